"""The task registry and the suites built from it.

A task name is ``domain/env-id``. ``kind`` says what a dataset row is: an episode
("control"), a captioned image ("caption") or a text document ("text"). ``episodes`` is
how many rows the default suite stores (control tasks measure expert and random returns
over at least ``RETURN_EPISODES`` episodes each, whatever is stored). One task in each of
BabyAI, Meta-World and classic control is ``held_out``: collected and scored, never trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

RETURN_EPISODES = 20
DOMAINS = ("babyai", "metaworld", "classic", "atari", "vl", "text")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSpec:
    name: str
    kind: Literal["control", "caption", "text"] = "control"
    episodes: int = 20
    held_out: bool = False
    images: bool = False

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS or "/" not in self.name:
            raise ValueError(f"name must be 'domain/env-id' with domain in {list(DOMAINS)}, "
                             f"got {self.name!r}")
        if self.kind not in ("control", "caption", "text"):
            raise ValueError(f"kind must be 'control', 'caption' or 'text', got {self.kind!r}")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")

    @property
    def domain(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def env_id(self) -> str:
        return self.name.split("/", 1)[1]


BABYAI_LEVELS = ("GoToRedBall", "GoToLocal", "PickupLoc", "PutNextLocal", "OpenDoor", "GoTo",
                 "UnlockPickup", "Synth")  # increasing difficulty
METAWORLD_TASKS = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
                   "button-press-topdown-v3", "window-open-v3", "window-close-v3",
                   "faucet-open-v3", "plate-slide-v3")
CLASSIC = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1",
           "MountainCarContinuous-v0")


def _registry() -> dict[str, TaskSpec]:
    specs = [TaskSpec(name=f"babyai/BabyAI-{lvl}-v0", episodes=40, images=True)
             for lvl in BABYAI_LEVELS]
    specs.append(TaskSpec(name="babyai/BabyAI-GoToObj-v0", episodes=20, images=True, held_out=True))
    specs += [TaskSpec(name=f"metaworld/{t}", episodes=12) for t in METAWORLD_TASKS]
    specs.append(TaskSpec(name="metaworld/drawer-close-v3", episodes=5, held_out=True))
    specs += [TaskSpec(name=f"classic/{e}", episodes=20) for e in CLASSIC]
    specs.append(TaskSpec(name="classic/LunarLander-v3", episodes=20, held_out=True))
    specs.append(TaskSpec(name="atari/Pong", episodes=2))  # one for validation
    specs.append(TaskSpec(name="atari/Breakout", episodes=3))
    specs.append(TaskSpec(name="vl/digits", kind="caption", episodes=1797))
    specs.append(TaskSpec(name="vl/babyai", kind="caption", episodes=2000))
    specs.append(TaskSpec(name="text/shakespeare", kind="text", episodes=100_000))
    return {s.name: s for s in specs}


TASKS: dict[str, TaskSpec] = _registry()
SUITES: dict[str, tuple[str, ...]] = {"default": tuple(TASKS)}


def resolve_tasks(suite: str = "default", names: list[str] | None = None) -> list[TaskSpec]:
    """Tasks of ``suite``, or only ``names`` among them; unknown names list the known."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known suites: {sorted(SUITES)}")
    known = SUITES[suite]
    if not names:
        return [TASKS[n] for n in known]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in suite {suite!r}; known tasks:\n  "
                         + "\n  ".join(known))
    return [TASKS[n] for n in names]


def make_control_task(spec: TaskSpec):
    """The ``ControlTask`` (env + expert) of a control task."""
    if spec.domain == "babyai":
        from moe_gato.envs.babyai import BabyAITask
        return BabyAITask(spec.env_id, images=spec.images)
    if spec.domain == "metaworld":
        from moe_gato.envs.meta_world import MetaWorldTask
        return MetaWorldTask(spec.env_id, images=spec.images)
    if spec.domain == "classic":
        from moe_gato.envs.classic import ClassicTask
        return ClassicTask(spec.env_id)
    if spec.domain == "atari":
        from moe_gato.envs.atari import AtariTask
        return AtariTask(spec.env_id)
    raise ValueError(f"{spec.name} is not a control task")
