"""The report's figures (matplotlib, PNG). Each ``draw_*`` fills one axis; the public
functions save a figure of one or more of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = {"teacher": "tab:red", "student": "tab:blue", "scratch": "tab:grey"}
KINDS = ("text", "discrete_action", "continuous_action")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _smooth(y: np.ndarray, window: int = 25) -> np.ndarray:
    if len(y) < window:
        return y
    return np.convolve(np.pad(y, (window - 1, 0), mode="edge"), np.ones(window) / window,
                       mode="valid")


# ------------------------------------------------------------------ IsoFLOP and the law
def _families(rows: list[dict]) -> dict[str, list[dict]]:
    from scaling.family import ExpertChoice

    out: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") == "done":
            tag = ExpertChoice(experts=r["experts"], k=r["k"], G=r["G"]).tag
            out.setdefault(tag, []).append(r)
    return out


def draw_isoflop(ax, doc: dict, family: str) -> None:
    """The family's runs per budget (dots) and the fitted law along each budget (lines)."""
    from scaling.fit import predict

    rows = _families(doc["sweep"])[family]
    law, fit = doc["law"], doc["fit"]
    k = fit["flops_per_param_token"]
    budgets = sorted({r["budget"] for r in rows})
    colours = _plt().cm.viridis(np.linspace(0, 0.85, len(budgets)))
    E, G = rows[0]["E"], rows[0]["G"]
    n_lo = min(r["N_active"] for r in rows) / 1.6
    n_hi = max(r["N_active"] for r in rows) * 1.6
    for budget, colour in zip(budgets, colours, strict=True):
        at = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["N_active"])
        ax.plot([r["N_active"] for r in at], [r["loss"] for r in at], "o", color=colour,
                label=f"C = {budget:.1e}")
        if law and fit.get("n_column", "N_active") == "N_active":  # the x axis' N
            N = np.geomspace(n_lo, n_hi, 60)
            C = float(np.mean([r["C"] for r in at]))
            L = predict(law, fit["laws"][law], N=N, D=C / (k * N), E=np.full_like(N, E),
                        G=np.full_like(N, float(G)))
            ax.plot(N, L, "-", color=colour, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("active parameters N")
    ax.set_ylabel("validation loss")
    ax.set_title(f"IsoFLOP, {family} (dots: runs; lines: {law} law)", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)


def isoflop_law(doc: dict, path: Path) -> None:
    fams = sorted(_families(doc["sweep"]), key=lambda f: f != "dense")
    fig, axes = _plt().subplots(1, len(fams), figsize=(5 * len(fams), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams, strict=True):
        draw_isoflop(ax, doc, fam)
    ylim = [min(ax.get_ylim()[0] for ax in axes[0]), max(ax.get_ylim()[1] for ax in axes[0])]
    for ax in axes[0]:
        ax.set_ylim(ylim)
    _save(fig, path)


# ------------------------------------------------------------------------- loss curves
def draw_loss(ax, histories: dict[str, list[dict]], labels: dict, key: str = "loss") -> None:
    """Smoothed training and validation ``key`` against tokens, from each run's metrics."""
    for name, records in histories.items():
        # a distilled run's "loss" is its objective; its hard-label part is the comparable one
        train_key = "objective/ce" if key == "loss" and any(
            "objective/ce" in r for r in records) else key
        sel = [r for r in records if train_key in r]
        if sel:
            ax.plot([r["tokens"] for r in sel], _smooth(np.array([r[train_key] for r in sel])),
                    color=COLOURS.get(name), lw=1, alpha=0.8, label=f"{labels[name]}, train")
        ev = [r for r in records if f"eval/{key}" in r]
        if ev:
            ax.plot([r["tokens"] for r in ev], [r[f"eval/{key}"] for r in ev], "o--",
                    color=COLOURS.get(name), ms=4, label=f"{labels[name]}, validation")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(key if key != "loss" else "loss (student's train curve: its hard-label CE)",
                 fontsize=9)
    ax.grid(alpha=0.3)


def loss_curves(histories: dict[str, list[dict]], labels: dict, path: Path) -> None:
    keys = ("loss",) + tuple(f"loss/{k}" for k in KINDS)
    fig, axes = _plt().subplots(1, len(keys), figsize=(4.6 * len(keys), 4))
    for ax, key in zip(axes, keys, strict=True):
        draw_loss(ax, histories, labels, key)
    axes[0].legend(fontsize=6)
    _save(fig, path)


# ------------------------------------------------------------------------- expert load
def expert_load(load: dict, path: Path) -> None:
    groups = load["groups"]
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 1, 0.5 * load["layers"]
                                                      + 2.2), squeeze=False)
    vmax = max(2.0, max(np.nanmax(np.asarray(m)) for m in groups.values()))
    for ax, (group, mat) in zip(axes[0], groups.items(), strict=True):
        a = np.asarray(mat)
        im = ax.imshow(a, cmap="magma", vmin=0, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(a):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < vmax / 2 else "black")
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(group, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="load x experts (1 = balanced)")
    fig.suptitle(f"teacher's expert load per modality group, steps {load['steps'][0]}-"
                 f"{load['steps'][1]}", fontsize=9, y=1.04)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------ scores
