"""After a sweep: the laws fitted to its results and the latency-constrained optimum.

    moe-gato sweep --config configs/sweep/tiny.yaml        # runs this at the end
    python -c "from scaling.report import fit_sweep; ..."  # on a finished sweep's rows

Writes under ``<out>/fit/``: ``fit.json``, ``fit.md`` and the IsoFLOP / law / frontier PNGs
(``scaling.fit_cli``, ``scaling.plots``), and ``optimum.json``, ``optimum.md`` and
``latency_frontier.png``: for budgets from the sweep's smallest to 10^4 times its largest,
the model of the sweep's family with the lowest predicted loss (free), the lowest among
those whose predicted batch-1 control rate on ``fit.device`` meets ``fit.hz``
(constrained), and the best dense model. The law used is the usable one (fitted, with a
held-out error, no coefficient at a bound) with the lowest held-out error that may compare
the family's expert counts; failing that, one fitted at a single expansion rate, over that
rate's models only; failing that, no optimum, and ``optimum.json`` says why
(``scaling.optimum.allowed_law``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def fit_sweep(cfg, rows: list[dict]) -> dict:
    """Fits, the optimum and their plots for a sweep config and its results rows."""
    from moe_gato.config import to_dict
    from moe_gato.train import load_train_config
    from scaling.identify import seed_noise
    from scaling.fit import finite_json, fit_table
    from scaling.fit_cli import write_fit
    from scaling.optimum import allowed_law, candidates, frontier

    table = [r for r in rows if r["status"] == "done"]
    doc = {"results": str(Path(cfg.out) / "results.csv"),
           **fit_table(table, list(cfg.fit.laws), bootstrap=cfg.fit.bootstrap,
                       n_column=cfg.fit.n_column, noise_floor=seed_noise(table))}
    out = write_fit(table, doc, Path(cfg.out) / "fit")

    base = load_train_config(cfg.train, cfg.train_overrides)
    context = cfg.context_length or base.model.context_length
    head = cfg.family.head_dim
    cands = candidates(cfg.family, to_dict(base.model), widths=range(head, 64 * head + 1, head),
                       experts=cfg.experts, context=context, device=cfg.fit.device,
                       shape=cfg.fit.shape)
    rate = {c.label: c.hz for c in cands}
    law, why, cands = allowed_law(doc, cands)
    lo, hi = min(r["budget"] for r in table), max(r["budget"] for r in table) * 1e4
    budgets = np.logspace(math.log10(lo), math.log10(hi), 13)
    front = frontier(law, doc["laws"][law], budgets, cands, hz=cfg.fit.hz) if law else []
    optimum = {"law": law, "law_reason": why, "hz": cfg.fit.hz, "device": cfg.fit.device,
               "shape": cfg.fit.shape, "context": context, "frontier": front,
               "measured": measured_best(table, rate)}
    (out / "optimum.json").write_text(json.dumps(finite_json(optimum), indent=1) + "\n")
    (out / "optimum.md").write_text(optimum_markdown(optimum) + "\n")
    plot_latency_frontier(optimum, out / "latency_frontier.png")
    print((out / "fit.md").read_text())
    print((out / "optimum.md").read_text())
    print(f"wrote {out}/fit.json, fit.md, optimum.json, optimum.md and the PNGs")
    return {"fit": doc, "optimum": optimum}


def measured_best(table: list[dict], rate: dict[str, float]) -> list[dict]:
    """Per budget and expert choice, the run with the lowest validation loss and the
    predicted control rate of its model (approach 1's envelope, as measured)."""
    from scaling.family import ExpertChoice

    best: dict[tuple, dict] = {}
    for r in table:
        tag = ExpertChoice(experts=r["experts"], k=r["k"], G=r["G"]).tag
        key = (r["budget"], tag)
        if key not in best or r["loss"] < best[key]["loss"]:
            model = f"d{r['d_model']}-{tag}"
            best[key] = {"C": r["budget"], "family": tag, "model": model, "loss": r["loss"],
                         "hz": rate.get(model)}
    return sorted(best.values(), key=lambda b: (b["family"], b["C"]))


def _cell(row: dict | None) -> str:
    if row is None:
        return "none meets the rate | | | |"
    return (f"{row['model']} | {row['N_active'] / 1e6:.2f}M, E {row['E']:g} | "
            f"{row['D']:.3g} | {row['loss']:.3f} @ {row['hz']:.0f} Hz |")


def optimum_markdown(opt: dict) -> str:
    if opt["law"] is None:
        return (f"# Compute-optimal and latency-constrained models\n\nNone: "
                f"{opt['law_reason']}.")
    lines = [f"# Compute-optimal and latency-constrained models ({opt['law']} law)", "",
             f"Law: {opt['law_reason']}.", "",
             f"Control rate target: >= {opt['hz']:g} Hz, batch 1, on `{opt['device']}` "
             f"({opt['shape']} observations, context {opt['context']}; predicted by "
             f"benchmarks/latency_model.json). Budgets beyond the sweep's are extrapolations "
             f"of the fitted law.", "",
             "| C (FLOPs) | free optimum | N active, E | D | loss @ Hz | constrained optimum | "
             "N active, E | D | loss @ Hz | best dense | N active, E | D | loss @ Hz |",
             "|---" * 13 + "|"]
    for f in opt["frontier"]:
        lines.append(f"| {f['C']:.2e} | {_cell(f['free'])} {_cell(f['constrained'])} "
                     f"{_cell(f['dense'])}")
    return "\n".join(lines)


def plot_latency_frontier(opt: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for fam in sorted({m["family"] for m in opt.get("measured", [])}):
        pts = [m for m in opt["measured"] if m["family"] == fam]
        ax.plot([m["C"] for m in pts], [m["loss"] for m in pts], ":x", label=f"best run, {fam}")
        bx.plot([m["C"] for m in pts], [m["hz"] or np.nan for m in pts], ":x",
                label=f"best run, {fam}")
    if not opt["frontier"]:
        ax.set_title("no law may be used: the measured runs only (optimum.md says why)",
                     fontsize=8)
    C = [f["C"] for f in opt["frontier"]]
    for key, label, style in (("free", "compute-optimal (any rate)", "-o"),
                              ("constrained", f">= {opt['hz']:g} Hz", "-s"),
                              ("dense", "dense only", "--^")):
        pts = [(c, f[key]) for c, f in zip(C, opt["frontier"], strict=True) if f[key]]
        if pts:
            ax.plot([c for c, _ in pts], [r["loss"] for _, r in pts], style, label=label)
            bx.plot([c for c, _ in pts], [r["hz"] for _, r in pts], style, label=label)
    bx.axhline(opt["hz"], color="k", lw=0.8, ls=":")
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xlabel("training compute C (FLOPs)")
        a.grid(alpha=0.3)
    bx.set_yscale("log")
    ax.set_ylabel(f"loss (lines: the {opt['law']} law)" if opt["law"] else "measured loss")
    bx.set_ylabel(f"predicted control rate on {opt['device']} (Hz)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    if opt["frontier"]:
        ax.set_title("optimal loss for a budget")
    bx.set_title("control rate of the chosen model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
