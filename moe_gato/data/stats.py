"""Where a mixture's gradient goes: the share of the loss each task and target kind gets.

    moe-gato targets --config configs/data/recipe.yaml --data data --sequences 3000
    moe-gato targets --config configs/data/recipe.yaml loss_weighting=sequence mission_targets=none

Sequences are drawn exactly as training draws them (``SequenceLoader.sequence``), their
next-token targets counted per task and kind, and weighted as the loss weighs them
(``MixtureConfig.loss_weighting``): the table says what share of the loss a task's actions
get, which a mixture's sequence weights alone do not.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

from moe_gato.data.mixture import MixtureConfig, load_mixture

#: target kinds as the table names them
KINDS = {0: "text", 4: "discrete_action", 5: "continuous_action"}


def target_shares(cfg: MixtureConfig, *, sequences: int = 3000, seed: int = 0,
                  data_dir: str | Path | None = None, progress: bool = False) -> dict:
    """Per task: share of the draws, targets per sequence, and per target kind the share of
    all targets and of the loss weight; ``total`` has the same per kind over all tasks."""
    from tqdm import tqdm

    from moe_gato.data.loader import SequenceLoader

    if sequences < 1:
        raise ValueError(f"sequences must be >= 1, got {sequences}")
    loader = SequenceLoader(cfg, split="train", seed=seed, data_dir=data_dir)
    draws = collections.Counter()
    count = collections.defaultdict(float)   # (task, kind) -> targets
    weight = collections.defaultdict(float)  # (task, kind) -> loss weight
    for i in tqdm(range(sequences), desc="targets", unit="seq", disable=not progress):
        info: dict = {}
        seq = loader.sequence(i, info)
        task = info["task"]
        draws[task] += 1
        mask_N = seq.loss_mask[1:]           # position 0 is never predicted
        kinds_N = seq.kinds[1:]
        n = int(mask_N.sum())
        unit = 1.0 / n if cfg.loss_weighting == "sequence" and n else 1.0
        for k, name in KINDS.items():
            c = int((mask_N & (kinds_N == k)).sum())
            count[task, name] += c
            weight[task, name] += c * unit
    total_count, total_weight = sum(count.values()), sum(weight.values())
    tasks = {}
    for task in loader.names:
        row = {"draws": draws[task] / sequences,
               "targets_per_sequence": sum(count[task, k] for k in KINDS.values())
               / max(draws[task], 1)}
        for name in KINDS.values():
            row[f"targets/{name}"] = count[task, name] / max(total_count, 1e-12)
            row[f"loss/{name}"] = weight[task, name] / max(total_weight, 1e-12)
        row["loss"] = sum(row[f"loss/{k}"] for k in KINDS.values())
        tasks[task] = row
    total = {f"{kind}/{name}": sum(r[f"{kind}/{name}"] for r in tasks.values())
             for kind in ("targets", "loss") for name in KINDS.values()}
    return {"sequences": sequences, "loss_weighting": cfg.loss_weighting,
            "mission_targets": cfg.mission_targets, "tasks": tasks, "total": total}


def markdown(shares: dict) -> str:
    """The table: per task its draws, targets per sequence and share of the loss per kind."""
    head = ("| task | draws | targets / sequence | loss share: text | discrete actions | "
            "continuous actions | all |\n|---|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for task, r in shares["tasks"].items():
        rows.append(f"| {task} | {r['draws']:.1%} | {r['targets_per_sequence']:.1f} | "
                    f"{r['loss/text']:.2%} | {r['loss/discrete_action']:.2%} | "
                    f"{r['loss/continuous_action']:.2%} | {r['loss']:.2%} |")
    t = shares["total"]
    rows.append(f"| **all** | 100% | | {t['loss/text']:.2%} | {t['loss/discrete_action']:.2%} | "
                f"{t['loss/continuous_action']:.2%} | 100% |")
    return (f"{shares['sequences']} sequences, loss_weighting={shares['loss_weighting']}, "
            f"mission_targets={shares['mission_targets']}\n\n" + head + "\n".join(rows) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/data/recipe.yaml",
                   help="mixture config (default: %(default)s)")
    p.add_argument("--data", default=None, help="collected suite (default: the config's data_dir)")
    p.add_argument("--sequences", type=int, default=3000, help="sequences drawn (default: 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the shares to this JSON file")
    p.add_argument("overrides", nargs="*", help="dotted mixture overrides, e.g. loss_weighting=sequence")


def run(args: argparse.Namespace) -> int:
    from moe_gato.config import write_json
    from moe_gato.train.config import _resolve_path

    try:
        cfg = load_mixture(str(_resolve_path(args.config, None)), args.overrides)
        shares = target_shares(cfg, sequences=args.sequences, seed=args.seed,
                               data_dir=args.data, progress=True)
    except ValueError as exc:
        print(f"moe-gato targets: {exc}", file=sys.stderr)
        return 2
    print(markdown(shares))
    if args.json:
        write_json(Path(args.json), shares)
    return 0

