"""Scoring, kept apart from the rollouts: expert-normalized scores, intervals, summaries.

    normalized_score(ret, expert=500.0, random=22.0)      # (ret - random) / (expert - random)
    mean_ci95([12.0, 30.0, 21.0])                          # (mean, half-width of the 95% CI)
    summarize(tasks)                                       # per domain, >= 50% / >= 80% counts

Gato (Reed et al. 2022, Section 4.1 and Figure 5) scores a control task by its mean return
over rollouts, normalized by the expert's and a random agent's returns, and counts the
tasks at or above 50% and 80% of expert. The expert and random returns are the ones the
collection measured (``task.json`` / the suite's manifest).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

THRESHOLDS = (0.5, 0.8)


def normalized_score(ret: float, *, expert: float, random: float) -> float:
    """(ret - random) / (expert - random); ``ValueError`` when the expert is no better than
    random (the score would mean nothing)."""
    if not all(map(math.isfinite, (ret, expert, random))):
        raise ValueError(f"returns must be finite, got return {ret}, expert {expert}, "
                         f"random {random}")
    if expert <= random:
        raise ValueError(f"expert return {expert} is not above the random return {random}: "
                         f"no normalized score")
    return (ret - random) / (expert - random)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t; 0 for one value,
    and for values that are all equal)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return mean, 0.0
    from scipy.stats import t

    half = float(t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, half


def task_result(returns: Sequence[float], successes: Sequence[bool] | None, *, expert: float,
                random: float, held_out: bool, domain: str, lengths: Sequence[int]) -> dict:
    """One task's row of ``eval.json``."""
    mean, half = mean_ci95(returns)
    return {
        "domain": domain, "held_out": held_out, "episodes": len(returns),
        "return_mean": mean, "return_ci95": half,
        "returns": [float(r) for r in returns],
        "length_mean": float(np.mean(lengths)),
        "success_rate": None if successes is None else float(np.mean(successes)),
        "expert_return": float(expert), "random_return": float(random),
        "normalized_score": normalized_score(mean, expert=expert, random=random),
        "normalized_ci95": half / (expert - random),
    }


def summarize(tasks: dict[str, dict]) -> dict:
    """Mean normalized score per domain and the counts of tasks at >= 50% and >= 80% of
    expert, for the training tasks and, apart, the held-out ones."""
    out: dict = {}
    for part, held in (("train", False), ("held_out", True)):
        rows = {n: r for n, r in tasks.items() if r.get("held_out") == held
                and r.get("normalized_score") is not None}
        domains: dict[str, list[float]] = {}
        for r in rows.values():
            domains.setdefault(r["domain"], []).append(r["normalized_score"])
        scores = [r["normalized_score"] for r in rows.values()]
        out[part] = {
            "tasks": len(rows),
            "mean_normalized_score": float(np.mean(scores)) if scores else None,
            "domain_mean_normalized_score": {d: float(np.mean(v)) for d, v in sorted(domains.items())},
            **{f"tasks_at_{int(th * 100)}pct": int(sum(s >= th for s in scores))
               for th in THRESHOLDS},
        }
    return out
