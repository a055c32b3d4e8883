"""IsoFLOP sweeps (scaling/sweep.py): the grid from the model's own FLOP accounting, real
training runs through the local launcher, a results table that survives a killed run, a
failing run and a rerun. The SLURM path runs in tests/test_launch.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from moe_gato.model import accounting
from scaling.family import ExpertChoice, FamilyConfig, model_config
from scaling.sweep import load_sweep_config, plan, read_result, run_sweep

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
