"""What a researcher reads off a fit: the compute-optimal N, D and loss per budget, and the
MoE compute multiplier over dense at equal loss, each with the interval its bootstrap
resamples carry (2.5% and 97.5% of the resamples' values).

    doc.update(readoffs(doc, cols, samples))   # inside scaling.fit.fit_table

Budgets: the table's own and 10x and 100x its largest (extrapolations, said so by
``extrapolated``); FLOPs per token = k N with the table's k (C = k N D). The optimum of a
law without a term for E is read at the E it was fitted at; the joint law's at every E of
the table. The multiplier of an MoE at E (joint law only: the one with both a term for E
and a data term) is C_dense / C, where C_dense is the compute the dense optimum needs to
reach the loss the MoE optimum reaches with C; > 1 means the MoE saves compute.
"""

from __future__ import annotations

import math

import numpy as np

from scaling.identify import ranks_experts
from scaling.laws import VARIABLES, predict

#: N searched for an optimum: log-spaced, 4.7% apart (the loss is flat at its minimum: the
#: optimal loss is read far more finely than N_opt)
_N = np.exp(np.linspace(math.log(1e3), math.log(1e16), 651))
_EXTRAPOLATE = (10.0, 100.0)


def optimum_grid(law: str, coefs: dict, C, *, k: float, E: float = 1.0, G: float = 1.0):
    """(N_opt, D_opt, L_opt), arrays over the budgets C, of the law on a grid of N; nan
    where no grid point gives a finite loss (or D < 1 token everywhere)."""
    C = np.atleast_1d(np.asarray(C, dtype=float))[:, None]
    D = C / (k * _N[None, :])
    with np.errstate(all="ignore"):
        L = predict(law, coefs, N=np.broadcast_to(_N, D.shape), D=np.maximum(D, 1.0), E=E, G=G)
    L = np.where(np.isfinite(L) & (D >= 1), L, np.inf)
    i = L.argmin(axis=1)
    rows = np.arange(C.shape[0])
    best = L[rows, i]
    ok = np.isfinite(best)
    nan = np.full(best.shape, np.nan)
    return (np.where(ok, _N[i], nan), np.where(ok, D[rows, i], nan), np.where(ok, best, nan))


def _interval(values) -> list[float] | None:
    v = np.asarray([x for x in values if math.isfinite(x)])
    return [float(q) for q in np.percentile(v, [2.5, 97.5])] if v.size >= 2 else None


def law_optimum(law: str, coefs: dict, samples, budgets, *, k: float, E: float, G: float,
                largest: float) -> list[dict]:
    """Per budget: N_opt, D_opt, L_opt (``compute_optimal``: exact) and their intervals."""
    from scaling.approaches import compute_optimal

    rows = []
    for C in budgets:
        N, D, L = (float(v[0]) for v in compute_optimal(law, coefs, [C], E=E, G=G,
                                                         flops_per_token=lambda n: k * n))
        row = {"C": float(C), "E": E, "G": G, "N_opt": N, "D_opt": D, "L_opt": L,
               "tokens_per_param": D / N, "extrapolated": bool(C > largest * 1.05)}
        if samples:
            opts = np.array([[v[0] for v in optimum_grid(law, s, C, k=k, E=E, G=G)]
                             for s in samples])
            row.update(N_ci=_interval(opts[:, 0]), D_ci=_interval(opts[:, 1]),
                       L_ci=_interval(opts[:, 2]))
        rows.append(row)
    return rows


def multipliers(coefs: dict, budgets, Es, *, k: float) -> np.ndarray:
    """C_dense / C at equal loss for the joint law's MoE at each E (rows) and budget C
    (columns); nan where the dense optimum's loss curve does not reach the MoE's loss."""
    budgets = np.asarray(budgets, dtype=float)
    grid = np.logspace(math.log10(budgets.min()) - 3, math.log10(budgets.max()) + 6, 145)
    dense = optimum_grid("joint", coefs, grid, k=k, E=1.0)[2]  # 1/16 decade apart
    ok = np.isfinite(dense)
    grid, dense = grid[ok], dense[ok]
    out = np.full((len(Es), budgets.size), np.nan)
    if grid.size < 2:
        return out
    order = np.argsort(dense)  # loss falls with compute: interpolate log C against L
    for j, E in enumerate(Es):
        target = optimum_grid("joint", coefs, budgets, k=k, E=E)[2]
        inside = (target >= dense.min()) & (target <= dense.max())
        c = np.exp(np.interp(target, dense[order], np.log(grid[order])))
        out[j] = np.where(inside, c / budgets, np.nan)
    return out


def readoffs(doc: dict, cols: dict, samples: dict) -> dict:
    """{"optimum": {law: rows}, "multiplier": [rows]} for the fitted laws with a data term."""
    k = doc["flops_per_param_token"]
    table_budgets = sorted({float(b) for b in cols["budget"]})
    largest = table_budgets[-1]
    budgets = table_budgets + [largest * f for f in _EXTRAPOLATE]
    out = {"optimum": {}, "multiplier": []}
    for law, coefs in doc["laws"].items():
        if "skipped" in coefs or "D" not in VARIABLES[law]:
            continue
        if ranks_experts(law):
            points = sorted({(float(e), 1.0) for e in cols["E"]})
        else:
            E = coefs.get("E_scope", 1.0)
            Gs = sorted({float(g) for g, e in zip(cols["G"], cols["E"], strict=True) if e == E})
            points = [(E, g) for g in (Gs if "G" in VARIABLES[law] else [1.0])]
        out["optimum"][law] = [row for E, G in points for row in law_optimum(
            law, coefs, samples.get(law), budgets, k=k, E=E, G=G, largest=largest)]
    joint = doc["laws"].get("joint")
    Es = sorted({float(e) for e in cols["E"] if e > 1})
    if joint and "skipped" not in joint and Es:
        central = multipliers(joint, budgets, Es, k=k)
        boot = (np.array([multipliers(s, budgets, Es, k=k) for s in samples["joint"]])
                if samples.get("joint") else None)
        for j, E in enumerate(Es):
            for i, C in enumerate(budgets):
                row = {"C": C, "E": E, "multiplier": float(central[j, i]),
                       "extrapolated": bool(C > largest * 1.05)}
                if boot is not None:
                    row["ci"] = _interval(boot[:, j, i])
                out["multiplier"].append(row)
    return out
