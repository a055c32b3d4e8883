"""Scaling laws fitted to training runs: Chinchilla's three approaches and three MoE laws.

Laws (natural logs; N = active parameters, D = tokens, E = experts or expansion rate with
1 = dense, G = granularity):
- ``chinchilla`` (Hoffmann et al. 2022, approach 3): L = E + A / N^alpha + B / D^beta.
- ``clark`` (Clark et al. 2022, routed LMs): log L = a log N + b log Ê + c log N log Ê + d,
  1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max. No data term (D is not used).
  E_start and E_max are fitted, or fixed when both are given (opts ``E_start=, E_max=``).
  Clark et al. write log10: a and b carry over, c and d do not (c x ln 10, d / ln 10).
- ``krajewski`` (Krajewski et al. 2024, Eq. 9): L = c + (g / G^gamma + a) / N^alpha + b / D^beta.
- ``joint`` (Ludziejewski et al. 2025): L = a Ê^delta N^-(alpha + gamma ln Ê)
  + b Ê^omega D^-(beta + zeta ln Ê) + c, with Clark's Ê at E_start = 1, so a dense model has
  Ê = 1 and the law is Chinchilla's; E_max is fixed (opt ``E_max=``; default None: Ê = E).

Fitting, as Hoffmann et al. and Epoch AI (Besiroglu et al. 2024) did: minimise
sum_i Huber_delta(log L_pred_i - log L_i), delta = 1e-3, by L-BFGS from a grid of starts
(for Chinchilla their grid of 4500); the lowest objective wins. Here every start runs at
once: a batched L-BFGS (numpy, analytic gradients) runs all starts for ``screen`` steps,
the ``keep`` best go on to convergence, and the ``polish`` best finish in scipy's L-BFGS-B
at tight tolerance. Coefficients are fitted in log space (a = log A, ...), which keeps every
term positive; bootstrap refits (``ci=True``) run as one batch from the full-data optimum.

Approaches 1 and 2 (``approach1``, ``approach2``) work on one family of runs at several
compute budgets; ``compute_optimal`` minimises a fitted law along C = flops_per_token(N) x D.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

LAWS = ("chinchilla", "clark", "krajewski", "joint")
HUBER_DELTA = 1e-3


# ---------------------------------------------------------------- the laws, in log space


def e_hat(E, E_start: float = 1.0, E_max: float | None = None) -> np.ndarray:
    """Clark et al.'s saturating transform of the number of experts (E_max None: no cap)."""
    E = np.asarray(E, dtype=float)
    if E_max is None or math.isinf(E_max):
        return E - 1 + E_start
    return 1 / (1 / (E - 1 + 1 / (1 / E_start - 1 / E_max)) + 1 / E_max)


def _sum_of_powers(features):
    """A law log L = log sum_k exp(Phi_k theta), each term linear in the (log-space)
    parameters: ``features(x)`` gives the Phi_k, (n, P) each. Returns the law's model:
    (theta_SP, x) -> (log L_Sn, vjp) with vjp(psi_Sn) = sum_n psi_n d log L_n / d theta."""
    def model(th, x):
        phis = features(x)
        u = [th @ phi.T for phi in phis]  # (S, n) each
        m = np.maximum.reduce(u)
        ex = [np.exp(uk - m) for uk in u]
        tot = sum(ex)
        # the softmax weight of a term is its share of L
        return m + np.log(tot), lambda psi: sum(((psi * e / tot) @ phi) for e, phi in
                                                zip(ex, phis, strict=True))
    return model


def _cols(n, P, cols: dict) -> np.ndarray:
    """An (n, P) feature matrix with the given columns ({index: values}) and zeros elsewhere."""
    out = np.zeros((n, P))
    for i, v in cols.items():
        out[:, i] = v
    return out


def _chinchilla_terms(x):
    # theta = (log A, log B, log E, alpha, beta)
    n, d = x["n"], x["d"]
    k = n.size
    return [_cols(k, 5, {0: 1, 3: -n}), _cols(k, 5, {1: 1, 4: -d}), _cols(k, 5, {2: 1})]


def _krajewski_terms(x):
    # theta = (log a, alpha, log b, beta, log g, gamma, log c)
    n, d, g = x["n"], x["d"], x["g"]
    k = n.size
    return [_cols(k, 7, {4: 1, 5: -g, 1: -n}), _cols(k, 7, {0: 1, 1: -n}),
            _cols(k, 7, {2: 1, 3: -d}), _cols(k, 7, {6: 1})]


