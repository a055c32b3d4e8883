"""Compute-optimal models: Chinchilla's approaches 1 and 2 on the runs of one family at
several budgets, and the minimum of a fitted law along a budget (``compute_optimal``).

Approach 1 takes each budget's lowest-loss run (the envelope); approach 2 fits a parabola of
L against log N per budget (3+ sizes) and takes its vertex; both then fit N_opt ~ C^a and
D_opt ~ C^b over the budgets (Hoffmann et al. 2022).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from scaling.laws import checked_array, predict


def compute_optimal(law: str, coefs: dict, C, *, E=None, G=None,
                    flops_per_token: Callable = lambda N: 6 * N):
    """(N_opt, D_opt, L_opt) minimising the law at each budget C, D = C / flops_per_token(N)."""
    from scipy.optimize import minimize_scalar

    if law == "clark":
        raise ValueError("clark has no data term: its loss falls with N at any budget")
    C = checked_array("C", C)
    lnN = np.linspace(math.log(1e3), math.log(1e16), 1301)
    out = []
    for c in C:
        N = np.exp(lnN)
        D = c / flops_per_token(N)
        ok = D >= 1
        if ok.sum() < 3:
            raise ValueError(f"C = {c:g}: too small for a model of 1e3 parameters")
        L = predict(law, coefs, N=N[ok], D=D[ok], E=E, G=G)
        i = int(np.argmin(L))
        lo, hi = lnN[ok][max(i - 1, 0)], lnN[ok][min(i + 1, ok.sum() - 1)]

        def loss(t, c=c):  # the law along the budget, against log N
            return float(predict(law, coefs, N=math.exp(t), D=c / flops_per_token(math.exp(t)),
                                 E=E, G=G))
        t = minimize_scalar(loss, bounds=(lo, hi), method="bounded",
                            options={"xatol": 1e-9}).x if hi > lo else lo
        n_opt = math.exp(t)
        out.append((n_opt, c / float(flops_per_token(n_opt)), loss(t)))
    return tuple(np.array(v) for v in zip(*out, strict=True))


def budgets(C, rtol: float = 0.05) -> np.ndarray:
    """A budget index per run: runs whose C differ by less than ``rtol`` share one."""
    C = checked_array("C", C)
    order = np.argsort(C)
    lc = np.log(C[order])
    group = np.concatenate([[0], np.cumsum(np.diff(lc) > math.log1p(rtol))])
    out = np.empty(C.size, dtype=int)
    out[order] = group
    return out


def _power_fit(C, Y):
    """Least squares log Y = k log C + log y0: (exponent, prefactor)."""
    k, b = np.polyfit(np.log(C), np.log(Y), 1)
    return float(k), float(math.exp(b))


def _checked(N, D, L, C):
    N = checked_array("N", N)
    return N, checked_array("D", D, N.size), checked_array("L", L, N.size), checked_array("C", C, N.size)


def approach1(N, D, L, C, *, rtol: float = 0.05) -> dict:
    """Chinchilla approach 1 on final losses: the lowest-loss run of each budget (the
    envelope), then N_opt ~ C^a and D_opt ~ C^b fitted over the budgets."""
    N, D, L, C = _checked(N, D, L, C)
    b = budgets(C, rtol)
    rows = []
    for k in range(b.max() + 1):
        i = np.flatnonzero(b == k)
        j = i[np.argmin(L[i])]
        rows.append({"C": float(np.exp(np.log(C[i]).mean())), "N_opt": float(N[j]),
                     "D_opt": float(D[j]), "L_opt": float(L[j]), "runs": int(i.size)})
    return _exponents(rows)


def approach2(N, D, L, C, *, rtol: float = 0.05) -> dict:
    """Chinchilla approach 2: per budget (3+ model sizes) a parabola of L against log N;
    its vertex is N_opt (D_opt from the budget's log D - log N line); then the power laws.
    Budgets whose parabola opens downward are listed with ``N_opt`` None and not fitted."""
    N, D, L, C = _checked(N, D, L, C)
    b = budgets(C, rtol)
    rows = []
    for k in range(b.max() + 1):
        i = np.flatnonzero(b == k)
        row = {"C": float(np.exp(np.log(C[i]).mean())), "runs": int(i.size), "N_opt": None,
               "D_opt": None, "L_opt": None}
        rows.append(row)
        x = np.log(N[i])
        if np.unique(x).size < 3:
            continue
        p2, p1, p0 = np.polyfit(x, L[i], 2)
        row["parabola"] = [float(p2), float(p1), float(p0)]
        if p2 <= 0:
            continue
        xv = -p1 / (2 * p2)
        s, c0 = np.polyfit(x, np.log(D[i]), 1)
        row.update(N_opt=float(math.exp(xv)), D_opt=float(math.exp(c0 + s * xv)),
                   L_opt=float(p0 - p1 * p1 / (4 * p2)),
                   inside=bool(x.min() <= xv <= x.max()))
    return _exponents(rows)


def _exponents(rows):
    ok = [r for r in rows if r["N_opt"] is not None]
    out = {"a": None, "b": None, "N_coef": None, "D_coef": None, "budgets": rows}
    if len({r["C"] for r in ok}) >= 2:
        C = np.array([r["C"] for r in ok])
        out["a"], out["N_coef"] = _power_fit(C, np.array([r["N_opt"] for r in ok]))
        out["b"], out["D_coef"] = _power_fit(C, np.array([r["D_opt"] for r in ok]))
    return out

