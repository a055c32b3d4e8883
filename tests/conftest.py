"""Shared fixtures: a small real suite collected once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
# OpenMP threads sleep while they wait (before torch loads): spinning on the shared cores
# made small ops 20-30x slower when tests, subprocesses and other work overlap
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: one task per kind of data the trainer sees: discrete control with text, continuous
#: control, images (captions), text
TRAIN_TASKS = ["babyai/BabyAI-GoToLocal-v0", "classic/Pendulum-v1", "vl/digits", "text/shakespeare"]


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    """A real suite (a few episodes per task) on disk; returns its folder."""
    from moe_gato.data.collect import collect

    out = tmp_path_factory.mktemp("tiny_suite")
    collect("default", out, tasks=TRAIN_TASKS, episodes=4, return_episodes=2, workers=1,
            progress=False)
    return out


SLURM_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_cluster.sh"


def free_port_pair() -> int:
    """A port p with p + 1 also free (slurmctld, slurmd), so this session's cluster does not
    collide with another one on this host."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM of this session's own (conf, state, munge under a tmp dir);
    installed with apt-get when missing. Yields the cluster's folder."""
    root = tmp_path_factory.mktemp("slurm") / "cluster"
    env = {**os.environ, "MOE_GATO_SLURM_DIR": str(root),
           "MOE_GATO_SLURM_PORT": str(free_port_pair())}
    out = subprocess.run([str(SLURM_SCRIPT), "install"], env=env, capture_output=True, text=True,
                         timeout=900)
    if out.returncode:
        pytest.fail("scripts/slurm_cluster.sh install failed (it installs Debian's slurmctld, "
                    f"slurmd, munge with apt-get):\n{out.stdout}{out.stderr}", pytrace=False)
    out = subprocess.run([str(SLURM_SCRIPT), "start"], env=env, capture_output=True, text=True,
                         timeout=120)
    try:
        if out.returncode:
            logs = "".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                           for p in sorted((root / "log").glob("*.log")))
            pytest.fail(f"scripts/slurm_cluster.sh start failed:\n{out.stderr}\n{logs}",
                        pytrace=False)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(root / "etc" / "slurm.conf"))
            cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True)
            assert cpus.stdout.split() == [str(len(os.sched_getaffinity(0)))], cpus
            yield root
    finally:
        subprocess.run([str(SLURM_SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
