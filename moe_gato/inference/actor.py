"""``PolicyActor``: a ``Policy`` as an actor of ``moe_gato.envs.loop`` (one env or a batch).

    ep = run_episode(task, PolicyActor(policy), seed)
    eps = run_episodes(tasks, PolicyActor(policy, prompt=demo), seeds)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from moe_gato.envs import ControlTask, Episode
from moe_gato.inference.policy import Policy


class PolicyActor:
    """Drives the episode loop with ``policy``. ``prompt``: an episode or a list of them (or
    a function of the episode's seed returning one, a list or None) prefixed as
    demonstrations at every reset."""

    wants_fields = True

    def __init__(self, policy: Policy,
                 prompt: Episode | list[Episode] | Callable[[int], Episode | list[Episode] | None]
                 | None = None) -> None:
        self.policy = policy
        self.prompt = prompt

    def _prompt(self, seed: int) -> Episode | list[Episode] | None:
        return self.prompt(seed) if callable(self.prompt) else self.prompt

    def reset(self, task: ControlTask, seed: int) -> None:
        self.policy.reset(task.info, prompt=self._prompt(seed), seed=seed)

    def act(self, raw_obs: Any, fields: dict[str, Any]) -> Any:
        return self.policy.act(fields)

    def reset_batch(self, tasks: Sequence[ControlTask], seeds: Sequence[int]) -> None:
        self.policy.reset(tasks[0].info, batch_size=len(tasks), prompt=self._prompt(seeds[0]),
                          seed=seeds[0])

    def act_batch(self, rows: Sequence[int], raw_obs: Sequence[Any],
                  fields: Sequence[dict[str, Any]]) -> list[Any]:
        return self.policy.act_batch(fields, rows=rows)
