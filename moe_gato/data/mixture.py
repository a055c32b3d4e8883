"""The data mixture: which tasks a model trains on, how often, and the packing settings.

    cfg = load_config(MixtureConfig, "configs/data/default.yaml", ["context_len=512"])

``tasks`` maps a task name to its sampling weight (normalized over the listed tasks, in
the manner of Gato's Table 1). Each task's last ``validation_fraction`` of rows (at least
one) is its validation split.

Where the gradient goes. Gato's loss is a mean over all text and action targets of a batch
(``loss_weighting: token``): a task's share of the gradient is then its share of the
*targets*, not of the draws — a classic-control sequence holds ~100 action targets, a BabyAI
one 3 actions and 3 repeated missions. ``loss_weighting: sequence`` gives each sequence's
targets one unit in all, so the mixture weights are the tasks' shares of the gradient.
``mission_targets`` decides whether a text observation of a control episode (BabyAI's
mission, repeated at every timestep) is a target at every timestep (Gato), only at the
episode's first, or never. ``moe-gato targets`` counts the shares a mixture gives.

Fine-tuning (``moe-gato finetune``) trains on a few demonstrations of a task, often a
held-out one: ``train_episodes`` keeps only the first N rows of a task's training split
(its validation split is unchanged), and ``allow_held_out`` lets held-out tasks into the
mixture, which is refused otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from moe_gato.config import load_config

__all__ = ["MixtureConfig", "load_mixture"]


@dataclasses.dataclass(kw_only=True)
class MixtureConfig:
    data_dir: str = "data"
    context_len: int = 1024
    prompt_prob: float = 0.25
    #: a prompt takes at most this share of the context (whole timesteps)
    prompt_share: float = 0.5
    validation_fraction: float = 0.1
    #: tokenized episodes kept in memory (LRU), in MiB
    cache_mb: int = 1024
    #: "token" (Gato): every target weighs one; "sequence": a sequence's targets share one
    #: unit, so each task's share of the gradient is its share of the draws
    loss_weighting: Literal["token", "sequence"] = "token"
    #: a control episode's text observation (BabyAI's mission) is a target at "all" its
    #: timesteps (Gato), only at the episode's "first", or at "none"
    mission_targets: Literal["all", "first", "none"] = "all"
    tasks: dict[str, float] = dataclasses.field(default_factory=dict)
    #: at most this many training rows (episodes) of a task: the first ones of its split
    train_episodes: dict[str, int] = dataclasses.field(default_factory=dict)
    #: held-out tasks may be in ``tasks`` (fine-tuning on them on purpose)
    allow_held_out: bool = False

    def __post_init__(self) -> None:
        if self.context_len < 2:
            raise ValueError(f"context_len must be an integer >= 2, got {self.context_len}")
        if not 0.0 <= self.prompt_prob <= 1.0:
            raise ValueError(f"prompt_prob must lie in [0, 1], got {self.prompt_prob}")
        if not 0.0 < self.prompt_share < 1.0:
            raise ValueError(f"prompt_share must lie in (0, 1), got {self.prompt_share}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")
        if self.loss_weighting not in ("token", "sequence"):
            raise ValueError(f"loss_weighting must be 'token' or 'sequence', "
                             f"got {self.loss_weighting!r}")
        if self.mission_targets not in ("all", "first", "none"):
            raise ValueError(f"mission_targets must be 'all', 'first' or 'none', "
                             f"got {self.mission_targets!r}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task with a weight > 0")
        for name, weight in self.tasks.items():
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"tasks.{name}: weight must be a finite number > 0, got {weight}")
        for name, n in self.train_episodes.items():
            if name not in self.tasks:
                raise ValueError(f"train_episodes.{name}: not a task of the mixture; tasks are "
                                 f"{list(self.tasks)}")
            if n < 1:
                raise ValueError(f"train_episodes.{name} must be >= 1, got {n}")


def load_mixture(path: str, overrides: list[str] | tuple[str, ...] = ()) -> MixtureConfig:
    return load_config(MixtureConfig, path, overrides)
