"""IsoFLOP sweeps (scaling/sweep.py): the grid from the model's own FLOP accounting, real
training runs through the local launcher, a results table that survives a killed run, a
failing run and a rerun. The SLURM path runs in tests/test_launch.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from moe_gato.model import accounting
from scaling.family import ExpertChoice, FamilyConfig, model_config
from scaling.sweep import load_sweep_config, plan, read_result, run_sweep

REPO = Path(__file__).resolve().parents[1]
TASKS = {"babyai/BabyAI-GoToLocal-v0": 1.0, "classic/Pendulum-v1": 1.0, "text/shakespeare": 1.0}


def write_sweep(tmp_path: Path, suite: Path, **top) -> Path:
    train = {"model": {"preset": "configs/model/tiny-moe.yaml", "context_length": 256},
             "data": {"data_dir": str(suite), "tasks": TASKS},
             "batch_size": 2, "micro_batch_size": 2, "tokens": 10_000,
             "optim": {"lr": 3e-3, "warmup_steps": 2}, "eval_sequences": 1, "peak_flops": 1e11}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    sweep = {"name": "micro", "out": str(tmp_path / "sweep"), "data": str(suite),
             "train": str(tmp_path / "train.yaml"), "budgets": [2.0e9, 4.0e9],
             "widths": [32, 64], "experts": [{"experts": 1}], "min_steps": 2,
             "launcher": {"kind": "local", "runner": "python", "max_parallel": 2},
             "poll_s": 0.5, "max_attempts": 2}
    sweep.update(top)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_grid_trains_each_model_for_its_budget(tmp_path, tiny_suite):
    cfg = load_sweep_config(write_sweep(tmp_path, tiny_suite,
                                        experts=[{"experts": 1}, {"experts": 4, "k": 1, "G": 2}]))
    runs, notes = plan(cfg)
    assert len(runs) + len(notes) == 2 * 2 * 2
    for r in runs:
        model = model_config(FamilyConfig(), d_model=r.d_model, experts=r.experts,
                             context_length=256)
        fpt = accounting.flops_per_token(model, training=True, seq_len=256)
        assert r.flops_per_token == pytest.approx(fpt, rel=1e-3)  # the recipe's model options
        assert r.steps == round(r.budget / fpt / 512) and r.D == r.steps * 512
        assert r.C == pytest.approx(r.D * fpt) and r.train["tokens"] == r.D
        assert r.train["model"]["d_model"] == r.d_model
        assert r.train["model"]["ffn"] == ("dense" if r.experts.dense else "moe")
    # at one budget a wider model trains on fewer tokens
    at = {(r.budget, r.d_model, r.experts.dense): r.D for r in runs}
    assert at[(4.0e9, 32, True)] > at[(4.0e9, 64, True)]
    assert len({r.config_hash for r in runs}) == len(runs)
    assert plan(cfg)[0][0].config_hash == runs[0].config_hash  # stable across calls


def test_the_grid_counts_unique_tokens_and_says_when_a_run_repeats_its_data(tmp_path,
                                                                            tiny_suite):
    from moe_gato.data.storage import read_manifest

    cfg = load_sweep_config(write_sweep(tmp_path, tiny_suite, budgets=[4.0e9, 4.0e11],
                                        widths=[32]))
    runs, notes = plan(cfg)
    tasks = read_manifest(tiny_suite)["tasks"]
    unique = sum(tasks[t]["tokens"] for t in TASKS) * 0.9  # less the validation share
    for r in runs:
        assert r.unique_tokens == pytest.approx(unique, rel=0.02)
        assert r.row()["epochs"] == pytest.approx(r.D / r.unique_tokens)
        assert r.row()["unique_tokens"] == min(r.D, r.unique_tokens)
    big = max(runs, key=lambda r: r.D)
    assert big.epochs > 1 and any("repeat their data" in n and big.name in n for n in notes)
    cfg.data = str(tmp_path / "nowhere")  # no manifest yet: unknown, not an error
    assert all(r.epochs is None for r in plan(cfg)[0])


@pytest.mark.parametrize("override,match", [
    ({"budgets": []}, "budgets must be a non-empty list"),
    ({"widths": [48]}, r"d_model \(48\) must be a multiple of family.head_dim"),
    ({"experts": [{"experts": 2, "k": 2, "G": 2}]}, r"k \* G = 4 exceeds the 2 experts"),
    ({"experts": [{"experts": 1, "k": 2}]}, "experts: 1 is the dense twin"),
    ({"launcher": {"kind": "cluster"}}, "launcher.kind"),
    ({"budgets": [1.0e3]}, "the grid is empty"),
    ({"fit": {"laws": ["kaplan"]}}, r"fit.laws: unknown law\(s\) \['kaplan'\]"),
])
def test_bad_sweep_configs_are_named(tmp_path, tiny_suite, override, match):
    with pytest.raises(ValueError, match=match):
        plan(load_sweep_config(write_sweep(tmp_path, tiny_suite, **override)))


def _trainer_pid(run_dir: Path) -> int | None:
    """The pid of the training process whose command line names ``run_dir``'s config."""
    needle = str(run_dir / "train.yaml").encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes():
                    return int(proc.name)
            except OSError:
                continue
    return None


