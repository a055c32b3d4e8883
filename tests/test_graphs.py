"""The graphed control step (issue: every lent GPU minute counts, item 5): the static cache
and the static-shape forward a CUDA graph captures act exactly as the dynamic cache —
through evictions, compactions, prompts, padding and dropped rows — and read nothing back
from the device; on CUDA the captured graphs replay what the eager step computes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_gato.envs.episode import Episode
from moe_gato.eval.latency import SHAPES, make_policy, observation
from moe_gato.inference import Policy
from moe_gato.inference.graphs import StepGraphs, supports_graphs
from moe_gato.model import build_model
from moe_gato.train.host_reads import HostReads

sys.path.insert(0, str(Path(__file__).parent))
from test_model import make_batch, tiny  # noqa: E402

CONFIGS = [("positions=none",), ("positions=rope",), ("positions=timestep_bias",),
           ("positions=rope", "past_actions=hide"), ("positions=rope", "moe.shared_expert=true",
                                                      "moe.bias_balancing=true")]


def _model(*overrides, context: int = 400):
    torch.manual_seed(0)
    return build_model(tiny("tiny-moe", f"context_length={context}", *overrides)).eval()


def _pair(model, **kw):
    """A dynamic-cache policy and a static-step one of ``model``."""
    return [make_policy(model, graphs=graphs, **kw) for graphs in (False, True)]


def _same_state(dynamic, static):
    """Both caches hold the same live slots with the same coordinates and tags."""
    a, b = dynamic.cache, static.cache
    assert a.length == b.length
    live_a, tags_a = a.live_tags()
    live_b, tags_b = b.live_tags()
    np.testing.assert_array_equal(live_a, live_b)
    np.testing.assert_array_equal(tags_a[live_a], tags_b[live_b])
    for va, vb in zip(a.live_coordinates(), b.live_coordinates(), strict=True):
        torch.testing.assert_close(va[:, live_a], vb[:, live_b], rtol=0, atol=0)


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("shape", ["metaworld", "babyai"])
def test_static_step_acts_as_the_dynamic_cache(overrides, shape):
    """Greedy actions equal step by step over 16 steps of a context of 400 positions
    (evictions from the 9th step on, compactions of the buffer), and the caches agree."""
    model = _model(*overrides)
    dynamic, static = _pair(model)
    obs_rng = np.random.default_rng(1)
    for p in (dynamic, static):
        p.reset(SHAPES[shape])
    evicted = compacted = False
    for _ in range(16):
        obs = observation(shape, obs_rng)
        before = static.cache.length
        a, b = dynamic.act(obs), static.act(obs)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        _same_state(dynamic, static)
        evicted |= static.cache.live() < static.cache.length
        compacted |= static.cache.length < before
    assert evicted and compacted


def test_prompt_moves_and_rotates_as_the_dynamic_cache():
    """With a prompt in front, an eviction renumbers the prompt's slots and rotates their
    rotary keys: the static cache does the same (its host-side decision that keys moved)."""
    model = _model("positions=rope", context=300)
    rng = np.random.default_rng(0)
    T = 12
    demo = Episode(observations={"state": rng.uniform(-1, 1, (T, 39)).astype(np.float32)},
                   actions=rng.uniform(-1, 1, (T, 4)).astype(np.float32),
                   rewards=np.zeros(T, np.float32), success=True, seed=0)
    dynamic, static = _pair(model)
    for p in (dynamic, static):
        p.reset(SHAPES["metaworld"], prompt=demo)
    assert static.cache.live() == len(static.prompt) > 0
    k_before = None
    for step in range(14):
        obs = observation("metaworld", rng)
        np.testing.assert_array_equal(dynamic.act(obs), static.act(obs))
        _same_state(dynamic, static)
        if step == 4:
            k_before = static.cache.k[0][0, :, 0].clone()
    # the prompt's first slot moved (renumbered after evictions), so its key was rotated
    assert not torch.equal(static.cache.k[0][0, :, 0], k_before)
    torch.testing.assert_close(static.cache.k[0][0, :, 0], dynamic.cache.k[0][0, :, 0])


def test_padded_rows_and_dropped_rows():
    """Rows of different lengths (missions) are left-padded; rows whose episode ended are
    dropped from the static buffers too (and the graphs that held them are let go)."""
    model = _model("positions=rope")
    dynamic, static = _pair(model)
    missions = ["go to the red ball", "open the door on your left please now",
                "pick up the key", "go to a purple box behind you"]
    for p in (dynamic, static):
        p.reset(SHAPES["babyai"], batch_size=4)
    rng = np.random.default_rng(3)
    rows = [0, 1, 2, 3]
    for step in range(10):
        if step == 4:
            rows = [0, 2, 3]
        if step == 7:
            rows = [2, 3]
        obs = []
        for r in rows:
            o = observation("babyai", rng)
            o["mission"] = missions[r]
            obs.append(o)
        a = dynamic.act_batch(obs, rows=rows)
        b = static.act_batch(obs, rows=rows)
        assert a == b
        _same_state(dynamic, static)
    assert static.cache.generation == 2 and static.cache.valid_BC.shape[0] == 2


def test_static_forward_reads_nothing_back():
    """What a graph captures (an observation chunk, then an action token) makes no host read;
    its logits equal the dynamic cache's."""
    model = _model("positions=rope", "past_actions=hide")
    cfg = model.cfg
    batch = make_batch(cfg, batch=2, length=30)
    lo, hi = 0, 64
    dynamic = model.new_cache(capacity=64)
    static = model.new_static_cache(rows=2, capacity=64, device="cpu")
    steps = StepGraphs(model, static, capture=False)
    with torch.no_grad():
        want = model(batch, cache=dynamic, last_only=True, id_range=(lo, hi)).logits[:, -1]
        with HostReads() as reads:
            got = steps.logits(batch, (lo, hi))
        assert reads.count == 0, reads.report()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        token = {k: v[:, -1:] for k, v in batch.items() if k != "patches"}
        token["patches"] = None
        want = model(token, cache=dynamic, last_only=True, id_range=(lo, hi)).logits[:, -1]
        with HostReads() as reads:
            got = steps.logits(token, (lo, hi))
        assert reads.count == 0, reads.report()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert static.length == dynamic.length == 31


