"""MoE layer throughput on CPU: forward + backward tokens/s of four layers on one grid.

    .venv/bin/python benchmarks/bench_moe_layer.py              # full grid, ~5 min (1 thread)
    .venv/bin/python benchmarks/bench_moe_layer.py --quick      # one small shape, smoke test
    .venv/bin/python benchmarks/bench_moe_layer.py --tokens 4096 --extra --no-save  # + ours_ref

Layers, all fp32, GELU, no biases, at equal active FLOPs: the dense FFN has hidden F = 4D;
the MoE has top-1 routing with granularity G = K, so each token visits K experts of hidden
F / K and does exactly one dense FFN's expert FLOPs (plus the router's 2 * D * E):
- dense:     ``FeedForward(D, 4D)``
- ours:      ``ModalityRoutedMoE`` (one group, dropless, ``gemm="auto"``: the fused torch
             path of moe_gato.model.dispatch)
- deepspeed: ``deepspeed.moe.layer.MoE`` with the same experts (``FeedForward(D, 4D / K)``),
             k = K, capacity factor 1.25 (it drops, and computes every capacity slot)
- megatron:  megatron-core ``moe_utils.permute / unpermute`` around the same grouped GEMM
             (``kernels.grouped_gemm``, the per-expert-mm reference) and the same router
- ``--extra`` adds ours_ref (``gemm="grouped"``: autograd through the ``kernels`` torch
             references) and ours_padded (``gemm="padded"``).

Timing: every layer is warmed up once, then ``--rounds`` rounds each time every layer once
(forward + backward, in a rotated order) so that load from other processes hits all layers
alike. Reported: median tok/s per layer and, for the ratios, the median over rounds of the
per-round ratio (paired measurements). The load average is recorded with the results.
Results go to benchmarks/RESULTS.md (date, machine) and benchmarks/moe_layer_ratios.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup():
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def retain_heap() -> bool:
    """glibc: serve every allocation from the heap (no mmap) and never trim it, so a freed
    buffer is reused by the next step instead of being unmapped and page-faulted back in.

    On this VM a fresh 268 MB buffer costs ~145 ms to fault in versus ~17 ms reused, and far
    more (seconds, bimodal) when the host is under memory pressure. Every layer reallocates
    its weight gradients each step (``zero_grad(set_to_none=True)``), and the MoE layers have
    E / K times the dense layer's parameters, so without this the ratios measure the VM's
    page-fault cost rather than the layers. Applied to the whole process: all layers alike.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**62))


