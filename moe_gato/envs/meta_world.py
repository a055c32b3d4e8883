"""Meta-World (metaworld 3.x) tasks with the scripted ``metaworld.policies`` experts.

Stored fields per step: ``state`` (39,) float32 (continuous) and with ``images=True``
``rgb`` (64, 64, 3) uint8 from the ``corner`` camera, rendered headless
(``MUJOCO_GL=egl``) with shadows, reflections, skybox and multisampling off.
Actions are 4-d in [-1, 1] (the env's own range). The object and goal positions of an
episode are drawn from the task's random reset space with the episode's seed. Episodes
run a fixed horizon
(``max_steps``, default 150: every expert of the suite succeeds well within it), so expert
and random returns sum the same number of dense rewards.
"""

from __future__ import annotations

import os

import numpy as np

from moe_gato.envs.base import GymTask
from moe_gato.envs.episode import FieldSpec

IMAGE_SIZE = 64
HORIZON = 150


class MetaWorldTask(GymTask):
    domain = "metaworld"
    has_success = True
    action_kind = "continuous"
    action_dim = 4
    action_low = [-1.0] * 4
    action_high = [1.0] * 4

    def __init__(self, env_id: str, *, images: bool = False, horizon: int = HORIZON) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")
        import gymnasium as gym
        import metaworld  # noqa: F401  (registers Meta-World/MT1)
        from metaworld.policies import ENV_POLICY_MAP

        super().__init__(env_id, images=images)
        if env_id not in ENV_POLICY_MAP:
            raise ValueError(f"no Meta-World expert for {env_id!r}; known: {sorted(ENV_POLICY_MAP)}")
        kwargs = dict(env_name=env_id, seed=0)
        if images:
            kwargs.update(render_mode="rgb_array", camera_name="corner",
                          width=IMAGE_SIZE, height=IMAGE_SIZE)
        self.env = gym.make("Meta-World/MT1", **kwargs)
        self.policy = ENV_POLICY_MAP[env_id]()
        self.max_steps = horizon
        self.obs_spec = {"state": FieldSpec(modality="continuous", dtype="float32", shape=(39,))}
        if images:
            self.obs_spec["rgb"] = FieldSpec(modality="image", dtype="uint8",
                                             shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
            quality = self.env.unwrapped.model.vis.quality
            quality.shadowsize = 0
            quality.offsamples = 0
        self._fast_scene = False
        # MT1 picks one of 50 goal configurations per reset from a generator seeded when the
        # env is built, whatever seed reset() gets: a fresh env replays the same goals.
        # Instead every episode samples its own from its seed (reset below), so that
        # evaluation seeds give configurations the collection never saw.
        self.env.get_wrapper_attr("sample_tasks")()  # sets a task: goal observed, steps allowed
        self.env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)

    def reset(self, seed: int):
        base = self.env.unwrapped
        base.seed(seed)
        base._freeze_rand_vec, base.seeded_rand_vec = False, True
        return super().reset(seed)

    def expert_action(self, raw_obs) -> np.ndarray:
        return np.clip(self.policy.get_action(raw_obs), -1.0, 1.0).astype(np.float32)

    def _render(self) -> np.ndarray:
        frame = self.env.render()
        if not self._fast_scene:
            import mujoco

            viewer = self.env.unwrapped.mujoco_renderer._get_viewer("rgb_array")
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                         mujoco.mjtRndFlag.mjRND_SKYBOX):
                viewer.scn.flags[flag] = 0
            self._fast_scene = True
            frame = self.env.render()
        return np.ascontiguousarray(frame[::-1])  # the corner camera renders upside down

    def observe(self, raw_obs) -> dict:
        out = {"state": np.asarray(raw_obs, np.float32)}
        if self.images:
            out["rgb"] = self._render()
        return out