def _joint_terms(x):
    # theta = (log a, alpha, gamma, delta, log b, beta, zeta, omega, log c)
    n, d, y = x["n"], x["d"], x["y"]
    k = n.size
    return [_cols(k, 9, {0: 1, 1: -n, 2: -n * y, 3: y}),
            _cols(k, 9, {4: 1, 5: -d, 6: -d * y, 7: y}), _cols(k, 9, {8: 1})]


def _clark(th, x):
    # theta = (a, b, c, d, v, w): v = log(1/E_start - 1/E_max), w = log E_max
    a, b, c, d, v, w = (th[:, i, None] for i in range(6))
    n = x["n"]
    u = x["e1"] + np.exp(-v)  # E - 1 + (1/E_start - 1/E_max)^-1
    h = 1 / u + np.exp(-w)    # 1/Ê
    y = -np.log(h)
    slope = b + c * n
    dv, dw = -slope * np.exp(-v) / (h * u * u), slope * np.exp(-w) / h

    def vjp(psi):
        return np.stack([psi @ n, (psi * y).sum(1), (psi * y) @ n, psi.sum(1), (psi * dv).sum(1),
                         (psi * dw).sum(1)], axis=1)
    return a * n + b * y + c * n * y + d, vjp


def _exp_keys(*keys):
    """Public <-> internal for laws whose listed keys are fitted as their logs."""
    def to_public(names, v):
        with np.errstate(over="ignore"):
            return {k: float(np.exp(t) if k in keys else t) for k, t in zip(names, v, strict=True)}

    def to_internal(names, c):
        # a coefficient fitted to 0 (an underflow) maps to log 1e-300, not -inf: -inf x 0
        # would turn the law's other terms into nan
        return np.array([math.log(max(c[k], 1e-300)) if k in keys else c[k] for k in names],
                        dtype=float)
    return to_public, to_internal


def _clark_public(names, v):
    a, b, c, d, lv, lw = (float(t) for t in v)
    with np.errstate(over="ignore", divide="ignore"):
        e_max = float(np.exp(lw))
        e_start = float(1 / (np.exp(lv) + 1 / e_max))
    return {"a": a, "b": b, "c": c, "d": d, "E_start": e_start, "E_max": e_max}


def _clark_internal(names, c):
    if not 0 < c["E_start"] < c["E_max"]:
        raise ValueError(f"clark: need 0 < E_start < E_max, got {c['E_start']}, {c['E_max']}")
    return np.array([c["a"], c["b"], c["c"], c["d"],
                     math.log(1 / c["E_start"] - 1 / c["E_max"]), math.log(c["E_max"])])


def _grid(*axes) -> np.ndarray:
    return np.array(list(itertools.product(*axes)), dtype=float)


@dataclass(frozen=True)
class Law:
    """One law: its public coefficients (in the order fitted), the inputs it needs beyond
    N and L, the log-loss model (theta_SP, x) -> (log L_Sn, vjp), the maps between public
    and fitted parameters, and the default grid of starts."""

    params: tuple[str, ...]
    needs: tuple[str, ...]
    model: Callable
    to_public: Callable
    to_internal: Callable
    grid: Callable[[], np.ndarray] | None


REGISTRY = {
    # Hoffmann et al.'s grid (as in Epoch's replication): 6 x 6 x 5 x 5 x 5 = 4500 starts
    "chinchilla": Law(("A", "B", "E", "alpha", "beta"), ("D",), _sum_of_powers(_chinchilla_terms),
                      *_exp_keys("A", "B", "E"),
                      lambda: _grid(np.arange(0, 30, 5), np.arange(0, 30, 5),
                                    np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5),
                                    np.arange(0, 2.5, 0.5))),
    "clark": Law(("a", "b", "c", "d", "E_start", "E_max"), ("E",), _clark, _clark_public,
                 _clark_internal, None),  # starts: least squares at a grid of (E_start, E_max)
    "krajewski": Law(("a", "alpha", "b", "beta", "g", "gamma", "c"), ("D", "G"),
                     _sum_of_powers(_krajewski_terms),
                     *_exp_keys("a", "b", "g", "c"),
                     lambda: _grid((0, 4, 8), (0.1, 0.3, 0.6), (0, 4, 8), (0.1, 0.3, 0.6),
                                   (0, 3), (0.3, 0.8), (-1, 0, 0.7))),
    "joint": Law(("a", "alpha", "gamma", "delta", "b", "beta", "zeta", "omega", "c"), ("D", "E"),
                 _sum_of_powers(_joint_terms), *_exp_keys("a", "b", "c"),
                 lambda: _grid((0, 5, 10, 15), (0.1, 0.3, 0.6), (0,), (-0.2, 0, 0.2),
                               (0, 5, 10, 15), (0.1, 0.3, 0.6), (0,), (-0.2, 0, 0.2),
                               (-1, 0, 0.5))),
}


