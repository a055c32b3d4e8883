"""Grouped GEMM over expert-contiguous rows, with the FFN activation fused.

Shape letters: R rows of the permuted buffer, D input width, F output width of the weight,
H = F / 2 (SwiGLU output width), E experts, E_PAD = E rounded up to a power of two.

  y_RF[rows of e] = act(x_RD[rows of e] @ w_EDF[e])   for e in 0..E-1

Expert e owns rows [offsets[e], offsets[e] + counts[e]) with offsets the exclusive prefix
sum of ``counts_E``; rows past counts.sum() (capacity padding) come out zero.
``activation``:
  None      y = x @ w                                  (R, F)
  "gelu"    y = gelu(x @ w), exact (erf) GELU          (R, F)
  "swiglu"  y = silu(x @ w[:, :, :H]) * (x @ w[:, :, H:])   (R, H): the first half of the
            weight's columns is the gate projection, the second half the up projection.

Three tiers: ``@triton.jit`` kernels, launchers (``grouped_gemm_triton``,
``grouped_gemm_dw_triton``; they check inputs and raise ``ValueError``), and the reference
``grouped_gemm_ref`` (one ``torch.mm`` per expert, ``PerExpertMM`` for its dX / dW; the
fused CPU path in moe_gato/model/dispatch.py uses the same ``per_expert_mm`` helpers).
``GroupedGemm`` is the autograd wrapper: its backward is the activation's derivative
(elementwise, on the pre-activation the forward kernel stored) followed by two grouped
GEMMs, dX = dH @ W^T (the forward kernel on a transposed view of W) and
dW[e] = X[rows of e]^T @ dH[rows of e] (``_grouped_gemm_dw_kernel``).

The forward kernel needs no host sync: every program reads counts_E, finds from the
per-expert tile counts which expert's tile it owns, and programs past the last tile zero
the padding rows. In the interpreter ``tl.dot`` on bf16 is wrong, so operands are cast to
fp32 there (``DOT_FP32``); compiled on a GPU bf16/fp16 operands go to the tensor cores as
they are, and fp32 operands use IEEE fp32 dots (no TF32), matching torch's fp32 matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from kernels.common import (FLOAT_DTYPES, INDEX_DTYPES, check_device, check_dtype, check_ndim,
                            check_same_device, interpreting, needs_int64, pow2)

ACTIVATIONS = (None, "gelu", "swiglu")
_ACT_CODE = {None: 0, "gelu": 1, "swiglu": 2}


# --- kernels ----------------------------------------------------------------------------

@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _grouped_gemm_kernel(x_ptr, w_ptr, counts_ptr, y_ptr, h_ptr, R, D, N, E,
                         stride_xr, stride_xd, stride_we, stride_wd, stride_wf,
                         stride_yr, stride_yf, stride_hr, stride_hf,
                         ACT: tl.constexpr, STORE_H: tl.constexpr, DOT_FP32: tl.constexpr,
                         PRECISION: tl.constexpr,
                         INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, E_PAD: tl.constexpr):
    # N is the output width (F, or H for SwiGLU, whose up half starts at column N of w).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0).to(tl.int32)  # (E_PAD,)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    row_end = tl.cumsum(counts, axis=0)
    total_tiles = tl.sum(tiles, axis=0)
    used = tl.sum(counts, axis=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N
    if INT64:
        cols = cols.to(tl.int64)
    if pid_m < total_tiles:
        e = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)  # the expert owning this tile
        sel = experts == e
        e_tile_end = tl.sum(tl.where(sel, tile_end, 0), axis=0)
        e_tiles = tl.sum(tl.where(sel, tiles, 0), axis=0)
        e_row_end = tl.sum(tl.where(sel, row_end, 0), axis=0)
        e_count = tl.sum(tl.where(sel, counts, 0), axis=0)
        row0 = e_row_end - e_count + (pid_m - (e_tile_end - e_tiles)) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < e_row_end
        e_idx = e
        if INT64:
            rows = rows.to(tl.int64)
            e_idx = e.to(tl.int64)
        w_base = w_ptr + e_idx * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            a = tl.load(x_ptr + rows[:, None] * stride_xr + ks[None, :] * stride_xd,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_base + ks[:, None] * stride_wd + cols[None, :] * stride_wf,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if ACT == 2:
                b_up = tl.load(w_base + ks[:, None] * stride_wd + (cols + N)[None, :] * stride_wf,
                               mask=kmask[:, None] & nmask[None, :], other=0.0)
                if DOT_FP32:
                    b_up = b_up.to(tl.float32)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        omask = rmask[:, None] & nmask[None, :]
        if STORE_H:
            h_ptrs = h_ptr + rows[:, None] * stride_hr + cols[None, :] * stride_hf
            tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=omask)
            if ACT == 2:
                tl.store(h_ptrs + N * stride_hf, acc_up.to(h_ptr.dtype.element_ty), mask=omask)
        if ACT == 1:
            acc = _gelu(acc)
        elif ACT == 2:
            acc = acc * tl.sigmoid(acc) * acc_up
        tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :] * stride_yf,
                 acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        # Programs past the last expert tile zero the padding rows [used, R).
        rows = used + (pid_m - total_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        if INT64:
            rows = rows.to(tl.int64)
        omask = (rows < R)[:, None] & nmask[None, :]
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :] * stride_yf,
                 zeros.to(y_ptr.dtype.element_ty), mask=omask)
        if STORE_H:
            h_ptrs = h_ptr + rows[:, None] * stride_hr + cols[None, :] * stride_hf
            tl.store(h_ptrs, zeros.to(h_ptr.dtype.element_ty), mask=omask)
            if ACT == 2:
                tl.store(h_ptrs + N * stride_hf, zeros.to(h_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _grouped_gemm_dw_kernel(x_ptr, dy_ptr, counts_ptr, dw_ptr, D, N, E,
                            stride_xr, stride_xd, stride_yr, stride_yf,
                            stride_we, stride_wd, stride_wf,
                            DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, E_PAD: tl.constexpr):
    # dw[e] (D, N) = x[rows of e]^T (D, rows) @ dy[rows of e] (rows, N); one (e, d, n) tile each.
    e = tl.program_id(0)
    dcols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ncols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    dmask = dcols < D
    nmask = ncols < N
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0).to(tl.int32)
    row_end = tl.cumsum(counts, axis=0)
    sel = experts == e
    end = tl.sum(tl.where(sel, row_end, 0), axis=0)
    start = end - tl.sum(tl.where(sel, counts, 0), axis=0)
    e_idx = e
    if INT64:
        dcols = dcols.to(tl.int64)
        ncols = ncols.to(tl.int64)
        e_idx = e.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        rmask = rows < end
        if INT64:
            rows = rows.to(tl.int64)
        a = tl.load(x_ptr + dcols[:, None] * stride_xd + rows[None, :] * stride_xr,
                    mask=dmask[:, None] & rmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(dy_ptr + rows[:, None] * stride_yr + ncols[None, :] * stride_yf,
                    mask=rmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(dw_ptr + e_idx * stride_we + dcols[:, None] * stride_wd + ncols[None, :] * stride_wf,
             acc.to(dw_ptr.dtype.element_ty), mask=dmask[:, None] & nmask[None, :])


# --- launchers --------------------------------------------------------------------------

def _gemm_blocks(D: int, N: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if interpreting():  # few programs, numpy does the dots
        return 32, pow2(N, lo=16, hi=64), pow2(D, lo=16, hi=64), 1, 1
    return 128, pow2(N, lo=16, hi=128), pow2(D, lo=16, hi=64), 8, 3


def _precision(x_RD: torch.Tensor) -> str:
    """fp32 inputs get full-precision dots (as torch's fp32 matmul), not TF32."""
    return "ieee" if x_RD.dtype == torch.float32 else "tf32"


def _check_args(x_RD, w_EDF, counts_E, activation):
    check_ndim("x_RD", x_RD, 2, "R, D")
    check_ndim("w_EDF", w_EDF, 3, "E, D, F")
    check_ndim("counts_E", counts_E, 1, "E")
    check_dtype("x_RD", x_RD, FLOAT_DTYPES)
    check_dtype("counts_E", counts_E, INDEX_DTYPES)
    if w_EDF.dtype != x_RD.dtype:
        raise ValueError(f"w_EDF has dtype {w_EDF.dtype} but x_RD has {x_RD.dtype}; they must match")
    if w_EDF.shape[1] != x_RD.shape[1]:
        raise ValueError(f"x_RD has width D={x_RD.shape[1]} but w_EDF is {tuple(w_EDF.shape)} "
                         "(E, D, F); the D must match")
    if counts_E.shape[0] != w_EDF.shape[0]:
        raise ValueError(f"counts_E has {counts_E.shape[0]} experts but w_EDF has "
                         f"{w_EDF.shape[0]}; they must match")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "swiglu" and w_EDF.shape[2] % 2:
        raise ValueError(f"swiglu needs an even F (gate and up halves), got F={w_EDF.shape[2]}")


def _forward(x_RD, w_EDF, counts_E, activation, store_h):
    R, D = x_RD.shape
    E, _, Fw = w_EDF.shape
    N = Fw // 2 if activation == "swiglu" else Fw
    y = torch.empty(R, N, dtype=x_RD.dtype, device=x_RD.device)
    h = torch.empty(R, Fw, dtype=x_RD.dtype, device=x_RD.device) if store_h else None
    if R == 0 or N == 0:
        return y, h
    if D == 0 or E == 0:
        y.zero_()
        if h is not None:
            h.zero_()
        return y, h
    BM, BN, BK, warps, stages = _gemm_blocks(D, N)
    grid = (triton.cdiv(R, BM) + E + 1, triton.cdiv(N, BN))
    hh = h if h is not None else y
    _grouped_gemm_kernel[grid](
        x_RD, w_EDF, counts_E, y, hh, R, D, N, E,
        x_RD.stride(0), x_RD.stride(1), w_EDF.stride(0), w_EDF.stride(1), w_EDF.stride(2),
        y.stride(0), y.stride(1), hh.stride(0), hh.stride(1),
        ACT=_ACT_CODE[activation], STORE_H=store_h, DOT_FP32=interpreting(),
        PRECISION=_precision(x_RD),
        INT64=needs_int64(x_RD, w_EDF, y, hh), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        E_PAD=pow2(E, lo=2), num_warps=warps, num_stages=stages)
    return y, h


def grouped_gemm_triton(x_RD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor,
                        activation: str | None = None) -> torch.Tensor:
    """Triton version of :func:`grouped_gemm_ref` (no autograd; see ``GroupedGemm``).

    counts_E must sum to at most R (not checked: that needs a host sync).
    """
    _check_args(x_RD, w_EDF, counts_E, activation)
    check_same_device(x_RD=x_RD, w_EDF=w_EDF, counts_E=counts_E)
    check_device("x_RD", x_RD)
    return _forward(x_RD, w_EDF, counts_E, activation, store_h=False)[0]


def grouped_gemm_dw_triton(x_RD: torch.Tensor, dy_RF: torch.Tensor,
                           counts_E: torch.Tensor) -> torch.Tensor:
    """dw_EDF[e] = x_RD[rows of e]^T @ dy_RF[rows of e]; experts without rows get zeros."""
    check_ndim("x_RD", x_RD, 2, "R, D")
    check_ndim("dy_RF", dy_RF, 2, "R, F")
    if x_RD.shape[0] != dy_RF.shape[0]:
        raise ValueError(f"x_RD has {x_RD.shape[0]} rows but dy_RF has {dy_RF.shape[0]}")
    check_same_device(x_RD=x_RD, dy_RF=dy_RF, counts_E=counts_E)
    check_device("x_RD", x_RD)
    E = counts_E.shape[0]
    D, N = x_RD.shape[1], dy_RF.shape[1]
    dw = torch.empty(E, D, N, dtype=x_RD.dtype, device=x_RD.device)
    if dw.numel() == 0:
        return dw
    BM, BN, BK, warps, stages = _gemm_blocks(D, N)
    BM = min(BM, pow2(D, lo=16, hi=128))  # the D tile: keep it no bigger than D needs
    BK = 32 if interpreting() else 64  # rows reduced per step
    grid = (E, triton.cdiv(D, BM), triton.cdiv(N, BN))
    _grouped_gemm_dw_kernel[grid](
        x_RD, dy_RF, counts_E, dw, D, N, E,
        x_RD.stride(0), x_RD.stride(1), dy_RF.stride(0), dy_RF.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        DOT_FP32=interpreting(), PRECISION=_precision(x_RD), INT64=needs_int64(x_RD, dy_RF, dw),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, E_PAD=pow2(E, lo=2),
        num_warps=warps, num_stages=stages)
    return dw


def _activation_backward(h_RF: torch.Tensor, dy: torch.Tensor, activation: str | None):
    """dH from the stored pre-activation H and dY (elementwise, fp32 math)."""
    if activation is None:
        return dy
    h = h_RF.float()
    g = dy.float()
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
        pdf = torch.exp(-0.5 * h * h) * 0.3989422804014327
        return (g * (cdf + h * pdf)).to(h_RF.dtype)
    gate, up = h.chunk(2, dim=1)  # (R, H) each
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    return torch.cat([d_gate, g * silu], dim=1).to(h_RF.dtype)


class GroupedGemm(torch.autograd.Function):
    """y = act(x @ w) per expert; backward is act' then dX and dW grouped GEMMs."""

    @staticmethod
    def forward(ctx, x_RD, w_EDF, counts_E, activation):
        _check_args(x_RD, w_EDF, counts_E, activation)
        check_same_device(x_RD=x_RD, w_EDF=w_EDF, counts_E=counts_E)
        check_device("x_RD", x_RD)
        store_h = activation is not None and any(ctx.needs_input_grad[:2])
        y, h = _forward(x_RD, w_EDF, counts_E, activation, store_h)
        ctx.activation = activation
        ctx.save_for_backward(x_RD, w_EDF, counts_E, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_RD, w_EDF, counts_E, h = ctx.saved_tensors
        dh = _activation_backward(h, dy, ctx.activation)  # (R, F)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _forward(dh, w_EDF.transpose(1, 2), counts_E, None, False)[0]
        if ctx.needs_input_grad[1]:
            dw = grouped_gemm_dw_triton(x_RD, dh, counts_E)
        return dx, dw, None, None


# --- reference --------------------------------------------------------------------------

def grouped_gemm_ref(x_RD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor,
                     activation: str | None = None) -> torch.Tensor:
    """y[rows of expert e] = act(x[rows of e] @ w[e]) for expert-contiguous rows; rows past
    ``counts_E.sum()`` (capacity padding) come out zero."""
    y = PerExpertMM.apply(x_RD, w_EDF, counts_E.tolist())
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "swiglu":
        gate, up = y.chunk(2, dim=1)
        y = F.silu(gate) * up
    return y


def per_expert_mm(x_RD: torch.Tensor, w_EDF: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """y_RF[rows of e] = x_RD[rows of e] @ w_EDF[e], one ``torch.mm`` per non-empty expert
    written into its slice of y; rows past ``sum(counts)`` are zero. No autograd.

    On CPU this beats ``F.grouped_mm`` (whose backward is ~6x slower than one ``bmm`` of
    equal FLOPs) and a padded ``bmm`` (which computes the load imbalance's padding rows).
    """
    used = sum(counts)
    y_RF = x_RD.new_empty(x_RD.shape[0], w_EDF.shape[2])
    y_RF[used:].zero_()
    for e, (x_nD, y_nF) in enumerate(zip(x_RD[:used].split(counts), y_RF[:used].split(counts))):
        if x_nD.shape[0]:
            torch.mm(x_nD, w_EDF[e], out=y_nF)
    return y_RF


def per_expert_mm_backward(x_RD: torch.Tensor, dy_RF: torch.Tensor, w_EDF: torch.Tensor,
                           counts: list[int], need_dx: bool = True, need_dw: bool = True):
    """(dX, dW) of :func:`per_expert_mm`: dX[rows of e] = dY @ W[e]^T, dW[e] = X^T @ dY over
    the rows of e; padding rows get dX = 0 and experts without rows dW = 0."""
    used = sum(counts)
    dx_RD = dw_EDF = None
    if need_dx:
        dx_RD = dy_RF.new_empty(x_RD.shape)
        dx_RD[used:].zero_()
        for e, (dy_nF, dx_nD) in enumerate(zip(dy_RF[:used].split(counts),
                                               dx_RD[:used].split(counts))):
            if dy_nF.shape[0]:
                torch.mm(dy_nF, w_EDF[e].t(), out=dx_nD)
    if need_dw:
        dw_EDF = torch.empty_like(w_EDF, memory_format=torch.contiguous_format)
        for e, (x_nD, dy_nF) in enumerate(zip(x_RD[:used].split(counts),
                                              dy_RF[:used].split(counts))):
            if x_nD.shape[0]:
                torch.mm(x_nD.t(), dy_nF, out=dw_EDF[e])
            else:
                dw_EDF[e].zero_()
    return dx_RD, dw_EDF


class PerExpertMM(torch.autograd.Function):
    """Autograd for :func:`per_expert_mm` (the reference's GEMM) with hand-written dX / dW."""

    @staticmethod
    def forward(ctx, x_RD, w_EDF, counts):
        ctx.counts = counts
        ctx.save_for_backward(x_RD, w_EDF)
        return per_expert_mm(x_RD, w_EDF, counts)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_RF):
        x_RD, w_EDF = ctx.saved_tensors
        dx, dw = per_expert_mm_backward(x_RD, dy_RF, w_EDF, ctx.counts, *ctx.needs_input_grad[:2])
        return dx, dw, None
