"""``moe-gato demo`` and ``moe-gato tokenize``: real expert episodes through the tokenizer.

    moe-gato demo                                     # BabyAI + Meta-World, first timestep each
    moe-gato tokenize --env BabyAI-GoToLocal-v0 --steps 2
    moe-gato tokenize --env metaworld/reach-v3 --steps 1 --seed 3

The demo grows with the pipeline (collect, train, compare); today it runs the expert of a
BabyAI level and of a Meta-World task for real and prints the tokens of their timesteps.
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np

from moe_gato.tokenizer import GatoTokenizer, TokenSequence


def babyai_expert_episode(env_id: str, seed: int, max_steps: int = 500):
    """Runs ``BabyAIBot`` on a BabyAI level; returns (observations, actions, return)."""
    import gymnasium as gym
    import minigrid  # noqa: F401
    from minigrid.utils.baby_ai_bot import BabyAIBot

    if env_id not in gym.registry:
        known = sorted(i for i in gym.registry if i.startswith("BabyAI-"))
        raise ValueError(f"unknown BabyAI level {env_id!r}; known: {', '.join(known[:8])}, ...")
    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    bot = BabyAIBot(env.unwrapped)
    steps, actions, ret = [], [], 0.0
    for _ in range(max_steps):
        action = int(bot.replan())
        steps.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        ret += float(reward)
        if terminated or truncated:
            break
    env.close()
    return steps, np.asarray(actions, np.int64), ret


def metaworld_expert_episode(task: str, seed: int, max_steps: int = 500):
    """Runs Meta-World's scripted policy on an MT1 task until success or ``max_steps``."""
    import gymnasium as gym
    import metaworld  # noqa: F401  (registers Meta-World/MT1)
    from metaworld.policies import ENV_POLICY_MAP

    if task not in ENV_POLICY_MAP:
        raise ValueError(f"unknown Meta-World task {task!r}; known: {', '.join(sorted(ENV_POLICY_MAP)[:8])}, ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make("Meta-World/MT1", env_name=task, seed=seed)
        obs, _ = env.reset(seed=seed)
        policy = ENV_POLICY_MAP[task]()
        observations, actions, ret = [], [], 0.0
        for _ in range(max_steps):
            action = np.clip(policy.get_action(obs), -1.0, 1.0).astype(np.float32)
            observations.append(np.asarray(obs, np.float32))
            actions.append(action)
            obs, reward, terminated, truncated, info = env.step(action)
            ret += float(reward)
            if terminated or truncated or info.get("success"):
                break
        env.close()
    return {"state": np.stack(observations)}, np.stack(actions), ret


def tokenize_env_episode(tok: GatoTokenizer, env: str, seed: int) -> tuple[TokenSequence, float]:
    if env.startswith("metaworld/"):
        obs, actions, ret = metaworld_expert_episode(env.split("/", 1)[1], seed)
        return tok.tokenize_episode(obs, actions, action_kind="continuous"), ret
    env_id = env.split("/", 1)[1] if env.startswith("babyai/") else env
    steps, actions, ret = babyai_expert_episode(env_id, seed)
    return tok.tokenize_episode(steps, actions, action_kind="discrete"), ret


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="BabyAI-GoToLocal-v0",
                   help="a BabyAI level id (BabyAI-*) or metaworld/<task>-v3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1, help="timesteps to print")


def run_tokenize(args: argparse.Namespace) -> int:
    tok = GatoTokenizer()
    seq, ret = tokenize_env_episode(tok, args.env, args.seed)
    steps = int(seq.timestep.max()) + 1
    print(f"{args.env} seed {args.seed}: expert return {ret:.2f}, {steps} timesteps, "
          f"{len(seq)} tokens, {int(seq.loss_mask.sum())} targets")
    print(tok.describe(seq, args.steps))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    for env in ("BabyAI-GoToLocal-v0", "metaworld/reach-v3"):
        run_tokenize(argparse.Namespace(env=env, seed=args.seed, steps=1))
        print()
    return 0
