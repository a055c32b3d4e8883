"""Sweeps designed to find the optimum: ``design:`` in a sweep config (``moe-gato sweep
--config configs/sweep/design-cpu.yaml``; ``--plan-only`` prints the design and its time).

Instead of the cross product budgets x widths x experts, a design places per budget:
- ``sizes`` (>= 5) dense widths log-spaced over N_opt / spread .. N_opt x spread, centred on
  the compute-optimal size of a prior law (Epoch's Chinchilla fit, or a usable law of an
  earlier sweep's fit.json) along the family's own FLOPs per token;
- for the MoE laws, at ``moe_budgets`` and the ``moe_sizes`` widths nearest the centre: the
  expansion rate E varied at fixed granularity (``expansions`` at ``fixed_G``; Clark's and
  the joint law need >= 3 levels of E) and G varied at fixed E (``granularities`` at
  ``fixed_E``; Krajewski's law needs >= 3 levels of G), top-1 over fine-grained experts;
- ``seeds`` runs of one point (the smallest budget's centre width), whose spread is the
  seed noise (``scaling.identify.seed_noise``): the fits' noise floor.
The budgets must span ``min_decades`` (>= 2) decades. After every round of runs, the dense
family's IsoFLOP parabola per budget (approach 2) is checked: a vertex outside the measured
widths (or a parabola that opens downward) widens that budget by ``widen_sizes`` widths
beyond the edge it points past, up to ``widen_rounds`` rounds; the widths added are kept in
``<out>/design.json`` so that a rerun plans the same grid. Learning rate, batch and warm-up
follow the sweep's ``hyper`` rule (``scaling.hyper``), which a design requires.

The time estimate (``estimate_seconds``) charges each run ``overhead_s`` plus its FLOPs at
``flops_per_s`` per process, ``max_parallel`` runs at once; the defaults come from the tiny
sweep of 2026-11-26 on this 2-core CPU (README: 18 runs, 3.66e13 FLOPs, 15.0 min, two at
once, one thread each): about 2.2e10 FLOP/s per run after ~8 s of start-up and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scaling.family import ExpertChoice, model_config

if TYPE_CHECKING:
    from scaling.sweep import SweepConfig

DESIGN_FILE = "design.json"
PRIOR_EPOCH = "epoch"


@dataclasses.dataclass(kw_only=True)
class DesignConfig:
    #: the law the widths are centred on: "epoch" (Epoch AI's Chinchilla fit, Besiroglu et
    #: al. 2024) or a fit.json of an earlier sweep (its usable law with a data term)
    prior: str = PRIOR_EPOCH
    #: the N the prior's law speaks of: active non-embedding (as Kaplan et al.) or active
    prior_n: str = "N_active_nonemb"
    sizes: int = 5                      # dense widths per budget
    spread: float = 4.0                 # widths span N_opt / spread .. N_opt x spread
    max_width: int = 1024
    min_decades: float = 2.0            # the budgets span at least this many decades
    widen_rounds: int = 2
    widen_sizes: int = 2                # widths added past an edge per widening
    moe_budgets: list[float] = dataclasses.field(default_factory=list)  # [] = every budget
    moe_sizes: int = 3
    expansions: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 8])
    fixed_G: int = 1
    granularities: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])
    fixed_E: int = 4
    seeds: int = 3                      # runs of the seed-noise point
    flops_per_s: float = 2.2e10         # per run, for the time estimate
    overhead_s: float = 8.0             # per run, for the time estimate

    def __post_init__(self) -> None:
        if self.prior_n not in ("N_active", "N_active_nonemb"):
            raise ValueError(f"design.prior_n must be N_active or N_active_nonemb, got "
                             f"{self.prior_n!r}")
        if self.sizes < 5:
            raise ValueError(f"design.sizes must be >= 5 (a parabola and its vertex per "
                             f"budget), got {self.sizes}")
        if not self.spread > 1:
            raise ValueError(f"design.spread must be > 1, got {self.spread}")
        if not self.min_decades >= 2:
            raise ValueError(f"design.min_decades must be >= 2, got {self.min_decades}")
        for field in ("widen_rounds", "widen_sizes", "moe_sizes"):
            if getattr(self, field) < 0:
                raise ValueError(f"design.{field} must be >= 0, got {getattr(self, field)}")
        for field, other in (("expansions", "fixed_G"), ("granularities", "fixed_E")):
            values = getattr(self, field)
            if values and (len(set(values)) < 3 or min(values) < 1):
                raise ValueError(f"design.{field} must list >= 3 different values >= 1 (a law "
                                 f"needs 3 levels), or none, got {values}")
            if getattr(self, other) < 1:
                raise ValueError(f"design.{other} must be >= 1, got {getattr(self, other)}")
        if self.seeds < 2:
            raise ValueError(f"design.seeds must be >= 2 (the seed noise needs repeats), got "
                             f"{self.seeds}")
        if not (self.flops_per_s > 0 and self.overhead_s >= 0):
            raise ValueError("design.flops_per_s must be > 0 and design.overhead_s >= 0")

    def moe_choices(self) -> list[ExpertChoice]:
        """E varied at fixed G, then G varied at fixed E (top-1: k G fine experts per token,
        each of hidden F / G, as active as the dense FFN)."""
        out = [ExpertChoice(experts=e * self.fixed_G, k=1, G=self.fixed_G)
               for e in self.expansions]
        out += [ExpertChoice(experts=self.fixed_E * g, k=1, G=g) for g in self.granularities]
        return list(dict.fromkeys(out))


@dataclasses.dataclass(frozen=True)
class Point:
    budget: float
    width: int
    experts: ExpertChoice
    seed: int | None = None


def check(cfg: SweepConfig) -> None:
    """A design's requirements on its sweep config."""
    d = cfg.design
    lo, hi = min(cfg.budgets), max(cfg.budgets)
    if math.log10(hi / lo) < d.min_decades - 1e-9:
        raise ValueError(f"design: the budgets span {math.log10(hi / lo):.2f} decades "
                         f"({lo:g} - {hi:g}); a design needs >= {d.min_decades:g}")
    if cfg.hyper is None:
        raise ValueError("design: needs the hyper rule (hyper: {} for its defaults): learning "
                         "rate, batch and warm-up must follow size and compute")
    bad = [b for b in d.moe_budgets if b not in cfg.budgets]
    if bad:
        raise ValueError(f"design.moe_budgets {bad} are not among the budgets {cfg.budgets}")


