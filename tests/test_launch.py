"""The sweep launchers: configs, the commands they build, local process trees (two runs at
once, a crash, a cancel) and a real single-node SLURM (scripts/slurm_cluster.sh) that trains
through submitit -> sbatch -> the DeepSpeed launcher, fails, and cancels."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scaling.launch import (Job, LauncherConfig, SlurmConfig, hostfile_text, make_launcher,
                            run_command, run_env, slurm_state)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
TASKS = {"babyai/BabyAI-GoToLocal-v0": 2.0, "classic/Pendulum-v1": 1.0, "vl/digits": 1.0,
         "text/shakespeare": 1.0}


def train_args(tmp_path: Path, suite: Path, out: Path, steps: int = 2, *extra: str) -> list[str]:
    """`moe-gato train` of a 2-layer tiny-moe on the tiny suite."""
    cfg = {
        "model": {"preset": "configs/model/tiny-moe.yaml", "context_length": 256, "num_layers": 2},
        "data": {"data_dir": str(suite), "tasks": TASKS},
        "batch_size": 4, "micro_batch_size": 2, "steps": steps, "optim": {"lr": 3e-3},
        "log_every": 1, "eval_every": 1000, "eval_sequences": 2, "checkpoint_every": 2,
        "keep_last": 1, "peak_flops": 1e11,
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["train", "--config", str(path), "--out", str(out), *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def processes_in(run_dir: Path) -> list[int]:
    """pids of processes whose command line names the run directory."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(run_dir) in arg for arg in (p.info["cmdline"] or [])):
            found.append(p.pid)
    return found


def finish(handle, run: Path, timeout: float) -> int:
    """The SLURM job's exit status, or a failure that says where it got stuck."""
    try:
        return handle.wait(timeout=timeout)
    except TimeoutError:
        log = run / "launcher.log"
        pytest.fail(f"slurm job {handle.job_id} still {slurm_state(handle.job_id)} after "
                    f"{timeout} s; {log}:\n" + (log.read_text()[-3000:] if log.exists() else ""))


# ------------------------------------------------------------------------ configs, commands
def test_bad_configs_name_the_field_and_the_allowed_values():
    with pytest.raises(ValueError, match="kind: 'pbs' is not one of local, slurm"):
        LauncherConfig(kind="pbs")
    with pytest.raises(ValueError, match="runner: 'mpirun' is not one of torchrun, deepspeed"):
        LauncherConfig(runner="mpirun")
    with pytest.raises(ValueError, match="max_parallel"):
        LauncherConfig(max_parallel=0)
    with pytest.raises(ValueError, match=r"slurm: unknown keys \['gpus'\]"):
        LauncherConfig(kind="slurm", slurm={"gpus": 8})
    assert LauncherConfig(slurm={"nodes": 2, "partition": "p"}).slurm.nodes == 2
    with pytest.raises(ValueError, match="slurm.nodes"):
        SlurmConfig(nodes=0)
    with pytest.raises(ValueError, match="slurm.extra_sbatch"):
        SlurmConfig(extra_sbatch={"--mem": "4G"})
    with pytest.raises(ValueError, match="slurm.nodes must be 1"):
        LauncherConfig(kind="slurm", runner="python", slurm=SlurmConfig(nodes=2))
    with pytest.raises(ValueError, match="procs"):
        Job(name="a", run_dir=Path("r"), args=["train"], procs=0)
    with pytest.raises(ValueError, match="name"):
        Job(name="a b", run_dir=Path("r"), args=["train"])
    launcher = make_launcher(LauncherConfig(runner="python"))
    with pytest.raises(ValueError, match="procs: runner python starts one process"):
        launcher.submit(Job(name="a", run_dir=Path("r"), args=["train"], procs=2))


