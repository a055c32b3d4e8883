"""Inference: a trained checkpoint acting in the environments (KV cache, top-k routing).

    policy = Policy.from_checkpoint("runs/demo/teacher")
    policy.reset(task.info); action = policy.act(task.observe(raw_obs))
    run_episode(task, PolicyActor(policy), seed)          # moe_gato.envs.loop
"""

from moe_gato.inference.actor import PolicyActor
from moe_gato.inference.policy import Policy

__all__ = ["Policy", "PolicyActor"]
