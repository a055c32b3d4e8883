"""What an episode is, what a task's fields are, and what an actor must know of a task.

Shape letters: T timesteps, A action dimensions, H, W, C image height, width, channels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import numpy as np

Modality = Literal["text", "image", "discrete", "continuous"]
MODALITIES = ("text", "image", "discrete", "continuous")
#: discrete values lie in [0, DISCRETE_VALUES) (Gato: row-major integers in [0, 1024))
DISCRETE_VALUES = 1024


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskInfo:
    """What an actor needs to know of a control task: its stored observation fields and its
    action space. Built from a live env (``ControlTask.info``) or from the ``task.json`` a
    collector wrote (``TaskInfo.from_meta``), so a policy reads observations exactly as the
    collectors stored them.

    Continuous actions are stored scaled from the env's ``[low, high]`` to ``[-1, 1]``;
    ``to_env_action`` maps a stored action back.
    """

    name: str
    obs_spec: dict[str, FieldSpec]
    action_kind: Literal["discrete", "continuous"]
    #: number of actions (discrete) or action dimensions (continuous)
    action_dim: int
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.action_kind not in ("discrete", "continuous"):
            raise ValueError(f"{self.name}: action_kind must be 'discrete' or 'continuous', "
                             f"got {self.action_kind!r}")
        if self.action_dim < 1:
            raise ValueError(f"{self.name}: action_dim must be >= 1, got {self.action_dim}")
        if self.action_kind == "continuous":
            for field in ("action_low", "action_high"):
                bound = getattr(self, field)
                if bound is None or len(bound) != self.action_dim:
                    raise ValueError(f"{self.name}: {field} must hold {self.action_dim} numbers "
                                     f"for a continuous action, got {bound!r}")
        if not self.obs_spec:
            raise ValueError(f"{self.name}: obs_spec names no observation field")

    @classmethod
    def from_meta(cls, meta: dict) -> "TaskInfo":
        """From a stored task's ``task.json``."""
        try:
            low, high = meta.get("action_low"), meta.get("action_high")
            return cls(name=meta["task"],
                       obs_spec={k: FieldSpec.from_json(v) for k, v in meta["obs_spec"].items()},
                       action_kind=meta["action_kind"], action_dim=int(meta["action_dim"]),
                       action_low=None if low is None else tuple(float(x) for x in low),
                       action_high=None if high is None else tuple(float(x) for x in high))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"task.json of {meta.get('task', '?')} is not a control task's "
                             f"(missing or malformed {exc})") from None

    # ------------------------------------------------------------------ actions
    def scale_action(self, action: Any) -> np.ndarray:
        """Env action -> stored action (int64 index, or float32 in [-1, 1])."""
        if self.action_kind == "discrete":
            return np.int64(action)
        low = np.asarray(self.action_low, np.float32)
        high = np.asarray(self.action_high, np.float32)
        a = np.asarray(action, np.float32).reshape(self.action_dim)
        return np.clip(2.0 * (a - low) / (high - low) - 1.0, -1.0, 1.0)

    def to_env_action(self, stored: Any) -> Any:
        """Stored action -> env action: an int, or float32 values in ``[low, high]``."""
        if self.action_kind == "discrete":
            return int(stored)
        low = np.asarray(self.action_low, np.float32)
        high = np.asarray(self.action_high, np.float32)
        a = np.clip(np.asarray(stored, np.float32).reshape(self.action_dim), -1.0, 1.0)
        return (low + (a + 1.0) * 0.5 * (high - low)).astype(np.float32)

    # ------------------------------------------------------------- observations
    def check_observation(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """One step's stored fields, checked against ``obs_spec``; ``ValueError`` naming the
        key for a missing or unknown key, a wrong shape or dtype, a non-finite value or a
        discrete value outside ``[0, NUM_BINS)``. Returns the fields as arrays (text: str)."""
        if not isinstance(fields, Mapping):
            raise ValueError(f"{self.name}: an observation must be a dict of "
                             f"{sorted(self.obs_spec)}, got {type(fields).__name__}")
        missing = sorted(set(self.obs_spec) - set(fields))
        unknown = sorted(set(fields) - set(self.obs_spec))
        if missing or unknown:
            raise ValueError(f"{self.name}: observation keys must be {sorted(self.obs_spec)}; "
                             f"missing {missing}, unknown {unknown}")
        out: dict[str, Any] = {}
        for key, spec in self.obs_spec.items():
            value = fields[key]
            where = f"{self.name}: observation {key!r}"
            if spec.modality == "text":
                if not isinstance(value, str):
                    raise ValueError(f"{where} must be a str, got {type(value).__name__}")
                out[key] = value
                continue
            arr = np.asarray(value)
            if arr.shape != tuple(spec.shape):
                raise ValueError(f"{where} must have shape {tuple(spec.shape)}, got {arr.shape}")
            if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
                raise ValueError(f"{where} must be numeric ({spec.dtype}), got dtype {arr.dtype}")
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise ValueError(f"{where} holds a non-finite value (NaN or inf)")
            if spec.modality == "discrete":
                if np.issubdtype(arr.dtype, np.floating) and (arr != np.round(arr)).any():
                    raise ValueError(f"{where} is discrete and must hold integers, got {arr.dtype} "
                                     f"values with fractions")
                if arr.size and (arr.min() < 0 or arr.max() >= DISCRETE_VALUES):
                    raise ValueError(f"{where} is discrete and must lie in [0, {DISCRETE_VALUES}), "
                                     f"got min {arr.min()} max {arr.max()}")
            if spec.modality == "image" and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(f"{where} is an image and must hold pixels in [0, 255]")
            out[key] = arr.astype(spec.dtype, copy=False)
        return out