# ------------------------------------------------------------------------------ the prior
def family_sizes(cfg: SweepConfig, base_model: dict, context: int,
                 n_column: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(widths, their N in ``n_column``, their training FLOPs per token) of the dense
    family from one head to ``design.max_width``."""
    from moe_gato.model import accounting

    head = cfg.family.head_dim
    widths, N, fpt = [], [], []
    for w in range(head, cfg.design.max_width + 1, head):
        m = model_config(cfg.family, d_model=w, experts=ExpertChoice(), base=base_model,
                         context_length=context)
        widths.append(w)
        N.append(accounting.num_active_params(m, non_embedding=n_column == "N_active_nonemb"))
        fpt.append(accounting.flops_per_token(m, training=True, seq_len=context))
    return widths, np.array(N, dtype=float), np.array(fpt)


def prior_law(prior: str) -> tuple[str, dict, str]:
    """(law, coefficients, where from) of the design's prior."""
    from scaling.plan import EPOCH_CHINCHILLA

    if prior == PRIOR_EPOCH:
        return "chinchilla", dict(EPOCH_CHINCHILLA), "Epoch AI's Chinchilla fit"
    path = Path(prior)
    if not path.is_file():
        raise ValueError(f"design.prior: {prior!r} is neither 'epoch' nor a fit.json")
    from scaling.plan import resolve_law

    law, coefs, source = resolve_law(json.loads(path.read_text()), None, None)
    return law, coefs, f"{path}: {source}"


def centre_index(law: str, coefs: dict, budget: float, N: np.ndarray,
                 fpt: np.ndarray) -> int:
    """The family member the prior law predicts best at this budget (D = C / FLOPs per
    token of each member)."""
    from scaling.laws import predict

    with np.errstate(all="ignore"):
        L = predict(law, coefs, N=N, D=np.maximum(budget / fpt, 1.0), E=1.0, G=1.0)
    return int(np.nanargmin(np.where(np.isfinite(L), L, np.nan)))


def spaced(N: np.ndarray, centre: int, sizes: int, spread: float) -> list[int]:
    """``sizes`` distinct member indices whose N are nearest N_centre x spread^[-1 .. 1]
    (log-spaced), shifted inside the family when the centre lies near an edge."""
    targets = N[centre] * spread ** np.linspace(-1, 1, sizes)
    chosen: list[int] = []
    for t in targets:
        order = np.argsort(np.abs(np.log(N / t)))
        chosen.append(next(int(i) for i in order if int(i) not in chosen))
    return sorted(chosen)


# ------------------------------------------------------------------------------ the design
def points(cfg: SweepConfig, base_model: dict, context: int) -> tuple[list[Point], list[str]]:
    """The design's runs (with the widths widened so far) and notes on its choices."""
    d = cfg.design
    law, coefs, source = prior_law(d.prior)
    widths, N, fpt = family_sizes(cfg, base_model, context, d.prior_n)
    added = read_widened(cfg)
    out, notes = [], [f"design: widths centred on the compute-optimal size of the {law} law "
                      f"({source}), N = {d.prior_n}"]
    for budget in cfg.budgets:
        c = centre_index(law, coefs, budget, N, fpt)
        dense = spaced(N, c, d.sizes, d.spread)
        if c in (0, len(widths) - 1):
            notes.append(f"C={budget:.2e}: the prior's optimum is the family's "
                         f"{'smallest' if c == 0 else 'largest'} member (d{widths[c]})")
        extra = sorted(set(added.get(f"{budget:g}", {}).get("dense", [])) - {widths[i]
                                                                            for i in dense})
        out += [Point(budget, widths[i], ExpertChoice()) for i in dense]
        out += [Point(budget, w, ExpertChoice()) for w in extra]
        if not d.moe_budgets or budget in d.moe_budgets:
            near = sorted(dense, key=lambda i: (abs(i - c), i))[:d.moe_sizes]
            for choice in d.moe_choices():
                out += [Point(budget, widths[i], choice) for i in sorted(near)
                        if _buildable(cfg, widths[i], choice)]
    first = min(cfg.budgets)
    c = centre_index(law, coefs, first, N, fpt)
    out += [Point(first, widths[c], ExpertChoice(), seed) for seed in range(1, d.seeds)]
    notes.append(f"design: seed noise from {d.seeds} seeds of d{widths[c]}-dense at "
                 f"C={first:.2e}")
    return list(dict.fromkeys(out)), notes


def _buildable(cfg: SweepConfig, width: int, choice: ExpertChoice) -> bool:
    return (cfg.family.ffn_mult * width) % choice.G == 0


# ------------------------------------------------------------------------------ widening
def read_widened(cfg: SweepConfig) -> dict:
    """{budget: {"dense": [widths added]}, "rounds": n} of ``<out>/design.json``."""
    path = Path(cfg.out) / DESIGN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def widen(cfg: SweepConfig, rows: list[dict]) -> tuple[bool, list[str]]:
    """After a round of runs: widths to add where a budget's dense IsoFLOP parabola has its
    vertex outside the measured widths, recorded in design.json. Returns (whether any were
    added, what it found)."""
    from scaling.approaches import approach2

    state = read_widened(cfg)
    if state.get("rounds", 0) >= cfg.design.widen_rounds:
        return False, []
    head, top = cfg.family.head_dim, cfg.design.max_width
    done = [r for r in rows if r["status"] == "done" and r["experts"] == 1
            and r.get("seed") in (None, 0)]
    by_budget: dict[float, list[dict]] = defaultdict(list)
    for r in done:
        by_budget[r["budget"]].append(r)
    said, added = [], False
    for budget, runs in sorted(by_budget.items()):
        widths = sorted({r["d_model"] for r in runs})
        if len(widths) < 3:
            continue
        N = np.array([r["N_active"] for r in runs])
        res = approach2(N, np.array([r["D"] for r in runs]), np.array([r["loss"] for r in runs]),
                        np.full(len(runs), budget))["budgets"][0]
        if res.get("inside"):
            continue
        down = res["N_opt"] is not None and res["N_opt"] < N.min()
        if res["N_opt"] is None:  # opens downward: widen towards the lower-loss edge
            down = min(runs, key=lambda r: r["loss"])["d_model"] == widths[0]
        step = -head if down else head
        edge = widths[0] if down else widths[-1]
        new = [w for w in (edge + step * i for i in range(1, cfg.design.widen_sizes + 1))
               if head <= w <= top]
        if not new:
            said.append(f"C={budget:.2e}: the vertex lies past the family's "
                        f"{'smallest' if down else 'largest'} width; nothing to add")
            continue
        entry = state.setdefault(f"{budget:g}", {"dense": []})
        entry["dense"] = sorted(set(entry["dense"]) | set(new))
        added = True
        said.append(f"C={budget:.2e}: the IsoFLOP vertex lies "
                    f"{'below' if down else 'above'} the widths {widths}: adding {new}")
    if added:
        state["rounds"] = state.get("rounds", 0) + 1
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / DESIGN_FILE).write_text(json.dumps(state, indent=1) + "\n")
    return added, said


# ------------------------------------------------------------------------------ estimates
def estimate_seconds(runs, cfg: SweepConfig) -> float:
    """Wall seconds of the runs at ``max_parallel`` at once (see the module's docstring)."""
    d = cfg.design or DesignConfig()
    per_run = [r.C / d.flops_per_s + d.overhead_s for r in runs]
    return sum(per_run) / cfg.launcher.max_parallel


def widening_seconds(cfg: SweepConfig) -> float:
    """The most the widening can add: every budget widened ``widen_sizes`` dense widths in
    each of ``widen_rounds`` rounds (an upper bound, in wall seconds as above)."""
    if cfg.design is None:
        return 0.0
    d = cfg.design
    runs = d.widen_rounds * d.widen_sizes
    return sum(runs * (b / d.flops_per_s + d.overhead_s) for b in cfg.budgets) \
        / cfg.launcher.max_parallel


__all__ = ["DesignConfig", "Point", "points", "widen", "read_widened", "estimate_seconds",
           "widening_seconds", "family_sizes", "centre_index", "spaced", "prior_law", "check"]
