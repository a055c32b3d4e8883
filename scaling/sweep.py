"""IsoFLOP sweeps of MoE-Gato: their config and command; the grid (``scaling.grid``), its
runs through a launcher by one driver per sweep folder (``scaling.driver``), then the fitted
laws (``scaling.report``).

    moe-gato sweep --config configs/sweep/tiny.yaml               # run (or resume), then fit
    moe-gato sweep --config configs/sweep/tiny.yaml --plan-only   # print the grid, run nothing
    moe-gato sweep --config configs/sweep/tiny.yaml launcher.kind=slurm launcher.max_parallel=8

Paths in the config (``out``, ``data``, ``train``, ``family.base``,
``launcher.slurm.folder``) are read once, relative to the folder the command runs in (an
input found only in this checkout, like a preset, is taken from there), and the runs get
them absolute: a sweep runs the same from any folder. Re-running the sweep skips finished
runs, re-attaches to live ones (a driver killed alone leaves its trainers running) and
retries failed ones until ``max_attempts``; see ``scaling.driver``. A run whose saved
config differs from the planned one is an error: sweep something else under another
``out``.

Results columns: ``name, config_hash, budget`` (nominal C), ``C`` (as trained), ``N_total,
N_active, N_active_nonemb, E`` (expansion rate, 1 = dense; ``scaling.family``), ``experts,
k, G, d_model, num_layers, D, steps, loss`` (final validation loss), ``loss/<kind>``,
``loss/<task>``, ``action_acc`` (mean teacher-forced action accuracy over control tasks)
and ``action_acc/<task>``, ``wall_s, launcher, status`` (done | failed | running),
``attempts, error``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from moe_gato.config import load_config
from scaling.driver import fit_finished, final_metrics, read_result, run_sweep, write_table
from scaling.family import ExpertChoice, FamilyConfig
from scaling.grid import PlannedRun, config_hash, plan, plan_table
from scaling.design import DesignConfig, check, estimate_seconds, widening_seconds
from scaling.hyper import HyperRule
from scaling.launch import LauncherConfig
from scaling.results import N_COLUMNS

REPO = Path(__file__).resolve().parents[1]
LAWS = ("chinchilla", "clark", "krajewski", "joint")

__all__ = ["FitConfig", "SweepConfig", "load_sweep_config", "PlannedRun", "config_hash", "plan",
           "plan_table", "run_sweep", "read_result", "final_metrics", "write_table",
           "fit_finished", "add_arguments", "run"]


@dataclasses.dataclass(kw_only=True)
class FitConfig:
    #: laws fitted after the sweep (scaling.fit.fit_law)
    laws: list[str] = dataclasses.field(default_factory=lambda: list(LAWS))
    #: control rate the latency-constrained optimum must meet, on ``device`` (a key of
    #: benchmarks/latency_model.json), for observations shaped like ``shape``
    hz: float = 50.0
    device: str = "cpu-2core"
    shape: str = "metaworld"
    bootstrap: int = 0                  # bootstrap resamples for the laws' intervals
    #: N of the laws: active parameters, or active non-embedding parameters
    n_column: str = "N_active"

    def __post_init__(self) -> None:
        bad = [law for law in self.laws if law not in LAWS]
        if bad:
            raise ValueError(f"fit.laws: unknown law(s) {bad}; allowed: {list(LAWS)}")
        if self.n_column not in N_COLUMNS:
            raise ValueError(f"fit.n_column: {self.n_column!r} is not one of "
                             f"{', '.join(N_COLUMNS)}")
        if not self.hz > 0:
            raise ValueError(f"fit.hz must be > 0, got {self.hz}")
        if self.bootstrap < 0:
            raise ValueError(f"fit.bootstrap must be >= 0, got {self.bootstrap}")


@dataclasses.dataclass(kw_only=True)
class SweepConfig:
    name: str
    #: output folder; empty = runs/sweep/<name>
    out: str = ""
    #: the collected suite the runs train on
    data: str = "data"
    #: the training recipe each run starts from (mixture, optimizer, model options)
    train: str = "configs/train/tiny-moe.yaml"
    #: dotted overrides of that recipe (``eval_sequences=2``, ``optim.lr=1e-3``)
    train_overrides: list[str] = dataclasses.field(default_factory=list)
    #: training context; null keeps the recipe's
    context_length: int | None = None
    budgets: list[float]
    #: the grid is budgets x widths x experts; with ``design`` the design places the runs
    widths: list[int] = dataclasses.field(default_factory=list)
    experts: list[ExpertChoice] = dataclasses.field(default_factory=lambda: [ExpertChoice()])
    #: a sweep designed to find the optimum (scaling.design): widths per budget centred on
    #: a prior law, MoE families varying E and G, seeds, automatic widening
    design: DesignConfig | None = None
    #: lr, batch and warm-up of each run by its compute and size (scaling.hyper); null keeps
    #: the recipe's lr and batch and warmup_fraction
    hyper: HyperRule | None = None
    family: FamilyConfig = dataclasses.field(default_factory=FamilyConfig)
    launcher: LauncherConfig = dataclasses.field(default_factory=LauncherConfig)
    procs: int = 1                      # processes per run (data parallel)
    threads: int = 1                    # torch threads per process
    max_attempts: int = 2
    #: warm-up steps as a share of each run's steps (the recipe's count would not fit)
    warmup_fraction: float = 0.1
    #: a (budget, model) pair with fewer steps is left out of the grid, and said so
    min_steps: int = 10
    poll_s: float = 2.0
    fit: FitConfig = dataclasses.field(default_factory=FitConfig)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        if not self.budgets or any(not (b > 0 and math.isfinite(b)) for b in self.budgets):
            raise ValueError(f"budgets must be a non-empty list of FLOPs > 0, got {self.budgets}")
        if (not self.widths and self.design is None) or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty list of d_model values >= 1 (or "
                             f"give a design), got {self.widths}")
        if not self.experts:
            raise ValueError("experts must list at least one choice ({experts: 1} is dense)")
        for field in ("procs", "threads", "max_attempts", "min_steps"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.procs > 1 and self.launcher.runner == "python":
            raise ValueError("procs > 1 needs launcher.runner torchrun or deepspeed, not python")
        if self.design is not None:
            check(self)
        self.out = self.out or f"runs/sweep/{self.name}"


def load_sweep_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                      ) -> SweepConfig:
    """The config at ``path`` with dotted ``overrides``, its paths made absolute (see the
    module's docstring)."""
    cfg = load_config(SweepConfig, path, overrides)
    cfg.out = str(Path(cfg.out).absolute())
    cfg.data = str(Path(cfg.data).absolute())
    cfg.train = str(_input_path(cfg.train))
    cfg.family.base = str(_input_path(cfg.family.base))
    if cfg.design is not None and cfg.design.prior != "epoch":
        cfg.design.prior = str(_input_path(cfg.design.prior))
    return cfg


def _input_path(path: str) -> Path:
    """An input file as the user named it: relative to this folder, else to the checkout
    (the built-in configs), else as given (the error that follows names it)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (REPO / p).exists():
        return p.absolute()
    return REPO / p


# ------------------------------------------------------------------------------ CLI
def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="configs/sweep/<name>.yaml")
    p.add_argument("--plan-only", action="store_true", help="print the grid, run nothing")
    p.add_argument("--no-fit", action="store_true", help="run the sweep, skip the fit")
    p.add_argument("--fit-only", action="store_true",
                   help="run nothing: fit the laws and the optimum to the finished runs")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the sweep config (launcher.max_parallel=2)")


def run(args) -> int:
    cfg = load_sweep_config(args.config, args.overrides)
    runs, notes = plan(cfg)
    if args.plan_only:
        print(plan_table(runs))
        for note in notes:
            print(note)
        minutes = estimate_seconds(runs, cfg) / 60
        print(f"{len(runs)} runs, {sum(r.C for r in runs):.3g} FLOPs: about {minutes:.0f} min "
              f"at {cfg.launcher.max_parallel} at once (scaling.design.estimate_seconds)"
              + (f"; widening may add up to {widening_seconds(cfg) / 60:.0f} min"
                 if cfg.design else ""))
        return 0
    if args.fit_only and args.no_fit:
        raise ValueError("--fit-only and --no-fit exclude each other")
    if args.fit_only:
        fit_finished(cfg)
        return 0
    rows = run_sweep(cfg)
    done = [row for row in rows if row["status"] == "done"]
    failed = [row for row in rows if row["status"] != "done"]
    print(f"sweep {cfg.name}: {len(done)} of {len(rows)} runs done; results in "
          f"{Path(cfg.out) / 'results.csv'}")
    for row in failed:
        print(f"  failed after {row['attempts']} attempt(s): {row['name']}: {row['error']}")
    if not args.no_fit and done:
        from scaling.report import fit_sweep

        fit_sweep(cfg, rows)
    return 0 if not failed else 1
