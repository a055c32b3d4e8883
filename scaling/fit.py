"""Scaling laws fitted to training runs: one law (``fit_law``), with bootstrap intervals, and
every law a results table identifies (``fit_table``), with held-out errors and Chinchilla's
approaches 1 and 2 per family.

Fitting, as Hoffmann et al. and Epoch AI (Besiroglu et al. 2024) did: minimise
sum_i Huber_delta(log L_pred_i - log L_i), delta = 1e-3, by L-BFGS from a grid of starts
(for Chinchilla their grid of 4500); the lowest objective wins (``scaling.lbfgs``). Runs
that cannot identify a law are refused, and coefficients at a bound flagged
(``scaling.identify``). Bootstrap resamples are refitted from several starts (the optimum
and the search's other local optima), so a coefficient the runs do not pin down gets a wide
interval, not a point. The laws' formulas: ``scaling.laws``; approaches 1-2 and the law's
optimum: ``scaling.approaches``; tables: ``scaling.results``; what a researcher reads off
(N_opt, D_opt, loss and the MoE multiplier with intervals): ``scaling.readoff``. This module
also re-exports those modules' public names, so ``from scaling.fit import predict,
approach2, read_results`` keeps working.
"""

from __future__ import annotations

import math

import numpy as np

from scaling.approaches import approach1, approach2, budgets, compute_optimal
from scaling.identify import (bound_flags, choose_law, identification, overfit_flag,
                              ranks_experts)
from scaling.laws import (LAWS, REGISTRY, Law, checked_array, e_hat, law_spec, log_inputs,
                          predict)
from scaling.lbfgs import HUBER_DELTA, Objective, lbfgs_batch, multistart
from scaling.results import (COLUMNS, EPOCH_CSV, columns, families, finite_json, law_inputs,
                             load_epoch_chinchilla, read_results)

__all__ = ["LAWS", "REGISTRY", "HUBER_DELTA", "COLUMNS", "EPOCH_CSV", "e_hat", "predict",
           "compute_optimal", "budgets", "approach1", "approach2", "read_results", "columns",
           "law_inputs", "families", "load_epoch_chinchilla", "finite_json", "lbfgs_batch",
           "fit_law", "fit_chinchilla", "objective", "held_out_errors", "fit_table", "best_law"]
#: starts of each bootstrap refit: the optimum and other local optima of the full search
BOOT_STARTS = 4


def fit_law(law: str, *, N, D=None, L, E=None, G=None, ci: bool = False, bootstrap: int = 1000,
            seed: int = 0, delta: float = HUBER_DELTA, starts=None, screen: int = 40,
            keep: int = 64, polish: int = 4, E_start: float | None = None,
            E_max: float | None = None) -> dict:
    """Fits one law; returns its coefficients, ``objective`` (the Huber sum), ``n``,
    ``rmse_log`` (in-sample) and ``flags`` (coefficients at a bound, ``scaling.identify``),
    plus ``ci`` = {name: (2.5%, 97.5%)} over ``bootstrap`` resamples when ``ci`` (and the
    resamples' coefficients under ``samples``). Runs that cannot identify the law are a
    ValueError. ``starts``: a list of coefficient dicts to start from instead of the law's
    grid. ``E_start``/``E_max``: clark fixes both when both are given; joint takes
    ``E_max`` (fixed) for its Ê."""
    spec = law_spec(law)
    if law != "clark" and E_start is not None:
        raise ValueError("E_start: only clark takes it (joint uses E_start = 1)")
    if law not in ("clark", "joint") and E_max is not None:
        raise ValueError(f"E_max: only clark and joint take it, not {law}")
    if law == "clark" and (E_start is None) != (E_max is None):
        raise ValueError("clark: give both E_start and E_max (fixed) or neither (fitted)")
    x = log_inputs(law, N, D, E, G, E_max=E_max if law == "joint" else None)
    logL = np.log(checked_array("L", L, x["n"].size))
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
    problems = identification(law, N=N, D=D, E=E, G=G, fixed=len(spec.params) - n_free)
    if problems:
        raise ValueError("; ".join(problems) + " (the runs do not identify the law)")
    obj = Objective(spec, x, logL, delta=delta, free=free, base=base)
    if starts is not None:
        th0 = np.stack([spec.to_internal(spec.params, {**_fixed(law, E_start, E_max), **s})
                        for s in starts])
        th0 = th0 if free is None else th0[:, free]
    elif law == "clark":
        th0 = _clark_starts(x, logL, E_start, E_max)
    else:
        th0 = spec.grid()
    th, fbest, pool, pool_f = multistart(obj, th0, screen=screen, keep=keep, polish=polish)
    pred = spec.model(obj.full(th[None]), x)[0][0]
    out = {**spec.to_public(spec.params, obj.full(th[None])[0]), "objective": fbest,
           "n": int(logL.size), "rmse_log": float(np.sqrt(np.mean((pred - logL) ** 2)))}
    if law == "joint":
        out["E_max"] = E_max
    out["flags"] = bound_flags(law, out)
    if ci:
        starts = _bootstrap_starts(law, th, pool, pool_f, obj)
        out["ci"], out["samples"] = _bootstrap(obj, starts, spec, bootstrap=bootstrap, seed=seed)
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


