"""The recipe experiments of issue 10 as one table and one plot.

    python benchmarks/recipe_report.py docs/recipe/experiments.yaml --out docs/recipe.md

``experiments.yaml`` lists every run (none left out)::

    experiments:
      - name: r1-table                      # row label
        change: "recipe mixture, context 576"  # what differs
        run: runs/exp/r1-table              # training run (metrics.jsonl)
        eval: runs/exp/r1-table-eval        # `moe-gato eval` output (eval.json)
    routing: {r3-groups: runs/exp/r3-groups}  # router entropy and load per group
    curves:                                 # normalized score against training tokens
      - label: rotary positions             # one line per run, its evaluated checkpoints
        run: runs/recipe/tiny-moe
        evals: [runs/recipe/eval-250, runs/recipe/eval-500, ...]

Per run: tokens and training minutes (from metrics.jsonl: each logged interval's tokens
over its tokens/s), the last validation loss per modality, and from eval.json the mean
normalized score per domain over the tasks evaluated, the tasks at >= 50% / >= 80% of
expert, and the named tasks. Writes the markdown table (``--out``) and, with ``curves``,
a PNG beside it: per curve, the mean normalized score (solid) and per domain (thin)
against training tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

MODALITIES = ("text", "discrete_action", "continuous_action")
NAMED = ("classic/CartPole-v1", "classic/Acrobot-v1", "classic/MountainCar-v0",
         "classic/MountainCarContinuous-v0", "babyai/BabyAI-GoToRedBall-v0")
DOMAINS = ("classic", "babyai", "metaworld", "atari")


def read_metrics(run: Path) -> list[dict]:
    text = (run / "metrics.jsonl").read_text()
    return [json.loads(ln) for ln in text[:text.rfind("\n") + 1].splitlines() if ln.strip()]


def train_summary(run: Path) -> dict:
    rows = read_metrics(run)
    train = [r for r in rows if "tokens_per_s" in r]
    seconds, last = 0.0, 0
    for r in train:
        seconds += (r["tokens"] - last) / max(r["tokens_per_s"], 1e-9)
        last = r["tokens"]
    evals = [r for r in rows if "eval/loss" in r]
    val = evals[-1] if evals else {}
    return {"tokens": rows[-1]["tokens"] if rows else 0, "minutes": seconds / 60,
            **{m: val.get(f"eval/loss/{m}") for m in MODALITIES}}


def eval_summary(path: Path) -> dict:
    d = json.loads((path / "eval.json").read_text())
    tasks = {t: r for t, r in d["tasks"].items() if not r["held_out"]}
    by_domain: dict[str, list[float]] = {}
    for t, r in tasks.items():
        by_domain.setdefault(r["domain"], []).append(r["normalized_score"])
    held = {t: r["normalized_score"] for t, r in d["tasks"].items() if r["held_out"]}
    scores = [r["normalized_score"] for r in tasks.values()]
    return {"n": len(tasks), "episodes": min((r["episodes"] for r in tasks.values()), default=0),
            "domains": {k: float(np.mean(v)) for k, v in by_domain.items()},
            "mean": float(np.mean(scores)) if scores else None,
            "at50": sum(s >= 0.5 for s in scores), "at80": sum(s >= 0.8 for s in scores),
            "named": {t: (tasks[t]["normalized_score"], tasks[t]["normalized_ci95"])
                      for t in NAMED if t in tasks},
            "held_out": held}


def _f(x, fmt="{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def table(experiments: list[dict], root: Path) -> str:
    head = ("| run | change | tokens | train min | val loss text / disc. act / cont. act | "
            + " | ".join(DOMAINS) + " | tasks evaluated | >= 50% | >= 80% | "
            + " | ".join(t.split("/")[1].replace("BabyAI-", "").replace("-v0", "")
                         .replace("-v1", "") for t in NAMED) + " | held out |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in experiments:
        if not (root / e["run"] / "metrics.jsonl").is_file():
            print(f"skipped {e['name']}: {root / e['run']} has no metrics.jsonl", file=sys.stderr)
            continue
        t = train_summary(root / e["run"])
        done = e.get("eval") and (root / e["eval"] / "eval.json").is_file()
        ev = eval_summary(root / e["eval"]) if done else None
        losses = " / ".join(_f(t[m]) for m in MODALITIES)
        cells = [e["name"], e.get("change", ""), f"{t['tokens'] / 1e6:.2f}M",
                 f"{t['minutes']:.1f}", losses]
        if ev:
            cells += [_f(ev["domains"].get(d)) for d in DOMAINS]
            cells += [f"{ev['n']} x {ev['episodes']} ep", str(ev["at50"]), str(ev["at80"])]
            cells += [f"{ev['named'][n][0]:.2f} ± {ev['named'][n][1]:.2f}" if n in ev["named"]
                      else "—" for n in NAMED]
            cells += [", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in ev["held_out"].items())
                      or "—"]
        else:
            cells += ["—"] * (len(DOMAINS) + 3 + len(NAMED) + 1)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routing_table(runs: dict[str, Path], last: int = 50) -> str:
    """Per MoE run and group: router entropy (normalized, mean over layers), the largest
    expert load relative to uniform, and the least-used expert's share, averaged over the
    last ``last`` logged steps."""
    lines = ["| run | group | load entropy (1 = uniform) | max load / uniform | least-used share |",
             "|---|---|---:|---:|---:|"]
    for name, run in runs.items():
        rows = [r for r in read_metrics(run) if "tokens_per_s" in r][-last:]
        names = sorted({k for r in rows for k in r if k.startswith("moe/")})

        def mean(key):  # a group without tokens in a step logs nothing for it
            return float(np.mean([r[key] for r in rows if key in r]))

        keys = [k for k in names if k.endswith("/entropy")]
        groups = sorted({k.split("/")[2] for k in keys})
        for g in groups:
            ent = [mean(k) for k in keys if k.split("/")[2] == g]
            ml = [mean(k.replace("entropy", "max_load")) for k in keys if k.split("/")[2] == g]
            loads = [mean(k) for k in names if k.split("/")[2] == g and "/load/" in k]
            lines.append(f"| {name} | {g} | {np.mean(ent):.2f} | {np.mean(ml):.2f} | "
                         f"{min(loads):.3f} |")
    return "\n".join(lines)


def curve_points(curve: dict, root: Path) -> list[tuple[int, dict]]:
    """(training tokens, eval summary) of each evaluated checkpoint of one curve's run."""
    points = []
    for ev in curve["evals"]:
        d = json.loads((root / ev / "eval.json").read_text())
        step_dir = Path(d["checkpoint"]).name
        tokens = _tokens_at(root / curve["run"], int(step_dir.split("_")[-1]))
        points.append((tokens, eval_summary(root / ev)))
    return sorted(points, key=lambda p: p[0])


