"""Expert FFN over routed tokens: the one place the model calls ``kernels`` (``impl``).

Shape letters: T tokens of one modality group, K experts per token (top_k * granularity),
D width, F expert hidden width, E experts of the group, R rows of the expert-contiguous
(permuted) buffer, N = T * K flat (token, k) slots.

Dropless (``capacity=None``): every (token, k) slot gets a row. With a capacity C per
expert, an expert keeps its first C slots in token order and the rest are dropped (their
gate contributes zero).

Paths (``gemm``; see also ``MoEConfig.gemm``):

- ``"auto"`` with ``impl="torch"``: ``_ExpertFFN``, one ``autograd.Function`` for
  permute -> up -> GELU -> down -> gate-weighted un-permute with a hand-written backward.
  One stable argsort gives the expert-contiguous order of the slots; the forward gathers
  x rows with ``index_select``, runs one ``mm`` per expert on its contiguous slice (no
  padding; capacity drops are simply not computed) and combines with one ``index_add_``;
  the backward reuses the same order for the gathers / ``index_add_`` and writes the dX
  and dW GEMMs per expert. Why (profiled on 2 AMD EPYC cores, bench_moe_layer.py):
  autograd through the references spent ~30% of the layer in gather / index_put / fill /
  mul / sum for the (T, K, D) combine and its scatter-add backward; torch's CPU
  ``grouped_mm`` backward is ~6x slower than one ``bmm`` of equal FLOPs; and a padded
  ``bmm`` computes the load imbalance (max / mean expert load 1.2-1.5x at E=64): per
  expert ``mm`` measured 1.1-1.3x the padded path and 1.05-1.2x the reference path. What
  is left (1 thread, T=16384, D=256, E=64, K=4): ~70% per-expert GEMMs, which at F / K =
  256 run ~1.4x slower than the dense FFN's one big GEMM, ~7% row gathers, ~6% gate
  multiplies, ~8% GELU and its backward (as in the dense FFN).
- ``"auto"`` with ``impl="triton"``, and ``"grouped"``: the ``kernels`` ops
  (``route_metadata`` / ``permute`` / ``grouped_gemm`` / ``unpermute``), differentiated by
  autograd (the references) or by the Triton autograd wrappers.
- ``"padded"``: the same ``kernels`` calls with each expert's rows at a fixed stride
  C' = max rows of any expert (destinations shifted to ``e * C' + rank``) and two
  ``torch.bmm``.

Every group at once without host reads (``expert_ffn_columns``, the GPU training path of
``MoEConfig.dispatch``): all groups' experts stacked in one column space, per-column counts
and offsets computed and kept on the device, ``F.grouped_mm`` fed the device offsets; every
shape is fixed by T and K, so nothing waits for the data.

Inference with few tokens (``expert_ffn_few``, no autograd): the experts of all groups in
one column space ``c`` (group g's expert e is column ``offsets[g] + e``), one ``mm`` per used
(column, projection) on a view of the stacked weights. A batch-1 decode step streams the
chosen experts' weights from memory once; gathering them into a (T * K, D, F) buffer for one
``bmm`` copies them first (see benchmarks/RESULTS.md, "MoE inference fast path").
"""

from __future__ import annotations

import bisect
import itertools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import kernels
from kernels.grouped_matmul import per_expert_mm, per_expert_mm_backward


