"""Expert parallelism: each rank of an expert-parallel group holds E / P experts of every
modality group and exchanges tokens with all-to-all.

Shape letters: t tokens of one group on this rank, K experts per token, D width, F expert
hidden, E experts of the group, P ranks of the expert-parallel group, e = E / P local
experts, R rows sent (t * K), S rows received.

Forward for one group on one rank: route (replicated router, global expert ids), permute
the (token, k) slots into expert-contiguous rows — which are also rank-contiguous —,
all-to-all the per-expert counts and then the rows, reorder the received rows from
source-major to local-expert-major, run the local experts (grouped GEMMs), undo the
reorder, all-to-all the rows back, and combine with the gates. The all-to-alls are
differentiable (``torch.distributed.nn.functional.all_to_all_single``), so backward sends
gradients back along the same routes.

Gradients: the trainer normalises every rank's loss by the global target count times the
number of ranks, so shared parameters are all-reduced and divided by the world size, and
expert parameters — which already received the gradient of every rank of their
expert-parallel group through the all-to-all — are summed over the ranks that hold the same
experts (the expert-data-parallel group) and divided by the world size.

Applied from the training code (``shard_experts``); the model stays a single-device module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from moe_gato.model.moe import ModalityRoutedMoE


class ExpertParallelFFN:
    """Replaces ``moe_gato.model.dispatch.expert_ffn`` for one expert group."""

    def __init__(self, group: dist.ProcessGroup, size: int, rank: int, impl: str):
        self.group, self.size, self.rank, self.impl = group, size, rank, impl

    def __call__(self, x_tD: torch.Tensor, expert_ids_tK: torch.Tensor, gates_tK: torch.Tensor,
                 w1_eDF: torch.Tensor, w2_eFD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.distributed.nn.functional import all_to_all_single

        P, e = self.size, w1_eDF.shape[0]
        E = P * e
        t, K = expert_ids_tK.shape
        counts_E, _, dest_tK = kernels.route_metadata(expert_ids_tK, E, None, impl=self.impl)
        x_RD = kernels.permute(x_tD, dest_tK, t * K, impl=self.impl)
        # counts: (P, e) to send -> (P, e) received, row p = what source rank p sends here
        recv_Pe = torch.empty_like(counts_E.view(P, e))
        dist.all_to_all_single(recv_Pe, counts_E.view(P, e).contiguous(), group=self.group)
        send_splits = counts_E.view(P, e).sum(1).tolist()
        recv_splits = recv_Pe.sum(1).tolist()
        x_SD = all_to_all_single(x_RD.new_empty(sum(recv_splits), x_RD.shape[1]), x_RD,
                                 recv_splits, send_splits, group=self.group)
        # source-major -> local-expert-major (stable: sources stay in rank order)
        local_expert_S = torch.repeat_interleave(
            torch.arange(e, device=x_SD.device).repeat(P), recv_Pe.reshape(-1))
        order_S = torch.argsort(local_expert_S, stable=True)
        counts_e = recv_Pe.sum(0)
        h_SF = F.gelu(kernels.grouped_gemm(x_SD[order_S], w1_eDF, counts_e, impl=self.impl))
        y_sorted_SD = kernels.grouped_gemm(h_SF, w2_eFD, counts_e, impl=self.impl)
        y_SD = torch.empty_like(y_sorted_SD).index_copy(0, order_S, y_sorted_SD)
        y_RD = all_to_all_single(y_SD.new_empty(t * K, y_SD.shape[1]), y_SD,
                                 send_splits, recv_splits, group=self.group)
        y_tD = kernels.unpermute(y_RD, dest_tK, gates_tK, impl=self.impl)
        return y_tD, counts_E


def expert_parallel_groups(size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup, int]:
    """(expert-parallel group of this rank, expert-data-parallel group, rank within the
    expert-parallel group). Expert-parallel groups are blocks of ``size`` consecutive ranks;
    ranks at the same offset of different blocks hold the same experts."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_group = edp_group = None
    for start in range(0, world, size):  # every rank must create every group
        g = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            ep_group = g
    for offset in range(size):
        g = dist.new_group(list(range(offset, world, size)))
        if rank % size == offset:
            edp_group = g
    return ep_group, edp_group, rank % size


