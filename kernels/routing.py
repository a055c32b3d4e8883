"""Routing metadata: top-k expert ids -> per-expert counts, offsets and destination rows.

Shape letters: T tokens, K top-k slots per token, E experts, N = T * K flat slots,
B blocks of flat slots (one program each), E_PAD = E rounded up to a power of two.

The expert-contiguous layout puts expert 0's rows first, then expert 1's, ...; within an
expert rows are ordered by flat slot index t * K + k (a stable sort). With ``capacity`` an
expert keeps its first ``capacity`` rows in that order; the others get destination -1 and
are not counted.

Three tiers: the ``@triton.jit`` kernels, the launcher ``route_metadata_triton`` (checks
inputs, raises ``ValueError``) and the reference ``route_metadata_ref``. The Triton path
runs three kernels, none of which syncs with the host:
  1. ``_block_histogram_kernel``: per block of slots, a one-hot (BLOCK, E_PAD) tile gives
     the block's per-expert counts and each slot's rank within its block and expert.
  2. ``_scan_kernel`` (one program): exclusive prefix over blocks -> each block's base rank
     per expert; totals -> counts (clamped to capacity) and offsets.
  3. ``_dest_kernel``: dest = offsets[e] + base[block, e] + local rank (-1 past capacity).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import INDEX_DTYPES, check_device, check_dtype, check_ndim, interpreting, pow2


# --- kernels ----------------------------------------------------------------------------

@triton.jit
def _block_histogram_kernel(ids_ptr, local_ptr, block_counts_ptr, N,
                            BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = offs < N
    ids = tl.load(ids_ptr + offs, mask=mask, other=-1).to(tl.int32)
    experts = tl.arange(0, E_PAD)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # (BLOCK, E_PAD)
    inclusive = tl.cumsum(onehot, axis=0)
    local = tl.sum((inclusive - 1) * onehot, axis=1)  # (BLOCK,) rank within block and expert
    tl.store(local_ptr + offs, local.to(local_ptr.dtype.element_ty), mask=mask)
    tl.store(block_counts_ptr + pid * E_PAD + experts, tl.sum(onehot, axis=0))


@triton.jit
def _scan_kernel(block_counts_ptr, block_base_ptr, counts_ptr, offsets_ptr, num_blocks, E,
                 capacity, HAS_CAPACITY: tl.constexpr, BLOCK_B: tl.constexpr,
                 E_PAD: tl.constexpr):
    experts = tl.arange(0, E_PAD)
    carry = tl.zeros((E_PAD,), dtype=tl.int32)
    for start in range(0, num_blocks, BLOCK_B):
        blocks = start + tl.arange(0, BLOCK_B)
        mask = (blocks < num_blocks)[:, None]
        ptrs = blocks[:, None] * E_PAD + experts[None, :]  # (BLOCK_B, E_PAD)
        c = tl.load(block_counts_ptr + ptrs, mask=mask, other=0)
        tl.store(block_base_ptr + ptrs, tl.cumsum(c, axis=0) - c + carry[None, :], mask=mask)
        carry += tl.sum(c, axis=0)
    counts = carry
    if HAS_CAPACITY:
        counts = tl.minimum(counts, capacity)
    offsets = tl.cumsum(counts, axis=0) - counts
    emask = experts < E
    tl.store(counts_ptr + experts, counts.to(counts_ptr.dtype.element_ty), mask=emask)
    tl.store(offsets_ptr + experts, offsets.to(offsets_ptr.dtype.element_ty), mask=emask)


@triton.jit
def _dest_kernel(ids_ptr, dest_ptr, block_base_ptr, offsets_ptr, N, capacity,
                 HAS_CAPACITY: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    ids = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    local = tl.load(dest_ptr + offs, mask=mask, other=0)  # written by the histogram kernel
    rank = tl.load(block_base_ptr + pid * E_PAD + ids, mask=mask, other=0) + local
    dest = tl.load(offsets_ptr + ids, mask=mask, other=0) + rank
    if HAS_CAPACITY:
        dest = tl.where(rank < capacity, dest, -1)
    tl.store(dest_ptr + offs, dest.to(dest_ptr.dtype.element_ty), mask=mask)


# --- launcher ---------------------------------------------------------------------------

def _check_args(expert_ids_TK: torch.Tensor, num_experts: int, capacity: int | None) -> None:
    check_ndim("expert_ids_TK", expert_ids_TK, 2, "T, K")
    check_dtype("expert_ids_TK", expert_ids_TK, INDEX_DTYPES)
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0, got {capacity!r}")


def route_metadata_triton(expert_ids_TK: torch.Tensor, num_experts: int,
                          capacity: int | None = None):
    """Triton version of :func:`route_metadata_ref`; same outputs (int64), bit for bit.

    Checks that every id lies in [0, num_experts) (one host sync).
    """
    _check_args(expert_ids_TK, num_experts, capacity)
    check_device("expert_ids_TK", expert_ids_TK)
    device = expert_ids_TK.device
    T, K = expert_ids_TK.shape
    N = T * K
    E = num_experts
    counts = torch.empty(E, dtype=torch.int64, device=device)
    offsets = torch.empty(E, dtype=torch.int64, device=device)
    dest = torch.empty(N, dtype=torch.int64, device=device)
    if N == 0:
        counts.zero_()
        offsets.zero_()
        return counts, offsets, dest.view(T, K)
    lo, hi = int(expert_ids_TK.min()), int(expert_ids_TK.max())
    if lo < 0 or hi >= E:
        raise ValueError(f"expert ids must lie in [0, {E}), got values in [{lo}, {hi}]")
    ids = expert_ids_TK.contiguous().view(-1)
    E_PAD = pow2(E, lo=2)
    # The one-hot tile is BLOCK x E_PAD; keep it near 8k elements on a GPU. The interpreter
    # pays per program, so it takes bigger tiles.
    budget = 1 << 16 if interpreting() else 1 << 13
    BLOCK = pow2(budget // E_PAD, lo=16, hi=1024)
    num_blocks = triton.cdiv(N, BLOCK)
    block_counts = torch.empty(num_blocks, E_PAD, dtype=torch.int32, device=device)
    block_base = torch.empty_like(block_counts)
    has_cap = capacity is not None
    cap = int(capacity) if has_cap else 0
    _block_histogram_kernel[(num_blocks,)](ids, dest, block_counts, N, BLOCK=BLOCK, E_PAD=E_PAD)
    BLOCK_B = pow2(budget // E_PAD, lo=16, hi=1024)
    _scan_kernel[(1,)](block_counts, block_base, counts, offsets, num_blocks, E, cap,
                       HAS_CAPACITY=has_cap, BLOCK_B=BLOCK_B, E_PAD=E_PAD)
    _dest_kernel[(num_blocks,)](ids, dest, block_base, offsets, N, cap,
                                HAS_CAPACITY=has_cap, BLOCK=BLOCK, E_PAD=E_PAD)
    return counts, offsets, dest.view(T, K)


# --- reference --------------------------------------------------------------------------

def route_metadata_ref(expert_ids_TK: torch.Tensor, num_experts: int,
                       capacity: int | None = None):
    """Per-expert counts, exclusive offsets, and each (token, k)'s destination row.

    Rows are expert-contiguous and, within an expert, ordered by flat index t * K + k
    (a stable sort). With ``capacity``, an expert keeps its first ``capacity`` rows in that
    order; the rest get ``dest = -1`` and are not counted. Returns int64 tensors
    ``counts_E``, ``offsets_E`` (exclusive prefix sum of counts) and ``dest_TK``.
    """
    flat = expert_ids_TK.reshape(-1).long()  # (T*K,)
    counts = torch.bincount(flat, minlength=num_experts)  # (E,) before capacity
    order = torch.argsort(flat, stable=True)  # (T*K,) flat index of each sorted row
    starts = torch.cumsum(counts, 0) - counts  # (E,)
    rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    rank = torch.empty_like(flat)
    rank[order] = rank_in_expert  # (T*K,) position of each (t, k) within its expert
    if capacity is not None:
        counts = counts.clamp(max=capacity)
    offsets = torch.cumsum(counts, 0) - counts
    dest = offsets[flat] + rank
    if capacity is not None:
        dest = torch.where(rank < capacity, dest, torch.full_like(dest, -1))
    return counts, offsets, dest.view_as(expert_ids_TK)
