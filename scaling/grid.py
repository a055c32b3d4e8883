"""The grid of a sweep: one planned run per (budget, width, expert choice), or the runs a
design places (``scaling.design``), each with its resolved training config.

For every compute budget C (FLOPs) and family member (width x expert choice, see
``scaling.family``) a run trains for D = C / (training FLOPs per token), the model's own
accounting at the training context (attention included), rounded to whole steps; the D and
C actually trained are recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING

from moe_gato.config import from_dict, to_dict
from scaling.family import ExpertChoice, model_config

if TYPE_CHECKING:
    from scaling.sweep import SweepConfig
@dataclasses.dataclass(kw_only=True)
class PlannedRun:
    name: str
    budget: float
    d_model: int
    experts: ExpertChoice
    train: dict                  # the resolved training config of the run
    config_hash: str
    N_total: int
    N_active: float
    N_active_nonemb: float
    num_layers: int
    flops_per_token: float       # training FLOPs per token at the training context
    steps: int
    D: int
    C: float

    def row(self) -> dict:
        e = self.experts
        return {"name": self.name, "config_hash": self.config_hash, "budget": self.budget,
                "C": self.C, "N_total": self.N_total, "N_active": self.N_active,
                "N_active_nonemb": self.N_active_nonemb, "E": e.expansion,
                "experts": e.experts, "k": e.k, "G": e.G, "d_model": self.d_model,
                "num_layers": self.num_layers, "D": self.D, "steps": self.steps}


def config_hash(train: dict) -> str:
    """sha256 of the resolved training config, less where the data lies on disk."""
    data = json.loads(json.dumps(train))
    data.get("data", {}).pop("data_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def plan(cfg: SweepConfig) -> tuple[list[PlannedRun], list[str]]:
    """The IsoFLOP grid: (runs, notes on (budget, model) pairs left out)."""
    from moe_gato.model import accounting
    from moe_gato.train import load_train_config
    from moe_gato.train.config import TrainConfig

    base = load_train_config(cfg.train, cfg.train_overrides)
    context = cfg.context_length or base.model.context_length
    per_step = base.batch_size * context
    runs, notes = [], []
    for budget in cfg.budgets:
        for width in cfg.widths:
            for experts in cfg.experts:
                model = model_config(cfg.family, d_model=width, experts=experts,
                                     base=to_dict(base.model), context_length=context)
                fpt = accounting.flops_per_token(model, training=True, seq_len=context)
                steps = round(budget / fpt / per_step)
                name = f"C{budget:.1e}-d{width}-{experts.tag}".replace("+", "")
                if steps < cfg.min_steps:
                    notes.append(f"{name}: {steps} steps of {per_step} tokens at this budget "
                                 f"(min_steps {cfg.min_steps}); left out")
                    continue
                train = to_dict(base)
                train["model"] = to_dict(model)
                train["data"]["data_dir"] = str(cfg.data)
                train["data"]["context_len"] = context
                train.update(tokens=steps * per_step, steps=None, eval_every=steps,
                             checkpoint_every=max(1, steps // 4), keep_last=2,
                             log_every=max(1, steps // 50))
                train["optim"]["warmup_steps"] = max(1, round(cfg.warmup_fraction * steps))
                from_dict(TrainConfig, train)  # validates the run's config now, not mid-sweep
                runs.append(PlannedRun(
                    name=name, budget=budget, d_model=width, experts=experts, train=train,
                    config_hash=config_hash(train), N_total=accounting.num_params(model),
                    N_active=accounting.num_active_params(model),
                    N_active_nonemb=accounting.num_active_params(model, non_embedding=True),
                    num_layers=model.num_layers, flops_per_token=fpt, steps=steps,
                    D=steps * per_step, C=steps * per_step * fpt))
    if not runs:
        raise ValueError(f"the grid is empty: every (budget, model) pair has fewer than "
                         f"min_steps ({cfg.min_steps}) steps; raise the budgets")
    return runs, notes


def plan_table(runs: list[PlannedRun]) -> str:
    lines = ["| run | N active | E | k | G | D (tokens) | steps | C (FLOPs) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.name} | {r.N_active / 1e6:.2f}M | {r.experts.expansion:g} | "
                     f"{r.experts.k} | {r.experts.G} | {r.D:,} | {r.steps} | {r.C:.2e} |")
    return "\n".join(lines)