def shard_experts(model: torch.nn.Module, size: int) -> None:
    """Keeps this rank's E / size experts of every group (weights were initialised
    identically on every rank from the same seed) and installs the all-to-all dispatch."""
    if not dist.is_initialized():
        raise ValueError("expert_parallel_size > 1 needs several processes (torchrun or deepspeed)")
    moes = [m for m in model.modules() if isinstance(m, ModalityRoutedMoE)]
    if not moes:
        raise ValueError("expert_parallel_size > 1 needs a model with ffn: moe")
    if moes[0].moe.capacity_factor is not None:
        raise ValueError("expert parallelism is dropless: set model.moe.capacity_factor to null")
    ep_group, edp_group, ep_rank = expert_parallel_groups(size)
    for moe in moes:
        for name, group in moe.groups.items():
            E = group.num_experts
            if E % size:
                raise ValueError(f"group {name!r} has {E} experts, not divisible by "
                                 f"expert_parallel_size {size}")
            e = E // size
            sl = slice(ep_rank * e, (ep_rank + 1) * e)
            group.w1_EDF = torch.nn.Parameter(group.w1_EDF.data[sl].clone())
            group.w2_EFD = torch.nn.Parameter(group.w2_EFD.data[sl].clone())
            for p in (group.w1_EDF, group.w2_EFD):
                p.expert_parallel = True
            group.expert_parallel = ExpertParallelFFN(ep_group, size, ep_rank, moe.moe.impl)
    model.expert_data_parallel_group = edp_group


def all_reduce_gradients(model: torch.nn.Module, world: int) -> None:
    """Averages shared gradients over all ranks and expert gradients over the ranks that
    hold the same experts (both divided by the world size; see the module docstring)."""
    edp = getattr(model, "expert_data_parallel_group", None)
    shared = [p.grad for p in model.parameters()
              if p.grad is not None and not getattr(p, "expert_parallel", False)]
    experts = [p.grad for p in model.parameters()
               if p.grad is not None and getattr(p, "expert_parallel", False)]
    for grads, group in ((shared, None), (experts, edp)):
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clips by the norm of the *whole* model's gradient: shared gradients (the same on every
    rank after the all-reduce) plus every expert shard of the expert-parallel group. Returns
    the norm before clipping as a device tensor: nothing is read back (foreach kernels, the
    clip factor applied on the device, 1 when under ``max_norm``)."""
    shared = [p.grad for p in model.parameters()
              if p.grad is not None and not getattr(p, "expert_parallel", False)]
    experts = [p.grad for p in model.parameters()
               if p.grad is not None and getattr(p, "expert_parallel", False)]

    def square_sum(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=_device(model))
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().sum()

    sq_shared, sq_experts = square_sum(shared), square_sum(experts)
    ep_group = next((m.expert_parallel.group for m in model.modules()
                     if getattr(m, "expert_parallel", None) is not None), None)
    if ep_group is not None:
        dist.all_reduce(sq_experts, group=ep_group)
    norm = (sq_shared + sq_experts).sqrt()
    if max_norm > 0 and shared + experts:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(shared + experts, coef.to(shared[0].dtype if shared else experts[0].dtype))
    return norm


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _expert_keys(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict: expert shards gathered over the expert-parallel group (a
    collective: every rank calls it)."""
    state = dict(model.state_dict())
    group = next(m.expert_parallel.group for m in model.modules()
                 if getattr(m, "expert_parallel", None) is not None)
    size = dist.get_world_size(group)
    for name, p in _expert_keys(model).items():
        parts = [torch.empty_like(p.data) for _ in range(size)]
        dist.all_gather(parts, p.data.contiguous(), group=group)
        state[name] = torch.cat(parts)
    return state


def local_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of an unsharded state dict (its slice of every expert stack)."""
    out = dict(full)
    experts = _expert_keys(model)
    for module in model.modules():
        ep = getattr(module, "expert_parallel", None)
        if ep is None:
            continue
        for name, p in experts.items():
            if name not in full:
                raise ValueError(f"checkpoint has no {name}")
            e = p.shape[0]
            if full[name].shape[0] != e * ep.size:
                raise ValueError(f"checkpoint {name} has {full[name].shape[0]} experts, the model "
                                 f"{e * ep.size}")
            out[name] = full[name][ep.rank * e:(ep.rank + 1) * e].clone()
        break
    return out