def _init_deepspeed():
    import deepspeed
    import deepspeed.comm.torch as ds_torch

    ds_torch.build_shm_op = lambda: None  # skip the 60-90 s shm_comm compile (DESIGN.md)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def layers(T: int, D: int, E: int, K: int, extra: bool = False):
    import torch
    import torch.nn as nn

    import kernels
    from moe_gato.model.config import KIND_NAMES, ModelConfig, MoEConfig
    from moe_gato.model.moe import FeedForward, ModalityRoutedMoE, init_moe_

    torch.manual_seed(0)
    F_dense, F_exp = 4 * D, 4 * D // K
    x = torch.randn(T, D)
    kinds = torch.zeros(T, dtype=torch.long)
    out = {}
    dense = FeedForward(D, F_dense)
    out["dense"] = (dense, lambda m, x: m(x).sum())

    for name, gemm in (("ours", "auto"), ("ours_ref", "grouped"), ("ours_padded", "padded")):
        if name != "ours" and not extra:
            continue
        cfg = ModelConfig(d_model=D, num_heads=1, ffn_hidden=F_dense, ffn="moe",
                          moe=MoEConfig(groups={"all": list(KIND_NAMES)}, num_experts=E,
                                        top_k=1, granularity=K, z_loss_coef=0, gemm=gemm))
        moe = ModalityRoutedMoE(cfg)
        init_moe_(moe, 0.02, 0.02)

        def run_ours(m, x):
            y, routing = m(x, kinds)
            return y.sum() + 0.01 * routing["all"].aux_loss
        out[name] = (moe, run_ours)

    from deepspeed.moe.layer import MoE

    try:
        ds = MoE(hidden_size=D, expert=FeedForward(D, F_exp), num_experts=E, ep_size=1, k=K,
                 capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4,
                 drop_tokens=True, use_rts=False)
        out["deepspeed"] = (ds, _ds_loss)
    except Exception as err:  # reported in the table instead of a number
        out["deepspeed"] = f"cannot build: {type(err).__name__}: {err}"[:120]

    from megatron.core.transformer.moe import moe_utils

    class MegatronPermuteLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.router_ED = nn.Parameter(torch.randn(E, D) * 0.02)
            self.w1_EDF = nn.Parameter(torch.randn(E, D, F_exp) * 0.02)
            self.w2_EFD = nn.Parameter(torch.randn(E, F_exp, D) * 0.02)

        def forward(self, x_TD):
            probs_TE = (x_TD @ self.router_ED.t()).softmax(-1)
            gates_TK, ids_TK = probs_TE.topk(K, dim=-1)
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
            routing_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids_TK, True)
            probs = torch.zeros(T, E, dtype=x_TD.dtype).scatter(1, ids_TK, gates_TK)
            x_RD, _, sorted_idx = moe_utils.permute(x_TD, routing_map, num_out_tokens=T * K)
            counts_E = routing_map.sum(0)
            h = torch.nn.functional.gelu(kernels.grouped_gemm(x_RD, self.w1_EDF, counts_E))
            y_RD = kernels.grouped_gemm(h, self.w2_EFD, counts_E)
            return moe_utils.unpermute(y_RD, sorted_idx, x_TD.shape, probs=probs,
                                       routing_map=routing_map)

    out["megatron"] = (MegatronPermuteLayer(), lambda m, x: m(x).sum())
    return x, out


def _ds_loss(m, x):
    y, l_aux, _ = m(x[None])
    return y.sum() + 0.01 * l_aux


def one_step(module, loss_fn, x) -> float:
    """Seconds of one forward + backward (gradients reset first, outside the timing)."""
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss_fn(module, x).backward()
    return time.perf_counter() - t0


