"""Compute-optimal models for a budget, and the latency-constrained optimum: the best model
whose batch-1 control rate on a device meets a target.

    from scaling.optimum import Candidate, candidates, best
    cands = candidates(family, base_model, widths=range(64, 1025, 32), experts=[...],
                       context=576, device="cuda-nvidia-h100-80gb-hbm3", shape="metaworld")
    pick = best("joint", coefs, 1e18, cands, hz=20)      # {"constrained": ..., "free": ...}

Each candidate is a member of the sweep's model family (``scaling.family``) with its active
parameters N, expansion rate E, granularity G, training FLOPs per token and predicted
control rate (``moe_gato.eval.latency.predict_hz``: the latency model fitted per device by
benchmarks/bench_latency.py). For a budget C every candidate trains D = C / FLOPs-per-token
tokens; the fitted law predicts its loss; the optimum is the lowest predicted loss, over all
candidates ("free") and over those at or above ``hz`` ("constrained"). The latency model was
fitted on the tiny, 25m and 79m presets: far outside them its rate is an extrapolation.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from scaling.family import ExpertChoice, FamilyConfig, model_config


@dataclasses.dataclass(kw_only=True, frozen=True)
class Candidate:
    d_model: int
    experts: ExpertChoice
    num_layers: int
    N_active: float
    N_active_nonemb: float
    N_total: float
    flops_per_token: float      # training FLOPs per token at the context
    hz: float                   # predicted batch-1 control rate on the device

    @property
    def label(self) -> str:
        return f"d{self.d_model}-{self.experts.tag}"


def candidates(family: FamilyConfig, base_model: dict | None, *, widths, experts, context: int,
               device: str, shape: str = "metaworld") -> list[Candidate]:
    from moe_gato.eval.latency import predict_hz
    from moe_gato.model import accounting

    out = []
    for width in widths:
        for choice in experts:
            try:
                cfg = model_config(family, d_model=int(width), experts=choice, base=base_model,
                                   context_length=context)
            except ValueError:
                continue  # a width the family cannot build with this choice (divisibility)
            out.append(Candidate(
                d_model=int(width), experts=choice, num_layers=cfg.num_layers,
                N_active=accounting.num_active_params(cfg),
                N_active_nonemb=accounting.num_active_params(cfg, non_embedding=True),
                N_total=accounting.num_params(cfg),
                flops_per_token=accounting.flops_per_token(cfg, training=True, seq_len=context),
                hz=predict_hz(cfg, device, shape=shape, context=context)))
    if not out:
        raise ValueError("no candidate model: check widths (multiples of family.head_dim) and "
                         "the expert choices")
    return out


def predicted_losses(law: str, coefs: dict, budget: float, cands: list[Candidate]) -> np.ndarray:
    """The law's loss of each candidate trained on the budget; N is the column the law was
    fitted on (``coefs["n_column"]``: active parameters unless it says non-embedding)."""
    from scaling.fit import predict

    nonemb = coefs.get("n_column") == "N_active_nonemb"
    N = np.array([c.N_active_nonemb if nonemb else c.N_active for c in cands])
    D = budget / np.array([c.flops_per_token for c in cands])
    E = np.array([c.experts.expansion for c in cands])
    G = np.array([float(c.experts.G) for c in cands])
    return np.asarray(predict(law, coefs, N=N, D=D, E=E, G=G), dtype=float)


def best(law: str, coefs: dict, budget: float, cands: list[Candidate], *, hz: float,
         dense_only: bool = False) -> dict:
    """{"free": row, "constrained": row or None}; a row holds the candidate's numbers, its
    D and C and the predicted loss."""
    if not budget > 0:
        raise ValueError(f"budget must be > 0 FLOPs, got {budget}")
    pool = [c for c in cands if c.experts.dense] if dense_only else list(cands)
    if not pool:
        raise ValueError("no dense candidate (experts: 1) to choose from")
    loss = predicted_losses(law, coefs, budget, pool)
    rows = [candidate_row(c, budget, float(v)) for c, v in zip(pool, loss, strict=True)
            if math.isfinite(v)]
    free = min(rows, key=lambda r: r["loss"]) if rows else None
    fast = [r for r in rows if r["hz"] >= hz]
    return {"free": free, "constrained": min(fast, key=lambda r: r["loss"]) if fast else None}


def candidate_row(c: Candidate, budget: float, loss: float | None) -> dict:
    """A candidate's numbers at a budget: its D and C, rate and (predicted) loss."""
    return {"model": c.label, "d_model": c.d_model, "num_layers": c.num_layers,
            "N_active": c.N_active, "N_total": c.N_total, "E": c.experts.expansion,
            "experts": c.experts.experts, "k": c.experts.k, "G": c.experts.G,
            "D": budget / c.flops_per_token, "C": budget, "hz": c.hz, "loss": loss}


def frontier(law: str, coefs: dict, budgets, cands: list[Candidate], *, hz: float) -> list[dict]:
    """Per budget: the free optimum, the latency-constrained one and the dense optimum
    (None when no candidate is dense)."""
    out = []
    has_dense = any(c.experts.dense for c in cands)
    for budget in budgets:
        pick = best(law, coefs, float(budget), cands, hz=hz)
        dense = (best(law, coefs, float(budget), cands, hz=hz, dense_only=True) if has_dense
                 else {"free": None, "constrained": None})
        out.append({"C": float(budget), "free": pick["free"], "constrained": pick["constrained"],
                    "dense": dense["free"], "dense_constrained": dense["constrained"]})
    return out


def allowed_law(doc: dict, cands: list[Candidate]):
    """(law, why, the candidates it may rank) for a fit document: a usable law that may
    compare all the candidates' expert counts, else one fitted at a single expansion rate
    with the candidates of that rate (``scaling.identify.choose_law``); (None, why, [])."""
    from scaling.identify import choose_law

    rates = sorted({c.experts.expansion for c in cands})
    law, why = choose_law(doc, E_values=rates)
    if law is not None:
        return law, why, cands
    for E in rates:
        alone, why_alone = choose_law(doc, E_values=[E])
        if alone is not None:
            return alone, (f"{why_alone}; only the models of E = {E:g} (no usable law has a "
                           f"term for the number of experts)"), [c for c in cands
                                                                  if c.experts.expansion == E]
    return None, why, []
