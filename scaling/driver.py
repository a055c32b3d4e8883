"""The sweep driver: runs a grid's runs through a launcher, one driver per sweep folder, and
keeps a results table that survives crashes of runs and of the driver itself.

    from scaling.driver import run_sweep
    rows = run_sweep(cfg)        # runs (or resumes, or re-attaches to) the sweep

Each run has its own directory ``out/runs/<name>/``: the resolved training config
(``train.yaml``, saved before the run starts), the trainer's run (``train/``), the
launcher's log and ``result.json``, its state: ``running`` (with how to find its process:
pid, host and start time, or the SLURM job id), ``done`` or ``failed``; ``attempts`` counts
launches, ``wall_s`` sums their wall time. ``out/results.csv`` and ``results.jsonl`` are
rebuilt from the result files after every finished run.

A driver holds ``out/sweep.lock`` (an exclusive ``flock``; the kernel releases it when the
driver dies, however it dies): a second driver on the same folder is refused. A rerun skips
finished runs (never rewriting their results), re-attaches to runs whose process or SLURM
job still lives instead of launching them again, judges a local run that ended while no
driver watched it by its outputs (a final evaluation at the planned last step is done), and
relaunches failed runs until ``max_attempts`` (the trainer resumes from its checkpoint).
"""

from __future__ import annotations

import collections
import csv
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from moe_gato.config import to_dict, write_json
from scaling.launch import LOG_NAME, UNKNOWN_EXIT, Job, make_launcher

if TYPE_CHECKING:
    from scaling.grid import PlannedRun
    from scaling.sweep import SweepConfig

LOCK_NAME = "sweep.lock"


# ------------------------------------------------------------------------------ the lock
@contextmanager
def sweep_lock(out: Path):
    """Holds ``out/sweep.lock`` for one driver; another driver's attempt is a ValueError
    naming the holder (pid, host, since when)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the runs (PEP 446)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"{out} is in use by another sweep driver ({holder}); wait for it "
                             f"to end or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


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


HEAD = ["name", "config_hash", "budget", "C", "N_total", "N_active", "N_active_nonemb", "E",
        "experts", "k", "G", "d_model", "num_layers", "D", "steps", "seed", "lr",
        "batch_size", "warmup_steps", "unique_tokens", "epochs", "loss", "action_acc",
        "wall_s", "launcher", "status", "attempts", "error"]


def write_table(out: Path, runs: list[PlannedRun]) -> list[dict]:
    """results.jsonl and results.csv from every run's result.json (atomically)."""
    rows = [res for r in runs if (res := read_result(out / "runs" / r.name)) is not None]
    extra = sorted({k for row in rows for k in row} - set(HEAD))
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEAD + extra)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "results.csv")
    tmp = out / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, out / "results.jsonl")
    return rows


def log_tail(path: Path, lines: int = 12) -> str:
    """A failed run's log, named, with its last lines (or that it is empty or missing)."""
    if not path.is_file():
        return f"no log at {path}"
    text = path.read_text(errors="replace").strip()
    if not text:
        return f"its log {path} is empty"
    tail = text.splitlines()[-lines:]
    return f"log {path}, last lines: " + " | ".join(tail)


# ------------------------------------------------------------------------------ running
def run_sweep(cfg: SweepConfig, *, progress: bool = True) -> list[dict]:
    """Runs (or resumes) the sweep; returns the results rows. A designed sweep widens its
    grid after each round of runs while a budget's IsoFLOP vertex lies outside its widths
    (``scaling.design.widen``), and runs the widths it adds."""
    from scaling.grid import plan

    out = Path(cfg.out)
    with sweep_lock(out):
        (out / "runs").mkdir(parents=True, exist_ok=True)
        resolved = json.loads(json.dumps(to_dict(cfg), default=str))
        (out / "sweep.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        launcher = make_launcher(cfg.launcher)
        while True:
            runs, notes = plan(cfg)
            for note in notes:
                print(f"sweep {cfg.name}: {note}", flush=True)
            rows = _run_all(cfg, out, runs, launcher, progress)
            if cfg.design is None:
                return rows
            from scaling.design import widen

            added, said = widen(cfg, rows)
            for line in said:
                print(f"sweep {cfg.name}: {line}", flush=True)
            if not added:
                return rows


def _run_all(cfg: SweepConfig, out: Path, runs: list[PlannedRun], launcher,
             progress: bool) -> list[dict]:
    from tqdm import tqdm

    todo: collections.deque = collections.deque()
    running: dict[str, tuple] = {}  # name: (run, handle, its running record)
    for r in runs:
        state = _resume_state(cfg, out, r, launcher)
        if isinstance(state, tuple):
            running[r.name] = state
        elif state:
            todo.append(r)
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo) - len(running),
               desc=f"sweep {cfg.name}", unit="run", disable=not progress)
    try:
        while todo or running:
            while todo and len(running) < cfg.launcher.max_parallel:
                r = todo.popleft()
                running[r.name] = (r, *_launch(cfg, launcher, out, r))
            time.sleep(cfg.poll_s)
            for name, (r, handle, record) in list(running.items()):
                status = handle.poll()
                if status is None:
                    continue
                del running[name]
                res = _finish(cfg, out, r, status, record)
                if res["status"] != "done" and res["attempts"] < cfg.max_attempts:
                    todo.append(r)  # retried: the trainer resumes from its checkpoint
                else:
                    bar.update(1)
                write_table(out, runs)
                bar.set_postfix(last=f"{name}: {res['status']}")
    except BaseException:
        for _, handle, _ in running.values():
            handle.cancel()
        raise
    finally:
        bar.close()
    return write_table(out, runs)