# ---------------------------------------------------------------- inputs


def _law(name: str) -> Law:
    if name not in REGISTRY:
        raise ValueError(f"law: unknown law {name!r}; choose from {', '.join(LAWS)}")
    return REGISTRY[name]


def _array(name, v, n=None, *, low=0.0, strict=True):
    a = np.asarray(v, dtype=float).reshape(-1)
    if n is not None and a.size == 1 and n != 1:
        a = np.full(n, a[0])
    if n is not None and a.size != n:
        raise ValueError(f"{name}: {a.size} values but N has {n} (lengths differ)")
    bad = ~np.isfinite(a) | ((a <= low) if strict else (a < low))
    if bad.any():
        want = f"> {low:g}" if strict else f">= {low:g}"
        raise ValueError(f"{name}: every value must be finite and {want}; "
                         f"got {a[bad][:3].tolist()}")
    return a


def _inputs(law: str, N, D, E, G, *, E_max=None) -> dict[str, np.ndarray]:
    """Validated log inputs of a law: n = log N, d = log D, g = log G, y = log Ê, e1 = E - 1."""
    spec = _law(law)
    N = _array("N", N)
    x = {"n": np.log(N)}
    for name, v, low, strict in (("D", D, 0.0, True), ("E", E, 1.0, False), ("G", G, 0.0, True)):
        if name not in spec.needs:
            continue
        if v is None:
            raise ValueError(f"{law} needs {name}")
        a = _array(name, v, N.size, low=low, strict=strict)
        if name == "D":
            x["d"] = np.log(a)
        elif name == "G":
            x["g"] = np.log(a)
        else:
            x["e1"] = a - 1
            x["y"] = np.log(e_hat(a, 1.0, E_max))
    return x


# ---------------------------------------------------------------- batched L-BFGS


class _Objective:
    """sum_i w_i Huber(log L_pred_i - log L_i) and its gradient, for a batch of parameter
    rows; ``weights`` (S, n) gives each row its own weights (bootstrap, leave-one-out)."""

    def __init__(self, spec: Law, x, logL, *, delta, weights=None, free=None, base=None):
        self.spec, self.x, self.logL, self.delta = spec, x, logL, delta
        self.weights = np.ones_like(logL) if weights is None else weights
        P = len(spec.params)
        self.free = np.arange(P) if free is None else free
        self.base = np.zeros(P) if base is None else base

    def full(self, th):
        out = np.broadcast_to(self.base, (th.shape[0], self.base.size)).copy()
        out[:, self.free] = th
        return out

    def __call__(self, th, rows=None):
        w = self.weights if self.weights.ndim == 1 else self.weights[rows]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            pred, vjp = self.spec.model(self.full(th), self.x)
            r = pred - self.logL
            ar = np.abs(r)
            hub = np.where(ar <= self.delta, 0.5 * r * r, self.delta * (ar - 0.5 * self.delta))
            f = (w * hub).sum(axis=1)
            psi = w * np.clip(r, -self.delta, self.delta)
            g = vjp(psi)[:, self.free]
        return f, g


