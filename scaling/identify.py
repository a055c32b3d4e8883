"""Which fits can be trusted, and which law may answer a question.

    problems = identification("krajewski", N=N, D=D, G=G)   # [] when the runs pin it down
    flags = bound_flags("chinchilla", coefs)                # {"E": "at its lower bound ..."}
    law, why = choose_law(fit_doc, E_values={1.0, 4.0})     # None, why not, when none may

A law is fitted only to runs that can identify it: at least ``RUNS_PER_COEF`` distinct runs
(configurations (N, D, E, G): repeated seeds count once) per fitted coefficient and
``MIN_LEVELS`` distinct values of each variable it has (N; D for laws with a data term; G
for Krajewski's; E for Clark's and the joint law). A fitted coefficient on or past the
edge of its plausible box (``scaling.laws.Law.bounds``: an irreducible loss collapsed to
~0, an exponent of 45) is flagged, and so is a law that fits its runs far below the seed
noise when that is known (an overfit).

A law is *usable* when it was fitted, has a finite held-out error no larger than
``MAX_HELDOUT_RMSE_LOG`` (a law that misses the runs it was not fitted to by more than ~10%
predicts nothing, however clean its coefficients) and no flag. A question
that compares models of several expansion rates E (the optimum over a family, a plan over
expert counts) may only be answered by a usable law with a term for E (Clark's, the joint
law); one about models of one E also by a law without it fitted at that E (``E_scope``).
Among the allowed laws the lowest held-out RMSE of log L wins; laws within the seed noise
of it (``noise_floor``: ``seed_noise`` of runs repeated with several seeds) are tied, and
the one with fewer coefficients wins the tie.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from scaling.laws import LOG_PARAMS, REGISTRY, VARIABLES, law_spec

RUNS_PER_COEF = 2
MIN_LEVELS = 3
#: a law whose in-sample RMSE of log L is below this share of the seed noise overfits
OVERFIT_SHARE = 0.5
#: the largest held-out RMSE of log L (~10% relative) for which a law may be used
MAX_HELDOUT_RMSE_LOG = 0.10
_EDGE = 1e-3  # "on the edge": within this share of the box (log space for scales)


def identification(law: str, *, N, D=None, E=None, G=None, fixed: int = 0) -> list[str]:
    """Why these runs cannot identify the law (empty when they can). ``fixed``: coefficients
    held fixed instead of fitted (Clark's E_start and E_max)."""
    spec = law_spec(law)
    n = np.asarray(N).size
    values = {k: _column(v, n) for k, v in {"N": N, "D": D, "E": E, "G": G}.items()}
    points = len(set(zip(*(values[k].tolist() for k in "NDEG"))))
    P = len(spec.params) - fixed
    out = []
    if points < RUNS_PER_COEF * P:
        out.append(f"{law} fits {P} coefficients: it needs {RUNS_PER_COEF * P} distinct runs "
                   f"({RUNS_PER_COEF} per coefficient), got {points}")
    for name in ["N", *VARIABLES[law]]:
        levels = np.unique(values[name]).size
        if levels < MIN_LEVELS:
            out.append(f"{law} needs {MIN_LEVELS} or more levels of {name}, got {levels}")
    return out


def _column(v, n: int) -> np.ndarray:
    """A variable as n values (absent: 1, as for a dense model; a scalar: repeated)."""
    a = np.asarray(1.0 if v is None else v, dtype=float).reshape(-1)
    return np.broadcast_to(a if a.size == n else a[:1], (n,)).round(12)


def bound_flags(law: str, coefs: dict) -> dict[str, str]:
    """{coefficient: why} for each fitted coefficient on or past its plausible box."""
    spec = law_spec(law)
    out = {}
    for k, (lo, hi) in spec.bounds.items():
        v = coefs.get(k)
        if not isinstance(v, (int, float)):
            continue
        if k in LOG_PARAMS[law]:
            at_lo = v <= lo * (1 + _EDGE * math.log(hi / lo))
            at_hi = v >= hi * (1 - _EDGE * math.log(hi / lo))
        else:
            at_lo, at_hi = v <= lo + _EDGE * (hi - lo), v >= hi - _EDGE * (hi - lo)
        if at_lo or at_hi:
            side, edge = ("lower", lo) if at_lo else ("upper", hi)
            out[k] = f"{v:.3g} is at or past its {side} bound {edge:g}: not identified"
    return out


def overfit_flag(rmse_in_sample: float, noise_floor: float | None) -> str | None:
    """Why a law fits its runs suspiciously well, given the seed noise (None: it does not)."""
    if noise_floor is None or not noise_floor > 0 or not math.isfinite(rmse_in_sample):
        return None
    if rmse_in_sample < OVERFIT_SHARE * noise_floor:
        return (f"in-sample RMSE of log L {rmse_in_sample:.2g} is below {OVERFIT_SHARE:g} x the "
                f"seed noise {noise_floor:.2g}: it fits the noise")
    return None


def ranks_experts(law: str) -> bool:
    """Whether the law has a term for the number of experts (the expansion rate E)."""
    return "E" in VARIABLES[law]


def unusable(doc: dict, law: str) -> str | None:
    """Why the fit document's ``law`` may not be used (None: it may)."""
    coefs = doc.get("laws", {}).get(law)
    if coefs is None:
        return "not in the fit"
    if "skipped" in coefs:
        return f"not fitted: {coefs['skipped']}"
    if coefs.get("flags"):
        return "flagged: " + "; ".join(f"{k} {v}" for k, v in coefs["flags"].items())
    rmse = doc.get("held_out", {}).get(law, {}).get("rmse_log")
    if rmse is None or not math.isfinite(rmse):
        why = doc.get("held_out", {}).get(law, {}).get("error")
        return "no held-out error" + (f" ({why})" if why else "")
    if rmse > MAX_HELDOUT_RMSE_LOG:
        return (f"held-out RMSE of log L {rmse:.3g} is above {MAX_HELDOUT_RMSE_LOG:g}: it does "
                f"not predict the runs it was not fitted to")
    return None


def out_of_scope(law: str, coefs: dict, E_values) -> str | None:
    """Why the law may not compare models of these expansion rates (None: it may)."""
    if E_values is None or ranks_experts(law):
        return None
    E_values = sorted({float(e) for e in E_values})
    if len(E_values) > 1:
        return (f"it has no term for the number of experts and the models span E = "
                f"{', '.join(f'{e:g}' for e in E_values)}")
    scope = coefs.get("E_scope", 1.0 if law == "chinchilla" else None)
    if scope is not None and abs(float(scope) - E_values[0]) > 1e-9:
        return f"it was fitted at E = {float(scope):g}, the models have E = {E_values[0]:g}"
    return None


def choose_law(doc: dict, *, E_values=None, exclude=()) -> tuple[str | None, str]:
    """(law, why it was chosen) for models of the expansion rates ``E_values`` (None: no
    restriction), or (None, why none may be used)."""
    reasons, allowed = [], []
    for law, coefs in doc.get("laws", {}).items():
        if law in exclude:
            continue
        why = unusable(doc, law) or out_of_scope(law, coefs, E_values)
        if why:
            reasons.append(f"{law}: {why}")
        else:
            allowed.append((doc["held_out"][law]["rmse_log"], law))
    if not allowed:
        return None, "no fitted law may be used: " + ("; ".join(reasons) or "none was fitted")
    allowed.sort()
    best_rmse, best = allowed[0]
    floor = doc.get("noise_floor") or 0.0
    tied = [law for rmse, law in allowed if rmse - best_rmse <= floor]
    law = min(tied, key=lambda k: len(REGISTRY[k].params))  # stable: the lower RMSE first
    held = doc["held_out"][law]
    why = (f"{law}: the lowest held-out error among the usable laws (RMSE of log L "
           f"{held['rmse_log']:.4f}, {held.get('mode', '?')}")
    if len(tied) > 1:
        others = ", ".join(t for t in tied if t != law)
        why += f"; tied within the seed noise {floor:.2g} with {others}: the fewest coefficients"
    why += "), no coefficient at a bound"
    if reasons:
        why += "; not used: " + "; ".join(reasons)
    return law, why


def seed_noise(rows) -> float | None:
    """The seed noise of a results table: the pooled standard deviation of log L over runs
    that share (N, D, E, G) but not their seed, or None when no run was repeated."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        key = tuple(round(float(r.get(k, 1.0)), 6) for k in ("N_active", "D", "E", "G"))
        groups[key].append(math.log(float(r["loss"])))
    ss, dof = 0.0, 0
    for logs in groups.values():
        if len(logs) > 1:
            mean = sum(logs) / len(logs)
            ss += sum((v - mean) ** 2 for v in logs)
            dof += len(logs) - 1
    return math.sqrt(ss / dof) if dof else None