def _bootstrap_starts(law: str, th, pool, pool_f, obj: Objective) -> np.ndarray:
    """Where each resample's refit starts (S, P): the full-data optimum and up to
    ``BOOT_STARTS - 1`` other local optima of the full-data search, each pulled inside the
    plausible box. One start alone keeps a refit in the optimum's basin: in a flat valley
    (a coefficient collapsed to ~0) every resample would stay put and the interval would
    shrink to a point."""
    spec = REGISTRY[law]
    lo, hi = (spec.to_internal(spec.params, {k: b[i] for k, b in spec.bounds.items()})
              for i in (0, 1))
    lo, hi = np.minimum(lo, hi)[obj.free], np.maximum(lo, hi)[obj.free]
    chosen = [th]
    for i in np.argsort(pool_f):
        if len(chosen) == BOOT_STARTS:
            break
        cand = np.clip(pool[i], lo, hi)
        if np.isfinite(pool_f[i]) and min(np.abs(cand - c).max() for c in chosen) > 1e-2:
            chosen.append(cand)
    inside = np.clip(th, lo, hi)
    if len(chosen) < BOOT_STARTS and np.abs(inside - th).max() > 1e-2:
        chosen.append(inside)
    return np.array(chosen)


def _bootstrap(obj: Objective, starts, spec: Law, *, bootstrap: int, seed: int):
    """Percentile intervals and the resamples' coefficients: each resample (points drawn
    with replacement) refitted from every start, its lowest objective kept; all resamples
    and starts as one batch."""
    if bootstrap < 2:
        raise ValueError(f"bootstrap: need at least 2 resamples, got {bootstrap}")
    n, S = obj.logL.size, len(starts)
    rng = np.random.default_rng(seed)
    counts = np.zeros((bootstrap, n))
    np.add.at(counts, (np.arange(bootstrap)[:, None], rng.integers(0, n, (bootstrap, n))), 1)
    boot = Objective(obj.spec, obj.x, obj.logL, delta=obj.delta, weights=np.repeat(counts, S, 0),
                     free=obj.free, base=obj.base)
    xb, fb = lbfgs_batch(boot, np.tile(starts, (bootstrap, 1)), iters=2000)
    fb = np.where(np.isfinite(fb), fb, np.inf).reshape(bootstrap, S)
    best = fb.argmin(axis=1)
    keep = np.isfinite(fb[np.arange(bootstrap), best])
    rows = xb.reshape(bootstrap, S, -1)[np.arange(bootstrap), best][keep]
    pub = [spec.to_public(spec.params, obj.full(r[None])[0]) for r in rows]
    # a coefficient the resample cannot pin down may run off to infinity: its interval says so
    ci = {k: tuple(float(q) for q in np.percentile([p[k] for p in pub], [2.5, 97.5]))
          for k in spec.params}
    return ci, pub


