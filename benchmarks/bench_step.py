"""The training step on one device: parity of the sync-free path, host syncs, throughput, MFU.

    python benchmarks/bench_step.py --data data --device cuda          # all checks, RESULTS.md
    python benchmarks/bench_step.py --data data --device cpu --quick   # a dry run on the CPU

Checks, each a section of one RESULTS.md entry (the card's name in its header):

The GPU path: the column dispatch, deferred reads, the planner and ``head_logits=auto``
(the fused head on a GPU, the targets' head on the CPU).

1. **Parity**: one fp32 step of the column dispatch with deferred reads (the GPU path)
   against the per-group dispatch read every step (the CPU path, as before), same weights
   and batch: loss, balancing loss and gradient norm, relative difference (target <= 1e-5);
   then ``--parity-steps`` bf16 steps (autocast on CUDA) of both paths and of the old path
   with another seed: the new path's final loss against the seed-to-seed band.
2. **Host syncs** over ``--sync-steps`` steady-state steps of the GPU path: on CUDA under
   ``torch.cuda.set_sync_debug_mode("error")`` (a sync raises), on the CPU counted by
   ``moe_gato.train.host_reads.HostReads`` (target 0).
3. **Data**: sequences/s of ``SequenceLoader`` against the planner (moe_gato/data/planner.py).
4. **Throughput**: tokens/s of the whole step (data, logging every ``log_every`` steps) of
   tiny-moe with the GPU path against the CPU path, interleaved rounds, median and spread;
   MFU of tiny-moe, gato-25m-moe and gato-79m-moe on the GPU path (targets on an H100/H200:
   >= 2M tokens/s for tiny-moe, >= 30% MFU for the two larger presets).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import append_results  # noqa: E402

#: reads that stay on the host on a GPU too (see tests/test_sync_free.py)
HOST_SIDE = ("_check_local_positions", "_host_targets", "_get_value", "_get_scalar_dtype",
             "_use_grad")


MIXTURE: str | None = None  # --mixture: another mixture than the recipe's
OVERRIDES: list[str] = []  # key=value overrides of the recipe, for every trainer


def rate_table(what: str, unit: str, rates: dict[str, list[float]], ratio: str) -> list[str]:
    """Markdown rows of interleaved rates (median, min-max) and the second over the first."""
    lines = [f"| {what} | {unit} (median) | spread (min-max) |", "|---|---:|---|"]
    for name, v in rates.items():
        lines.append(f"| {name} | {statistics.median(v):,.0f} | {min(v):,.0f}-{max(v):,.0f} |")
    old, new = (statistics.median(v) for v in rates.values())
    return lines + ["", f"{ratio}: **{new / old:.2f}x**."]


def trainer(data: str, device: str, overrides: list[str], preset: str = "tiny-moe"):
    """The default recipe (configs/train/tiny-moe.yaml) on ``data``, as a ``Trainer``."""
    from moe_gato.config import load_yaml
    from moe_gato.train import Trainer
    from moe_gato.train.config import train_config_from_dict

    recipe = load_yaml(REPO / "configs/train/tiny-moe.yaml")
    if MIXTURE is not None:
        recipe["data"] = str(Path(MIXTURE).resolve())
    cfg = train_config_from_dict(recipe, REPO / "configs/train", [
        f"device={device}", "eval_every=1000000", "checkpoint_every=1000000", "resume=never",
        f"data.data_dir={data}", *OVERRIDES, *overrides])
    if preset != "tiny-moe":  # another shape with the recipe's options and our vocabulary
        import dataclasses

        from moe_gato.model import load_config

        recipe = cfg.model
        cfg.model = load_config(REPO / f"configs/model/{preset}.yaml", [
            f"text_vocab_size={recipe.text_vocab_size}", f"context_length={recipe.context_length}",
            f"value_embedding={recipe.value_embedding}", f"past_actions={recipe.past_actions}",
            f"positions={recipe.positions}"])
        cfg.model.moe = dataclasses.replace(cfg.model.moe, dispatch=recipe.moe.dispatch)
    return Trainer(cfg, Path(tempfile.mkdtemp(prefix="bench_step_")), data_dir=data)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def parity(args) -> list[str]:
    """fp32 one-step parity, then a bf16 run of each path against the seed band."""
    old = trainer(args.data, args.device, ["model.moe.dispatch=groups", "seed=0"])
    new = trainer(args.data, args.device, ["model.moe.dispatch=columns", "head_logits=auto",
                                           "seed=0"])
    new.model.load_state_dict(old.model.state_dict())
    new.defer_reads = True
    autocast = {}
    for t in (old, new):  # step 1 in fp32 on every device
        autocast[id(t)], t.autocast = t.autocast, None
    a, b = old.train_step(), new.read(new.step_async())
    rows = [f"| {k} | {a[k]:.6g} | {b[k]:.6g} | {relative(b[k], a[k]):.1e} |"
            for k in ("loss", "aux_loss", "grad_norm")]
    worst = max(relative(b[k], a[k]) for k in ("loss", "aux_loss", "grad_norm"))
    lines = ["One fp32 step, same weights and batch (target: <= 1e-5 relative): "
             f"**{'met' if worst <= 1e-5 else 'not met'}** (worst {worst:.1e}).", "",
             "| quantity | per-group dispatch, read every step | column dispatch, deferred | rel. diff |",
             "|---|---:|---:|---:|", *rows, ""]
    finals = {}
    for name, t in (("old", old), ("new", new)):
        t.autocast = autocast[id(t)]
    seed1 = trainer(args.data, args.device, ["model.moe.dispatch=groups", "seed=1"])
    for name, t in (("old, seed 0", old), ("new, seed 0", new), ("old, seed 1", seed1)):
        while t.step < args.parity_steps:
            record_due = t.step + 1 == args.parity_steps
            p = t.step_async()
            if record_due or not t.defer_reads:
                finals[name] = t.read(p)["loss"]
    band = abs(finals["old, seed 1"] - finals["old, seed 0"])
    gap = abs(finals["new, seed 0"] - finals["old, seed 0"])
    lines += [f"{args.parity_steps} steps ({'bf16 autocast' if args.device == 'cuda' else 'fp32'}) "
              f"of each, final training loss: old path {finals['old, seed 0']:.4f}, new path "
              f"{finals['new, seed 0']:.4f}, old path seed 1 {finals['old, seed 1']:.4f}; "
              f"new - old {gap:.4f} against the seed band {band:.4f}: "
              f"**{'within' if gap <= band else 'outside'}**."]
    return lines


def syncs(args) -> list[str]:
    t = trainer(args.data, args.device, ["model.moe.dispatch=columns", "batches=planner",
                                         "head_logits=fused"])  # the GPU's auto, anywhere
    t.defer_reads = True
    t.read(t.step_async())  # optimizer state and gradients allocated
    t.read(t.step_async())
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(args.sync_steps):
                t.step_async()
            count, how = 0, 'torch.cuda.set_sync_debug_mode("error") raised nothing'
        except RuntimeError as exc:
            count, how = 1, f"a sync raised: {str(exc).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        from moe_gato.train.host_reads import HostReads

        with HostReads(allow=HOST_SIDE) as reads:
            for _ in range(args.sync_steps):
                t.step_async()
        count, how = reads.count, (reads.report() if reads.count else "HostReads counted none")
    return [f"Host syncs over {args.sync_steps} steady-state steps of the GPU path (target 0): "
            f"**{count}** ({how})."]


def throughput(args) -> list[str]:
    paths = {"CPU path (per-group dispatch, read every step, loader)":
             ["model.moe.dispatch=groups", "batches=loader"],
             "GPU path (column dispatch, deferred reads, planner, head auto)":
             ["model.moe.dispatch=columns", "batches=planner", "head_logits=auto"]}
    trainers = {}
    for name, extra in paths.items():
        t = trainer(args.data, args.device, [*extra, f"log_every={args.log_every}",
                                             f"data_workers={args.workers}"])
        t.defer_reads = "columns" in extra[0] and args.device == "cuda"
        for _ in range(3):  # warm-up
            t.read(t.step_async())
        trainers[name] = t
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.rounds):  # interleaved rounds
        for name, t in trainers.items():
            start = time.perf_counter()
            for i in range(args.steps):
                p = t.step_async()
                if i + 1 == args.steps or (i + 1) % args.log_every == 0 or not t.defer_reads:
                    t.read(p)
            if args.device == "cuda":
                torch.cuda.synchronize()
            rates[name].append(t.cfg.tokens_per_step * args.steps / (time.perf_counter() - start))
    cfg = next(iter(trainers.values())).cfg
    lines = [f"tiny-moe, context {cfg.data.context_len}, batch {cfg.batch_size}, {args.rounds} "
             f"interleaved rounds of {args.steps} steps, data_workers {args.workers}, log every "
             f"{args.log_every}:", "", *rate_table("path", "tokens/s", rates, "GPU path / CPU path")]
    if args.device == "cuda" and not (args.quick or args.no_mfu):
        lines += ["", "| preset | tokens/s | MFU (dense bf16 peak) |", "|---|---:|---:|"]
        for preset in ("tiny-moe", "gato-25m-moe", "gato-79m-moe"):
            t = trainer(args.data, args.device, ["model.moe.dispatch=columns", "head_logits=auto",
                                                 f"log_every={args.log_every}"], preset)
            t.read(t.step_async())
            records = []
            for i in range(args.steps):
                p = t.step_async()
                if (i + 1) % args.log_every == 0:
                    records.append(t.read(p))
            lines.append(f"| {preset} | {records[-1]['tokens_per_s']:,.0f} | "
                         f"{records[-1]['mfu'] * 100:.1f}% |")
    return lines


def data(args) -> list[str]:
    """Sequences/s of the batches alone: SequenceLoader against the planner (the split
    flattened once; batches gathered by index, patches on the device), interleaved."""
    from moe_gato.data.planner import SequencePlanner

    t = trainer(args.data, args.device, ["batches=loader"])
    loader, size = t.loader, t.cfg.micro_batch_size
    start = time.perf_counter()
    planner = SequencePlanner(loader, device=args.device)
    flatten_s = time.perf_counter() - start
    rates: dict[str, list[float]] = {"SequenceLoader (Python)": [], "planner": []}
    n = args.steps * 4 * size
    for r in range(args.rounds):
        for name, build in zip(rates, (loader.batch, planner.batch)):
            begin = time.perf_counter()
            for s in range(r * n, (r + 1) * n, size):
                build(s, size)
            if args.device == "cuda":
                torch.cuda.synchronize()
            rates[name].append(n / (time.perf_counter() - begin))
    return [f"{args.rounds} interleaved rounds of {n} sequences (context "
            f"{loader.cfg.context_len}, batches of {size}); flattening the split took "
            f"{flatten_s:.1f} s ({planner.flat.size:,} positions):", "",
            *rate_table("builder", "sequences/s", rates, "planner / loader")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data", help="collected suite (default: data)")
    p.add_argument("--mixture", help="mixture config (default: the recipe's, "
                   "configs/data/recipe.yaml); configs/data/micro.yaml for the micro suite")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available()
                   else "cpu")
    p.add_argument("--quick", action="store_true", help="few steps: a dry run of every check")
    p.add_argument("--only", choices=["parity", "syncs", "data", "throughput"], action="append")
    p.add_argument("--parity-steps", type=int, default=200)
    p.add_argument("--sync-steps", type=int, default=20)
    p.add_argument("--steps", type=int, default=40, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--no-mfu", action="store_true",
                   help="throughput: the two paths only, not the MFU of the larger presets")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the recipe (configs/train/tiny-moe.yaml), e.g. batch_size=16")
    args = p.parse_args(argv)
    global MIXTURE, OVERRIDES
    MIXTURE, OVERRIDES = args.mixture, args.overrides
    if args.quick:
        args.parity_steps, args.sync_steps, args.steps, args.rounds = 3, 2, 2, 1
        args.log_every, args.workers = 2, 0
    checks = {"parity": parity, "syncs": syncs, "data": data, "throughput": throughput}
    sections = []
    for name in args.only or list(checks):
        lines = checks[name](args)
        sections.append(f"**{name}**\n\n" + "\n".join(lines))
        print(sections[-1], flush=True)
    if not args.no_save:
        append_results(f"Training step on {args.device} (bench_step.py{', quick' if args.quick else ''})",
                       "\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
