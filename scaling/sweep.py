"""IsoFLOP sweeps of MoE-Gato: the grid, its runs through a launcher, a results table that
survives crashes, then the fitted laws.

    moe-gato sweep --config configs/sweep/tiny.yaml               # run (or resume), then fit
    moe-gato sweep --config configs/sweep/tiny.yaml --plan-only   # print the grid, run nothing
    moe-gato sweep --config configs/sweep/tiny.yaml launcher.kind=slurm launcher.max_parallel=8

For every compute budget C (FLOPs) and family member (width x expert choice, see
``scaling.family``) a run trains for D = C / (training FLOPs per token), the model's own
accounting at the training context (attention included), rounded to whole steps; the D and
C actually trained are recorded. Each run has its own directory ``out/runs/<name>/``: the
resolved training config (``train.yaml``, saved before the run starts), the trainer's run
(``train/``), the launcher's log and ``result.json``. ``out/results.csv`` and
``results.jsonl`` are rebuilt from the result files after every finished run.

Re-running the sweep skips finished runs (never rewriting their results), retries failed
ones until ``max_attempts`` (the trainer resumes from its last checkpoint), and records a
crashed run while the others go on. A run whose saved config differs from the planned one
is an error: sweep something else under another ``out``.

Results columns: ``name, config_hash, budget`` (nominal C), ``C`` (as trained), ``N_total,
N_active, N_active_nonemb, E`` (expansion rate, 1 = dense; ``scaling.family``), ``experts,
k, G, d_model, num_layers, D, steps, loss`` (final validation loss), ``loss/<kind>``,
``loss/<task>``, ``action_acc`` (mean teacher-forced action accuracy over control tasks)
and ``action_acc/<task>``, ``wall_s, launcher, status`` (done | failed | running),
``attempts, error``.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import yaml

from moe_gato.config import from_dict, load_config, to_dict, write_json
from scaling.family import ExpertChoice, FamilyConfig, model_config
from scaling.launch import Job, LauncherConfig, make_launcher

REPO = Path(__file__).resolve().parents[1]
LAWS = ("chinchilla", "clark", "krajewski", "joint")


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

    def __post_init__(self) -> None:
        bad = [law for law in self.laws if law not in LAWS]
        if bad:
            raise ValueError(f"fit.laws: unknown law(s) {bad}; allowed: {list(LAWS)}")
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
    widths: list[int]
    experts: list[ExpertChoice] = dataclasses.field(default_factory=lambda: [ExpertChoice()])
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
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty list of d_model values >= 1, "
                             f"got {self.widths}")
        if not self.experts:
            raise ValueError("experts must list at least one choice ({experts: 1} is dense)")
        for field in ("procs", "threads", "max_attempts", "min_steps"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.procs > 1 and self.launcher.runner == "python":
            raise ValueError("procs > 1 needs launcher.runner torchrun or deepspeed, not python")
        self.out = self.out or f"runs/sweep/{self.name}"


def load_sweep_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                      ) -> SweepConfig:
    return load_config(SweepConfig, path, overrides)


# ------------------------------------------------------------------------------ the grid
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


# ------------------------------------------------------------------------------ results
def read_result(run_dir: Path) -> dict | None:
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); move it aside to rerun the run") \
            from None


def final_metrics(train_dir: Path) -> dict:
    """The final evaluation of a finished training run, as results columns."""
    from moe_gato.train.metrics import read_metrics

    path = train_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    evals = [r for r in read_metrics(train_dir) if "eval/loss" in r]
    if not evals:
        raise ValueError(f"{path} holds no evaluation")
    last = evals[-1]
    out = {"loss": last["eval/loss"]}
    acc = []
    for key, value in last.items():
        if key.startswith("eval/loss/"):
            out["loss/" + key[len("eval/loss/"):]] = value
        elif key.startswith("eval/action_acc/"):
            out["action_acc/" + key[len("eval/action_acc/"):]] = value
            acc.append(value)
    out["action_acc"] = sum(acc) / len(acc) if acc else float("nan")
    out["final_step"] = last["step"]
    return out


def write_table(out: Path, runs: list[PlannedRun]) -> list[dict]:
    """results.jsonl and results.csv from every run's result.json (atomically)."""
    rows = [res for r in runs if (res := read_result(out / "runs" / r.name)) is not None]
    head = ["name", "config_hash", "budget", "C", "N_total", "N_active", "N_active_nonemb",
            "E", "experts", "k", "G", "d_model", "num_layers", "D", "steps", "loss",
            "action_acc", "wall_s", "launcher", "status", "attempts", "error"]
    extra = sorted({k for row in rows for k in row} - set(head))
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=head + extra)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "results.csv")
    tmp = out / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, out / "results.jsonl")
    return rows


def _log_tail(path: Path, chars: int = 1500) -> str:
    if not path.is_file():
        return ""
    return path.read_text(errors="replace")[-chars:]


