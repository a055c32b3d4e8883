"""The scaling laws: their formulas, in log space, and their inputs. One law per entry of
``REGISTRY``; ``predict`` evaluates any of them.

Natural logs; N = active parameters, D = tokens, E = experts or expansion rate with 1 =
dense, G = granularity:
- ``chinchilla`` (Hoffmann et al. 2022, approach 3): L = E + A / N^alpha + B / D^beta.
- ``clark`` (Clark et al. 2022, routed LMs): log L = a log N + b log Ê + c log N log Ê + d,
  1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max. No data term (D is not used).
  E_start and E_max are fitted, or fixed when both are given (opts ``E_start=, E_max=``).
  Clark et al. write log10: a and b carry over, c and d do not (c x ln 10, d / ln 10).
- ``krajewski`` (Krajewski et al. 2024, Eq. 9): L = c + (g / G^gamma + a) / N^alpha + b / D^beta.
  No term for E: the paper holds the expansion rate fixed.
- ``joint`` (Ludziejewski et al. 2025): L = a Ê^delta N^-(alpha + gamma ln Ê)
  + b Ê^omega D^-(beta + zeta ln Ê) + c, with Clark's Ê at E_start = 1, so a dense model has
  Ê = 1 and the law is Chinchilla's; E_max is fixed (opt ``E_max=``; default None: Ê = E).

Each law's coefficients are fitted in log space where they are scales (a = log A, ...), which
keeps every term positive. ``Law.bounds`` is the box of plausible coefficients (public
units): a fit that ends on its edge is flagged (``scaling.identify``), not trusted.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

LAWS = ("chinchilla", "clark", "krajewski", "joint")
#: the variables each law has beyond N: a law ranks models only along these
VARIABLES = {"chinchilla": ("D",), "clark": ("E",), "krajewski": ("D", "G"), "joint": ("D", "E")}

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
    and fitted parameters, the default grid of starts and the plausible box of each
    coefficient (public units)."""

    params: tuple[str, ...]
    needs: tuple[str, ...]
    model: Callable
    to_public: Callable
    to_internal: Callable
    grid: Callable[[], np.ndarray] | None
    bounds: dict[str, tuple[float, float]]

#: plausible coefficients: scales, irreducible losses and exponents of published fits lie well
#: inside; an irreducible loss collapsed to ~0 or an exponent of 45 lies on or past an edge
_SCALE, _FLOOR, _EXP = (1e-8, 1e15), (1e-3, 20.0), (0.01, 2.0)

REGISTRY = {
    # Hoffmann et al.'s grid (as in Epoch's replication): 6 x 6 x 5 x 5 x 5 = 4500 starts
    "chinchilla": Law(("A", "B", "E", "alpha", "beta"), ("D",), _sum_of_powers(_chinchilla_terms),
                      *_exp_keys("A", "B", "E"),
                      lambda: _grid(np.arange(0, 30, 5), np.arange(0, 30, 5),
                                    np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5),
                                    np.arange(0, 2.5, 0.5)),
                      {"A": _SCALE, "B": _SCALE, "E": _FLOOR, "alpha": _EXP, "beta": _EXP}),
    "clark": Law(("a", "b", "c", "d", "E_start", "E_max"), ("E",), _clark, _clark_public,
                 _clark_internal, None,  # starts: least squares at a grid of (E_start, E_max)
                 {"a": (-2.0, 2.0), "b": (-2.0, 2.0), "c": (-1.0, 1.0), "d": (-50.0, 50.0),
                  "E_start": (0.01, 100.0), "E_max": (1.5, 1e6)}),
    "krajewski": Law(("a", "alpha", "b", "beta", "g", "gamma", "c"), ("D", "G"),
                     _sum_of_powers(_krajewski_terms),
                     *_exp_keys("a", "b", "g", "c"),
                     lambda: _grid((0, 4, 8), (0.1, 0.3, 0.6), (0, 4, 8), (0.1, 0.3, 0.6),
                                   (0, 3), (0.3, 0.8), (-1, 0, 0.7)),
                     {"a": _SCALE, "alpha": _EXP, "b": _SCALE, "beta": _EXP, "g": _SCALE,
                      "gamma": _EXP, "c": _FLOOR}),
    "joint": Law(("a", "alpha", "gamma", "delta", "b", "beta", "zeta", "omega", "c"), ("D", "E"),
                 _sum_of_powers(_joint_terms), *_exp_keys("a", "b", "c"),
                 lambda: _grid((0, 5, 10, 15), (0.1, 0.3, 0.6), (0,), (-0.2, 0, 0.2),
                               (0, 5, 10, 15), (0.1, 0.3, 0.6), (0,), (-0.2, 0, 0.2),
                               (-1, 0, 0.5)),
                 {"a": _SCALE, "alpha": _EXP, "gamma": (-1.0, 1.0), "delta": (-3.0, 3.0),
                  "b": _SCALE, "beta": _EXP, "zeta": (-1.0, 1.0), "omega": (-3.0, 3.0),
                  "c": _FLOOR}),
}
#: coefficients fitted as their logs (scales and irreducible losses)
LOG_PARAMS = {"chinchilla": ("A", "B", "E"), "clark": ("E_start", "E_max"),
              "krajewski": ("a", "b", "g", "c"), "joint": ("a", "b", "c")}


# ---------------------------------------------------------------- inputs


def law_spec(name: str) -> Law:
    if name not in REGISTRY:
        raise ValueError(f"law: unknown law {name!r}; choose from {', '.join(LAWS)}")
    return REGISTRY[name]


def checked_array(name, v, n=None, *, low=0.0, strict=True):
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


def log_inputs(law: str, N, D, E, G, *, E_max=None) -> dict[str, np.ndarray]:
    """Validated log inputs of a law: n = log N, d = log D, g = log G, y = log Ê, e1 = E - 1."""
    spec = law_spec(law)
    N = checked_array("N", N)
    x = {"n": np.log(N)}
    for name, v, low, strict in (("D", D, 0.0, True), ("E", E, 1.0, False), ("G", G, 0.0, True)):
        if name not in spec.needs:
            continue
        if v is None:
            raise ValueError(f"{law} needs {name}")
        a = checked_array(name, v, N.size, low=low, strict=strict)
        if name == "D":
            x["d"] = np.log(a)
        elif name == "G":
            x["g"] = np.log(a)
        else:
            x["e1"] = a - 1
            x["y"] = np.log(e_hat(a, 1.0, E_max))
    return x


def predict(law: str, coefs: dict, *, N, D=None, E=None, G=None) -> np.ndarray:
    """The law's loss at each run (arrays broadcast against N)."""
    spec = law_spec(law)
    missing = [k for k in spec.params if k not in coefs]
    if missing:
        raise ValueError(f"{law}: coefficients lack {missing}")
    N = np.asarray(N, dtype=float)
    shape = np.broadcast_shapes(N.shape, *(np.shape(v) for v in (D, E, G) if v is not None))
    bc = (lambda v: None if v is None else np.broadcast_to(np.asarray(v, float), shape).ravel())
    x = log_inputs(law, bc(N), bc(D), bc(E), bc(G),
                   E_max=coefs.get("E_max") if law == "joint" else None)
    th = spec.to_internal(spec.params, coefs)[None]
    return np.exp(spec.model(th, x)[0][0]).reshape(shape)