def expert_capacity(num_tokens: int, top_k: int, num_experts: int,
                    capacity_factor: float | None) -> int | None:
    """Rows per expert in capacity mode, ``ceil(factor * T * K / E)``; None when dropless."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def expert_ffn(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor,
               w1_EDF: torch.Tensor, w2_EFD: torch.Tensor, *, capacity: int | None,
               impl: str, gemm: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """y_TD[t] = sum_k gates[t, k] * FFN_{expert[t, k]}(x_TD[t]); returns (y_TD, kept_E),
    where kept_E counts the slots each expert processed (after capacity)."""
    T, K = expert_ids_TK.shape
    E = w1_EDF.shape[0]
    if gemm == "auto" and impl == "torch":
        slot_R, kept_E = sorted_slots(expert_ids_TK, E, capacity)
        y_TD = _ExpertFFN.apply(x_TD, gates_TK, w1_EDF, w2_EFD, slot_R, kept_E.tolist())
        return y_TD, kept_E
    kept_E, _, dest_TK = kernels.route_metadata(expert_ids_TK, E, capacity, impl=impl)
    if gemm == "padded":
        return _padded_ffn(x_TD, dest_TK, gates_TK, kept_E, w1_EDF, w2_EFD,
                           int(kept_E.max()), impl), kept_E
    num_rows = T * K if capacity is None else E * capacity
    x_RD = kernels.permute(x_TD, dest_TK, num_rows, impl=impl)
    h_RF = kernels.grouped_gemm(x_RD, w1_EDF, kept_E, activation="gelu", impl=impl)
    y_RD = kernels.grouped_gemm(h_RF, w2_EFD, kept_E, impl=impl)
    y_TD = kernels.unpermute(y_RD, dest_TK, gates_TK, impl=impl)
    return y_TD, kept_E


def expert_ffn_columns(x_TD: torch.Tensor, cols_TK: torch.Tensor, gates_TK: torch.Tensor,
                       w1_CDF: torch.Tensor, w2_CFD: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum_k gates[t, k] * FFN_c(x_TD[t]), c = cols_TK[t, k] a column of the stacked
    experts ``w1_CDF`` / ``w2_CFD``; dropless, differentiable, no host read: rows in
    column-contiguous order (a stable sort of the T * K slots), device offsets for the grouped
    GEMMs. Under CUDA autocast the GEMMs run in its dtype (``grouped_mm`` takes bf16 there)."""
    T, K = cols_TK.shape
    C = w1_CDF.shape[0]
    flat_N = cols_TK.reshape(-1)
    slot_R = torch.argsort(flat_N, stable=True)                      # (R,) R = T * K
    counts_C = torch.zeros(C, dtype=torch.int32, device=flat_N.device).index_add_(
        0, flat_N, torch.ones_like(flat_N, dtype=torch.int32))
    offs_C = counts_C.cumsum(0, dtype=torch.int32)
    token_R = slot_R // K
    x_RD = x_TD.index_select(0, token_R)
    if x_TD.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x_RD, w1_CDF, w2_CFD = x_RD.to(dtype), w1_CDF.to(dtype), w2_CFD.to(dtype)
    h_RF = F.gelu(F.grouped_mm(x_RD, w1_CDF, offs=offs_C))
    y_RD = F.grouped_mm(h_RF, w2_CFD, offs=offs_C)
    gate_R = gates_TK.reshape(-1).index_select(0, slot_R).to(y_RD.dtype)
    return x_TD.new_zeros(T, x_TD.shape[1], dtype=y_RD.dtype).index_add(
        0, token_R, y_RD * gate_R[:, None]).to(x_TD.dtype)


def expert_ffn_few(x_TD: torch.Tensor, cols_TK: torch.Tensor, gates_TK: torch.Tensor,
                   w1_EDF: list[torch.Tensor], w2_EFD: list[torch.Tensor],
                   offsets: list[int]) -> torch.Tensor:
    """y_TD[t] = sum_k gates[t, k] * FFN_c(x_TD[t]) with c = cols_TK[t, k], where column c
    is expert ``c - offsets[g]`` of ``w1_EDF[g]`` / ``w2_EFD[g]`` for the g with
    ``offsets[g] <= c < offsets[g + 1]`` (``offsets`` has one entry more than the lists; all
    experts share one hidden width F). Dropless, no autograd, for few tokens: one ``mm`` per
    used (column, projection), one GELU over all slots."""
    T, K = cols_TK.shape
    if T == 1:  # decode: the K slots of one token, in k order (distinct columns)
        runs = [(c, k, k + 1) for k, c in enumerate(cols_TK[0].tolist())]
        x_ND = x_TD.new_empty(K, x_TD.shape[1])  # only its shape is used: x rows are x_TD
    else:  # slots in column-contiguous order
        flat_N = cols_TK.reshape(-1)
        slot_N = torch.argsort(flat_N, stable=True)
        token_N = slot_N // K
        counts = torch.bincount(flat_N, minlength=offsets[-1]).tolist()
        ends = itertools.accumulate(counts)
        runs = [(c, end - n, end) for c, (n, end) in enumerate(zip(counts, ends)) if n]
        x_ND = x_TD.index_select(0, token_N)
    h_NF = x_ND.new_empty(x_ND.shape[0], w1_EDF[0].shape[2])
    weights = []
    for c, a, b in runs:
        g = bisect.bisect_right(offsets, c) - 1
        w1_DF, w2_FD = w1_EDF[g][c - offsets[g]], w2_EFD[g][c - offsets[g]]
        torch.mm(x_TD if T == 1 else x_ND[a:b], w1_DF, out=h_NF[a:b])
        weights.append(w2_FD)
    h_NF = F.gelu(h_NF)
    y_ND = torch.empty_like(x_ND)
    for (c, a, b), w2_FD in zip(runs, weights):
        torch.mm(h_NF[a:b], w2_FD, out=y_ND[a:b])
    if T == 1:
        return torch.mm(gates_TK.to(y_ND.dtype), y_ND)  # (1, D)
    y_ND.mul_(gates_TK.reshape(-1).index_select(0, slot_N).to(y_ND.dtype)[:, None])
    return x_TD.new_zeros(x_TD.shape).index_add_(0, token_N, y_ND)