def lbfgs_batch(fun, x0, *, iters: int = 500, m: int = 10, ftol: float = 1e-13,
                c1: float = 1e-4, halvings: int = 40):
    """Minimises S independent problems at once: ``fun(x_SP, rows) -> (f_S, g_SP)`` for
    those rows of the batch. Backtracking (Armijo) line search per row; a row stops when its
    step lowers f by less than ftol (relative) or no step lowers it. Returns (x, f)."""
    x = np.array(x0, dtype=float)
    S, P = x.shape
    f, g = fun(x, np.arange(S))
    active = np.isfinite(f) & np.isfinite(g).all(axis=1)
    f = np.where(active, f, np.inf)
    s_hist, y_hist, rho = np.zeros((m, S, P)), np.zeros((m, S, P)), np.zeros((m, S))
    scale = 1 / np.maximum(np.linalg.norm(g, axis=1), 1.0)  # first step's length, then s.y/y.y
    scale[~active] = 0
    for it in range(iters):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        gi = g[idx]
        slots = [(it - 1 - j) % m for j in range(min(it, m))]  # newest first
        q, alpha = gi.copy(), []
        for k in slots:
            a = rho[k, idx] * (s_hist[k, idx] * q).sum(1)
            q -= a[:, None] * y_hist[k, idx]
            alpha.append(a)
        q *= scale[idx, None]
        for k, a in zip(reversed(slots), reversed(alpha), strict=True):
            b = rho[k, idx] * (y_hist[k, idx] * q).sum(1)
            q += s_hist[k, idx] * (a - b)[:, None]
        d = -q
        gd = (gi * d).sum(1)
        uphill = ~(gd < 0)  # a stale curvature pair: fall back to steepest descent
        d[uphill] = -gi[uphill] * scale[idx[uphill], None]
        gd[uphill] = (gi[uphill] * d[uphill]).sum(1)
        t = np.ones(idx.size)
        x_new, f_new, g_new = x[idx].copy(), np.full(idx.size, np.inf), gi.copy()
        pend = np.arange(idx.size)
        for _ in range(halvings):
            xt = x[idx[pend]] + t[pend, None] * d[pend]
            ft, gt = fun(xt, idx[pend])
            ok = (np.isfinite(ft) & np.isfinite(gt).all(1)
                  & (ft <= f[idx[pend]] + c1 * t[pend] * gd[pend]))
            took = pend[ok]
            x_new[took], f_new[took], g_new[took] = xt[ok], ft[ok], gt[ok]
            pend = pend[~ok]
            if not pend.size:
                break
            t[pend] *= 0.5
        moved = np.isfinite(f_new)
        s, yv = x_new - x[idx], g_new - gi
        sy, yy = (s * yv).sum(1), (yv * yv).sum(1)
        with np.errstate(invalid="ignore", over="ignore"):
            good = moved & (yy > 0) & (sy > 1e-12 * np.sqrt((s * s).sum(1) * yy))
        k = it % m
        s_hist[k, idx] = np.where(good[:, None], s, 0)
        y_hist[k, idx] = np.where(good[:, None], yv, 0)
        rho[k, idx] = np.where(good, 1 / np.where(good, sy, 1), 0)
        scale[idx[good]] = sy[good] / yy[good]
        done = ~moved | (f[idx] - f_new <= ftol * np.abs(f[idx]))
        x[idx[moved]], f[idx[moved]], g[idx[moved]] = x_new[moved], f_new[moved], g_new[moved]
        active[idx[done]] = False
    return x, f


def _polish(obj: _Objective, th0):
    """scipy L-BFGS-B from th0 at tight tolerance (objective rescaled to about 1: scipy's
    ftol is relative to max(|f|, 1), and Huber sums here are ~1e-3)."""
    from scipy.optimize import minimize

    f0 = float(obj(th0[None])[0][0])
    k = 1 / f0 if f0 > 0 and math.isfinite(f0) else 1.0

    def fg(t):
        f, g = obj(t[None])
        if not math.isfinite(f[0]) or not np.isfinite(g).all():
            return 1e300, np.zeros_like(t)  # outside the law's domain: a wall to back off from
        return k * f[0], k * g[0]

    res = minimize(fg, th0, jac=True, method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000, "maxcor": 20})
    return res.x, float(obj(res.x[None])[0][0])


def _multistart(obj: _Objective, starts, *, screen=40, keep=64, polish=4, iters=2000):
    """The batched search: all starts for ``screen`` steps, the ``keep`` best to convergence,
    the ``polish`` best through scipy; returns (best parameters, best objective)."""
    x, f = lbfgs_batch(obj, starts, iters=screen)
    order = np.argsort(f)[:keep]
    x, f = lbfgs_batch(obj, x[order], iters=iters)
    i = int(np.argmin(f))
    if not math.isfinite(f[i]):
        raise ValueError("the fit failed: the objective is not finite at any start")
    best_x, best_f = x[i], float(f[i])
    for i in np.argsort(f)[:polish]:
        if math.isfinite(f[i]):
            xp, fp = _polish(obj, x[i])
            if fp < best_f:
                best_x, best_f = xp, fp
    return best_x, best_f