def time_shape(impls: dict, x, rounds: int) -> tuple[dict, dict]:
    """Interleaved timing: -> (median seconds per layer, per-round ratio lists vs ours).
    A layer that raises gets its error message instead of a time."""
    x = x.clone().requires_grad_()
    live = {n: v for n, v in impls.items() if not isinstance(v, str)}
    failed = {n: v for n, v in impls.items() if isinstance(v, str)}
    for n, (m, f) in list(live.items()):  # warm-up
        try:
            one_step(m, f, x)
        except Exception as err:
            failed[n] = f"fails: {type(err).__name__}: {err}"[:120]
            del live[n]
    names = list(live)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            m, f = live[n]
            times[n].append(one_step(m, f, x))
    med = {n: statistics.median(v) for n, v in times.items()}
    med.update(failed)
    ratios = {n: [b / a for a, b in zip(times["ours"], times[n])] for n in names}
    return med, ratios


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, no results")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per shape")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384],
                        help="T values of the grid (16384 takes most of the time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: "
                        "with 2 threads on 2 shared cores every small OpenMP region waits for "
                        "a descheduled thread, and layers made of many small GEMMs - ours, "
                        "DeepSpeed's, megatron's - measured 5-10x slower in some rounds)")
    parser.add_argument("--shape", type=int, nargs=4, action="append", metavar=("T", "D", "E", "K"),
                        help="run only these shapes (repeatable) instead of the grid")
    parser.add_argument("--extra", action="store_true", help="also ours_ref and ours_padded")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--allocator", choices=("retain", "default"), default="retain",
                        help="retain: keep freed memory in the heap (see retain_heap)")
    args = parser.parse_args(argv)
    _setup()
    retained = args.allocator == "retain" and retain_heap()
    import torch

    torch.set_num_threads(args.threads)
    _init_deepspeed()
    from benchmarks.common import append_results

    grid = ([(1024, 128, 8, 2)] if args.quick else [tuple(s) for s in args.shape] if args.shape else
            [(T, D, E, K) for T in args.tokens for D in (256, 512) for E in (8, 64)
             for K in (2, 4)])
    names = ["dense", "ours", "deepspeed", "megatron"]
    if args.extra:
        names[2:2] = ["ours_ref", "ours_padded"]
    peers = [n for n in names if n != "ours"]
    rows, loads, t_start = [], [os.getloadavg()[0]], time.time()
    for T, D, E, K in grid:
        x, impls = layers(T, D, E, K, extra=args.extra)
        rounds = args.rounds if T * D <= 4096 * 512 else max(3, args.rounds - 2)
        med, ratios = time_shape(impls, x, rounds)
        loads.append(os.getloadavg()[0])
        rows.append(((T, D, E, K), med, ratios))
        print(T, D, E, K, {n: f"{T / v:,.0f}" if not isinstance(v, str) else v
                           for n, v in med.items()},
              {p: f"{statistics.median(ratios[p]):.2f}x" for p in peers if p in ratios},
              f"load {loads[-1]:.1f}", flush=True)
        del impls
    lines = ["| T | D | E | K | " + " | ".join(f"{n} tok/s" for n in names)
             + " | " + " | ".join(f"ours/{p}" for p in peers) + " |",
             "|---" * (4 + len(names) + len(peers)) + "|"]
    for (T, D, E, K), med, ratios in rows:
        cells = [f"{T / med[n]:,.0f}" if not isinstance(med[n], str) else med[n]
                 for n in names]
        rat = [_ratio_cell(ratios.get(p)) for p in peers]
        lines.append(f"| {T} | {D} | {E} | {K} | " + " | ".join(cells + rat) + " |")
    table = "\n".join(lines)
    print(table)
    minutes = (time.time() - t_start) / 60
    print(f"{minutes:.1f} min, load average (1 min) {min(loads):.1f}-{max(loads):.1f}")
    if args.quick or args.no_save:
        return
    alloc = ("glibc heap retained (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^62; see "
             "retain_heap)" if retained else "default glibc allocator")
    note = (f"fp32, forward+backward of one layer; torch threads {torch.get_num_threads()}; "
            f"{alloc}; "
            f"{args.rounds} interleaved rounds per shape ({max(3, args.rounds - 2)} for "
            "T*D > 4096*512) after one warm-up. tok/s: median per layer. Ratios: median over "
            "rounds of the paired per-round throughput ratio, with [min-max] over rounds. "
            f"1-min load average during the run {min(loads):.1f}-{max(loads):.1f} "
            f"(2 cores; other jobs were running); run took {minutes:.1f} min.")
    append_results("MoE layer, forward+backward tokens/s (bench_moe_layer.py)",
                   note + "\n\n" + table)
    _plot(rows)


def _ratio_cell(r) -> str:
    if not r:
        return "-"
    return f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]"


def _plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"T{T//1024}k D{D} E{E} K{K}" for (T, D, E, K), _, _ in rows]
    fig, ax = plt.subplots(figsize=(12, 4))
    for i, (peer, color) in enumerate((("dense", "C0"), ("deepspeed", "C1"), ("megatron", "C2"))):
        vals = [statistics.median(r[peer]) if r.get(peer) else 0 for _, _, r in rows]
        ax.bar([j + 0.27 * (i - 1) for j in range(len(rows))], vals, 0.27, label=f"ours / {peer}",
               color=color)
    ax.axhline(0.85, color="C0", ls="--", lw=0.8)
    ax.axhline(1.3, color="C1", ls="--", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ours / peer, forward+backward tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("moe_layer_ratios.png"), dpi=120)


if __name__ == "__main__":
    main()
