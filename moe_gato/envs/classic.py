"""gymnasium classic control (and Box2D's LunarLander) with scripted experts; observation
'state' (continuous)."""

from __future__ import annotations

import functools

import numpy as np

from moe_gato.envs.base import GymTask
from moe_gato.envs.episode import FieldSpec


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


def _lunar_lander_expert(obs: np.ndarray, env) -> int:
    # gymnasium ships a PID-style lander with its Box2D environments (~260 return here)
    from gymnasium.envs.box2d.lunar_lander import heuristic

    return int(heuristic(env, obs))


_CLASSIC = {
    "CartPole-v1": (_cartpole_expert, 4),
    "Acrobot-v1": (_acrobot_expert, 6),
    "MountainCar-v0": (_mountain_car_expert, 2),
    "Pendulum-v1": (_pendulum_expert, 3),
    "MountainCarContinuous-v0": (_mountain_car_continuous_expert, 2),
    "LunarLander-v3": (_lunar_lander_expert, 8),  # needs the box2d package
}
#: experts that read the environment as well as the observation
_READS_ENV = {"LunarLander-v3"}


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
        if env_id in _READS_ENV:  # bound once: expert_action passes the observation only
            self._expert = functools.partial(self._expert, env=self.env.unwrapped)
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
