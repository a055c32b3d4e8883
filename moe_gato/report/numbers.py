"""The report's numbers from a training run and its evaluation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import yaml

Z95 = 1.96


def model_numbers(run: Path, records: list[dict]) -> dict:
    """Shape label, parameters, tokens trained and training wall time of a run, from its
    ``config.yaml`` and its metrics ``records``."""
    from moe_gato.config import from_dict
    from moe_gato.model import ModelConfig, accounting
    from scaling.family import ExpertChoice

    cfg = from_dict(ModelConfig, yaml.safe_load((run / "config.yaml").read_text())["model"])
    shape = f"d{cfg.d_model} x {cfg.num_layers} layers, " + (
        f"{cfg.moe.num_experts} experts k {cfg.moe.top_k} G {cfg.moe.granularity}"
        if cfg.ffn == "moe" else "dense")
    if not records:
        raise ValueError(f"{run}/metrics.jsonl holds no record")
    times = [r["time"] for r in records if "time" in r]
    tag = (ExpertChoice(experts=cfg.moe.num_experts, k=cfg.moe.top_k,
                        G=cfg.moe.granularity).tag if cfg.ffn == "moe" else "dense")
    return {"shape": shape, "ffn": cfg.ffn, "d_model": cfg.d_model, "expert_tag": tag,
            "N_active": accounting.num_active_params(cfg),
            "N_total": accounting.num_params(cfg), "tokens": int(records[-1]["tokens"]),
            "steps": int(records[-1]["step"]),
            "wall_s": float(times[-1] - times[0]) if len(times) > 1 else 0.0}


def final_losses(run: Path, records: list[dict]) -> dict:
    """The last validation loss of a run's metrics ``records``, overall and per target kind."""
    evals = [r for r in records if "eval/loss" in r]
    if not evals:
        raise ValueError(f"{run}/metrics.jsonl holds no evaluation")
    last = evals[-1]
    kinds = {k[len("eval/loss/"):]: v for k, v in last.items()
             if k.startswith("eval/loss/") and "/" not in k[len("eval/loss/"):]}
    return {"val_loss": float(last["eval/loss"]), "val_kinds": kinds}


def _training(tasks: dict) -> dict:
    return {n: r for n, r in tasks.items()
            if not r.get("held_out") and r.get("normalized_score") is not None}


def _mean_ci(rows: list[dict]) -> tuple[float, float]:
    """Mean of the tasks' scores and its 95% interval from theirs (independent tasks)."""
    scores = np.array([r["normalized_score"] for r in rows])
    se = np.array([r["normalized_ci95"] / Z95 for r in rows])
    return float(scores.mean()), float(Z95 * math.sqrt((se ** 2).sum()) / len(rows))


def mean_score(tasks: dict) -> dict:
    """Mean normalized score over the training tasks, its interval and the task counts."""
    rows = list(_training(tasks).values())
    if not rows:
        return {"mean": None, "ci95": None, "tasks": 0, "at_50": 0, "at_80": 0}
    mean, ci = _mean_ci(rows)
    scores = [r["normalized_score"] for r in rows]
    return {"mean": mean, "ci95": ci, "tasks": len(rows),
            "at_50": int(sum(s >= 0.5 for s in scores)),
            "at_80": int(sum(s >= 0.8 for s in scores))}


def domain_scores(tasks: dict) -> dict:
    by: dict[str, list[dict]] = {}
    for r in _training(tasks).values():
        by.setdefault(r["domain"], []).append(r)
    return {d: dict(zip(("mean", "ci95"), _mean_ci(rows), strict=True), tasks=len(rows))
            for d, rows in sorted(by.items())}


_LOAD = re.compile(r"^moe/(\d+)/([^/]+)/load/(\d+)$")


def expert_load(run: Path, records: list[dict], last_fraction: float = 0.2) -> dict:
    """Per modality group a (layers x experts) matrix from a run's metrics ``records``: each
    expert's share of the group's routed tokens times the number of experts (1 =
    balanced), averaged over the last ``last_fraction`` of the logged steps."""
    records = [r for r in records if any(k.startswith("moe/") for k in r)]
    if not records:
        raise ValueError(f"{run}/metrics.jsonl holds no routing metrics (a dense run?)")
    tail = records[-max(1, int(len(records) * last_fraction)):]
    sums: dict[tuple[int, str, int], list[float]] = {}
    for r in tail:
        for key, v in r.items():
            m = _LOAD.match(key)
            if m:
                sums.setdefault((int(m[1]), m[2], int(m[3])), []).append(v)
    layers = 1 + max(k[0] for k in sums)
    groups: dict[str, np.ndarray] = {}
    for (layer, group, e), vals in sums.items():
        experts = 1 + max(k[2] for k in sums if k[1] == group)
        mat = groups.setdefault(group, np.full((layers, experts), np.nan))
        mat[layer, e] = float(np.mean(vals)) * experts
    return {"layers": layers, "steps": [tail[0]["step"], tail[-1]["step"]],
            "groups": {g: m.tolist() for g, m in groups.items()}}


def retained(scratch, student, teacher, *, lower_is_better: bool) -> float | None:
    """(scratch - student) / (scratch - teacher), signs turned so that a better student is
    larger; None when the teacher does not beat the scratch model."""
    if None in (scratch, student, teacher):
        return None
    gain = (scratch - teacher) if lower_is_better else (teacher - scratch)
    if not gain > 0:
        return None
    kept = (scratch - student) if lower_is_better else (student - scratch)
    return float(kept / gain)


def family_latency(sweep, pick: dict, max_heads: int = 16) -> list[dict]:
    """The latency model's predicted control rate for the sweep family's dense members and
    its members with the pick's expert choice, widths up to ``max_heads`` heads, at the
    pick's context, device and observation shape (``sweep``: the sweep's config)."""
    from moe_gato.config import to_dict
    from moe_gato.train import load_train_config
    from scaling.family import ExpertChoice
    from scaling.optimum import candidates

    base = load_train_config(sweep.train, sweep.train_overrides)
    row = pick["pick"]
    head = sweep.family.head_dim
    cands = candidates(sweep.family, to_dict(base.model),
                       widths=range(head, max_heads * head + 1, head),
                       experts=[ExpertChoice(), ExpertChoice(experts=row["experts"], k=row["k"],
                                                             G=row["G"])],
                       context=pick["context"], device=pick["device"], shape=pick["shape"])
    return [{"model": c.label, "dense": c.experts.dense, "N_active": c.N_active, "hz": c.hz}
            for c in cands]
