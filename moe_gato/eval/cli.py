"""``moe-gato eval``: a checkpoint's rollouts in the real environments, scored.

    moe-gato eval --checkpoint runs/demo/teacher --tasks default --episodes 20 --out runs/demo/eval-all
    moe-gato eval --checkpoint runs/demo/teacher/checkpoints/step_00000500 \\
        --tasks classic/CartPole-v1,babyai/BabyAI-GoToRedBall-v0 --episodes 50 --prompt
    moe-gato eval --checkpoint runs/demo/teacher --tasks classic/CartPole-v1 --out runs/p4 \\
        --prompt --prompt-demos 4 --prompt-share 0.5

Writes ``OUT/eval.json``, ``OUT/eval.md`` (a table) and ``OUT/eval.png``; running the same
command again keeps the tasks already finished.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moe_gato.eval.evaluate import EvalConfig

    d = EvalConfig()
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (its newest valid checkpoint) or a checkpoint folder")
    p.add_argument("--data", default="data", help="the collected suite (expert/random returns, "
                   "held-out rows, prompts); default: data")
    p.add_argument("--tasks", default="default",
                   help="a suite name or comma-separated task names (default: default)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--episodes", type=int, default=d.episodes,
                   help=f"rollouts per control task (default {d.episodes}; Gato used 50)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"environments stepped together (default {d.batch_size})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="0 (default): greedy actions; > 0 samples")
    p.add_argument("--prompt", action="store_true",
                   help="prefix a successful expert demonstration of the task (Gato's eval)")
    p.add_argument("--prompt-demos", type=int, default=d.prompt_demos,
                   help="demonstrations in the prompt, sharing its part of the context "
                        f"(default {d.prompt_demos}; with --prompt)")
    p.add_argument("--prompt-share", type=float, default=d.prompt_share,
                   help=f"largest share of the context the prompt may take (default {d.prompt_share})")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap on an episode's steps (default: the task's own limit)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"first rollout seed (default {d.seed}; must not overlap the collection's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA-graphed control steps (with --device cuda; a dropless MoE "
                        "without added experts)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch CPU threads (default {d.threads}: see EvalConfig)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("MUJOCO_GL", "egl")
    from moe_gato.eval.evaluate import EvalConfig, evaluate
    from moe_gato.eval.report import markdown

    if not args.out:
        raise ValueError("--out must name a folder")
    cfg = EvalConfig(episodes=args.episodes, batch_size=args.batch_size,
                     temperature=args.temperature, prompt=args.prompt,
                     prompt_demos=args.prompt_demos, prompt_share=args.prompt_share,
                     max_steps=args.max_steps, seed=args.seed, device=args.device,
                     graphs=args.graphs, threads=args.threads)
    doc = evaluate(args.checkpoint, data_dir=args.data, out=args.out, tasks=args.tasks, cfg=cfg,
                   progress=not args.no_progress)
    print(markdown(doc))
    print(f"\nwrote {args.out}/eval.json, eval.md, eval.png")
    return 0
