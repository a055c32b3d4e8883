"""BabyAI levels (minigrid) with ``BabyAIBot`` as the expert.

Stored fields per step: ``grid`` (7, 7, 3) uint8 object/colour/state ids (discrete),
``direction`` () int64 (discrete, 0-3), ``mission`` (text), and with ``images=True``
``rgb`` (56, 56, 3) uint8, the agent's partial view drawn with 8-pixel tiles.
The bot reads the env object, so it runs in the same process as the env.
"""

from __future__ import annotations

import numpy as np

from moe_gato.envs.base import GymTask
from moe_gato.envs.episode import FieldSpec

TILE = 8


class BabyAITask(GymTask):
    domain = "babyai"
    has_success = True
    action_kind = "discrete"

    def __init__(self, env_id: str, *, images: bool = True) -> None:
        import gymnasium as gym
        import minigrid  # noqa: F401  (registers the BabyAI-* ids)

        super().__init__(env_id, images=images)
        self.env = gym.make(env_id)
        self.action_dim = int(self.env.action_space.n)
        self.max_steps = 100_000  # the level truncates itself at its own max_steps
        self.obs_spec = {
            "direction": FieldSpec(modality="discrete", dtype="int64", shape=()),
            "grid": FieldSpec(modality="discrete", dtype="uint8", shape=(7, 7, 3)),
            "mission": FieldSpec(modality="text", dtype="str"),
        }
        if images:
            self.obs_spec["rgb"] = FieldSpec(modality="image", dtype="uint8",
                                             shape=(7 * TILE, 7 * TILE, 3))
        self._bot = None

    def reset(self, seed: int):
        from minigrid.utils.baby_ai_bot import BabyAIBot

        obs = super().reset(seed)
        self._bot = BabyAIBot(self.env.unwrapped)
        return obs

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["success"] = bool(terminated and reward > 0)  # the mission was accomplished
        return obs, reward, terminated, truncated, info

    def expert_action(self, raw_obs) -> int:
        return int(self._bot.replan())

    def observe(self, raw_obs) -> dict:
        out = {"direction": np.int64(raw_obs["direction"]), "grid": raw_obs["image"],
               "mission": raw_obs["mission"]}
        if self.images:
            out["rgb"] = self.env.unwrapped.get_frame(tile_size=TILE, agent_pov=True)
        return out