# ---------------------------------------------------------------- fitting API


def fit_law(law: str, *, N, D=None, L, E=None, G=None, ci: bool = False, bootstrap: int = 1000,
            seed: int = 0, delta: float = HUBER_DELTA, starts=None, screen: int = 40,
            keep: int = 64, polish: int = 4, E_start: float | None = None,
            E_max: float | None = None) -> dict:
    """Fits one law; returns its coefficients, ``objective`` (the Huber sum) and ``n``, plus
    ``ci`` = {name: (2.5%, 97.5%)} over ``bootstrap`` resamples when ``ci``. ``starts``: a
    list of coefficient dicts to start from instead of the law's grid. ``E_start``/``E_max``:
    clark fixes both when both are given; joint takes ``E_max`` (fixed) for its Ê."""
    spec = _law(law)
    if law != "clark" and E_start is not None:
        raise ValueError("E_start: only clark takes it (joint uses E_start = 1)")
    if law not in ("clark", "joint") and E_max is not None:
        raise ValueError(f"E_max: only clark and joint take it, not {law}")
    if law == "clark" and (E_start is None) != (E_max is None):
        raise ValueError("clark: give both E_start and E_max (fixed) or neither (fitted)")
    x = _inputs(law, N, D, E, G, E_max=E_max if law == "joint" else None)
    logL = np.log(_array("L", L, x["n"].size))
    free, base = None, None
    if law == "clark" and E_max is not None:
        base = spec.to_internal(spec.params, {"a": 0, "b": 0, "c": 0, "d": 0, "E_start": E_start,
                                              "E_max": E_max})
        free = np.arange(4)
    n_free = len(spec.params) if free is None else free.size
    if logL.size <= n_free:
        raise ValueError(f"{law} fits {n_free} parameters: it needs at least {n_free + 1} runs, "
                         f"got {logL.size}")
    for name, key in (("E", "y"), ("G", "g")):
        if key in x and np.ptp(x[key]) == 0:
            raise ValueError(f"{law} needs runs with at least two different {name} "
                             f"(its {name} terms are not identifiable otherwise)")
    obj = _Objective(spec, x, logL, delta=delta, free=free, base=base)
    if starts is not None:
        th0 = np.stack([spec.to_internal(spec.params, {**_fixed(law, E_start, E_max), **s})
                        for s in starts])
        th0 = th0 if free is None else th0[:, free]
    elif law == "clark":
        th0 = _clark_starts(x, logL, E_start, E_max)
    else:
        th0 = spec.grid()
    th, fbest = _multistart(obj, th0, screen=screen, keep=keep, polish=polish)
    out = {**spec.to_public(spec.params, obj.full(th[None])[0]), "objective": fbest,
           "n": int(logL.size)}
    if law == "joint":
        out["E_max"] = E_max
    if ci:
        out["ci"] = _bootstrap(obj, th, spec, bootstrap=bootstrap, seed=seed)
    return out


def _fixed(law, E_start, E_max):
    return {"E_start": E_start, "E_max": E_max} if law == "clark" and E_max is not None else {}


def _clark_starts(x, logL, E_start, E_max):
    """(a, b, c, d) by least squares on log L at each (E_start, E_max) of a small grid."""
    pairs = [(E_start, E_max)] if E_max is not None else \
        [(s, m) for s in (1.5, 3.0, 8.0) for m in (30.0, 300.0, 3000.0)]
    rows = []
    for s, m in pairs:
        y = np.log(e_hat(x["e1"] + 1, s, m))
        X = np.stack([x["n"], y, x["n"] * y, np.ones_like(y)], axis=1)
        coef = np.linalg.lstsq(X, logL, rcond=None)[0]
        rows.append(coef if E_max is not None else np.concatenate(
            [coef, [math.log(1 / s - 1 / m), math.log(m)]]))
    return np.array(rows)


