"""``moe-gato demo`` (the main job: ``moe_gato.pipeline``) and ``moe-gato tokenize``.

    moe-gato demo                         # every stage on configs/demo/default.yaml
    moe-gato demo --quick                 # the same stages on the micro configuration
    moe-gato demo --stage eval --stage report        # some stages alone
    moe-gato demo --out runs/demo2 teacher.budget=2e13
    moe-gato tokenize --task babyai/BabyAI-GoToRedBall-v0 --seed 3
    moe-gato tokenize --task metaworld/reach-v3 --steps 2

The stages, their outputs and their own subcommands: ``moe_gato.pipeline``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moe_gato.tokenizer import GatoTokenizer, TokenSequence


# ------------------------------------------------------------------------ tokenize
def expert_episode(task: str, seed: int):
    """Runs the task's expert for real (the collectors' code); returns (episode, spec)."""
    from moe_gato.envs import TASKS, ExpertActor, make_control_task, run_episode

    spec = TASKS.get(task)
    if spec is None or spec.kind != "control":
        known = sorted(n for n, s in TASKS.items() if s.kind == "control")
        raise ValueError(f"unknown control task {task!r}; known: {', '.join(known)}")
    env = make_control_task(spec)
    try:
        episode = run_episode(env, ExpertActor(), seed)
    finally:
        env.close()
    return episode, env


def tokenize_expert_episode(tok: GatoTokenizer, task: str, seed: int) -> tuple[TokenSequence, float]:
    episode, env = expert_episode(task, seed)
    seq = tok.tokenize_episode(episode.observations, episode.actions, action_kind=env.action_kind,
                               spec={k: v.modality for k, v in env.obs_spec.items()})
    return seq, episode.episode_return


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="babyai/BabyAI-GoToLocal-v0",
                   help="a control task (domain/env-id), e.g. metaworld/reach-v3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1, help="timesteps to print")


def run_tokenize(args: argparse.Namespace) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    tok = GatoTokenizer()
    seq, ret = tokenize_expert_episode(tok, args.task, args.seed)
    steps = int(seq.timestep.max()) + 1
    print(f"{args.task} seed {args.seed}: expert return {ret:.2f}, {steps} timesteps, "
          f"{len(seq)} tokens, {int(seq.loss_mask.sum())} targets")
    print(tok.describe(seq, args.steps))
    return 0


# ---------------------------------------------------------------------------- demo
DEFAULT_CONFIG = "configs/demo/default.yaml"
QUICK_CONFIG = "configs/demo/quick.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moe_gato.pipeline import STAGE_NAMES

    p.add_argument("--config", default=None,
                   help=f"pipeline config (default {DEFAULT_CONFIG}; --quick: {QUICK_CONFIG})")
    p.add_argument("--quick", action="store_true",
                   help=f"the same stages on the micro configuration ({QUICK_CONFIG})")
    p.add_argument("--out", default=None, help="run folder (default: the config's out)")
    p.add_argument("--report", default=None,
                   help="report folder (default: the config's report, else reports/<today>)")
    p.add_argument("--stage", action="append", choices=STAGE_NAMES, default=None,
                   help="run only this stage (repeatable); its inputs must be done")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the pipeline config (teacher.budget=2e13)")


def run(args: argparse.Namespace) -> int:
    from moe_gato.pipeline import load_pipeline_config, run_pipeline

    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.config and args.quick:
        raise ValueError("--quick names its own config; pass --config or --quick, not both")
    path = args.config or (QUICK_CONFIG if args.quick else DEFAULT_CONFIG)
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    cfg = load_pipeline_config(path, overrides)
    run_pipeline(cfg, stages=args.stage, report=args.report)
    return 0