# ------------------------------------------------------------------------------ running
def run_sweep(cfg: SweepConfig, *, progress: bool = True) -> list[dict]:
    """Runs (or resumes) the sweep; returns the results rows."""
    from tqdm import tqdm

    runs, notes = plan(cfg)
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    # the resolved sweep config beside its results (paths as strings)
    resolved = json.loads(json.dumps(to_dict(cfg), default=str))
    (out / "sweep.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    for note in notes:
        print(f"sweep {cfg.name}: {note}", flush=True)
    todo = collections.deque()
    for r in runs:
        res = read_result(out / "runs" / r.name)
        if res is not None and res.get("config_hash") != r.config_hash:
            raise ValueError(f"{out / 'runs' / r.name} holds a run of another config (hash "
                             f"{res.get('config_hash')}, planned {r.config_hash}); a finished "
                             f"result is never overwritten: sweep into another out folder")
        if res is None or (res["status"] != "done" and res["attempts"] < cfg.max_attempts):
            todo.append(r)
    launcher = make_launcher(cfg.launcher)
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"sweep {cfg.name}",
               unit="run", disable=not progress)
    running: dict[str, tuple] = {}
    try:
        while todo or running:
            while todo and len(running) < cfg.launcher.max_parallel:
                r = todo.popleft()
                running[r.name] = (r, *_launch(cfg, launcher, out, r))
            time.sleep(cfg.poll_s)
            for name, (r, handle, started, attempts) in list(running.items()):
                status = handle.poll()
                if status is None:
                    continue
                del running[name]
                res = _finish(cfg, out, r, status, time.time() - started, attempts)
                if res["status"] != "done" and attempts < cfg.max_attempts:
                    todo.append(r)  # retried: the trainer resumes from its checkpoint
                else:
                    bar.update(1)
                write_table(out, runs)
                bar.set_postfix(last=f"{name}: {res['status']}")
    except BaseException:
        for r, handle, _, _ in running.values():
            handle.cancel()
        raise
    finally:
        bar.close()
    return write_table(out, runs)


def _launch(cfg: SweepConfig, launcher, out: Path, r: PlannedRun):
    run_dir = out / "runs" / r.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.yaml").write_text(yaml.safe_dump(r.train, sort_keys=False))
    prev = read_result(run_dir)
    attempts = (prev["attempts"] if prev else 0) + 1
    write_json(run_dir / "result.json", {**r.row(), "status": "running", "attempts":
                                           attempts - 1, "launcher": cfg.launcher.kind})
    job = Job(name=r.name, run_dir=run_dir, procs=cfg.procs, threads=cfg.threads,
              args=["train", "--config", str(run_dir / "train.yaml"),
                    "--data", str(cfg.data), "--out", str(run_dir / "train")])
    return launcher.submit(job), time.time(), attempts


def _finish(cfg: SweepConfig, out: Path, r: PlannedRun, status: int, wall: float,
            attempts: int) -> dict:
    run_dir = out / "runs" / r.name
    res = {**r.row(), "launcher": cfg.launcher.kind, "attempts": attempts,
           "wall_s": round(wall, 1), "exit_status": status}
    if status == 0:
        try:
            res.update(final_metrics(run_dir / "train"), status="done", error="")
        except ValueError as exc:
            res.update(status="failed", error=f"exit 0 but {exc}")
    else:
        res.update(status="failed", error=f"exit status {status}; log tail: "
                   + _log_tail(run_dir / "launcher.log", 600).replace("\n", " | "))
    write_json(run_dir / "result.json", res)
    return res


def fit_finished(cfg: SweepConfig) -> dict:
    """The laws and the optimum fitted to the sweep's finished runs (``scaling.report``)."""
    from scaling.report import fit_sweep

    runs, _ = plan(cfg)
    out = Path(cfg.out)
    if not (out / "runs").is_dir():
        raise ValueError(f"{out} holds no sweep runs: run `moe-gato sweep --config ...` first")
    rows = write_table(out, runs)
    if not any(row["status"] == "done" for row in rows):
        raise ValueError(f"no finished run in {out}/runs: nothing to fit")
    return fit_sweep(cfg, rows)


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
        return 0
    if args.fit_only and args.no_fit:
        raise ValueError("--fit-only and --no-fit exclude each other")
    if args.fit_only:
        fit_finished(cfg)
        return 0
    rows = run_sweep(cfg)
    done = [row for row in rows if row["status"] == "done"]
    failed = [row["name"] for row in rows if row["status"] != "done"]
    print(f"sweep {cfg.name}: {len(done)} of {len(runs)} runs done; results in "
          f"{Path(cfg.out) / 'results.csv'}" + (f"; failed: {failed}" if failed else ""))
    if not args.no_fit and done:
        from scaling.report import fit_sweep

        fit_sweep(cfg, rows)
    return 0 if not failed else 1
