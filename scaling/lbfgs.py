"""The optimizer behind every law fit: a batched L-BFGS that minimises many independent
problems at once (all starts of a grid, all bootstrap resamples), scipy's L-BFGS-B to
polish the best few, and the multi-start search that combines them.

The objective is Hoffmann et al.'s and Epoch AI's (Besiroglu et al. 2024):
sum_i w_i Huber_delta(log L_pred_i - log L_i), delta = 1e-3, with analytic gradients.
"""

from __future__ import annotations

import math

import numpy as np

from scaling.laws import Law

HUBER_DELTA = 1e-3


class Objective:
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


def scipy_polish(obj: Objective, th0):
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


def multistart(obj: Objective, starts, *, screen=40, keep=64, polish=4, iters=2000):
    """The batched search: all starts for ``screen`` steps, the ``keep`` best to convergence,
    the ``polish`` best through scipy. Returns (best parameters, best objective, the
    converged ``keep`` rows (K, P), their objectives): the other local optima seed the
    bootstrap's refits."""
    x, f = lbfgs_batch(obj, starts, iters=screen)
    order = np.argsort(f)[:keep]
    x, f = lbfgs_batch(obj, x[order], iters=iters)
    i = int(np.argmin(f))
    if not math.isfinite(f[i]):
        raise ValueError("the fit failed: the objective is not finite at any start")
    best_x, best_f = x[i], float(f[i])
    for i in np.argsort(f)[:polish]:
        if math.isfinite(f[i]):
            xp, fp = scipy_polish(obj, x[i])
            if fp < best_f:
                best_x, best_f = xp, fp
    return best_x, best_f, x, f
