"""Atari (ale-py; the ROMs ship in the wheel) with RAM-reading scripted players.

Stored field per step: ``frame`` (64, 64) uint8, the grey screen downscaled (16 patches
of 16x16; Pong games of the scripted player last ~20k steps, so frames are kept small). Actions index the game's minimal action
set. Frame skip 2, sticky actions off; each episode's randomness comes from the player's
own exploration (``EPSILON`` random actions), seeded per episode.

RAM addresses (checked by moving the paddle and watching the bytes change):
Pong   49 ball x (the player's paddle column is x ~ 188), 54 ball y (0 while no ball is in
       play), 51 player paddle y (RIGHT moves it up, i.e. lowers the value).
Breakout 72 paddle x, 99 ball x, 101 ball y.
"""

from __future__ import annotations

import numpy as np

from moe_gato.envs.base import GymTask
from moe_gato.envs.episode import FieldSpec

FRAME = 64
FRAMESKIP = 2
EPSILON = 0.03


def _reflect(y: float, lo: float, hi: float) -> float:
    while y < lo or y > hi:
        y = 2 * lo - y if y < lo else 2 * hi - y
    return y


class PongPlayer:
    """Looks ahead in a cloned emulator state for where the ball will cross the paddle's
    column, then holds the paddle so the ball meets its upper edge (a steep return the
    computer player misses)."""

    PADDLE_X, OFFSET = 188, -6

    def __init__(self) -> None:
        self.prev = None
        self.target = None

    def reset(self) -> None:
        self.prev = self.target = None

    def _intercept(self, ale) -> int | None:
        state = ale.cloneState()
        y = None
        for _ in range(200):
            ale.act(0)
            ram = ale.getRAM()
            if ram[54] == 0:
                break
            if ram[49] >= self.PADDLE_X:
                y = int(ram[54])
                break
        ale.restoreState(state)
        return y

    def __call__(self, ale) -> int:
        ram = ale.getRAM()
        bx, by, py = int(ram[49]), int(ram[54]), int(ram[51])
        if self.prev is not None and by != 0 and bx > self.prev[0]:
            if self.target is None:
                self.target = self._intercept(ale)
        else:
            self.target = None
        self.prev = (bx, by) if by != 0 else None
        goal = self.target if self.target is not None else (by or 110)
        d = goal + self.OFFSET - py
        return 0 if abs(d) <= 1 else (3 if d > 0 else 2)  # NOOP, LEFT (down), RIGHT (up)


class BreakoutPlayer:
    """Keeps the paddle under the ball; fires to serve."""

    OFFSET = 8

    def __init__(self) -> None:
        self.prev = None

    def reset(self) -> None:
        self.prev = None

    def __call__(self, ale) -> int:
        ram = ale.getRAM()
        px, bx, by = int(ram[72]), int(ram[99]), int(ram[101])
        if by == 0:
            return 1  # FIRE
        d = bx - (px + self.OFFSET)
        return 0 if abs(d) <= 2 else (2 if d > 0 else 3)  # NOOP, RIGHT, LEFT


PLAYERS = {"Pong": PongPlayer, "Breakout": BreakoutPlayer}


class AtariTask(GymTask):
    domain = "atari"
    action_kind = "discrete"
    max_steps = 27_000

    def __init__(self, env_id: str, *, images: bool = True) -> None:
        import ale_py
        import gymnasium as gym

        super().__init__(env_id, images=True)
        if env_id not in PLAYERS:
            raise ValueError(f"no scripted Atari player for {env_id!r}; known: {sorted(PLAYERS)}")
        gym.register_envs(ale_py)
        self.env = gym.make(f"ALE/{env_id}-v5", frameskip=FRAMESKIP,
                            repeat_action_probability=0.0, obs_type="grayscale")
        self.action_dim = int(self.env.action_space.n)
        self.player = PLAYERS[env_id]()
        self.obs_spec = {"frame": FieldSpec(modality="image", dtype="uint8", shape=(FRAME, FRAME))}
        self._rng = np.random.default_rng(0)

    def reset(self, seed: int):
        self.player.reset()
        self._rng = np.random.default_rng([seed, 1])
        return super().reset(seed)

    def expert_action(self, raw_obs) -> int:
        action = self.player(self.env.unwrapped.ale)
        if self._rng.random() < EPSILON:
            action = int(self._rng.integers(self.action_dim))
        return action

    def observe(self, raw_obs) -> dict:
        from PIL import Image

        small = Image.fromarray(raw_obs).resize((FRAME, FRAME), Image.BILINEAR)
        return {"frame": np.asarray(small, np.uint8)}