def test_sweep_survives_a_killed_run_a_failing_run_and_a_rerun(tmp_path, tiny_suite):
    path = write_sweep(tmp_path, tiny_suite, budgets=[2.0e9, 6.0e9])
    cfg = load_sweep_config(path)
    runs, _ = plan(cfg)
    victim = max(runs, key=lambda r: r.steps)  # the longest run is killed after a checkpoint
    out = Path(cfg.out)
    killed = {}

    def killer():
        deadline = time.time() + 300
        ckpts = out / "runs" / victim.name / "train" / "checkpoints"
        while time.time() < deadline and not killed:
            if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
                pid = _trainer_pid(out / "runs" / victim.name)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"] = pid
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    rows = run_sweep(cfg, progress=False)
    thread.join()
    assert killed, "the victim run was never seen with a checkpoint"
    by = {r["name"]: r for r in rows}
    assert all(r["status"] == "done" for r in rows), [(r["name"], r["error"]) for r in rows]
    assert by[victim.name]["attempts"] == 2  # killed once, then resumed from its checkpoint
    metrics = [json.loads(x) for x in
               (out / "runs" / victim.name / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics]
    assert steps == sorted(set(steps)) and max(steps) == victim.steps  # no step twice
    for r in rows:
        assert r["D"] == r["steps"] * 512 and r["loss"] > 0 and 0 <= r["action_acc"] <= 1
        assert "loss/classic/Pendulum-v1" in r and r["launcher"] == "local"
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted(t["name"] for t in table) == sorted(by)
    assert (out / "sweep.yaml").is_file() and (out / "runs" / victim.name / "train.yaml").is_file()

    # a rerun launches nothing and rewrites no finished result
    stamps = {r.name: (out / "runs" / r.name / "result.json").stat().st_mtime_ns for r in runs}
    assert run_sweep(cfg, progress=False) == rows
    assert stamps == {r.name: (out / "runs" / r.name / "result.json").stat().st_mtime_ns
                      for r in runs}

    # a failing run (its data folder has no such task) is recorded, retried up to
    # max_attempts, and the other runs of the sweep finish
    bad = write_sweep(tmp_path, tiny_suite, out=str(tmp_path / "sweep2"), budgets=[2.0e9],
                      widths=[32, 64], max_attempts=2)
    cfg2 = load_sweep_config(bad)
    first = plan(cfg2)[0][0]
    runs2 = plan(cfg2)[0]
    broken = out.parent / "sweep2" / "runs" / first.name
    broken.mkdir(parents=True)
    (broken / "train").mkdir()
    (broken / "train" / "config.yaml").write_text("not: [a run")  # the trainer refuses it
    rows2 = {r["name"]: r for r in run_sweep(cfg2, progress=False)}
    assert rows2[first.name]["status"] == "failed" and rows2[first.name]["attempts"] == 2
    assert "exit status" in rows2[first.name]["error"]
    assert all(rows2[r.name]["status"] == "done" for r in runs2 if r.name != first.name)
    assert read_result(broken)["status"] == "failed"


def test_a_changed_config_never_overwrites_a_finished_result(tmp_path, tiny_suite):
    """(The run starts through torchrun, as in configs/sweep/tiny.yaml.)"""
    torchrun = {"kind": "local", "runner": "torchrun", "max_parallel": 1}
    cfg = load_sweep_config(write_sweep(tmp_path, tiny_suite, budgets=[2.0e9], widths=[32],
                                        launcher=torchrun))
    rows = run_sweep(cfg, progress=False)
    assert [r["status"] for r in rows] == ["done"]
    changed = load_sweep_config(write_sweep(tmp_path, tiny_suite, budgets=[2.0e9], widths=[32],
                                            launcher=torchrun,
                                            train_overrides=["optim.lr=0.001"]))
    with pytest.raises(ValueError, match="holds a run of another config"):
        run_sweep(changed, progress=False)
    assert read_result(Path(cfg.out) / "runs" / plan(cfg)[0][0].name)["status"] == "done"


def test_expert_choice_expansion():
    assert ExpertChoice(experts=8, k=1, G=2).expansion == 4
    assert ExpertChoice().dense and ExpertChoice().expansion == 1


def test_a_two_run_micro_sweep_through_the_real_slurm(tmp_path, tiny_suite, slurm_cluster):
    """Each run is a SLURM job (submitit -> sbatch) whose node runs the DeepSpeed launcher."""
    cfg = load_sweep_config(write_sweep(
        tmp_path, tiny_suite, budgets=[4.0e9], widths=[32, 64],
        launcher={"kind": "slurm", "runner": "deepspeed", "max_parallel": 2,
                  "slurm": {"folder": str(tmp_path / "submitit"), "time_min": 10}}))
    rows = run_sweep(cfg, progress=False)
    assert len(rows) == 2
    assert all(r["status"] == "done" and r["launcher"] == "slurm" for r in rows), rows
    for r in rows:
        log = (Path(cfg.out) / "runs" / r["name"] / "launcher.log").read_text()
        assert "deepspeed" in log.lower() and r["loss"] > 0


# ------------------------------------------------------------ from any folder, re-attaching
def _cli_env() -> dict:
    """The environment of a `moe-gato` child: this checkout's code first."""
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def test_a_sweep_runs_from_a_folder_outside_the_checkout(tmp_path, tiny_suite, monkeypatch):
    """Paths as the user typed them, relative to the user's folder; the runs start there,
    write there, and a failed run's error names its log and shows its last lines."""
    home = tmp_path / "elsewhere"
    home.mkdir()
    (home / "suite").symlink_to(tiny_suite)
    out_name = f"sweep-elsewhere-{os.getpid()}"
    write_sweep(home, tiny_suite, out=out_name, data="suite", train="train.yaml",
                budgets=[4.0e9], widths=[32, 64])
    monkeypatch.chdir(home)  # where the user is: relative paths are read from here
    broken = home / out_name / "runs" / plan(load_sweep_config("sweep.yaml"))[0][0].name
    (broken / "train").mkdir(parents=True)
    (broken / "train" / "config.yaml").write_text("not: [a run")  # the trainer refuses it
    out = subprocess.run([sys.executable, "-m", "moe_gato.cli", "sweep", "--config", "sweep.yaml",
                          "--no-fit", "max_attempts=1"], cwd=home, env=_cli_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]  # one run failed on purpose
    assert not (REPO / out_name).exists(), "the runs wrote into the checkout"
    lines = (home / out_name / "results.jsonl").read_text().splitlines()
    rows = {r["name"]: r for r in map(json.loads, lines)}
    assert len(rows) == 2
    good = [r for name, r in rows.items() if name != broken.name]
    assert [r["status"] for r in good] == ["done"] and good[0]["loss"] > 0
    bad = rows[broken.name]
    log = broken / "launcher.log"
    assert bad["status"] == "failed" and f"log {log}, last lines:" in bad["error"]
    assert "config.yaml" in bad["error"]  # the trainer's own complaint, from the log's tail
    assert str(log) in out.stdout  # the command's summary names it too


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def _training(out: Path, names: list[str]) -> bool:
    """Every run has written a training step."""
    return all((out / "runs" / n / "train" / "metrics.jsonl").is_file()
               and (out / "runs" / n / "train" / "metrics.jsonl").read_text().strip()
               for n in names)


def _kill_driver_and_rerun(tmp_path: Path, cfg, timeout: float) -> tuple[list[dict], dict]:
    """Starts `moe-gato sweep` as its own process, SIGKILLs that process alone once every
    run trains, then reruns the sweep here; returns (rows, the first driver's records)."""
    runs, _ = plan(cfg)
    names = [r.name for r in runs]
    out = Path(cfg.out)
    driver = subprocess.Popen([sys.executable, "-m", "moe_gato.cli", "sweep", "--config",
                               str(tmp_path / "sweep.yaml"), "--no-fit"], cwd=tmp_path,
                              env=_cli_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _training(out, names), timeout, "every run's first step")
        # a second driver on the same folder is refused while the first lives
        with pytest.raises(ValueError, match="in use by another sweep driver"):
            run_sweep(cfg, progress=False)
    finally:
        driver.kill()  # SIGKILL to the driver only: its runs keep going
        driver.wait()
    records = {n: read_result(out / "runs" / n) for n in names}
    assert all(r["status"] == "running" and r["attempts"] == 1 for r in records.values())
    return run_sweep(cfg, progress=False), records


def _check_one_attempt_each(cfg, rows: list[dict], records: dict, started: float) -> None:
    out = Path(cfg.out)
    runs = {r.name: r for r in plan(cfg)[0]}
    assert all(r["status"] == "done" for r in rows), [(r["name"], r["error"]) for r in rows]
    ended = time.time()
    for row in rows:
        assert row["attempts"] == 1, row  # re-attached, not launched again
        # the wall time runs from the first driver's launch, across the driver's death
        assert records[row["name"]]["started"] - 1 <= ended - row["wall_s"] <= started + 60
        metrics = [json.loads(x) for x in (out / "runs" / row["name"] / "train" /
                                           "metrics.jsonl").read_text().splitlines()]
        steps = [m["step"] for m in metrics]
        assert steps == sorted(set(steps)) and max(steps) == runs[row["name"]].steps  # no twice


@pytest.mark.slow
def test_a_killed_driver_reattaches_to_its_local_runs(tmp_path, tiny_suite):
    cfg = load_sweep_config(write_sweep(tmp_path, tiny_suite, budgets=[4.0e11], widths=[32, 64]))
    started = time.time()
    rows, records = _kill_driver_and_rerun(tmp_path, cfg, 300)
    _check_one_attempt_each(cfg, rows, records, started)
    attached = 0
    for row in rows:
        log = (Path(cfg.out) / "runs" / row["name"] / "launcher.log").read_text()
        assert log.count("moe_gato.cli train") == 1, log  # launched once
        attached += f"re-attached to pid {records[row['name']]['job']['pid']}" in log
    assert attached, "no trainer outlived its driver long enough to be re-attached"


@pytest.mark.slow
def test_a_killed_driver_reattaches_to_its_slurm_jobs(tmp_path, tiny_suite, slurm_cluster):
    cfg = load_sweep_config(write_sweep(
        tmp_path, tiny_suite, budgets=[4.0e11], widths=[32, 64],
        launcher={"kind": "slurm", "runner": "python", "max_parallel": 2,
                  "slurm": {"folder": str(tmp_path / "submitit"), "time_min": 10}}))
    started = time.time()
    rows, records = _kill_driver_and_rerun(tmp_path, cfg, 300)
    _check_one_attempt_each(cfg, rows, records, started)
    for row in rows:
        job = records[row["name"]]["job"]["job_id"]
        log = (Path(cfg.out) / "runs" / row["name"] / "launcher.log").read_text()
        assert log.count(": slurm job ") == 1, log  # submitted once
        assert f"re-attached to slurm job {job}" in log
