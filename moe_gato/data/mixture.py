"""The data mixture: which tasks a model trains on, how often, and the packing settings.

    cfg = load_config(MixtureConfig, "configs/data/default.yaml", ["context_len=512"])

``tasks`` maps a task name to its sampling weight (normalized over the listed tasks, in
the manner of Gato's Table 1). Each task's last ``validation_fraction`` of rows (at least
one) is its validation split.
"""

from __future__ import annotations

import dataclasses
import math

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
    tasks: dict[str, float] = dataclasses.field(default_factory=dict)

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
        if not self.tasks:
            raise ValueError("tasks must name at least one task with a weight > 0")
        for name, weight in self.tasks.items():
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"tasks.{name}: weight must be a finite number > 0, got {weight}")


def load_mixture(path: str, overrides: list[str] | tuple[str, ...] = ()) -> MixtureConfig:
    return load_config(MixtureConfig, path, overrides)