def test_commands_for_one_machine_and_for_each_node_of_many():
    job = Job(name="r", run_dir=Path("runs/r"), args=["train", "--out", "runs/r"], procs=4,
              threads=3, env={"EXTRA": "1"})
    cli = ["moe_gato.cli", "train", "--out", "runs/r"]
    assert run_command(job, "python", port=1) == [sys.executable, "-u", "-m", *cli]
    one = run_command(job, "torchrun", port=1)
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
                       "-m", *cli]
    many = run_command(job, "torchrun", port=29123, hosts=["n1", "n2", "n3"], node_rank=2)
    assert many[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--nnodes", "3",
                        "--node-rank", "2", "--master-addr", "n1", "--master-port", "29123",
                        "-m", *cli]
    ds = run_command(job, "deepspeed", port=29500)
    assert ds[1:] == ["-m", "deepspeed.launcher.runner", "--master_port", "29500",
                      "--num_gpus", "4", "--module", "--no_local_rank", *cli]
    ds = run_command(job, "deepspeed", port=29500, hosts=["n1", "n2"], node_rank=1,
                     hostfile=Path("hf"))
    assert ds[1:] == ["-m", "deepspeed.launcher.runner", "--master_port", "29500",
                      "--hostfile", "hf", "--no_ssh", "--node_rank", "1", "--master_addr", "n1",
                      "--module", "--no_local_rank", *cli]
    assert hostfile_text(["n1", "n2"], 4) == "n1 slots=4\nn2 slots=4\n"
    assert job.run_dir == REPO / "runs" / "r"  # where the run's processes start
    env = run_env(job, "deepspeed", {"OMP_NUM_THREADS": "16", "PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "3" and env["EXTRA"] == "1" and env["PATH"] == "/bin"
    assert env["HF_DATASETS_OFFLINE"] == "1" and env["DS_ACCELERATOR"] == "cpu"  # no GPU here
    assert "DS_ACCELERATOR" not in run_env(job, "torchrun", {})


# ----------------------------------------------------------------------------------- local
@pytest.mark.slow
def test_local_launcher_runs_two_trainings_at_once(tmp_path, tiny_suite):
    launcher = make_launcher(LauncherConfig(kind="local", runner="torchrun", max_parallel=2))
    runs = [tmp_path / "a", tmp_path / "b"]
    handles = [launcher.submit(Job(name=r.name, run_dir=r,
                                   args=train_args(tmp_path, tiny_suite, r))) for r in runs]
    assert [h.poll() for h in handles] == [None, None]  # the second did not wait for the first
    assert handles[0].job_id != handles[1].job_id
    assert [h.wait(timeout=300) for h in handles] == [0, 0]
    for run in runs:
        rows = metrics(run)
        assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
        assert (run / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
        log = (run / "launcher.log").read_text()
        assert "torch.distributed.run --nproc-per-node 1 --standalone" in log
        assert "exited with status 0" in log


@pytest.mark.slow
def test_local_crash_is_nonzero_with_its_error_logged_and_cancel_kills_the_tree(tmp_path,
                                                                                 tiny_suite):
    launcher = make_launcher(LauncherConfig(kind="local", runner="python", max_parallel=1))
    bad = tmp_path / "bad"
    crash = launcher.submit(Job(name="bad", run_dir=bad,
                                args=["train", "--config", str(tmp_path / "missing.yaml"),
                                      "--out", str(bad)]))
    long = tmp_path / "long"
    running = launcher.submit(Job(name="long", run_dir=long,
                                  args=train_args(tmp_path, tiny_suite, long, 10_000)))
    assert crash.poll() not in (None, 0)  # max_parallel 1: the second started after the first
    assert "missing.yaml" in (bad / "launcher.log").read_text()
    wait_for(lambda: (long / "metrics.jsonl").is_file(), 120, "the long run's first step")
    assert running.poll() is None
    running.cancel()
    assert running.wait(timeout=30) == 143  # 128 + SIGTERM
    assert processes_in(long) == []


# ----------------------------------------------------------------------------------- SLURM
@pytest.mark.slow
def test_slurm_job_trains_with_deepspeed_over_its_allocation(tmp_path, tiny_suite, slurm_cluster):
    launcher = make_launcher(LauncherConfig(
        kind="slurm", runner="deepspeed", slurm=SlurmConfig(folder=tmp_path / "submitit")))
    run = tmp_path / "ds"
    handle = launcher.submit(Job(name="ds", run_dir=run, procs=2,
                                 args=train_args(tmp_path, tiny_suite, run, 2,
                                                 "deepspeed.enabled=true")))
    assert handle.job_id.isdigit()
    assert finish(handle, run, 240) == 0, (run / "launcher.log").read_text()[-3000:]
    # (the job's function has reported; SLURM may still be closing the job)
    wait_for(lambda: slurm_state(handle.job_id) == "COMPLETED", 30, "SLURM's COMPLETED")
    assert (run / "hostfile").read_text() == f"{socket.gethostname().split('.')[0]} slots=2\n"
    log = (run / "launcher.log").read_text()
    assert f"slurm job {handle.job_id}, node 0/1" in log and "--no_ssh" in log
    assert "exited with status 0" in log
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert (run / "checkpoints" / "step_00000002" / "deepspeed").is_dir()  # two ranks' ZeRO state


@pytest.mark.slow
def test_slurm_failed_and_cancelled_jobs_are_nonzero(tmp_path, tiny_suite, slurm_cluster):
    launcher = make_launcher(LauncherConfig(
        kind="slurm", runner="torchrun", max_parallel=3,
        slurm=SlurmConfig(folder=tmp_path / "submitit")))
    bad, long, queued = tmp_path / "bad", tmp_path / "long", tmp_path / "queued"
    failing = launcher.submit(Job(name="bad", run_dir=bad,
                                  args=["train", "--config", str(tmp_path / "missing.yaml"),
                                        "--out", str(bad)]))
    running = launcher.submit(Job(name="long", run_dir=long,
                                  args=train_args(tmp_path, tiny_suite, long, 10_000)))
    # two CPUs: this one waits for both others
    pending = launcher.submit(Job(name="queued", run_dir=queued, threads=2,
                                  args=train_args(tmp_path, tiny_suite, queued)))
    assert slurm_state(pending.job_id) == "PENDING"
    pending.cancel()
    assert finish(pending, queued, 60) == 143
    assert "ended CANCELLED" in (queued / "launcher.log").read_text()
    assert not (queued / "metrics.jsonl").exists()

    assert finish(failing, bad, 120) not in (None, 0)
    assert "missing.yaml" in (bad / "launcher.log").read_text()

    wait_for(lambda: (long / "metrics.jsonl").is_file(), 120, "the long job's first step")
    assert running.poll() is None
    running.cancel()
    assert finish(running, long, 60) == 143
    assert slurm_state(running.job_id) == "CANCELLED"
    wait_for(lambda: processes_in(long) == [], 30, "the cancelled job's processes to end")
