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
from pathlib import Path
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
    seed: int = 0
    #: tokens of the data the run can see once, and how many times it sees them (None: the
    #: data folder holds no manifest yet)
    unique_tokens: float | None = None

    @property
    def epochs(self) -> float | None:
        return None if not self.unique_tokens else self.D / self.unique_tokens

    def row(self) -> dict:
        e, t = self.experts, self.train
        return {"name": self.name, "config_hash": self.config_hash, "budget": self.budget,
                "C": self.C, "N_total": self.N_total, "N_active": self.N_active,
                "N_active_nonemb": self.N_active_nonemb, "E": e.expansion,
                "experts": e.experts, "k": e.k, "G": e.G, "d_model": self.d_model,
                "num_layers": self.num_layers, "D": self.D, "steps": self.steps,
                "seed": self.seed, "lr": t["optim"]["lr"], "batch_size": t["batch_size"],
                "warmup_steps": t["optim"]["warmup_steps"],
                "unique_tokens": (min(self.D, self.unique_tokens) if self.unique_tokens
                                  else None), "epochs": self.epochs}


def config_hash(train: dict) -> str:
    """sha256 of the resolved training config, less where the data lies on disk."""
    data = json.loads(json.dumps(train))
    data.get("data", {}).pop("data_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def data_tokens(data_dir: str | Path, mixture: dict) -> float | None:
    """Training tokens the mixture's tasks hold in a collected suite (their tokens less the
    validation share); None when the folder holds no manifest."""
    from moe_gato.data.storage import DataError, read_manifest

    try:
        tasks = read_manifest(data_dir)["tasks"]
    except (DataError, OSError, ValueError):
        return None
    weights = mixture.get("tasks", {})
    held = mixture.get("validation_fraction", 0.0)
    total = sum(tasks[t].get("tokens", 0) for t, w in weights.items() if w > 0 and t in tasks)
    return total * (1 - held) if total else None


def plan(cfg: SweepConfig) -> tuple[list[PlannedRun], list[str]]:
    """The grid: (runs, notes on the design and on (budget, model) pairs left out)."""
    from moe_gato.train import load_train_config

    base = load_train_config(cfg.train, cfg.train_overrides)
    context = cfg.context_length or base.model.context_length
    if cfg.design is not None:
        from scaling.design import points

        designed, notes = points(cfg, to_dict(base.model), context)
        pts = [(p.budget, p.width, p.experts, p.seed) for p in designed]
    else:
        pts = [(b, w, e, None) for b in cfg.budgets for w in cfg.widths for e in cfg.experts]
        notes = []
    unique = data_tokens(cfg.data, to_dict(base.data))
    runs = []
    for budget, width, experts, seed in pts:
        run, note = _planned(cfg, base, context, budget, width, experts, seed, unique)
        if run is not None:
            runs.append(run)
        if note:
            notes.append(note)
    if not runs:
        raise ValueError(f"the grid is empty: every (budget, model) pair has fewer than "
                         f"min_steps ({cfg.min_steps}) steps; raise the budgets")
    repeat = [r for r in runs if r.epochs is not None and r.epochs > 1]
    if repeat:
        worst = max(repeat, key=lambda r: r.epochs)
        notes.append(f"{len(repeat)} run(s) repeat their data (up to {worst.epochs:.2g} epochs "
                     f"of {unique:.3g} unique tokens, {worst.name}): the laws assume fresh "
                     f"tokens")
    return runs, notes


def _planned(cfg: SweepConfig, base, context: int, budget: float, width: int,
             experts: ExpertChoice, seed: int | None, unique: float | None):
    """(the planned run or None, a note or None) of one point of the grid."""
    from moe_gato.model import accounting
    from moe_gato.train.config import TrainConfig

    model = model_config(cfg.family, d_model=width, experts=experts, base=to_dict(base.model),
                         context_length=context)
    fpt = accounting.flops_per_token(model, training=True, seq_len=context)
    N_active = accounting.num_active_params(model)
    batch = cfg.hyper.batch_sequences(budget, context) if cfg.hyper else base.batch_size
    per_step = batch * context
    steps = round(budget / fpt / per_step)
    name = f"C{budget:.1e}-d{width}-{experts.tag}".replace("+", "")
    name += f"-s{seed}" if seed else ""
    if steps < cfg.min_steps:
        return None, (f"{name}: {steps} steps of {per_step} tokens at this budget "
                      f"(min_steps {cfg.min_steps}); left out")
    train = to_dict(base)
    train["model"] = to_dict(model)
    train["data"]["data_dir"] = str(cfg.data)
    train["data"]["context_len"] = context
    train.update(tokens=steps * per_step, steps=None, eval_every=steps,
                 checkpoint_every=max(1, steps // 4), keep_last=2,
                 log_every=max(1, steps // 50))
    if cfg.hyper:
        micro = max(m for m in range(1, min(batch, base.micro_batch_size) + 1) if batch % m == 0)
        train.update(batch_size=batch, micro_batch_size=micro)
        train["optim"]["lr"] = cfg.hyper.lr(budget, N_active)
        train["optim"]["warmup_steps"] = cfg.hyper.warmup_steps(steps)
    else:
        train["optim"]["warmup_steps"] = max(1, round(cfg.warmup_fraction * steps))
    if seed:
        train["seed"] = seed
    from_dict(TrainConfig, train)  # validates the run's config now, not mid-sweep
    return PlannedRun(
        name=name, budget=budget, d_model=width, experts=experts, train=train,
        config_hash=config_hash(train), N_total=accounting.num_params(model), N_active=N_active,
        N_active_nonemb=accounting.num_active_params(model, non_embedding=True),
        num_layers=model.num_layers, flops_per_token=fpt, steps=steps, D=steps * per_step,
        C=steps * per_step * fpt, seed=seed or train.get("seed", 0), unique_tokens=unique), None


def plan_table(runs: list[PlannedRun]) -> str:
    lines = ["| run | N active | E | k | G | D (tokens) | epochs | steps | batch | lr | "
             "warm-up | C (FLOPs) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        epochs = "-" if r.epochs is None else f"{r.epochs:.2g}"
        lines.append(f"| {r.name} | {r.N_active / 1e6:.2f}M | {r.experts.expansion:g} | "
                     f"{r.experts.k} | {r.experts.G} | {r.D:,} | {epochs} | {r.steps} | "
                     f"{r.train['batch_size']} | {r.train['optim']['lr']:.3g} | "
                     f"{r.train['optim']['warmup_steps']} | {r.C:.2e} |")
    return "\n".join(lines)
