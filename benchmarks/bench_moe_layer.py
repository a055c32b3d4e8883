"""MoE layer throughput on CPU: forward + backward tokens/s of four layers on one grid.

    .venv/bin/python benchmarks/bench_moe_layer.py            # full grid, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_moe_layer.py --quick    # one small shape, smoke test

Layers, all fp32 at equal active FLOPs (dense FFN hidden 4D; MoE experts of hidden 4D / K,
K experts per token, so each token does one dense FFN's work):
- dense:    ``FeedForward(D, 4D)``
- ours:     ``ModalityRoutedMoE`` (one group, ``gemm="auto"``), and ``gemm="grouped"``
- deepspeed: ``deepspeed.moe.layer.MoE`` with the same experts, k = K, capacity factor 1.25
- megatron: megatron-core ``moe_utils.permute / unpermute`` around ``kernels.grouped_gemm``
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


def _init_deepspeed():
    import deepspeed
    import deepspeed.comm.torch as ds_torch

    ds_torch.build_shm_op = lambda: None  # skip the 60-90 s shm_comm compile (DESIGN.md)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def layers(T: int, D: int, E: int, K: int):
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

    for gemm in ("auto", "grouped"):
        cfg = ModelConfig(d_model=D, num_heads=1, ffn_hidden=F_dense, ffn="moe",
                          moe=MoEConfig(groups={"all": list(KIND_NAMES)}, num_experts=E,
                                        top_k=1, granularity=K, z_loss_coef=0, gemm=gemm))
        moe = ModalityRoutedMoE(cfg)
        init_moe_(moe, 0.02, 0.02)

        def run_ours(m, x):
            y, routing = m(x, kinds)
            return y.sum() + 0.01 * routing["all"].aux_loss
        out["ours" if gemm == "auto" else "ours_grouped"] = (moe, run_ours)

    if 1.25 * T * T * K * 4 <= 2 ** 30:  # DeepSpeed's dense (T, E, C) dispatch tensors
        from deepspeed.moe.layer import MoE

        ds = MoE(hidden_size=D, expert=FeedForward(D, F_exp), num_experts=E, ep_size=1, k=K,
                 capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4,
                 drop_tokens=True, use_rts=False)
        out["deepspeed"] = (ds, _ds_loss)

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


def time_layer(module, loss_fn, x, iters: int) -> float:
    """Median seconds of one forward + backward (after one warm-up)."""
    x = x.clone().requires_grad_()
    times = []
    for i in range(iters + 1):
        module.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss_fn(module, x).backward()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384],
                        help="T values of the grid (16384 takes most of the time)")
    args = parser.parse_args(argv)
    _setup()
    import torch

    _init_deepspeed()
    from benchmarks.common import append_results

    grid = ([(1024, 128, 8, 2)] if args.quick else
            [(T, D, E, K) for T in args.tokens for D in (256, 512) for E in (8, 64)
             for K in (2, 4)])
    names = ["dense", "ours", "ours_grouped", "deepspeed", "megatron"]
    rows = []
    for T, D, E, K in grid:
        x, impls = layers(T, D, E, K)
        iters = args.iters if T * D <= 4096 * 512 else max(2, args.iters - 1)
        tps = {n: T / time_layer(m, f, x, iters) for n, (m, f) in impls.items()}
        rows.append(((T, D, E, K), tps))
        print(T, D, E, K, {n: f"{v:,.0f}" for n, v in tps.items()}, flush=True)
        del impls
    lines = ["| T | D | E | K | " + " | ".join(f"{n} tok/s" for n in names)
             + " | ours/dense | ours/deepspeed | ours/megatron |",
             "|---" * (4 + len(names) + 3) + "|"]
    fmt = lambda v: f"{v:,.0f}" if v else "skipped"  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    for (T, D, E, K), tps in rows:
        o = tps["ours"]
        lines.append(f"| {T} | {D} | {E} | {K} | " + " | ".join(fmt(tps.get(n)) for n in names)
                     + f" | {ratio(o, tps['dense'])} | {ratio(o, tps.get('deepspeed'))}"
                     f" | {ratio(o, tps['megatron'])} |")
    table = "\n".join(lines)
    print(table)
    if args.quick:
        return
    note = ("fp32, forward+backward of one layer, median of timed runs after a warm-up; "
            f"torch threads {torch.get_num_threads()}. DeepSpeed is skipped where its dense "
            "(T, E, capacity) dispatch/combine tensors exceed 1 GiB (all T=16384 shapes).")
    append_results("MoE layer, forward+backward tokens/s (bench_moe_layer.py)",
                   note + "\n\n" + table)
    _plot(rows)


def _plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"T{T//1024}k D{D} E{E} K{K}" for (T, D, E, K), _ in rows]
    fig, ax = plt.subplots(figsize=(12, 4))
    for i, (peer, color) in enumerate((("dense", "C0"), ("deepspeed", "C1"), ("megatron", "C2"))):
        vals = [tps["ours"] / tps[peer] if tps.get(peer) else 0 for _, tps in rows]
        ax.bar([j + 0.27 * (i - 1) for j in range(len(rows))], vals, 0.27, label=f"ours / {peer}",
               color=color)
    ax.axhline(0.85, color="C0", ls="--", lw=0.8)
    ax.axhline(1.3, color="C1", ls="--", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("throughput ratio")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("moe_layer_ratios.png"), dpi=120)


if __name__ == "__main__":
    main()
