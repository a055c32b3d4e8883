"""Expert demonstrations and other training data, stored with HF datasets, and the loader
that turns them into packed Gato training sequences.

    moe-gato collect --suite default --out data/              # build the suite
    loader = SequenceLoader(load_mixture("configs/data/default.yaml"))

Modules: ``tasks`` (registry and suites), ``control`` / ``babyai`` / ``meta_world`` /
``atari`` (environments and experts), ``captions`` (vision-language and text rows),
``storage`` (on-disk format), ``collect`` (parallel, resumable collection), ``mixture``
(the mixture config), ``loader`` (``SequenceLoader``), ``cli``.
"""

from moe_gato.data.episode import Episode, FieldSpec
from moe_gato.data.loader import SequenceLoader, count_tokens, split_rows
from moe_gato.data.mixture import MixtureConfig, load_mixture
from moe_gato.data.storage import DataError, TaskData, read_manifest
from moe_gato.data.tasks import SUITES, TASKS, TaskSpec, make_control_task, resolve_tasks

__all__ = ["DataError", "Episode", "FieldSpec", "MixtureConfig", "SUITES", "SequenceLoader",
           "TASKS", "TaskData", "TaskSpec", "count_tokens", "load_mixture", "make_control_task",
           "read_manifest", "resolve_tasks", "split_rows"]
