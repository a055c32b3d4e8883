"""``moe-gato train``: thin over ``moe_gato.train.train``.

    moe-gato train --config configs/train/tiny-moe.yaml --data data --out runs/tiny-moe
    moe-gato train --config configs/train/tiny-moe.yaml --data data --out runs/x \\
        tokens=2000000 optim.lr=3e-4 model.moe.num_experts=8
    moe-gato train --config ... --out runs/x --overwrite   # moves the old runs/x aside
    torchrun --nproc-per-node 2 -m moe_gato.cli train --config ... expert_parallel_size=2
    deepspeed --num_gpus 8 -m moe_gato.cli train --config ... deepspeed.enabled=true
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="configs/train/<name>.yaml")
    p.add_argument("--data", default=None, help="collected suite (default: data.data_dir)")
    p.add_argument("--out", required=True, help="run directory (config, metrics, checkpoints)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: a run already in --out is moved aside to OUT.old-<time>")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. tokens=1000000 optim.lr=3e-4")


def run(args: argparse.Namespace) -> int:
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from moe_gato.train import TrainingError, load_train_config, train

    cfg = load_train_config(args.config, args.overrides)
    try:
        record = train(cfg, args.out, data_dir=args.data, overwrite=args.overwrite)
    except TrainingError as exc:  # training broke down: one line, exit 1 (bad input is 2)
        print(f"moe-gato train: error: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        if record:
            print(f"step {record['step']}: loss {record['loss']:.4f}"
                  + (f", eval/loss {record['eval/loss']:.4f}" if "eval/loss" in record else ""))
        else:
            print(f"{args.out} has already reached its budget of {cfg.num_steps} steps; "
                  f"nothing to do")
    return 0
