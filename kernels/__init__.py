"""MoE token-dispatch kernels: routing metadata, permute, un-permute, grouped GEMM.

Knows nothing of Gato. Every op takes ``impl="torch" | "triton"``; ``"torch"`` is the
pure-PyTorch reference in ``kernels.reference`` (differentiable through autograd).
The Triton implementations are added beside their references.
"""

from kernels.reference import grouped_gemm_ref, permute_ref, route_metadata_ref, unpermute_ref

IMPLS = ("torch", "triton")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        raise NotImplementedError("the Triton kernels are not written yet")


def route_metadata(expert_ids_TK, num_experts, capacity=None, *, impl="torch"):
    _check_impl(impl)
    return route_metadata_ref(expert_ids_TK, num_experts, capacity)


def permute(x_TD, dest_TK, num_rows, *, impl="torch"):
    _check_impl(impl)
    return permute_ref(x_TD, dest_TK, num_rows)


def unpermute(y_RD, dest_TK, gates_TK, *, impl="torch"):
    _check_impl(impl)
    return unpermute_ref(y_RD, dest_TK, gates_TK)


def grouped_gemm(x_RD, w_EDF, counts_E, *, impl="torch"):
    _check_impl(impl)
    return grouped_gemm_ref(x_RD, w_EDF, counts_E)


__all__ = ["route_metadata", "permute", "unpermute", "grouped_gemm", "IMPLS"]