def objective(law: str, coefs: dict, *, N, D=None, L, E=None, G=None,
              delta: float = HUBER_DELTA) -> float:
    """The fit's objective at given coefficients: sum_i Huber_delta(log L_pred_i - log L_i)."""
    pred = predict(law, coefs, N=N, D=D, E=E, G=G)
    r = np.log(pred) - np.log(checked_array("L", L, pred.size))
    return float(np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum())


def fit_chinchilla(N, D, L, *, ci: bool = False, bootstrap: int = 1000, seed: int = 0,
                   **opts) -> dict:
    """Chinchilla approach 3: A, B, E, alpha, beta, ``objective`` (and ``ci``)."""
    return fit_law("chinchilla", N=N, D=D, L=L, ci=ci, bootstrap=bootstrap, seed=seed, **opts)


def held_out_errors(table, laws=LAWS, *, mode: str = "auto", rtol: float = 0.05,
                    fits: dict | None = None, n_column: str = "N_active") -> dict:
    """Each law's error on runs it was not fitted to: ``largest`` fits all budgets but the
    largest and predicts that one; ``loo`` refits without each run in turn (one batch, from
    the full-data fit); ``auto`` takes ``largest`` when there are 2+ budgets and the others
    identify the law (``scaling.identify``), else ``loo``.
    Returns {law: {mode, n_held_out, rmse_log, mean_abs_rel, max_abs_rel}} or {law: {error}}."""
    if mode not in ("auto", "largest", "loo"):
        raise ValueError(f"mode: unknown {mode!r}; choose from auto, largest, loo")
    cols = columns(table, n_column)
    b = budgets(cols["budget"], rtol)
    out = {}
    for law in laws:
        law_spec(law)
        inp = law_inputs(law, cols)
        try:
            held = b == b.max()
            train = {k: v[~held] for k, v in inp.items()}
            m = mode
            if m == "auto":
                fixed = {k: v for k, v in train.items() if k != "L"}
                m = "largest" if b.max() > 0 and not identification(law, **fixed) else "loo"
            if m == "largest":
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
    x = log_inputs(law, inp["N"], inp.get("D"), inp.get("E"), inp.get("G"),
                   E_max=full.get("E_max") if law == "joint" else None)
    logL = np.log(inp["L"])
    n = logL.size
    if n <= len(spec.params) + 1:
        raise ValueError(f"{law}: {n} runs are too few to leave one out")
    obj = Objective(spec, x, logL, delta=HUBER_DELTA, weights=1 - np.eye(n))
    th = spec.to_internal(spec.params, full)
    xs, _ = lbfgs_batch(obj, np.repeat(th[None], n, axis=0), iters=2000)
    pred, _ = spec.model(xs, x)
    return np.exp(pred[np.arange(n), np.arange(n)])


def e_scope(law: str, E: np.ndarray) -> float | None:
    """The one expansion rate a law without a term for E is fitted at: chinchilla the
    dense runs' (else the commonest E), krajewski (a law of granularity at fixed E) the
    commonest E of the MoE runs (else 1); None for laws with an E term (all runs)."""
    if ranks_experts(law):
        return None
    values, counts = np.unique(E, return_counts=True)
    moe = values > 1
    if law == "chinchilla" and (values == 1).any():
        return 1.0
    if law == "krajewski" and moe.any():
        values, counts = values[moe], counts[moe]
    return float(values[np.argmax(counts)])


