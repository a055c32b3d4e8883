"""The one command line, ``moe-gato``; each subcommand is thin over importable functions.

    moe-gato demo                                   # the main job on the built-in default
    moe-gato demo --quick                           # its stages on the micro configuration
    moe-gato build-text-tokenizer --vocab-size 8192 --out moe_gato/assets/text_8192.model
    moe-gato tokenize --task babyai/BabyAI-GoToLocal-v0 --steps 2
    moe-gato collect --suite default --out data/
    moe-gato targets --config configs/data/recipe.yaml --data data loss_weighting=sequence
    moe-gato train --config configs/train/tiny-moe.yaml --data data --out runs/tiny-moe
    moe-gato finetune --checkpoint runs/demo/teacher --data data --tasks babyai/BabyAI-GoToObj-v0 \\
        --episodes 16 --mode new-expert --steps 200 --out runs/ft/gotoobj
    moe-gato eval --checkpoint runs/demo/teacher --tasks default --episodes 20 --out runs/demo/eval-all
    moe-gato sweep --config configs/sweep/tiny.yaml
    moe-gato fit --results runs/sweep/tiny/results.csv --out runs/sweep/tiny/fit
    moe-gato plan --budget 1e21 --hardware 64xH100 --hz 20 --fit runs/sweep/tiny/fit/fit.json
    moe-gato pick --sweep configs/sweep/tiny.yaml --budget 4e13 --out runs/demo/teacher.yaml
    moe-gato report --run runs/demo --out reports/2026-11-26
    python -m moe_gato.cli --help

Nothing runs at import time; subcommands import their modules when they run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: subcommand -> (module, function adding arguments, function running it, help)
SUBCOMMANDS = {
    "demo": ("moe_gato.demo", "add_arguments", "run", "run the main job on the built-in default"),
    "tokenize": ("moe_gato.demo", "add_tokenize_arguments", "run_tokenize",
                 "tokenize a real expert episode and print its token sequence"),
    "build-text-tokenizer": ("moe_gato.tokenizer.cli", "add_arguments", "run",
                             "train the SentencePiece text model on the project's corpus"),
    "collect": ("moe_gato.data.cli", "add_collect_arguments", "run_collect",
                "collect expert demonstrations into HF datasets on disk"),
    "targets": ("moe_gato.data.stats", "add_arguments", "run",
                "the share of the loss each task and target kind gets from a mixture"),
    "train": ("moe_gato.train.cli", "add_arguments", "run",
              "train MoE-Gato (or its dense twin) on a collected suite"),
    "distill": ("moe_gato.train.distill", "add_arguments", "run",
                "distill a MoE teacher into a dense student (soft targets + hard labels)"),
    "finetune": ("moe_gato.train.finetune", "add_arguments", "run",
                 "fine-tune a checkpoint on a task's demonstrations (full, experts, "
                 "new-expert, scratch)"),
    "eval": ("moe_gato.eval.cli", "add_arguments", "run",
             "roll a checkpoint out in the real environments and score it"),
    "bench-latency": ("moe_gato.eval.latency", "add_arguments", "run",
                      "time batch-1 control steps (p50 / p99, Hz) of a preset or checkpoint"),
    "sweep": ("scaling.sweep", "add_arguments", "run",
              "run an IsoFLOP sweep (local or SLURM launcher), then fit the scaling laws"),
    "fit": ("scaling.fit_cli", "add_arguments", "run",
            "fit Chinchilla-style and MoE scaling laws to a sweep's results table"),
    "plan": ("scaling.plan", "add_arguments", "run",
             "plan a run past this machine: the law's optimum for a budget, hardware and rate"),
    "report": ("moe_gato.pipeline.cli", "add_arguments", "run",
               "write the main job's report (tables, PNG plots) from its run folder"),
    "pick": ("scaling.pick", "add_arguments", "run",
             "write the training config of a sweep's latency-constrained optimum for a budget"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-gato", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, add, _, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        try:
            getattr(importlib.import_module(module), add)(p)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                p.set_defaults(_missing=f"{name} is not available in this checkout ({exc})")
                continue
            raise
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads sleep instead of spinning while they wait: on a shared 2-core machine
    # spinning made small ops 20-30x slower (benchmarks/RESULTS.md, control-step latency).
    # Read when torch first loads, so it is set before any subcommand imports it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    missing = getattr(args, "_missing", None)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    module, _, run, _ = SUBCOMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    except ValueError as exc:  # bad input: a clear message, no traceback
        print(f"moe-gato {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
