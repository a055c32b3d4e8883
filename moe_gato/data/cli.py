"""``moe-gato collect``: build a data suite on disk.

    moe-gato collect --suite default --out data/
    moe-gato collect --suite default --out data/ --tasks classic/CartPole-v1,atari/Pong --episodes 5
    moe-gato collect --config configs/collect/default.yaml --out data/
    moe-gato collect --suite default --out data/ --overwrite
    moe-gato collect --list

Writes one HF datasets folder per task under DIR/<domain>/<env-id>/ and DIR/manifest.json.
Running the same command again after an interruption keeps the finished tasks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/collect/default.yaml"


def collect_options(config: str | None, suite: str | None = None, episodes: int | None = None,
                    seed: int | None = None) -> dict:
    """``collect`` keyword arguments from a collection config (``DEFAULT_CONFIG`` when
    ``config`` is None and it exists) with the command line's values on top."""
    from moe_gato.data.collect import load_collect_config

    path = config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    opts = load_collect_config(path) if path else {"suite": "default", "seed": 0, "episodes": None,
                                                   "tasks": None}
    if suite is not None:
        opts["suite"] = suite
    if episodes is not None:
        opts["episodes"] = episodes
    if seed is not None:
        opts["seed"] = seed
    return opts


def add_collect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="collection config (suite, seed, episodes per task); default: "
                             f"{DEFAULT_CONFIG} when it exists, else the registry's counts")
    parser.add_argument("--suite", default=None, help="suite of tasks (default: the config's, "
                                                       "else default)")
    parser.add_argument("--out", default="data", help="output directory (default: data)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names (domain/env-id); default: the whole suite")
    parser.add_argument("--episodes", type=int, default=None,
                        help="rows stored per task, for every task (default: the config's "
                             "count per task)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace task folders that exist (otherwise finished ones are kept)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--seed", type=int, default=None,
                        help="base seed of the episodes (default: the config's, else 0)")
    parser.add_argument("--list", action="store_true", help="list the suite's tasks and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_collect(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("MUJOCO_GL", "egl")
    from moe_gato.data.collect import collect, rows_stored
    from moe_gato.data.storage import DataError
    from moe_gato.envs.tasks import resolve_tasks

    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else None
    try:
        if names is not None and not names:
            raise ValueError(f"--tasks {args.tasks!r} names no task; leave it out to collect "
                             f"the whole suite")
        opts = collect_options(args.config, args.suite, args.episodes, args.seed)
        config_tasks = opts.pop("tasks")
        names = names if names is not None else config_tasks
        specs = resolve_tasks(opts["suite"], names)
        if args.list:
            for s in specs:
                print(f"{s.name:40s} {s.kind:8s} rows={rows_stored(s, opts['episodes'])}"
                      + ("  held-out" if s.held_out else ""))
            return 0
        start = time.perf_counter()
        suite = opts.pop("suite")
        manifest = collect(suite, args.out, tasks=names, **opts,
                           overwrite=args.overwrite, workers=args.workers,
                           progress=not args.no_progress)
    except (ValueError, DataError) as exc:
        print(f"moe-gato collect: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(manifest))
    print(f"\n{len(manifest['tasks'])} tasks in {args.out}/manifest.json "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


def format_table(manifest: dict) -> str:
    """The suite as a markdown table (task, episodes, tokens, expert and random return)."""
    lines = ["| task | episodes | tokens | expert return | random return |",
             "|---|---:|---:|---:|---:|"]

    def fmt(x):
        return "—" if x is None else f"{x:.2f}"

    total = 0
    for name, e in sorted(manifest["tasks"].items()):
        total += e.get("tokens") or 0
        label = name + (" (held out)" if e.get("held_out") else "")
        lines.append(f"| {label} | {e['episodes']} | {e.get('tokens') or 0:,} | "
                     f"{fmt(e.get('expert_return'))} | {fmt(e.get('random_return'))} |")
    lines.append(f"| **total** | | {total:,} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-gato collect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_collect_arguments(parser)
    return run_collect(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