def _resume_state(cfg: SweepConfig, out: Path, r: PlannedRun, launcher):
    """What a (re)started driver does with a planned run: False (finished, or out of
    attempts), True (launch it), or (run, handle, record) of a live run re-attached."""
    run_dir = out / "runs" / r.name
    res = read_result(run_dir)
    if res is None:
        return True
    if res.get("config_hash") != r.config_hash:
        raise ValueError(f"{run_dir} holds a run of another config (hash "
                         f"{res.get('config_hash')}, planned {r.config_hash}); a finished "
                         f"result is never overwritten: sweep into another out folder")
    if res["status"] == "done":
        return False
    if res["status"] == "running":
        handle = launcher.attach(res["job"], run_dir) if res.get("job") else None
        if handle is not None:
            return r, handle, res
        res = _finish(cfg, out, r, UNKNOWN_EXIT, res)  # ended while no driver watched it
        if res["status"] == "done":
            return False
    return res["attempts"] < cfg.max_attempts


def _launch(cfg: SweepConfig, launcher, out: Path, r: PlannedRun):
    """Starts one attempt of a run; returns (handle, its running record)."""
    run_dir = out / "runs" / r.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.yaml").write_text(yaml.safe_dump(r.train, sort_keys=False))
    prev = read_result(run_dir) or {}
    job = Job(name=r.name, run_dir=run_dir, procs=cfg.procs, threads=cfg.threads,
              args=["train", "--config", str(run_dir / "train.yaml"),
                    "--data", str(cfg.data), "--out", str(run_dir / "train")])
    started = time.time()
    handle = launcher.submit(job)
    record = {**r.row(), "status": "running", "attempts": prev.get("attempts", 0) + 1,
              "wall_s": prev.get("wall_s", 0.0), "started": started, "job": handle.record(),
              "launcher": cfg.launcher.kind, "error": prev.get("error", "")}
    write_json(run_dir / "result.json", record)
    return handle, record


def _finish(cfg: SweepConfig, out: Path, r: PlannedRun, status: int, record: dict) -> dict:
    """The result of the attempt ``record`` describes, ended with ``status``."""
    run_dir = out / "runs" / r.name
    wall = record.get("wall_s", 0.0) + max(0.0, time.time() - record.get("started", time.time()))
    res = {**r.row(), "launcher": record.get("launcher", cfg.launcher.kind),
           "attempts": record.get("attempts", 1), "wall_s": round(wall, 1),
           "exit_status": None if status == UNKNOWN_EXIT else status}
    if status in (0, UNKNOWN_EXIT):
        try:
            final = final_metrics(run_dir / "train")
            if final["final_step"] != r.steps:
                raise ValueError(f"its last evaluation is at step {final['final_step']}, "
                                 f"not the planned {r.steps}")
            res.update(final, status="done", error="")
        except ValueError as exc:
            how = "exit 0" if status == 0 else "ended while no driver watched it"
            res.update(status="failed", error=f"{how} but {exc}; "
                                              f"{log_tail(run_dir / LOG_NAME)}")
    else:
        res.update(status="failed", error=f"exit status {status}; "
                                          f"{log_tail(run_dir / LOG_NAME)}")
    write_json(run_dir / "result.json", res)
    return res


def fit_finished(cfg: SweepConfig) -> dict:
    """The laws and the optimum fitted to the sweep's finished runs (``scaling.report``)."""
    from scaling.grid import plan
    from scaling.report import fit_sweep

    runs, _ = plan(cfg)
    out = Path(cfg.out)
    if not (out / "runs").is_dir():
        raise ValueError(f"{out} holds no sweep runs: run `moe-gato sweep --config ...` first")
    rows = write_table(out, runs)
    if not any(row["status"] == "done" for row in rows):
        raise ValueError(f"no finished run in {out}/runs: nothing to fit")
    return fit_sweep(cfg, rows)
