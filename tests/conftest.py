"""Shared fixtures: a small real suite collected once per test session."""

from __future__ import annotations

import os

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