def fit_table(table, laws="all", *, bootstrap: int = 0, seed: int = 0, rtol: float = 0.05,
              n_column: str = "N_active", noise_floor: float | None = None) -> dict:
    """Everything ``moe-gato fit`` reports for a results table: each law's coefficients
    (with bootstrap intervals when ``bootstrap``), flags and held-out errors, and approaches
    1 and 2 for each (E, G) family run at several budgets. N is ``n_column`` (``N_active``
    or ``N_active_nonemb``). A law without a term for E is fitted to the runs of one E
    (``e_scope``, recorded as ``E_scope``). ``noise_floor``: the seed noise (RMSE of log L
    over repeated runs, ``scaling.identify.seed_noise``), which flags a law that fits below it
    and ties laws whose held-out errors differ by less. With ``laws="all"`` or a list, a law
    the table cannot identify (too few runs or levels, or coefficients off to infinity) is
    listed as skipped, with the reason; one named law raises instead."""
    from scaling.readoff import readoffs

    if laws == "all":
        names = LAWS
    else:
        names = tuple(laws.split(",")) if isinstance(laws, str) else tuple(laws)
    for law in names:
        law_spec(law)
    cols = columns(table, n_column)
    # C = k N D for every run of a sweep (k = 6 plus attention): the budget's N <-> D exchange
    k = float(np.median(cols["C"] / (cols["N"] * cols["D"])))
    doc = {"n_runs": int(cols["loss"].size), "n_column": n_column, "noise_floor": noise_floor,
           "flops_per_param_token": k, "laws": {}, "held_out": {}, "families": {}}
    rows = table.to_dict("records") if hasattr(table, "to_dict") else list(table)
    samples = {}
    for law in names:
        scope = e_scope(law, cols["E"])
        part = [r for r, e in zip(rows, cols["E"], strict=True) if scope is None or e == scope]
        try:
            ci = {"ci": True, "bootstrap": bootstrap, "seed": seed} if bootstrap else {}
            coefs = fit_law(law, **law_inputs(law, columns(part, n_column)), **ci)
            bad = {k: v for k, v in coefs.items()
                   if isinstance(v, float) and not math.isfinite(v)}
            if bad:
                raise ValueError(f"degenerate fit: {bad} (the runs do not pin the law down; "
                                 f"more budgets or widths are needed)")
        except ValueError as exc:
            if isinstance(laws, str) and laws != "all" and "," not in laws:
                raise
            doc["laws"][law] = {"skipped": str(exc)}
            continue
        if scope is not None:
            coefs["E_scope"] = scope
        coefs["n_column"] = n_column
        overfit = overfit_flag(coefs["rmse_log"], noise_floor)
        if overfit:
            coefs["flags"]["fit"] = overfit
        samples[law] = coefs.pop("samples", None)
        doc["laws"][law] = coefs
        doc["held_out"].update(held_out_errors(part, [law], rtol=rtol, fits=doc["laws"],
                                               n_column=n_column))
    for name, idx in families(table).items():
        fam = {"runs": int(idx.size), "budgets": int(budgets(cols["budget"][idx], rtol).max() + 1)}
        if fam["budgets"] >= 2:
            args = (cols["N"][idx], cols["D"][idx], cols["loss"][idx], cols["budget"][idx])
            fam["approach1"] = approach1(*args, rtol=rtol)
            fam["approach2"] = approach2(*args, rtol=rtol)
        doc["families"][name] = fam
    if "chinchilla" in samples:
        c = doc["laws"]["chinchilla"]
        doc["chinchilla_exponents"] = {"a": c["beta"] / (c["alpha"] + c["beta"]),
                                       "b": c["alpha"] / (c["alpha"] + c["beta"])}
    doc.update(readoffs(doc, cols, samples))
    return doc


def best_law(doc: dict, *, exclude=(), E_values=None) -> str | None:
    """The usable law of a fit document (``fit_table``) with the lowest held-out error for
    models of the expansion rates ``E_values`` (``scaling.identify.choose_law``); None when
    none may be used. ``exclude``: laws left out of the choice."""
    return choose_law(doc, E_values=E_values, exclude=exclude)[0]