def draw_scores(ax, doc: dict, labels: dict) -> None:
    models = list(doc["models"])
    domains = sorted({d for m in doc["models"].values() for d in m["domains"]}) + ["all"]
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        m = doc["models"][name]
        vals = [m["domains"][d] if d in m["domains"] else None for d in domains[:-1]]
        vals.append({"mean": m["scores"]["mean"], "ci95": m["scores"]["ci95"]})
        x = np.arange(len(domains)) + (i - (len(models) - 1) / 2) * width
        ax.bar(x, [v["mean"] if v else 0 for v in vals], width,
               yerr=[v["ci95"] if v else 0 for v in vals], capsize=3,
               color=COLOURS.get(name), label=labels[name], edgecolor="black", lw=0.4)
    ax.axhline(0, color="black", lw=0.6)
    for th in (0.5, 0.8):
        ax.axhline(th, color="grey", ls=":", lw=0.8)
    ax.set_xticks(range(len(domains)))
    ax.set_xticklabels(domains)
    ax.set_ylabel("mean expert-normalized score")
    ax.set_title("scores per domain (95% CI)", fontsize=9)
    ax.legend(fontsize=7)


def scores(doc: dict, labels: dict, path: Path) -> None:
    fig, ax = _plt().subplots(figsize=(7, 4))
    draw_scores(ax, doc, labels)
    _save(fig, path)


# ----------------------------------------------------------------------------- latency
def draw_latency(ax, doc: dict) -> None:
    fam = doc.get("family_latency", [])
    for dense, style, label in ((True, "--", "dense members (predicted)"),
                                (False, "-", "MoE members (predicted)")):
        pts = sorted((c["N_active"], 1e3 / c["hz"]) for c in fam if c["dense"] == dense)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, color="tab:green" if dense else "tab:red",
                    lw=1, label=label)
    for name, marker in (("teacher", "s"), ("student", "o")):
        m = doc["models"][name]
        if m.get("latency"):
            ax.errorbar([m["N_active"]], [m["latency"]["p50_ms"]],
                        yerr=[[0], [m["latency"]["p99_ms"] - m["latency"]["p50_ms"]]],
                        fmt=marker, color=COLOURS[name], ms=8, capsize=3,
                        label=f"{name}, measured p50 (bar to p99)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for hz in (20, 50):
        ax.axhline(1e3 / hz, color="black", ls=":", lw=0.8)
        ax.annotate(f"{hz} Hz ({1e3 / hz:.0f} ms)", (0.99, 1e3 / hz), ha="right", va="bottom",
                    xycoords=("axes fraction", "data"), fontsize=7)
    ax.set_xlabel("active parameters")
    ax.set_ylabel("batch-1 control step (ms)")
    ax.set_title(f"control latency on {doc['pick']['device']} ({doc['pick']['shape']})",
                 fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3, which="both")


def latency(doc: dict, path: Path) -> None:
    fig, ax = _plt().subplots(figsize=(6, 4))
    draw_latency(ax, doc)
    _save(fig, path)


# ---------------------------------------------------------------------- the main figure
def summary(doc: dict, histories: dict[str, list[dict]], labels: dict, path: Path) -> None:
    fig, axes = _plt().subplots(2, 2, figsize=(12, 8.5))
    moe = [f for f in _families(doc["sweep"]) if f != "dense"]
    draw_isoflop(axes[0, 0], doc, moe[0] if moe else "dense")
    draw_loss(axes[0, 1], histories, labels)
    axes[0, 1].legend(fontsize=6)
    draw_scores(axes[1, 0], doc, labels)
    draw_latency(axes[1, 1], doc)
    fig.suptitle(f"MoE-Gato main job ({doc['config']['name']}): sweep, teacher, student",
                 fontsize=11)
    _save(fig, path)
