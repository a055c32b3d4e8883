"""One episode loop for any actor: the expert, a random actor, or a trained policy.

    ep = run_episode(task, ExpertActor(), seed=3)                   # what collection records
    ep = run_episode(task, RandomActor(), seed=3, record=False)     # the random baseline
    eps = run_episodes(tasks, actor, seeds)                          # N envs stepped together

An actor sees each step's raw env observation (the scripted experts read it, or the env
itself) and the stored fields of that step (``task.observe``: what the collectors record
and what a trained policy reads). ``run_episodes`` steps N environments of one task in
lock-step and asks a ``BatchActor`` for all their actions at once; environments whose
episode has ended drop out of the batch (ragged ends).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Protocol, Sequence

import numpy as np

from moe_gato.envs.base import ControlTask
from moe_gato.envs.episode import Episode


class Actor(Protocol):
    #: whether ``act`` reads the stored fields (computed only then, or when recording)
    wants_fields: bool

    def reset(self, task: ControlTask, seed: int) -> None: ...

    def act(self, raw_obs: Any, fields: dict[str, Any] | None) -> Any: ...


class BatchActor(Protocol):
    wants_fields: bool

    def reset_batch(self, tasks: Sequence[ControlTask], seeds: Sequence[int]) -> None: ...

    def act_batch(self, rows: Sequence[int], raw_obs: Sequence[Any],
                  fields: Sequence[dict[str, Any] | None]) -> list[Any]:
        """Actions for the still-running environments ``rows`` (indices into the batch)."""
        ...


class ExpertActor:
    """The task's scripted expert (it reads the raw observation or the env itself)."""

    wants_fields = False

    def reset(self, task: ControlTask, seed: int) -> None:
        self.task = task

    def act(self, raw_obs, fields):
        return self.task.expert_action(raw_obs)


class RandomActor:
    """Uniform random actions, seeded by the episode's seed."""

    wants_fields = False

    def reset(self, task: ControlTask, seed: int) -> None:
        self.task, self.rng = task, np.random.default_rng(seed)

    def act(self, raw_obs, fields):
        return self.task.random_action(self.rng)


class _Recorder:
    """Collects one episode's fields, actions and rewards."""

    def __init__(self, task: ControlTask, seed: int, record: bool):
        self.task, self.seed, self.record = task, seed, record
        self.fields: dict[str, list] = {k: [] for k in task.obs_spec}
        self.actions: list = []
        self.rewards: list[float] = []
        self.success = False
        self.done = False

    def add(self, fields, action, reward: float, terminated: bool, truncated: bool, info: dict):
        if self.record:
            for key, value in fields.items():
                self.fields[key].append(value)
        self.actions.append(self.task.info.scale_action(action))
        self.rewards.append(reward)
        self.success = self.success or bool(info.get("success", False))
        self.done = terminated or truncated or len(self.actions) >= self.task.max_steps

    def episode(self) -> Episode:
        observations: dict[str, Any] = {}
        if self.record:
            for key, spec in self.task.obs_spec.items():
                if spec.modality == "text":
                    observations[key] = [str(s) for s in self.fields[key]]
                else:
                    observations[key] = np.asarray(self.fields[key], dtype=spec.dtype)
        act_dtype = np.int64 if self.task.action_kind == "discrete" else np.float32
        return Episode(observations=observations, actions=np.asarray(self.actions, act_dtype),
                       rewards=np.asarray(self.rewards, np.float32), success=self.success,
                       seed=self.seed)


def _reset(task: ControlTask, seed: int):
    with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints sampling retries
        return task.reset(seed)


def run_episode(task: ControlTask, actor: Actor, seed: int, *, record: bool = True) -> Episode:
    """Runs one episode of ``task`` (at most ``task.max_steps`` steps) driven by ``actor``;
    with ``record`` the episode keeps the stored fields of every step."""
    raw = _reset(task, seed)
    actor.reset(task, seed)
    rec = _Recorder(task, seed, record)
    while not rec.done:
        fields = task.observe(raw) if (record or actor.wants_fields) else None
        action = actor.act(raw, fields)
        raw, reward, terminated, truncated, info = task.step(action)
        rec.add(fields, action, reward, terminated, truncated, info)
    return rec.episode()


def run_episodes(tasks: Sequence[ControlTask], actor: BatchActor, seeds: Sequence[int], *,
                 record: bool = False, on_episode_end=None) -> list[Episode]:
    """Runs one episode in each of ``tasks`` (N environments of one task) in lock-step:
    one ``act_batch`` call per step for every environment still running. Returns the
    episodes in the order of ``seeds``; ``on_episode_end(i, episode)`` is called as each
    one ends."""
    if len(tasks) != len(seeds) or not tasks:
        raise ValueError(f"run_episodes needs one seed per environment, got {len(tasks)} "
                         f"environments and {len(seeds)} seeds")
    if len({t.name for t in tasks}) != 1:
        raise ValueError(f"run_episodes steps environments of one task, got "
                         f"{sorted({t.name for t in tasks})}")
    raws = [_reset(t, s) for t, s in zip(tasks, seeds, strict=True)]
    actor.reset_batch(tasks, seeds)
    recs = [_Recorder(t, s, record) for t, s in zip(tasks, seeds, strict=True)]
    episodes: list[Episode | None] = [None] * len(tasks)
    while True:
        rows = [i for i, r in enumerate(recs) if not r.done]
        if not rows:
            break
        fields = [tasks[i].observe(raws[i]) if (record or actor.wants_fields) else None
                  for i in rows]
        actions = actor.act_batch(rows, [raws[i] for i in rows], fields)
        for i, f, action in zip(rows, fields, actions, strict=True):
            raws[i], reward, terminated, truncated, info = tasks[i].step(action)
            recs[i].add(f, action, reward, terminated, truncated, info)
            if recs[i].done:
                episodes[i] = recs[i].episode()
                if on_episode_end is not None:
                    on_episode_end(i, episodes[i])
    return episodes  # type: ignore[return-value]
