"""Control tasks: an environment and its expert.

A ``ControlTask`` subclass says how to reset and step its environment, what its expert
does, and how a raw observation becomes the stored fields (``obs_spec``). The episode
loop that drives it with any actor (expert, random, trained policy) is ``moe_gato.envs.loop``.
Continuous actions are stored scaled from the env's action space ``[low, high]`` to
``[-1, 1]`` (``action_low``/``action_high`` are stored with the task so a policy can map back).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np

from moe_gato.envs.episode import FieldSpec, TaskInfo


class ControlTask:
    domain: str = ""
    action_kind: Literal["discrete", "continuous"] = "discrete"
    #: number of actions (discrete) or action dimensions (continuous)
    action_dim: int = 1
    action_low: list[float] | None = None
    action_high: list[float] | None = None
    max_steps: int = 1000
    #: whether episodes report ``info["success"]`` (BabyAI, Meta-World)
    has_success: bool = False
    obs_spec: dict[str, FieldSpec] = {}

    def __init__(self, env_id: str, *, images: bool = False) -> None:
        self.env_id = env_id
        self.images = images

    # --- what a subclass provides -------------------------------------------------
    def reset(self, seed: int) -> Any:
        raise NotImplementedError

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        raise NotImplementedError

    def expert_action(self, raw_obs: Any) -> Any:
        raise NotImplementedError

    def random_action(self, rng: np.random.Generator) -> Any:
        if self.action_kind == "discrete":
            return int(rng.integers(self.action_dim))
        return rng.uniform(self.action_low, self.action_high).astype(np.float32)

    def observe(self, raw_obs: Any) -> dict[str, Any]:
        """Stored fields of one step (what the collectors record and a policy reads)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --- shared ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.domain}/{self.env_id}"

    @functools.cached_property
    def info(self) -> TaskInfo:
        """The task's fields and action space, as a policy needs them (read once, after the
        subclass has set them up)."""
        low = None if self.action_low is None else tuple(self.action_low)
        high = None if self.action_high is None else tuple(self.action_high)
        return TaskInfo(name=self.name, obs_spec=dict(self.obs_spec), action_kind=self.action_kind,
                        action_dim=self.action_dim, action_low=low, action_high=high)



class GymTask(ControlTask):
    """A gymnasium environment held by ``self.env``."""

    env: Any = None

    def reset(self, seed: int) -> Any:
        obs, _ = self.env.reset(seed=seed)
        self.env.action_space.seed(seed)
        return obs

    def step(self, action: Any):
        return self.env.step(action)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
