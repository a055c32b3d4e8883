"""Expert FFN over routed tokens: the one place the model calls ``kernels`` (``impl``).

Shape letters: T tokens of one modality group, K experts per token (top_k * granularity),
D width, F expert hidden width, E experts of the group, R rows of the expert-contiguous
(permuted) buffer.

Dropless (``capacity=None``): R = T * K, every (token, k) slot gets a row. With a capacity
C per expert, R = E * C; an expert keeps its first C slots in token order and the rest
are dropped (their gate contributes zero).

Expert GEMMs (``gemm``): ``"grouped"`` calls ``kernels.grouped_gemm`` on the packed rows;
``"padded"`` lays each expert's rows out at a fixed stride C' = max rows of any expert
(same ``route_metadata`` / ``permute`` / ``unpermute`` calls, destinations shifted to
``e * C' + rank``) and runs two ``torch.bmm``. On CPU torch's grouped_mm loops over
per-expert ``mm`` calls and its backward is ~6x slower than one ``bmm`` of equal FLOPs
(profiled in benchmarks/bench_moe_layer.py), so ``"auto"`` pads when the padding costs at
most ``PAD_WASTE`` extra rows and the kernels are the torch reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kernels

PAD_WASTE = 0.5  # "auto" pads when E * max_rows <= (1 + PAD_WASTE) * used rows


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
    kept_E, _, dest_TK = kernels.route_metadata(expert_ids_TK, E, capacity, impl=impl)
    if gemm != "grouped":
        max_rows = int(kept_E.max())
        if gemm == "padded" or (impl == "torch" and
                                E * max_rows <= (1 + PAD_WASTE) * int(kept_E.sum())):
            return _padded_ffn(x_TD, dest_TK, gates_TK, kept_E, w1_EDF, w2_EFD, max_rows,
                               impl), kept_E
    num_rows = T * K if capacity is None else E * capacity
    x_RD = kernels.permute(x_TD, dest_TK, num_rows, impl=impl)
    h_RF = kernels.grouped_gemm(x_RD, w1_EDF, kept_E, activation="gelu", impl=impl)
    y_RD = kernels.grouped_gemm(h_RF, w2_EFD, kept_E, impl=impl)
    y_TD = kernels.unpermute(y_RD, dest_TK, gates_TK, impl=impl)
    return y_TD, kept_E


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