def curve_plot(curves: list[dict], root: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, curve in enumerate(curves):
        points = curve_points(curve, root)
        x = [p[0] / 1e6 for p in points]
        color = f"C{i}"
        ax.plot(x, [p[1]["mean"] for p in points], "o-", color=color, lw=2.2,
                label=f"{curve['label']}: mean of the tasks evaluated")
        for d, style in zip(DOMAINS, (":", "--", "-.", (0, (1, 3)))):
            y = [p[1]["domains"].get(d) for p in points]
            if any(v is not None for v in y):
                ax.plot(x, y, ls=style, color=color, lw=1, alpha=0.8, label=f"{curve['label']}: {d}")
    ax.axhline(0.8, color="grey", ls=":", lw=1)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("normalized score (0 random, 1 expert)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _tokens_at(run: Path, step: int) -> int:
    rows = [r for r in read_metrics(run) if r.get("step", -1) <= step and "tokens" in r]
    return rows[-1]["tokens"] if rows else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", help="YAML listing the runs")
    p.add_argument("--out", default="docs/recipe_table.md", help="markdown table to write")
    p.add_argument("--root", default=".", help="folder the run paths are relative to")
    args = p.parse_args(argv)
    spec = yaml.safe_load(Path(args.experiments).read_text())
    root, out = Path(args.root), Path(args.out)
    text = table(spec["experiments"], root)
    out.write_text(text + "\n")
    print(text)
    if spec.get("routing"):
        text = routing_table({k: root / v for k, v in spec["routing"].items()})
        out.with_name(out.stem + "_routing.md").write_text(text + "\n")
        print(text)
    curves = spec.get("curves") or ([dict(spec["curve"], label="default recipe")]
                                    if spec.get("curve") else [])
    if curves:
        png = out.with_suffix(".png")
        curve_plot(curves, root, png, spec.get("curve_title",
                                               "normalized score against training tokens"))
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
