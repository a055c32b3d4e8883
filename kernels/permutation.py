"""Permute tokens into the expert-contiguous buffer and un-permute (gate-weighted combine).

Shape letters: T tokens, K top-k slots per token, D width, R rows of the permuted buffer,
N = T * K flat slots.

  permute:   x_RD[dest[t, k]] = x_TD[t]; rows nobody writes are zero.
  unpermute: y_TD[t] = sum_k gates[t, k] * y_RD[dest[t, k]]; dest -1 (a drop) adds zero.

Three tiers: ``@triton.jit`` kernels, launchers (``permute_triton``, ``unpermute_triton``,
``unpermute_gate_grad_triton``; they check inputs and raise ``ValueError``), and the
references ``permute_ref`` / ``unpermute_ref``. ``Permute`` and ``Unpermute`` are the
autograd pair: the backward of permute is an un-permute with unit gates; the backward of
un-permute is a gate-scaled permute (for dy_RD) plus a row-dot kernel (for the gates).

Permute is written as a gather over output rows: ``_invert_dest_kernel`` turns dest_TK
into src_R (the flat slot t * K + k that fills row r, or -1), then ``_gather_rows_kernel``
writes every output row exactly once (a copy, a scaled copy, or zeros), so no separate
zero-fill pass is needed. Index arithmetic is int32 unless some offset overflows it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import (FLOAT_DTYPES, INDEX_DTYPES, INT32_MAX, check_device, check_dtype,
                            check_ndim, check_same_device, interpreting, needs_int64, pow2)


# --- kernels ----------------------------------------------------------------------------

@triton.jit
def _invert_dest_kernel(dest_ptr, src_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat slots
    mask = offs < N
    d = tl.load(dest_ptr + offs, mask=mask, other=-1)
    tl.store(src_ptr + d, offs.to(src_ptr.dtype.element_ty), mask=mask & (d >= 0))


@triton.jit
def _gather_rows_kernel(x_ptr, src_ptr, scale_ptr, out_ptr, R, D, K,
                        stride_xt, stride_xd, stride_or, stride_od,
                        HAS_SCALE: tl.constexpr, INT64: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    rmask = rows < R
    cmask = cols < D
    slot = tl.load(src_ptr + rows, mask=rmask, other=-1)
    keep = slot >= 0
    tok = slot // K
    if INT64:
        tok = tok.to(tl.int64)
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    v = tl.load(x_ptr + tok[:, None] * stride_xt + cols[None, :] * stride_xd,
                mask=keep[:, None] & cmask[None, :], other=0.0)
    if HAS_SCALE:
        s = tl.load(scale_ptr + slot, mask=keep, other=0.0).to(tl.float32)
        v = v.to(tl.float32) * s[:, None]
    tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_od,
             v.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _combine_kernel(y_ptr, dest_ptr, gates_ptr, out_ptr, T, D,
                    stride_yr, stride_yd, stride_ot, stride_od,
                    K: tl.constexpr, HAS_GATES: tl.constexpr, INT64: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    tmask = toks < T
    cmask = cols < D
    if INT64:
        cols = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        d = tl.load(dest_ptr + toks * K + k, mask=tmask, other=-1)
        keep = d >= 0
        if INT64:
            d = d.to(tl.int64)
        v = tl.load(y_ptr + d[:, None] * stride_yr + cols[None, :] * stride_yd,
                    mask=keep[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_GATES:
            g = tl.load(gates_ptr + toks * K + k, mask=keep, other=0.0).to(tl.float32)
            v = v * g[:, None]
        acc += v
    if INT64:
        toks = toks.to(tl.int64)
    tl.store(out_ptr + toks[:, None] * stride_ot + cols[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _gate_grad_kernel(dout_ptr, y_ptr, dest_ptr, dgates_ptr, T, D,
                      stride_ot, stride_od, stride_yr, stride_yd,
                      K: tl.constexpr, INT64: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.program_id(1)
    tmask = toks < T
    d = tl.load(dest_ptr + toks * K + k, mask=tmask, other=-1)
    keep = d >= 0
    t_idx = toks
    if INT64:
        d = d.to(tl.int64)
        t_idx = toks.to(tl.int64)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        cmask = cols < D
        a = tl.load(dout_ptr + t_idx[:, None] * stride_ot + cols[None, :] * stride_od,
                    mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        b = tl.load(y_ptr + d[:, None] * stride_yr + cols[None, :] * stride_yd,
                    mask=keep[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(dgates_ptr + toks * K + k, acc.to(dgates_ptr.dtype.element_ty), mask=tmask)


# --- launchers --------------------------------------------------------------------------

def _row_blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps): the interpreter wants few, big programs."""
    if interpreting():
        return 64, pow2(D, lo=16, hi=256), 1
    BLOCK_D = pow2(D, lo=64, hi=1024)
    return max(1, 4096 // BLOCK_D), BLOCK_D, 4


def _check_dest(dest_TK: torch.Tensor, T: int | None = None) -> None:
    check_ndim("dest_TK", dest_TK, 2, "T, K")
    check_dtype("dest_TK", dest_TK, INDEX_DTYPES)
    if T is not None and dest_TK.shape[0] != T:
        raise ValueError(f"dest_TK has {dest_TK.shape[0]} rows but the tokens have {T}")


def _invert_dest(dest_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """src_R: the flat slot t * K + k that fills row r, or -1 for a row nobody fills."""
    N = dest_TK.numel()
    idx_dtype = torch.int64 if N >= INT32_MAX else torch.int32
    src = torch.full((num_rows,), -1, dtype=idx_dtype, device=dest_TK.device)
    if N:
        BLOCK = 4096 if interpreting() else 1024
        _invert_dest_kernel[(triton.cdiv(N, BLOCK),)](dest_TK.contiguous().view(-1), src, N,
                                                      BLOCK=BLOCK)
    return src


def _gather_rows(x_TD, dest_TK, num_rows, scale_TK=None):
    T, D = x_TD.shape
    K = dest_TK.shape[1]
    out = torch.empty(num_rows, D, dtype=x_TD.dtype, device=x_TD.device)
    if num_rows == 0 or D == 0:
        return out
    src = _invert_dest(dest_TK, num_rows)
    BLOCK_R, BLOCK_D, warps = _row_blocks(D)
    grid = (triton.cdiv(num_rows, BLOCK_R), triton.cdiv(D, BLOCK_D))
    scale = scale_TK.contiguous() if scale_TK is not None else src  # dummy pointer when unused
    _gather_rows_kernel[grid](x_TD, src, scale, out, num_rows, D, K,
                              x_TD.stride(0), x_TD.stride(1), out.stride(0), out.stride(1),
                              HAS_SCALE=scale_TK is not None, INT64=needs_int64(x_TD, out),
                              BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=warps)
    return out


def permute_triton(x_TD: torch.Tensor, dest_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Triton version of :func:`permute_ref`.

    ``dest_TK`` must map kept slots to distinct rows in [0, num_rows) (as ``route_metadata``
    produces); this is not checked, since checking needs a host sync.
    """
    check_ndim("x_TD", x_TD, 2, "T, D")
    check_dtype("x_TD", x_TD, FLOAT_DTYPES)
    _check_dest(dest_TK, x_TD.shape[0])
    if not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be an int >= 0, got {num_rows!r}")
    check_same_device(x_TD=x_TD, dest_TK=dest_TK)
    check_device("x_TD", x_TD)
    return _gather_rows(x_TD, dest_TK, num_rows)


def _combine(y_RD, dest_TK, gates_TK):
    T, K = dest_TK.shape
    D = y_RD.shape[1]
    out = torch.empty(T, D, dtype=y_RD.dtype, device=y_RD.device)
    if T == 0 or D == 0:
        return out
    BLOCK_T, BLOCK_D, warps = _row_blocks(D)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
    dest = dest_TK.contiguous()
    gates = gates_TK.contiguous() if gates_TK is not None else dest
    _combine_kernel[grid](y_RD, dest, gates, out, T, D,
                          y_RD.stride(0), y_RD.stride(1), out.stride(0), out.stride(1),
                          K=K, HAS_GATES=gates_TK is not None, INT64=needs_int64(y_RD, out),
                          BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=warps)
    return out


def unpermute_triton(y_RD: torch.Tensor, dest_TK: torch.Tensor,
                     gates_TK: torch.Tensor | None) -> torch.Tensor:
    """Triton version of :func:`unpermute_ref` (fp32 accumulation; ``gates_TK=None`` means
    unit gates, i.e. a plain sum over the k copies)."""
    check_ndim("y_RD", y_RD, 2, "R, D")
    check_dtype("y_RD", y_RD, FLOAT_DTYPES)
    _check_dest(dest_TK)
    tensors = dict(y_RD=y_RD, dest_TK=dest_TK)
    if gates_TK is not None:
        check_dtype("gates_TK", gates_TK, FLOAT_DTYPES)
        if gates_TK.shape != dest_TK.shape:
            raise ValueError(f"gates_TK has shape {tuple(gates_TK.shape)} but dest_TK has "
                             f"{tuple(dest_TK.shape)}; they must match (T, K)")
        tensors["gates_TK"] = gates_TK
    check_same_device(**tensors)
    check_device("y_RD", y_RD)
    return _combine(y_RD, dest_TK, gates_TK)


def unpermute_gate_grad_triton(dout_TD: torch.Tensor, y_RD: torch.Tensor,
                               dest_TK: torch.Tensor, gates_dtype: torch.dtype) -> torch.Tensor:
    """dgates[t, k] = <dout[t], y_RD[dest[t, k]]> (zero for a dropped slot)."""
    T, K = dest_TK.shape
    D = y_RD.shape[1]
    dgates = torch.empty(T, K, dtype=gates_dtype, device=y_RD.device)
    if T == 0 or K == 0:
        return dgates
    BLOCK_T, BLOCK_D, warps = _row_blocks(D)
    _gate_grad_kernel[(triton.cdiv(T, BLOCK_T), K)](
        dout_TD, y_RD, dest_TK.contiguous(), dgates, T, D,
        dout_TD.stride(0), dout_TD.stride(1), y_RD.stride(0), y_RD.stride(1),
        K=K, INT64=needs_int64(dout_TD, y_RD), BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
        num_warps=warps)
    return dgates


# --- autograd ---------------------------------------------------------------------------

class Permute(torch.autograd.Function):
    """x_TD -> x_RD; backward: dx_TD = unpermute(dx_RD, dest, unit gates)."""

    @staticmethod
    def forward(ctx, x_TD, dest_TK, num_rows):
        ctx.save_for_backward(dest_TK)
        return permute_triton(x_TD, dest_TK, num_rows)

    @staticmethod
    def backward(ctx, dx_RD):
        (dest_TK,) = ctx.saved_tensors
        return _combine(dx_RD, dest_TK, None), None, None


class Unpermute(torch.autograd.Function):
    """(y_RD, gates_TK) -> y_TD; backward: dy_RD = gate-scaled permute of dy_TD, and
    dgates = row dots of dy_TD with y_RD."""

    @staticmethod
    def forward(ctx, y_RD, dest_TK, gates_TK):
        ctx.save_for_backward(y_RD, dest_TK, gates_TK)
        return unpermute_triton(y_RD, dest_TK, gates_TK)

    @staticmethod
    def backward(ctx, dout_TD):
        y_RD, dest_TK, gates_TK = ctx.saved_tensors
        dy_RD = dgates = None
        if ctx.needs_input_grad[0]:
            dy_RD = _gather_rows(dout_TD, dest_TK, y_RD.shape[0], gates_TK).to(y_RD.dtype)
        if ctx.needs_input_grad[2]:
            dgates = unpermute_gate_grad_triton(dout_TD, y_RD, dest_TK, gates_TK.dtype)
        return dy_RD, None, dgates


# --- references -------------------------------------------------------------------------

def permute_ref(x_TD: torch.Tensor, dest_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """x_RD[dest[t, k]] = x_TD[t]; rows nobody writes (after drops) stay zero."""
    T, K = dest_TK.shape
    dest = dest_TK.reshape(-1).long()
    src = torch.arange(T, device=x_TD.device).repeat_interleave(K)  # (T*K,) token of each slot
    keep = dest >= 0
    out = x_TD.new_zeros(num_rows, x_TD.shape[1])
    return out.index_copy(0, dest[keep], x_TD[src[keep]])


def unpermute_ref(y_RD: torch.Tensor, dest_TK: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum_k gates[t, k] * y_RD[dest[t, k]]; a dropped slot (dest -1) adds zero."""
    keep = (dest_TK >= 0).unsqueeze(-1)  # (T, K, 1)
    rows = y_RD[dest_TK.clamp(min=0).long()]  # (T, K, D)
    w = (gates_TK.unsqueeze(-1) * keep).to(y_RD.dtype)
    return (rows * w).sum(dim=1)
