"""Environments, their scripted experts, and one episode loop for any actor.

    task = make_control_task(TASKS["classic/CartPole-v1"])
    ep = run_episode(task, ExpertActor(), seed=0)        # or RandomActor(), or a policy
    task.info                                            # TaskInfo: fields and action space

Modules: ``tasks`` (registry and suites), ``base`` (``ControlTask``), ``classic`` /
``babyai`` / ``meta_world`` / ``atari`` (environments and experts), ``episode``
(``Episode``, ``FieldSpec``, ``TaskInfo``), ``loop`` (actors, ``run_episode``,
``run_episodes``). Both data collection and evaluation run episodes through ``loop``.
"""

from moe_gato.envs.base import ControlTask
from moe_gato.envs.episode import Episode, FieldSpec, TaskInfo
from moe_gato.envs.loop import (Actor, BatchActor, ExpertActor, RandomActor, run_episode,
                                run_episodes)
from moe_gato.envs.tasks import (RETURN_EPISODES, SUITES, TASKS, TaskSpec, make_control_task,
                                 resolve_tasks)

__all__ = ["Actor", "BatchActor", "ControlTask", "Episode", "ExpertActor", "FieldSpec",
           "RETURN_EPISODES", "RandomActor", "SUITES", "TASKS", "TaskInfo", "TaskSpec",
           "make_control_task", "resolve_tasks", "run_episode", "run_episodes"]
