"""The GPU path's steps read nothing back from the device (issue: every lent GPU minute
counts): the column-space MoE dispatch equals the per-group one, and a steady-state training
step on it makes no host read, counted on the CPU by ``HostReads``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moe_gato.model import build_model
from moe_gato.train.host_reads import HostReads

sys.path.insert(0, str(Path(__file__).parent))
from test_model import make_batch, tiny  # noqa: E402

#: reads that stay on the host on a GPU too: the CPU-only local-position check and AdamW's
#: CPU step counters (fused AdamW keeps them on the device)
ALLOWED = ("_check_local_positions", "_host_targets", "_get_value", "_get_scalar_dtype",
           "_use_grad")


def test_host_reads_counts_what_waits_for_the_device():
    x = torch.randn(8)
    with HostReads() as reads:
        y = (x.softmax(0) * 3).cumsum(0)
        torch.zeros(4).index_add_(0, torch.tensor([1, 1]), torch.ones(2))
    assert reads.count == 0
    with HostReads() as reads:
        float(y.sum()), y.tolist(), (y > 0).nonzero(), y[y > 0], bool((y > 1).any())
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]))
    assert [what for what, _ in reads.events] == [
        "Tensor.__float__", "Tensor.tolist", "aten.nonzero", "aten.index with a boolean mask",
        "Tensor.__bool__", "aten.repeat_interleave without output_size"]


@pytest.mark.parametrize("overrides", [(), ("moe.shared_expert=true",), ("moe.bias_balancing=true",),
                                       ("moe.renormalize=false", "moe.top_k=2"),
                                       ("moe.experts_per_group={image: 2}",)])
def test_column_dispatch_equals_the_group_loop(overrides):
    """Loss, balancing and z losses, every gradient and the routing records of the column
    space equal the per-group loop's (fp32), with no host read on the column path."""
    results = {}
    for dispatch in ("groups", "columns"):
        torch.manual_seed(0)
        cfg = tiny("tiny-moe", f"moe.dispatch={dispatch}", *overrides)
        model = build_model(cfg)
        batch = make_batch(cfg, batch=3, length=40)
        torch.manual_seed(1)
        with HostReads(allow=ALLOWED) as reads:
            out = model(batch)
            out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[dispatch] = (out, grads, reads)
    (a, ga, ra), (c, gc, rc) = results["groups"], results["columns"]
    assert ra.count > 30 and rc.count == 0, rc.report()
    for name in ("lm_loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(c, name), getattr(a, name), rtol=1e-5, atol=1e-8)
    assert ga.keys() == gc.keys()
    for name, g in ga.items():
        torch.testing.assert_close(gc[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()) + 1e-9)
    for layer_a, layer_c in zip(a.routing, c.routing, strict=True):
        assert set(layer_a) == set(layer_c)
        for group, ra_g in layer_a.items():
            rc_g = layer_c[group]
            assert torch.equal(ra_g.token_index_t, rc_g.token_index_t)
            assert torch.equal(ra_g.expert_ids_tK, rc_g.expert_ids_tK)
            assert torch.equal(ra_g.load_E, rc_g.load_E)


def test_columns_refuse_a_capacity():
    with pytest.raises(ValueError, match="dispatch='columns' is dropless"):
        tiny("tiny-moe", "moe.dispatch=columns", "moe.capacity_factor=1.25")


def test_a_steady_state_training_step_reads_nothing_back(tmp_path, tiny_suite):
    """Three steps of the trainer on the column dispatch with deferred reads: the model,
    the loss, the clip, the optimizer and the metrics stay on the device; the record is
    read once, when asked for."""
    from test_train import write_config

    from moe_gato.train import Trainer, load_train_config

    cfg = load_train_config(write_config(tmp_path, tiny_suite), ["model.moe.dispatch=columns"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.defer_reads = True
    first = trainer.step_async()  # the first step allocates optimizer state and gradients
    trainer.read(first)
    with HostReads(allow=ALLOWED) as reads:
        pending = [trainer.step_async() for _ in range(3)]
    assert reads.count == 0, reads.report()
    record = trainer.read(pending[-1])
    assert record["step"] == 4 and record["loss"] > 0 and record["grad_norm"] > 0


def test_bench_step_dry_run(tiny_suite, tmp_path, capsys):
    """benchmarks/bench_step.py, the heart of benchmarks/gpu_check.sh, runs every check on the
    CPU at toy sizes: fp32 parity met, no host read in steady state, both paths timed."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from benchmarks import bench_step

    mixture = tmp_path / "mixture.yaml"
    mixture.write_text("tasks:\n  babyai/BabyAI-GoToLocal-v0: 1.0\n  classic/Pendulum-v1: 1.0\n"
                       "  vl/digits: 1.0\n  text/shakespeare: 1.0\n")
    assert bench_step.main(["--data", str(tiny_suite), "--mixture", str(mixture), "--device", "cpu",
                            "--quick", "--no-save", "model.context_length=192"]) == 0
    out = capsys.readouterr().out
    assert "**met**" in out and "(target 0): **0**" in out, out
    assert "GPU path / CPU path" in out and "planner / loader" in out
