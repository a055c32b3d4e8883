"""The device data path (issue: every lent GPU minute counts): ``SequencePlanner`` draws what
``SequenceLoader.sequence`` draws from the rows' timestep bounds alone, and its batches,
gathered by index from the split flattened once, equal the loader's bitwise."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_gato.data import MixtureConfig, SequenceLoader
from moe_gato.data.planner import FlatSplit, SequencePlanner

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TRAIN_TASKS  # noqa: E402

NO_BABYAI = [t for t in TRAIN_TASKS if "babyai" not in t]
#: (tasks, context, mission_targets, loss_weighting, indices), 10,000 in all: context 192
#: leaves no room for a BabyAI prompt (96 < 171 tokens), 400 fits one; at context 64
#: Pendulum's episodes (~1,000 tokens) are longer than 8 contexts, so they are cropped;
#: captions and Shakespeare windows in all three
SETTINGS = [(TRAIN_TASKS, 192, "first", "sequence", 4000), (TRAIN_TASKS, 400, "all", "token", 3000),
            (NO_BABYAI, 64, "none", "token", 3000)]


def assert_batches_equal(got: dict, want: dict) -> None:
    from moe_gato.model.model import target_weights

    host_weight = got.pop("target_weight_host")
    assert float(host_weight) == float(target_weights(want).sum())
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name].cpu()
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if w.dtype.is_floating_point:  # bitwise, not merely close
            assert torch.equal(g.view(torch.int32), w.view(torch.int32)), name
        else:
            assert torch.equal(g, w), name


@pytest.mark.parametrize("tasks,context,missions,weighting,indices", SETTINGS)
def test_planner_equals_the_loader(tiny_suite, tasks, context, missions, weighting, indices):
    cfg = MixtureConfig(data_dir=str(tiny_suite), context_len=context, prompt_prob=0.5,
                        mission_targets=missions, loss_weighting=weighting,
                        tasks={t: 1.0 for t in tasks})
    loader = SequenceLoader(cfg, seed=3)
    planner = SequencePlanner(loader)
    kinds, prompts = set(), 0
    crops = sum(planner.plan(i).runs[-1].step_add < 0 for i in range(300))
    for start in range(0, indices, 100):
        assert_batches_equal(planner.batch(start, 100), loader.batch(start, 100))
        for i in range(start, start + 100, 7):
            plan = planner.plan(i)
            kinds.add(plan.task)
            prompts += plan.control and len(plan.runs) == 2
    assert kinds == set(tasks)  # every kind of data was drawn
    assert prompts > 0  # and the prompt path was taken
    assert crops > 0 or context > 64  # and, at context 64, the crop path


def test_planners_share_one_flat_split(tiny_suite):
    """The split is flattened once and can be shared by planners."""
    cfg = MixtureConfig(data_dir=str(tiny_suite), context_len=256,
                        tasks={"vl/digits": 1.0, "classic/Pendulum-v1": 1.0})
    loader = SequenceLoader(cfg, seed=0)
    flat = FlatSplit(loader)
    a, b = SequencePlanner(loader, flat=flat), SequencePlanner(loader, flat=flat)
    assert_batches_equal(a.batch(40, 8), loader.batch(40, 8))
    assert_batches_equal(b.batch(40, 8), loader.batch(40, 8))


def test_patch_codes_round_trip_bitwise():
    """uint8 images code as their pixel values; other values get entries of their own."""
    from moe_gato.tokenizer.images import images_to_patches

    from moe_gato.data.planner import _uint8_table

    extra, tab = {}, _uint8_table()
    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8),
                  rng.random((2, 20, 24, 1), dtype=np.float32)):
        patches, _ = images_to_patches(image)
        patches = patches.reshape(-1, 3, 16, 16)
        codes = FlatSplit._codes(patches, tab, extra)
        full = np.concatenate([tab, np.array(list(extra), np.float32)])
        assert np.array_equal(full[codes].view(np.int32), patches.view(np.int32))
    assert len(extra) > 0  # the float image needed values of its own
