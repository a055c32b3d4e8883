"""MoE token-dispatch kernels: routing metadata, permute, un-permute, grouped GEMM.

Knows nothing of Gato; this module is the one dispatch point. Every op takes
``impl="torch" | "triton"``:

- ``"torch"``: the pure-PyTorch references (differentiable through ordinary autograd).
- ``"triton"``: the ``@triton.jit`` kernels behind ``torch.autograd.Function`` wrappers
  (permute <-> un-permute, grouped GEMM -> dX and dW grouped GEMMs).

Shape letters: T tokens, K top-k slots per token, D width, F output width, E experts,
R rows of the expert-contiguous (permuted) buffer.

Interpreter mode: when no CUDA device is present, importing ``kernels`` sets
``TRITON_INTERPRET=1`` (``os.environ.setdefault``, so an explicit value wins) before Triton
is imported, and the Triton path then runs as Triton's CPU interpreter on CPU tensors.
With a GPU nothing is changed and the kernels are compiled (they need CUDA tensors).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.grouped_matmul import ACTIVATIONS, GroupedGemm, grouped_gemm_ref  # noqa: E402
from kernels.permutation import Permute, Unpermute, permute_ref, unpermute_ref  # noqa: E402
from kernels.routing import route_metadata_ref, route_metadata_triton  # noqa: E402

IMPLS = ("torch", "triton")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def route_metadata(expert_ids_TK, num_experts, capacity=None, *, impl="torch"):
    """-> (counts_E, offsets_E, dest_TK), int64. Rows are expert-contiguous, ordered by
    t * K + k within an expert; with ``capacity`` an expert keeps its first ``capacity``
    rows, the rest get dest -1 and are not counted."""
    _check_impl(impl)
    if impl == "triton":
        return route_metadata_triton(expert_ids_TK, num_experts, capacity)
    return route_metadata_ref(expert_ids_TK, num_experts, capacity)


def permute(x_TD, dest_TK, num_rows, *, impl="torch"):
    """-> x_RD with x_RD[dest[t, k]] = x_TD[t]; rows nobody writes are zero."""
    _check_impl(impl)
    if impl == "triton":
        return Permute.apply(x_TD, dest_TK, num_rows)
    return permute_ref(x_TD, dest_TK, num_rows)


def unpermute(y_RD, dest_TK, gates_TK, *, impl="torch"):
    """-> y_TD[t] = sum_k gates[t, k] * y_RD[dest[t, k]]; dropped slots (dest -1) add zero."""
    _check_impl(impl)
    if impl == "triton":
        return Unpermute.apply(y_RD, dest_TK, gates_TK)
    return unpermute_ref(y_RD, dest_TK, gates_TK)


def grouped_gemm(x_RD, w_EDF, counts_E, *, activation=None, impl="torch"):
    """-> y_RF[rows of e] = act(x_RD[rows of e] @ w_EDF[e]); rows past counts.sum() are zero.

    ``activation``: None, ``"gelu"`` (exact erf GELU) or ``"swiglu"``: F = 2H, the first
    H columns of w are the gate, the last H the up projection, and the output is (R, H)
    = silu(x @ w_gate) * (x @ w_up). Fused into the GEMM epilogue on the Triton path.
    """
    _check_impl(impl)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if impl == "triton":
        return GroupedGemm.apply(x_RD, w_EDF, counts_E, activation)
    return grouped_gemm_ref(x_RD, w_EDF, counts_E, activation)


__all__ = ["route_metadata", "permute", "unpermute", "grouped_gemm", "IMPLS", "ACTIVATIONS",
           "route_metadata_ref", "permute_ref", "unpermute_ref", "grouped_gemm_ref"]
