"""The output head and its cross-entropy fused, in chunks of positions: no logits tensor.

A training step's head computes (N, V) logits, casts them to fp32 for the cross-entropy and
keeps them for the backward pass: the largest tensor of a small model's step (the gato
presets' 33k-id vocabulary, 32 sequences of 576 positions: 2.4 GB of fp32 logits). Here
the positions go through the head a chunk at a time; each chunk's logits live only while
its loss and its gradients are computed, in the forward pass, since the loss is the output
(the gradients with respect to the hidden states and the head's rows are stored, and the
backward pass only scales them by the incoming gradient). Three GEMMs per chunk, as the
unfused head; no read back to the host and shapes fixed by N, so a GPU step stays sync-free.

Shape letters: N positions, D width, V vocabulary (head rows), n positions of a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: fp32 logits elements of one chunk (16 MiB): small enough to stay in a CPU's caches'
#: reach and a GPU's allocator's free lists, large enough for full-width GEMMs
CHUNK_ELEMENTS = 1 << 22


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_VD, targets_N, weight_N, chunk):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N = x_ND.shape[0]
        dtype = x_ND.dtype
        w_cast_VD = w_VD.to(dtype)
        nll_N = torch.empty(N, dtype=torch.float32, device=x_ND.device)
        grad_x_ND = torch.empty_like(x_ND) if need_x else None
        grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) \
            if need_w else None
        for a in range(0, N, chunk):
            x_nD = x_ND[a:a + chunk]
            logits_nV = (x_nD @ w_cast_VD.t()).float()
            lse_n = torch.logsumexp(logits_nV, dim=-1)
            t_n = targets_N[a:a + chunk]
            nll_N[a:a + chunk] = lse_n - logits_nV.gather(1, t_n[:, None]).squeeze(1)
            if not (need_x or need_w):
                continue
            # d(sum_i w_i nll_i) / d logits = w_i (softmax_i - onehot(t_i)), in place
            grad_nV = logits_nV.sub_(lse_n[:, None]).exp_()
            grad_nV.scatter_add_(1, t_n[:, None], grad_nV.new_full((len(t_n), 1), -1.0))
            grad_nV.mul_(weight_N[a:a + chunk, None].float())
            grad_nV = grad_nV.to(dtype)
            if need_x:
                torch.mm(grad_nV, w_cast_VD, out=grad_x_ND[a:a + chunk])
            if need_w:  # accumulated in fp32 over the chunks
                grad_w_VD.addmm_(grad_nV.t().float(), x_nD.float())
        ctx.save_for_backward(grad_x_ND, grad_w_VD)  # None where not needed
        ctx.w_dtype = w_VD.dtype
        ctx.mark_non_differentiable(nll_N)
        return (nll_N * weight_N.float()).sum(), nll_N

    @staticmethod
    def backward(ctx, grad_sum, grad_nll):
        grad_x_ND, grad_w_VD = ctx.saved_tensors
        dx = dw = None
        if grad_x_ND is not None:
            dx = grad_x_ND * grad_sum.to(grad_x_ND.dtype)
        if grad_w_VD is not None:
            dw = (grad_w_VD * grad_sum).to(ctx.w_dtype)
        return dx, dw, None, None, None


def fused_linear_cross_entropy(x_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                               weight_N: torch.Tensor, *, chunk: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i weight_i * nll_i, nll_N) for logits ``x_ND @ w_VD.T`` and ``targets_N``, without
    a logits tensor (module docstring). The sum is differentiable with respect to ``x_ND``
    and ``w_VD``; ``nll_N`` (fp32) is not (it is for metrics: per-kind losses). ``chunk``:
    positions per chunk (default: ``CHUNK_ELEMENTS`` logits). Under CUDA autocast the GEMMs
    run in its dtype, as the unfused head's would."""
    if x_ND.dim() != 2 or w_VD.dim() != 2 or x_ND.shape[1] != w_VD.shape[1]:
        raise ValueError(f"x must be (N, D) and w (V, D), got {tuple(x_ND.shape)} and "
                         f"{tuple(w_VD.shape)}")
    chunk = int(chunk or max(1, CHUNK_ELEMENTS // w_VD.shape[0]))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if x_ND.is_cuda and torch.is_autocast_enabled("cuda"):
        x_ND = x_ND.to(torch.get_autocast_dtype("cuda"))
    with torch.autocast(x_ND.device.type, enabled=False):
        return _FusedLinearCrossEntropy.apply(x_ND, w_VD, targets_N, weight_N, chunk)


def reference_linear_cross_entropy(x_ND, w_VD, targets_N, weight_N):
    """The unfused head: what ``fused_linear_cross_entropy`` equals (tests)."""
    nll_N = F.cross_entropy((x_ND @ w_VD.t()).float(), targets_N, reduction="none")
    return (nll_N * weight_N.float()).sum(), nll_N.detach()