def sorted_slots(expert_ids_TK: torch.Tensor, num_experts: int, capacity: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (slot_R, kept_E): the flat slots t * K + k that are kept, in the expert-contiguous
    order of ``kernels.route_metadata`` (by expert, then by slot), and each expert's kept
    count. Row r of the permuted buffer is slot ``slot_R[r]``: the inverse of its dest."""
    flat_N = expert_ids_TK.reshape(-1)
    slot_R = torch.argsort(flat_N, stable=True)  # (N,)
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    if capacity is None or int(counts_E.max()) <= capacity:
        return slot_R, counts_E
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_R = torch.arange(slot_R.numel(), device=slot_R.device) - starts_E[flat_N[slot_R]]
    return slot_R[rank_R < capacity], counts_E.clamp(max=capacity)


class _ExpertFFN(torch.autograd.Function):
    """y_TD = sum over kept rows r of gate_r * gelu(x_TD[token_r] @ w1[e_r]) @ w2[e_r],
    rows expert-contiguous (``counts`` rows per expert, a Python list: the per-expert
    slices are host-side anyway on CPU)."""

    @staticmethod
    def forward(ctx, x_TD, gates_TK, w1_EDF, w2_EFD, slot_R, counts):
        T, K = gates_TK.shape
        token_R = slot_R // K  # (R,)
        gate_R = gates_TK.reshape(-1).index_select(0, slot_R).to(x_TD.dtype)  # (R,)
        x_RD = x_TD.index_select(0, token_R)
        pre_RF = per_expert_mm(x_RD, w1_EDF, counts)
        h_RF = F.gelu(pre_RF)
        y_RD = per_expert_mm(h_RF, w2_EFD, counts)
        out_TD = x_TD.new_zeros(T, y_RD.shape[1]).index_add_(0, token_R, y_RD * gate_R[:, None])
        ctx.save_for_backward(x_RD, pre_RF, h_RF, y_RD, w1_EDF, w2_EFD, slot_R, token_R, gate_R)
        ctx.counts, ctx.T, ctx.K, ctx.gates_dtype = counts, T, K, gates_TK.dtype
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_TD):
        x_RD, pre_RF, h_RF, y_RD, w1_EDF, w2_EFD, slot_R, token_R, gate_R = ctx.saved_tensors
        counts, T, K = ctx.counts, ctx.T, ctx.K
        dout_RD = dout_TD.index_select(0, token_R)  # (R, D)
        dgates_TK = None
        if ctx.needs_input_grad[1]:
            dgate_R = torch.linalg.vecdot(dout_RD, y_RD)  # (R,) row dots, no (R, D) temporary
            dgates_TK = dout_TD.new_zeros(T * K, dtype=ctx.gates_dtype).index_copy_(
                0, slot_R, dgate_R.to(ctx.gates_dtype)).view(T, K)  # dropped slots get zero
        dy_RD = dout_RD.mul_(gate_R[:, None])
        dh_RF, dw2_EFD = per_expert_mm_backward(h_RF, dy_RD, w2_EFD, counts)
        dpre_RF = torch.ops.aten.gelu_backward(dh_RF, pre_RF)
        dx_RD, dw1_EDF = per_expert_mm_backward(x_RD, dpre_RF, w1_EDF, counts)
        dx_TD = dout_TD.new_zeros(T, x_RD.shape[1]).index_add_(0, token_R, dx_RD)
        return dx_TD, dgates_TK, dw1_EDF, dw2_EFD, None, None


def _padded_ffn(x_TD, dest_TK, gates_TK, kept_E, w1_EDF, w2_EFD, max_rows: int, impl: str):
    E, D = w1_EDF.shape[:2]
    offsets_E = torch.cumsum(kept_E, 0) - kept_E
    expert_TK = torch.searchsorted(torch.cumsum(kept_E, 0), dest_TK, right=True)
    expert_TK = expert_TK.clamp(max=E - 1)  # dropped slots (dest -1) stay dropped below
    padded_TK = torch.where(dest_TK >= 0, expert_TK * max_rows + dest_TK - offsets_E[expert_TK],
                            dest_TK)
    x_ECD = kernels.permute(x_TD, padded_TK, E * max_rows, impl=impl).view(E, max_rows, D)
    h_ECF = F.gelu(torch.bmm(x_ECD, w1_EDF))
    y_ECD = torch.bmm(h_ECF, w2_EFD)  # (E, C', D)
    return kernels.unpermute(y_ECD.view(E * max_rows, D), padded_TK, gates_TK, impl=impl)