def test_graphs_refuse_what_they_cannot_replay():
    capped = _model("moe.capacity_factor=1.25")
    assert not supports_graphs(capped) and supports_graphs(_model())
    with pytest.raises(ValueError, match="capacity_factor"):
        Policy(capped, graphs=True)
    model = _model()
    with pytest.raises(ValueError, match="use_cache"):
        Policy(model, graphs=True, use_cache=False)
    cache = model.new_static_cache(rows=1, capacity=8, device="cpu")
    cache.prepare(6)
    cache.end()
    with pytest.raises(ValueError, match="cannot hold 6 live slots and a call of 4"):
        cache.prepare(4)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            StepGraphs(model, cache, capture=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", ["metaworld", "babyai"])
def test_cuda_graphs_replay_the_eager_step(shape):
    """On the card: the captured graphs give the eager static step's actions bit for bit
    over 40 steps with evictions; one capture per call shape (the first step's chunk has
    no previous action in front, and continuous actions add a one-token call)."""
    model = _model("positions=rope").cuda()
    eager, graphed = (make_policy(model, device="cuda", graphs=True) for _ in range(2))
    for p in (eager, graphed):
        p.reset(SHAPES[shape])
    eager.steps.capture = False
    rng = np.random.default_rng(0)
    for _ in range(40):
        obs = observation(shape, rng)
        np.testing.assert_array_equal(np.asarray(eager.act(obs)), np.asarray(graphed.act(obs)))
    assert graphed.steps.captures == (3 if shape == "metaworld" else 2)
    assert graphed.steps.replays >= 40


def test_stacked_experts_follow_the_parameters():
    """The inference stacks of the column dispatch are kept between calls and rebuilt when a
    parameter changes in place or is cast."""
    model = _model()
    moe = next(m for m in model.modules() if hasattr(m, "_column_weights"))
    with torch.no_grad():
        first = moe._column_weights(None)
        assert moe._column_weights(None) is first
        group = next(iter(moe.groups.values()))
        group.w1_EDF.add_(1.0)
        second = moe._column_weights(None)
        assert second is not first
        torch.testing.assert_close(second["w1_CDF"][:group.num_experts], group.w1_EDF)
        model.double()
        assert moe._column_weights(None)["w1_CDF"].dtype == torch.float64
    with torch.enable_grad():
        assert moe._column_weights(None)["w1_CDF"].requires_grad
    assert moe._stacked is None  # nothing kept from a step with gradients


def test_autocast_weights_change_nothing_under_autocast():
    """The copies a graph is captured with give autocast's results bit for bit (CPU autocast
    casts linear weights as CUDA's does), and the original parameters come back."""
    from moe_gato.inference.graphs import autocast_weights

    model = _model()
    batch = make_batch(model.cfg, batch=2, length=30)
    params = {n: p for n, p in model.named_parameters()}
    copies = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(batch, compute_loss=False).logits
        with autocast_weights(model, torch.bfloat16, copies):
            assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
            got = model(batch, compute_loss=False).logits
        with autocast_weights(model, torch.bfloat16, copies):  # the same copies again
            qkv = model.blocks[0].attn.qkv.weight
            assert qkv.data_ptr() == copies["blocks.0.attn.qkv"].data_ptr()
    assert torch.equal(got, want) and len(copies) >= 4
    assert all(params[n] is p for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_value_embedding_rows_follow_the_parameters():
    """Without gradients the smooth value embedding's rows are kept between calls and
    rebuilt when a parameter changes; with gradients they are part of the graph."""
    model = _model("value_embedding=smooth")
    with torch.no_grad():
        first = model.embed.weight()
        assert model.embed.weight() is first
        model.embed.value_basis.add_(0.5)
        second = model.embed.weight()
        assert second is not first and not torch.equal(second, first)
    with torch.enable_grad():
        assert model.embed.weight().requires_grad
    assert model.embed._rows is None
