"""Control tasks: an environment, its expert, and the loop that records an episode.

A ``ControlTask`` subclass says how to reset and step its environment, what its expert
does, and how a raw observation becomes the stored fields (``obs_spec``). Continuous
actions are stored scaled from the env's action space ``[low, high]`` to ``[-1, 1]``
(``action_low``/``action_high`` are stored with the task so a policy can map back).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Literal

import numpy as np

from moe_gato.data.episode import Episode, FieldSpec

Policy = Literal["expert", "random"]


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
        """Stored fields of one step (called only when the episode is recorded)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --- shared ---------------------------------------------------------------------
    def scale_action(self, action: Any) -> np.ndarray:
        """Env action -> stored action (int64 index, or float32 in [-1, 1])."""
        if self.action_kind == "discrete":
            return np.int64(action)
        low = np.asarray(self.action_low, np.float32)
        high = np.asarray(self.action_high, np.float32)
        a = np.asarray(action, np.float32).reshape(self.action_dim)
        return np.clip(2.0 * (a - low) / (high - low) - 1.0, -1.0, 1.0)

    def unscale_action(self, action: np.ndarray) -> np.ndarray:
        """Stored action in [-1, 1] -> env action (what a trained policy sends)."""
        low = np.asarray(self.action_low, np.float32)
        high = np.asarray(self.action_high, np.float32)
        return low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (high - low)

    def run_episode(self, policy: Policy, seed: int, record: bool = True) -> Episode:
        rng = np.random.default_rng(seed)
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints sampling retries
            raw = self.reset(seed)
        fields: dict[str, list] = {k: [] for k in self.obs_spec}
        actions, rewards, success = [], [], False
        for _ in range(self.max_steps):
            action = self.expert_action(raw) if policy == "expert" else self.random_action(rng)
            if record:
                for key, value in self.observe(raw).items():
                    fields[key].append(value)
            raw, reward, terminated, truncated, info = self.step(action)
            actions.append(self.scale_action(action))
            rewards.append(reward)
            success = success or bool(info.get("success", False))
            if terminated or truncated:
                break
        observations: dict[str, Any] = {}
        if record:
            for key, spec in self.obs_spec.items():
                if spec.modality == "text":
                    observations[key] = [str(s) for s in fields[key]]
                else:
                    observations[key] = np.asarray(fields[key], dtype=spec.dtype)
        act_dtype = np.int64 if self.action_kind == "discrete" else np.float32
        return Episode(observations=observations, actions=np.asarray(actions, act_dtype),
                       rewards=np.asarray(rewards, np.float32), success=success, seed=seed)


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


# --- classic control ----------------------------------------------------------------

def _cartpole_expert(obs: np.ndarray) -> int:
    # sign of the force of an LQR controller on the linearised cart-pole
    x, x_dot, theta, theta_dot = obs
    return int(1.0 * x + 1.8 * x_dot + 20.0 * theta + 3.2 * theta_dot > 0)


def _acrobot_expert(obs: np.ndarray) -> int:
    # pump energy: torque in the direction of the second joint's velocity
    return 2 if obs[5] > 0 else 0


def _mountain_car_expert(obs: np.ndarray) -> int:
    return 2 if obs[1] >= 0 else 0


def _mountain_car_continuous_expert(obs: np.ndarray) -> np.ndarray:
    return np.array([1.0 if obs[1] >= 0 else -1.0], np.float32)


def _pendulum_expert(obs: np.ndarray) -> np.ndarray:
    # theta'' = 15 sin(theta) + 3 u with theta = 0 upright; E = theta'^2 / 2 + 15 cos(theta)
    cos, sin, theta_dot = obs
    theta = np.arctan2(sin, cos)
    if cos > 0.85:  # near the top: PD hold
        u = -12.0 * theta - 2.5 * theta_dot
    else:  # energy shaping swing-up towards E = 15
        energy = 0.5 * theta_dot**2 + 15.0 * cos
        u = -1.0 * (energy - 15.0) * np.sign(theta_dot if abs(theta_dot) > 1e-3 else 1.0)
    return np.array([np.clip(u, -2.0, 2.0)], np.float32)


_CLASSIC = {
    "CartPole-v1": (_cartpole_expert, 4),
    "Acrobot-v1": (_acrobot_expert, 6),
    "MountainCar-v0": (_mountain_car_expert, 2),
    "Pendulum-v1": (_pendulum_expert, 3),
    "MountainCarContinuous-v0": (_mountain_car_continuous_expert, 2),
}


class ClassicTask(GymTask):
    """gymnasium classic control with a scripted expert; observation 'state' (continuous)."""

    domain = "classic"

    def __init__(self, env_id: str, *, images: bool = False) -> None:
        import gymnasium as gym

        super().__init__(env_id, images=False)
        if env_id not in _CLASSIC:
            raise ValueError(f"no classic-control expert for {env_id!r}; known: {sorted(_CLASSIC)}")
        self._expert, obs_dim = _CLASSIC[env_id]
        self.env = gym.make(env_id)
        self.max_steps = int(self.env.spec.max_episode_steps)
        self.obs_spec = {"state": FieldSpec(modality="continuous", dtype="float32", shape=(obs_dim,))}
        space = self.env.action_space
        if hasattr(space, "n"):
            self.action_kind, self.action_dim = "discrete", int(space.n)
        else:
            self.action_kind, self.action_dim = "continuous", int(space.shape[0])
            self.action_low = [float(v) for v in space.low]
            self.action_high = [float(v) for v in space.high]

    def expert_action(self, raw_obs):
        return self._expert(raw_obs)

    def observe(self, raw_obs):
        return {"state": np.asarray(raw_obs, np.float32)}