def _bootstrap(obj: _Objective, th, spec: Law, *, bootstrap: int, seed: int):
    """Percentile intervals: each resample (points drawn with replacement) refitted from the
    full-data optimum, all resamples as one batch."""
    if bootstrap < 2:
        raise ValueError(f"bootstrap: need at least 2 resamples, got {bootstrap}")
    n = obj.logL.size
    rng = np.random.default_rng(seed)
    counts = np.zeros((bootstrap, n))
    np.add.at(counts, (np.arange(bootstrap)[:, None], rng.integers(0, n, (bootstrap, n))), 1)
    boot = _Objective(obj.spec, obj.x, obj.logL, delta=obj.delta, weights=counts, free=obj.free,
                      base=obj.base)
    xb, fb = lbfgs_batch(boot, np.repeat(th[None], bootstrap, axis=0), iters=2000)
    pub = [spec.to_public(spec.params, obj.full(r[None])[0]) for r in xb[np.isfinite(fb)]]
    # a coefficient the resample cannot pin down may run off to infinity: its interval says so
    return {k: tuple(float(q) for q in np.percentile([p[k] for p in pub], [2.5, 97.5]))
            for k in spec.params}


def objective(law: str, coefs: dict, *, N, D=None, L, E=None, G=None,
              delta: float = HUBER_DELTA) -> float:
    """The fit's objective at given coefficients: sum_i Huber_delta(log L_pred_i - log L_i)."""
    pred = predict(law, coefs, N=N, D=D, E=E, G=G)
    r = np.log(pred) - np.log(_array("L", L, pred.size))
    return float(np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum())


def fit_chinchilla(N, D, L, *, ci: bool = False, bootstrap: int = 1000, seed: int = 0,
                   **opts) -> dict:
    """Chinchilla approach 3: A, B, E, alpha, beta, ``objective`` (and ``ci``)."""
    return fit_law("chinchilla", N=N, D=D, L=L, ci=ci, bootstrap=bootstrap, seed=seed, **opts)


def predict(law: str, coefs: dict, *, N, D=None, E=None, G=None) -> np.ndarray:
    """The law's loss at each run (arrays broadcast against N)."""
    spec = _law(law)
    missing = [k for k in spec.params if k not in coefs]
    if missing:
        raise ValueError(f"{law}: coefficients lack {missing}")
    N = np.asarray(N, dtype=float)
    shape = np.broadcast_shapes(N.shape, *(np.shape(v) for v in (D, E, G) if v is not None))
    bc = (lambda v: None if v is None else np.broadcast_to(np.asarray(v, float), shape).ravel())
    x = _inputs(law, bc(N), bc(D), bc(E), bc(G),
                E_max=coefs.get("E_max") if law == "joint" else None)
    th = spec.to_internal(spec.params, coefs)[None]
    return np.exp(spec.model(th, x)[0][0]).reshape(shape)


# ---------------------------------------------------------------- compute-optimal models


def compute_optimal(law: str, coefs: dict, C, *, E=None, G=None,
                    flops_per_token: Callable = lambda N: 6 * N):
    """(N_opt, D_opt, L_opt) minimising the law at each budget C, D = C / flops_per_token(N)."""
    from scipy.optimize import minimize_scalar

    if law == "clark":
        raise ValueError("clark has no data term: its loss falls with N at any budget")
    C = _array("C", C)
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
    C = _array("C", C)
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
    N = _array("N", N)
    return N, _array("D", D, N.size), _array("L", L, N.size), _array("C", C, N.size)


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


# ---------------------------------------------------------------- results tables


COLUMNS = ("N_active", "D", "C", "E", "G", "loss")


