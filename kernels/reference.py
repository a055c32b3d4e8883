"""Pure-PyTorch references for MoE token dispatch (the ``impl="torch"`` path).

Shape letters: T tokens, K top-k slots per token, D width, F output width, E experts,
R rows of the expert-contiguous (permuted) buffer.

Everything here is differentiable through ordinary autograd (indexing, ``index_add``,
``F.grouped_mm``), so these functions double as the reference the Triton kernels are
checked against, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def grouped_gemm_ref(x_RD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of e] @ w[e] for expert-contiguous rows; rows past
    ``counts_E.sum()`` (capacity padding) come out zero."""
    offs = torch.cumsum(counts_E, 0).to(torch.int32)  # (E,) inclusive ends
    used = int(offs[-1]) if offs.numel() else 0
    if _grouped_mm_ok(x_RD, w_EDF):
        y = F.grouped_mm(x_RD[:used], w_EDF, offs=offs)  # (used, F)
    else:  # grouped_mm wants 16-byte aligned rows; odd widths go expert by expert
        pieces = torch.split(x_RD[:used], counts_E.tolist())
        y = torch.cat([p @ w_EDF[e] for e, p in enumerate(pieces)])
    if used == x_RD.shape[0]:
        return y
    return torch.cat([y, y.new_zeros(x_RD.shape[0] - used, y.shape[1])])


def _grouped_mm_ok(x_RD: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    size = x_RD.element_size()
    return (x_RD.dtype == w_EDF.dtype and x_RD.dtype in (torch.float32, torch.bfloat16)
            and (x_RD.shape[1] * size) % 16 == 0 and (w_EDF.shape[2] * size) % 16 == 0)
