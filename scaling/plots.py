"""Scaling-law plots (matplotlib, PNG) from a results table and its fit.

A table is a list of dicts (or a pandas DataFrame) with ``N_active, D, C, E, G, loss`` and
optionally ``budget``, as ``scaling.fit.read_results`` returns it; a fit is the dict that
``scaling.fit.fit_table`` returns (``fit.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scaling import fit as F


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fitted(fit: dict) -> list[str]:
    return [law for law, c in fit["laws"].items() if "skipped" not in c]


def plot_isoflop(table, fit: dict, path) -> None:
    """Loss against N for each budget, one panel per (E, G) family, with each budget's
    fitted parabola (approach 2) and its minimum."""
    plt = _plt()
    cols = F.columns(table, fit.get("n_column", "N_active"))
    fams = F.families(table)
    fig, axes = plt.subplots(1, len(fams), figsize=(4.5 * len(fams), 3.8), squeeze=False)
    for ax, (name, idx) in zip(axes[0], fams.items(), strict=True):
        b = F.budgets(cols["budget"][idx])
        rows = fit["families"].get(name, {}).get("approach2", {}).get("budgets", [])
        colours = plt.cm.viridis(np.linspace(0, 0.9, b.max() + 1))
        for k in range(b.max() + 1):
            i = idx[b == k]
            ax.scatter(cols["N"][i], cols["loss"][i], s=14, color=colours[k],
                       label=f"C={np.exp(np.log(cols['budget'][i]).mean()):.1e}")
            r = rows[k] if k < len(rows) else {}
            if r.get("parabola"):
                lnN = np.log(cols["N"][i])
                x = np.linspace(lnN.min(), lnN.max())
                ax.plot(np.exp(x), np.polyval(r["parabola"], x), color=colours[k], lw=1)
            if r.get("N_opt"):
                ax.scatter([r["N_opt"]], [r["L_opt"]], marker="*", s=90, color=colours[k],
                           edgecolor="black", linewidth=0.5, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel(f"N ({fit.get('n_column', 'N_active')})")
        ax.set_ylabel("validation loss")
        ax.set_title(f"IsoFLOP {name} (star: parabola minimum)", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_law_fit(table, fit: dict, path) -> None:
    """Predicted against measured loss for each fitted law (the line is y = x); titles
    carry the held-out error."""
    plt = _plt()
    cols = F.columns(table, fit.get("n_column", "N_active"))
    laws = _fitted(fit) or ["none"]
    fig, axes = plt.subplots(1, len(laws), figsize=(3.8 * len(laws), 3.8), squeeze=False)
    for ax, law in zip(axes[0], laws, strict=True):
        meas = cols["loss"]
        if law != "none":
            inp = F.law_inputs(law, cols)
            pred = F.predict(law, fit["laws"][law], **{k: v for k, v in inp.items() if k != "L"})
            ax.scatter(meas, pred, s=12, c=np.log(cols["E"]) if np.ptp(cols["E"]) else "tab:blue")
            held = fit["held_out"].get(law, {})
            err = (f"held out ({held['mode']}): {100 * held['mean_abs_rel']:.2f}%"
                   if "mode" in held else held.get("error", ""))
            ax.set_title(f"{law}\n{err}", fontsize=9)
        lo, hi = meas.min(), meas.max()
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("measured loss" + (" (colour: log E)" if np.ptp(cols["E"]) else ""))
        ax.set_ylabel("predicted loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(table, fit: dict, path) -> None:
    """The compute-optimal frontier, dense (E = 1) against MoE (E > 1): each family's best
    run per budget (dots; crosses: approach 2's parabola minima), and the law's optimum
    along C = k N D (joint when fitted, one curve per E; else chinchilla, which does not see
    E). Left loss, right N_opt, against C."""
    plt = _plt()
    cols = F.columns(table, fit.get("n_column", "N_active"))
    fig, (ax_l, ax_n) = plt.subplots(1, 2, figsize=(9, 3.8))
    k = fit["flops_per_param_token"]
    C = np.logspace(np.log10(cols["C"].min()), np.log10(cols["C"].max()) + 1, 30)
    for name, idx in F.families(table).items():
        E = cols["E"][idx[0]]
        colour = "black" if E == 1 else None
        best = fit["families"][name].get("approach1")
        if best is None:  # one budget: the best run there
            i = idx[np.argmin(cols["loss"][idx])]
            pts = [{"C": cols["C"][i], "L_opt": cols["loss"][i], "N_opt": cols["N"][i]}]
        else:
            pts = best["budgets"]
        line = ax_l.plot([p["C"] for p in pts], [p["L_opt"] for p in pts], "o", color=colour,
                         label=f"{'dense' if E == 1 else 'MoE'} {name}: best run")[0]
        ax_n.plot([p["C"] for p in pts], [p["N_opt"] for p in pts], "o", color=line.get_color())
        par = [r for r in fit["families"][name].get("approach2", {}).get("budgets", [])
               if r["N_opt"] is not None]
        ax_n.plot([r["C"] for r in par], [r["N_opt"] for r in par], "x", color=line.get_color(),
                  label=f"{name}: parabola minimum" if par else None)
        if "joint" in _fitted(fit):
            N, _, L = F.compute_optimal("joint", fit["laws"]["joint"], C, E=E,
                                        flops_per_token=lambda n: k * n)
            ax_l.plot(C, L, color=line.get_color(), lw=1, label=f"joint law, E={E:g}")
            ax_n.plot(C, N, color=line.get_color(), lw=1)
    if "joint" not in _fitted(fit) and "chinchilla" in _fitted(fit):
        N, _, L = F.compute_optimal("chinchilla", fit["laws"]["chinchilla"], C,
                                    flops_per_token=lambda n: k * n)
        scope = fit["laws"]["chinchilla"].get("E_scope", 1.0)
        ax_l.plot(C, L, color="grey", lw=1, label=f"chinchilla law (runs of E = {scope:g})")
        ax_n.plot(C, N, color="grey", lw=1)
    for ax, label in ((ax_l, "loss"), (ax_n, "compute-optimal active N")):
        ax.set_xscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(label)
    ax_n.set_yscale("log")
    ax_l.legend(fontsize=6)
    if ax_n.get_legend_handles_labels()[0]:
        ax_n.legend(fontsize=6)
    ax_l.set_title("compute-optimal frontier: dense vs MoE", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_published(table, fit: dict, path) -> None:
    """Our coefficients (dots, bars: bootstrap 95% intervals when fitted with them) beside
    the published ones (``scaling.published``: other markers), one panel per law, the
    dimensionless coefficients on one axis; a flagged coefficient is drawn hollow."""
    from scaling.published import COMPARED, PUBLISHED

    plt = _plt()
    laws = list(COMPARED)
    fig, axes = plt.subplots(1, len(laws), figsize=(3.6 * len(laws), 3.8), squeeze=False)
    markers = ["s", "^", "D", "v"]
    for ax, law in zip(axes[0], laws, strict=True):
        keys = COMPARED[law]
        x = np.arange(len(keys))
        ours = fit["laws"].get(law, {})
        if ours and "skipped" not in ours:
            ci, flags = ours.get("ci", {}), ours.get("flags", {})
            for i, k in enumerate(keys):
                lo, hi = ci.get(k, (ours[k], ours[k]))
                ax.errorbar([i - 0.12], [ours[k]], yerr=[[ours[k] - lo], [hi - ours[k]]],
                            fmt="o", color="tab:red", mfc="none" if k in flags else "tab:red",
                            capsize=3, label="ours" if i == 0 else None)
        else:
            ax.text(0.03, 0.92, "ours: " + (ours.get("skipped", "not fitted")[:60]
                                          if ours else "not fitted"),
                    transform=ax.transAxes, fontsize=6, va="top")
        for j, pub in enumerate(PUBLISHED[law]):
            ax.plot(x + 0.12, [pub["coefs"][k] for k in keys], markers[j % len(markers)],
                    color=f"C{j}", label=pub["source"][:38])
        if not PUBLISHED[law]:
            ax.text(0.03, 0.05, "published fit not transcribed (scaling/published.py)",
                    transform=ax.transAxes, fontsize=6)
        ax.set_xticks(x, keys)
        ax.set_title(law, fontsize=9)
        ax.axhline(0, color="grey", lw=0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(table, fit: dict, out) -> list[Path]:
    """isoflop.png, law_fit.png, frontier.png and published.png under ``out``; returns
    their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "isoflop.png", out / "law_fit.png", out / "frontier.png",
             out / "published.png"]
    for fn, p in zip((plot_isoflop, plot_law_fit, plot_frontier, plot_published), paths,
                     strict=True):
        fn(table, fit, p)
    return paths