def read_results(path) -> list[dict]:
    """The runs with ``status == "done"`` of a sweep's results CSV, as dicts of floats over
    ``COLUMNS`` (+ ``budget`` when present; E and G default to 1 when absent)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such results table: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        head = reader.fieldnames or []
        missing = [c for c in ("N_active", "D", "C", "loss") if c not in head]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (has {head})")
        rows = []
        for line, r in enumerate(reader, start=2):
            if "status" in head and r["status"] != "done":
                continue
            row = {}
            for k in COLUMNS:
                v = r.get(k) or ("1" if k in ("E", "G") else "")  # absent E, G: dense
                try:
                    row[k] = float(v)
                except ValueError:
                    raise ValueError(f"{path}, line {line}: {k} = {v!r} is not a number "
                                     f"on a finished run") from None
            if r.get("budget"):
                row["budget"] = float(r["budget"])
            rows.append(row)
    return rows


def columns(table) -> dict[str, np.ndarray]:
    """{column: array} from a table: a list of dicts or a pandas DataFrame."""
    if hasattr(table, "to_dict"):
        table = table.to_dict("records")
    if not table:
        raise ValueError("the results table has no finished runs")
    keys = [k for k in (*COLUMNS, "budget") if k in table[0]]
    out = {k: np.array([float(r.get(k, 1.0)) for r in table]) for k in keys}
    for k in ("E", "G"):
        out.setdefault(k, np.ones(len(table)))
    out.setdefault("budget", out["C"])
    return out


def law_inputs(law: str, cols) -> dict:
    """fit_law's keyword arguments for a law from ``columns(table)`` (N = N_active)."""
    return {"N": cols["N_active"], "D": cols["D"], "L": cols["loss"],
            **({"E": cols["E"]} if "E" in REGISTRY[law].needs else {}),
            **({"G": cols["G"]} if "G" in REGISTRY[law].needs else {})}


def held_out_errors(table, laws=LAWS, *, mode: str = "auto", rtol: float = 0.05,
                    fits: dict | None = None) -> dict:
    """Each law's error on runs it was not fitted to: ``largest`` fits all budgets but the
    largest and predicts that one; ``loo`` refits without each run in turn (one batch, from
    the full-data fit); ``auto`` takes ``largest`` when there are 2+ budgets and enough runs.
    Returns {law: {mode, n_held_out, rmse_log, mean_abs_rel, max_abs_rel}} or {law: {error}}."""
    if mode not in ("auto", "largest", "loo"):
        raise ValueError(f"mode: unknown {mode!r}; choose from auto, largest, loo")
    cols = columns(table)
    b = budgets(cols["budget"], rtol)
    out = {}
    for law in laws:
        spec = _law(law)
        inp = law_inputs(law, cols)
        try:
            held = b == b.max()
            m = mode
            if m == "auto":
                m = "largest" if b.max() > 0 and (~held).sum() > len(spec.params) + 1 else "loo"
            if m == "largest":
                train = {k: v[~held] for k, v in inp.items()}
                coefs = fit_law(law, **train)
                pred = predict(law, coefs, **{k: v[held] for k, v in inp.items() if k != "L"})
                meas = inp["L"][held]
            else:
                pred, meas = _loo(law, inp, (fits or {}).get(law)), inp["L"]
        except ValueError as exc:
            out[law] = {"error": str(exc)}
            continue
        rel = pred / meas - 1
        out[law] = {"mode": m, "n_held_out": int(meas.size),
                    "rmse_log": float(np.sqrt(np.mean(np.log(pred / meas) ** 2))),
                    "mean_abs_rel": float(np.mean(np.abs(rel))),
                    "max_abs_rel": float(np.max(np.abs(rel)))}
    return out


def _loo(law, inp, full=None):
    """Leave-one-out predictions: run i predicted by the fit with weight 0 on run i."""
    spec = REGISTRY[law]
    full = full or fit_law(law, **inp)
    x = _inputs(law, inp["N"], inp.get("D"), inp.get("E"), inp.get("G"),
                E_max=full.get("E_max") if law == "joint" else None)
    logL = np.log(inp["L"])
    n = logL.size
    if n <= len(spec.params) + 1:
        raise ValueError(f"{law}: {n} runs are too few to leave one out")
    obj = _Objective(spec, x, logL, delta=HUBER_DELTA, weights=1 - np.eye(n))
    th = spec.to_internal(spec.params, full)
    xs, _ = lbfgs_batch(obj, np.repeat(th[None], n, axis=0), iters=2000)
    pred, _ = spec.model(xs, x)
    return np.exp(pred[np.arange(n), np.arange(n)])


def families(table) -> dict[str, np.ndarray]:
    """{"E=8 G=2": run indices} for each (E, G) of a table, dense (E = 1) first."""
    cols = columns(table)
    keys = sorted({(e, g) for e, g in zip(cols["E"], cols["G"], strict=True)})
    return {f"E={e:g} G={g:g}": np.flatnonzero((cols["E"] == e) & (cols["G"] == g))
            for e, g in keys}


