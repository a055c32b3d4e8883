"""Expert demonstrations and other training data, stored with HF datasets, and the loader
that turns them into packed Gato training sequences.

    moe-gato collect --suite default --out data/              # build the suite
    loader = SequenceLoader(load_mixture("configs/data/default.yaml"))

Modules: ``captions`` (vision-language and text rows), ``storage`` (on-disk format),
``collect`` (parallel, resumable collection of the tasks and experts of
``moe_gato.envs``), ``mixture`` (the mixture config), ``loader`` (``SequenceLoader``),
``cli``.
"""

from moe_gato.data.loader import SequenceLoader, count_tokens, split_rows
from moe_gato.data.mixture import MixtureConfig, load_mixture
from moe_gato.data.storage import DataError, TaskData, read_manifest

__all__ = ["DataError", "MixtureConfig", "SequenceLoader", "TaskData", "count_tokens",
           "load_mixture", "read_manifest", "split_rows"]
