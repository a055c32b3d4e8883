"""What a collector hands to storage: one episode, and the description of a task's fields.

Shape letters: T timesteps, A action dimensions, H, W, C image height, width, channels.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Modality = Literal["text", "image", "discrete", "continuous"]
MODALITIES = ("text", "image", "discrete", "continuous")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One observation field: its modality for the tokenizer, dtype and per-step shape."""

    modality: Modality
    dtype: str = "float32"
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {list(MODALITIES)}, got {self.modality!r}")
        if self.modality != "text":
            np.dtype(self.dtype)  # raises TypeError on a bad dtype

    def to_json(self) -> dict:
        return {"modality": self.modality, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "FieldSpec":
        return cls(modality=d["modality"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclasses.dataclass(kw_only=True)
class Episode:
    """One episode of a control task.

    observations  flat key -> (T, ...) array, or a list of T strings for text fields
    actions       (T,) int64 for discrete actions; (T, A) float32 in [-1, 1] for continuous
                  actions (the env's action space mapped to [-1, 1], see ``ControlTask``)
    rewards       (T,) float32
    """

    observations: dict[str, np.ndarray | list[str]]
    actions: np.ndarray
    rewards: np.ndarray
    success: bool
    seed: int

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def episode_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))