def fit_table(table, laws="all", *, bootstrap: int = 0, seed: int = 0, rtol: float = 0.05) -> dict:
    """Everything ``moe-gato fit`` reports for a results table: each law's coefficients
    (with bootstrap intervals when ``bootstrap``), held-out errors, and approaches 1 and 2
    for each (E, G) family run at several budgets. With ``laws="all"`` or a list, a law the
    table cannot identify (e.g. joint on dense runs only, or a fit whose coefficients run
    off to infinity) is listed as skipped, with the reason; one named law raises instead."""
    if laws == "all":
        names = LAWS
    else:
        names = tuple(laws.split(",")) if isinstance(laws, str) else tuple(laws)
    for law in names:
        _law(law)
    cols = columns(table)
    # C = k N D for every run of a sweep (k = 6 plus attention): the budget's N <-> D exchange
    k = float(np.median(cols["C"] / (cols["N_active"] * cols["D"])))
    doc = {"n_runs": int(cols["loss"].size), "flops_per_param_token": k, "laws": {},
           "held_out": {}, "families": {}}
    for law in names:
        try:
            ci = {"ci": True, "bootstrap": bootstrap, "seed": seed} if bootstrap else {}
            coefs = fit_law(law, **law_inputs(law, cols), **ci)
            bad = {k: v for k, v in coefs.items()
                   if isinstance(v, float) and not math.isfinite(v)}
            if bad:
                raise ValueError(f"degenerate fit: {bad} (the runs do not pin the law down; "
                                 f"more budgets or widths are needed)")
            doc["laws"][law] = coefs
        except ValueError as exc:
            if isinstance(laws, str) and laws != "all" and "," not in laws:
                raise
            doc["laws"][law] = {"skipped": str(exc)}
    fitted = [law for law in names if "skipped" not in doc["laws"][law]]
    doc["held_out"] = held_out_errors(table, fitted, rtol=rtol, fits=doc["laws"])
    for name, idx in families(table).items():
        fam = {"runs": int(idx.size), "budgets": int(budgets(cols["budget"][idx], rtol).max() + 1)}
        if fam["budgets"] >= 2:
            args = (cols["N_active"][idx], cols["D"][idx], cols["loss"][idx], cols["budget"][idx])
            fam["approach1"] = approach1(*args, rtol=rtol)
            fam["approach2"] = approach2(*args, rtol=rtol)
        doc["families"][name] = fam
    if "chinchilla" in fitted:
        c = doc["laws"]["chinchilla"]
        doc["chinchilla_exponents"] = {"a": c["beta"] / (c["alpha"] + c["beta"]),
                                       "b": c["alpha"] / (c["alpha"] + c["beta"])}
    return doc


EPOCH_CSV = Path(__file__).resolve().parent / "data" / "chinchilla_epoch.csv"


def load_epoch_chinchilla(path: str | Path | None = None):
    """(N, D, L) of Epoch AI's extraction of Chinchilla's runs (scaling/data/README.md), the
    5 highest losses dropped as Epoch did; D = C / (6 N). ``path`` (or the environment's
    MOE_GATO_CHINCHILLA_CSV) replaces the copy kept in the repo."""
    import csv
    import os

    path = Path(path or os.environ.get("MOE_GATO_CHINCHILLA_CSV") or EPOCH_CSV)
    if not path.is_file():
        raise ValueError(f"Epoch's Chinchilla data not found at {path}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    N = np.array([float(r["Model Size"]) for r in rows])
    C = np.array([float(r["Training FLOP"]) for r in rows])
    L = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(L, kind="stable")[:-5]  # Epoch: the 5 highest losses dropped
    return N[keep], C[keep] / (6 * N[keep]), L[keep]


def finite_json(v):
    """A document with inf / nan as None (JSON has neither) and numpy scalars as Python
    numbers."""
    if isinstance(v, dict):
        return {k: finite_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite_json(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


def best_law(doc: dict, *, exclude=()) -> str | None:
    """The law of a fit document (``fit_table``) fitted with the lowest held-out RMSE of
    log L; the first fitted one when none has a held-out error; None when none was fitted.
    ``exclude``: laws left out of the choice."""
    fitted = [law for law, c in doc["laws"].items() if "skipped" not in c and law not in exclude]
    held = doc.get("held_out", {})
    scored = [(held.get(law, {}).get("rmse_log"), law) for law in fitted]
    scored = [(v, law) for v, law in scored if v is not None and math.isfinite(v)]
    return min(scored)[1] if scored else (fitted[0] if fitted else None)
