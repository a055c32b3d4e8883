"""Benchmark the MoE dispatch kernels on a GPU (a ``triton.testing`` perf report).

    python benchmarks/bench_kernels.py            # all shapes; PNGs + CSVs in benchmarks/
    python benchmarks/bench_kernels.py --quick    # T = 4k only

Measures, in bf16, over T in {4k, 16k, 64k}, D in {1024, 2048, 4096}, E in {8, 64},
K in {1, 2} (random top-k routing):
  * permute + un-permute (forward) in GB/s: ``impl="triton"``, ``impl="torch"`` and
    megatron-core 0.16.1's ``moe_utils.permute`` / ``unpermute``, against the card's HBM
    bandwidth. Bytes = 2 * (T*D + T*K*D) * 2 (read x, write x_RD, read y_RD, write y).
    Ours take dest_TK from ``route_metadata`` (timed separately as "triton+route");
    megatron's permute derives its indices from the routing map on every call.
  * grouped GEMM (T*K, D) x (E, D, F=D) in TFLOP/s: ``impl="triton"``, ``impl="torch"``
    (``F.grouped_mm``) and a dense bf16 matmul of the same total size, against the card's
    dense bf16 tensor-core peak.
Appends a dated table with the device name to benchmarks/RESULTS.md. Targets (H100/H200):
permute + un-permute >= 70% of HBM bandwidth and >= 1.5x megatron-core; grouped GEMM
>= 60% of the dense matmul. Needs CUDA: without it this exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

T_VALS = (4096, 16384, 65536)
D_VALS = (1024, 2048, 4096)
E_VALS = (8, 64)
K_VALS = (1, 2)


def card_peaks(name: str) -> tuple[float, float]:
    """(HBM GB/s, dense bf16 TFLOP/s) of the card, from moe_gato.peaks (nan when unknown)."""
    from moe_gato.peaks import card_peaks as peaks_of

    peaks = peaks_of(name)
    if peaks is None:
        return float("nan"), float("nan")
    return peaks.hbm_bytes_per_s / 1e9, peaks.bf16_flops / 1e12


def make_cases(quick: bool) -> list[tuple[int, int, int, int]]:
    ts = T_VALS[:1] if quick else T_VALS
    return [(T, D, E, K) for T in ts for D in D_VALS for E in E_VALS for K in K_VALS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only T = 4k")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (the Triton kernels are benchmarked compiled); "
              "none found, nothing measured.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernels: unset TRITON_INTERPRET to benchmark the compiled kernels.",
              file=sys.stderr)
        return 2

    import triton
    import triton.testing
    from megatron.core.transformer.moe import moe_utils

    from kernels import grouped_gemm, permute, route_metadata, unpermute

    device_name = torch.cuda.get_device_name()
    hbm_gbs, tc_tflops = card_peaks(device_name)
    cases = make_cases(args.quick)
    cache: dict = {}

    def inputs(T, D, E, K):
        if (T, D, E, K) not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            g = torch.Generator(device="cuda").manual_seed(0)
            ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices
            counts, _, dest = route_metadata(ids, E, impl="torch")
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g)
            gates = torch.rand(T, K, device="cuda", generator=g)
            routing_map = torch.zeros(T, E, dtype=torch.bool, device="cuda").scatter_(1, ids, True)
            probs = torch.zeros(T, E, device="cuda").scatter_(1, ids, gates)
            cache[(T, D, E, K)] = dict(ids=ids, counts=counts, dest=dest, x=x, gates=gates,
                                       routing_map=routing_map, probs=probs)
        return cache[(T, D, E, K)]

    def bench(fn):
        ms, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return ms, hi, lo  # (median, fastest ~ min time -> max rate later)

    perm_lines = ["triton", "triton+route", "torch", "megatron", "peak"]

    @triton.testing.perf_report(triton.testing.Benchmark(
        x_names=["case"], x_vals=list(range(len(cases))), line_arg="provider",
        line_vals=perm_lines, line_names=perm_lines, ylabel="GB/s",
        xlabel="case (T, D, E, K): see RESULTS.md", plot_name="permute_unpermute_bf16", args={}))
    def bench_permute(case, provider):
        T, D, E, K = cases[case]
        d = inputs(T, D, E, K)
        nbytes = 2 * (T * D + T * K * D) * 2
        if provider == "peak":
            return hbm_gbs
        if provider in ("triton", "torch"):
            fn = lambda: unpermute(permute(d["x"], d["dest"], T * K, impl=provider),  # noqa: E731
                                   d["dest"], d["gates"], impl=provider)
        elif provider == "triton+route":
            def fn():
                _, _, dest = route_metadata(d["ids"], E, impl="triton")
                return unpermute(permute(d["x"], dest, T * K, impl="triton"), dest, d["gates"],
                                 impl="triton")
        else:
            def fn():
                x_RD, _, idx = moe_utils.permute(d["x"], d["routing_map"], num_out_tokens=T * K)
                return moe_utils.unpermute(x_RD, idx, d["x"].shape, probs=d["probs"],
                                           routing_map=d["routing_map"])
        return tuple(nbytes / (ms * 1e-3) / 1e9 for ms in bench(fn))

    gemm_lines = ["triton", "torch", "dense", "peak"]

    @triton.testing.perf_report(triton.testing.Benchmark(
        x_names=["case"], x_vals=list(range(len(cases))), line_arg="provider",
        line_vals=gemm_lines, line_names=gemm_lines, ylabel="TFLOP/s",
        xlabel="case (T, D, E, K): see RESULTS.md", plot_name="grouped_gemm_bf16", args={}))
    def bench_gemm(case, provider):
        T, D, E, K = cases[case]
        if provider == "peak":
            return tc_tflops
        d = inputs(T, D, E, K)
        R, Fw = T * K, D
        x_RD = torch.randn(R, D, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, D, Fw, device="cuda", dtype=torch.bfloat16) / D**0.5
        flops = 2 * R * D * Fw
        if provider == "dense":
            w0 = w[0]
            fn = lambda: x_RD @ w0  # noqa: E731
        else:
            fn = lambda: grouped_gemm(x_RD, w, d["counts"], impl=provider)  # noqa: E731
        return tuple(flops / (ms * 1e-3) / 1e12 for ms in bench(fn))

    print(f"device: {device_name}  (peaks: {hbm_gbs} GB/s HBM, {tc_tflops} TFLOP/s bf16)")
    perm_df = bench_permute.run(print_data=True, save_path=str(HERE), return_df=True)
    gemm_df = bench_gemm.run(print_data=True, save_path=str(HERE), return_df=True)
    perm_df = perm_df[0] if isinstance(perm_df, list) else perm_df
    gemm_df = gemm_df[0] if isinstance(gemm_df, list) else gemm_df

    lines = [f"\n## Dispatch kernels on a GPU, bf16 (bench_kernels.py)\n\n"
             f"{datetime.datetime.now():%Y-%m-%d %H:%M} · {device_name}\n",
             f"bf16; peaks used: {hbm_gbs} GB/s HBM, {tc_tflops} TFLOP/s dense bf16. "
             "Permute + un-permute in GB/s, grouped GEMM (F = D) in TFLOP/s. "
             "PNGs: benchmarks/permute_unpermute_bf16.png, benchmarks/grouped_gemm_bf16.png.\n",
             "| T | D | E | K | triton GB/s | +route | torch | megatron | % HBM | x megatron "
             "| triton TFLOP/s | torch grouped_mm | dense | % dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, (T, D, E, K) in enumerate(cases):
        p = perm_df.iloc[i]
        q = gemm_df.iloc[i]
        tri, rt, tor, meg = (p[f"{n} (GB/s)"] for n in ("triton", "triton+route", "torch", "megatron"))
        gt, gr, gd = (q[f"{n} (TFLOP/s)"] for n in ("triton", "torch", "dense"))
        lines.append(f"| {T} | {D} | {E} | {K} | {tri:.0f} | {rt:.0f} | {tor:.0f} | {meg:.0f} "
                     f"| {100 * tri / hbm_gbs:.0f}% | {tri / meg:.2f} | {gt:.0f} | {gr:.0f} "
                     f"| {gd:.0f} | {100 * gt / gd:.0f}% |")
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended results to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
