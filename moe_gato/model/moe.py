"""Modality-routed mixture of experts: each token kind's group has its own router and experts.

Shape letters: T tokens (all kinds), t tokens of one group, D width, F expert hidden
width, E experts of a group, K experts per token (top_k * granularity).

Per group: router logits in fp32, softmax, top-K (optionally on probabilities plus a
DeepSeek-V3 balancing bias that only steers selection), optional renormalisation of the
chosen gates, dropless or capacity dispatch, optional shared expert. A token only ever
reaches experts of its own group. Expert weights are stacked parameters ``w1_EDF`` /
``w2_EFD`` per group, so an expert-parallel wrapper can shard them along E.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_gato.model.config import ModelConfig
from moe_gato.model.dispatch import expert_capacity, expert_ffn
from moe_gato.tokenizer.layout import Kind


@dataclasses.dataclass
class GroupRouting:
    """What one group's router did in one layer (tensors; detached except the losses)."""

    token_index_t: torch.Tensor   # (t,) flat (b * L + l) positions routed in this group
    expert_ids_tK: torch.Tensor   # (t, K) chosen experts
    load_E: torch.Tensor          # (E,) slots routed to each expert, before capacity
    dropped: torch.Tensor         # () slots dropped by capacity (0 when dropless)
    aux_loss: torch.Tensor        # () Switch balancing loss (unscaled), differentiable
    z_loss: torch.Tensor          # () router z-loss (unscaled), differentiable


class FeedForward(nn.Module):
    """The dense FFN: D -> F -> D with GELU, no biases."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ExpertGroup(nn.Module):
    """One modality group: router, E stacked experts, optional shared expert."""

    def __init__(self, d_model: int, hidden: int, num_experts: int, shared: bool):
        super().__init__()
        self.router_ED = nn.Parameter(torch.empty(num_experts, d_model))
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.register_buffer("expert_bias_E", torch.zeros(num_experts))
        self.shared = FeedForward(d_model, hidden) if shared else None
        #: set by moe_gato.train.expert_parallel.shard_experts: this rank then holds E / P
        #: experts and exchanges tokens with all-to-all instead of calling expert_ffn
        self.expert_parallel = None

    @property
    def num_experts(self) -> int:
        """All experts of the group (the router's rows), also under expert parallelism."""
        return self.router_ED.shape[0]


class ModalityRoutedMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.moe = cfg.moe
        self.groups = nn.ModuleDict({
            name: ExpertGroup(cfg.d_model, cfg.expert_hidden, cfg.moe.num_experts_of(name),
                              cfg.moe.shared_expert)
            for name in cfg.moe.groups})
        names = list(cfg.moe.groups)
        self.register_buffer("group_of_kind", torch.tensor(
            [names.index(cfg.moe.group_of(k)) for k in Kind]), persistent=False)

    def forward(self, x_TD: torch.Tensor, kinds_T: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, GroupRouting]]:
        group_T = self.group_of_kind[kinds_T]
        # While gradients are recorded every group runs, with or without tokens, so that the
        # backward graph has the same shape on every rank: expert parallelism needs every
        # rank in every exchange, and reductions that bucket gradients in the order they
        # become ready (ZeRO-2) would otherwise mix up parameters between ranks.
        uniform = torch.is_grad_enabled() or any(
            g.expert_parallel is not None for g in self.groups.values())
        y_TD, routing = None, {}
        for g, (name, group) in enumerate(self.groups.items()):
            index_t = (group_T == g).nonzero().squeeze(1)  # (t,)
            if index_t.numel() == 0 and not uniform:
                continue
            whole = index_t.numel() == x_TD.shape[0] and not uniform  # skip gather/scatter
            x_tD = x_TD if whole else x_TD.index_select(0, index_t)
            y_tD, group_routing = self._route(group, x_tD, index_t)
            if index_t.numel():
                routing[name] = group_routing
            if whole:
                return y_tD, routing
            if y_TD is None:
                y_TD = x_TD.new_zeros(x_TD.shape)
            y_TD = y_TD.index_copy(0, index_t, y_tD)
        return y_TD, routing

    def _route(self, group: ExpertGroup, x_tD: torch.Tensor, index_t: torch.Tensor
               ) -> tuple[torch.Tensor, GroupRouting]:
        cfg, E, K = self.moe, group.num_experts, self.moe.experts_per_token
        logits_tE = x_tD.float() @ group.router_ED.float().t()
        probs_tE = logits_tE.softmax(dim=-1)
        select_tE = probs_tE + group.expert_bias_E if cfg.bias_balancing else probs_tE
        expert_ids_tK = select_tE.topk(K, dim=-1).indices
        gates_tK = probs_tE.gather(1, expert_ids_tK)
        if cfg.renormalize:
            gates_tK = gates_tK / gates_tK.sum(dim=-1, keepdim=True)
        load_E = torch.bincount(expert_ids_tK.reshape(-1), minlength=E)
        if x_tD.shape[0]:
            # Switch: E * sum_e (fraction of slots to e) * (mean router probability of e)
            aux_loss = E * torch.dot(load_E.float() / expert_ids_tK.numel(), probs_tE.mean(0))
            z_loss = torch.logsumexp(logits_tE, dim=-1).square().mean()
        else:  # a group without tokens (see forward): zero, still in the graph
            aux_loss = z_loss = logits_tE.sum()
        capacity = expert_capacity(x_tD.shape[0], K, E, cfg.capacity_factor)
        if group.expert_parallel is not None:
            y_tD, kept_E = group.expert_parallel(x_tD, expert_ids_tK, gates_tK.to(x_tD.dtype),
                                                 group.w1_EDF, group.w2_EFD)
        else:
            y_tD, kept_E = expert_ffn(x_tD, expert_ids_tK, gates_tK.to(x_tD.dtype),
                                      group.w1_EDF, group.w2_EFD, capacity=capacity,
                                      impl=cfg.impl, gemm=cfg.gemm)
        if group.shared is not None:
            y_tD = y_tD + group.shared(x_tD)
        routing = GroupRouting(token_index_t=index_t, expert_ids_tK=expert_ids_tK.detach(),
                               load_E=load_E, dropped=expert_ids_tK.numel() - kept_E.sum(),
                               aux_loss=aux_loss, z_loss=z_loss)
        return y_tD, routing

    @torch.no_grad()
    def update_bias(self, routing: dict[str, GroupRouting]) -> None:
        """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts and
        lower it for over-loaded ones by ``bias_update_rate`` (call once per optimizer step)."""
        for name, r in routing.items():
            load_E = r.load_E.float()
            bias = self.groups[name].expert_bias_E
            bias += self.moe.bias_update_rate * torch.sign(load_E.mean() - load_E)


def init_moe_(moe: ModalityRoutedMoE, std: float, out_std: float) -> None:
    for group in moe.groups.values():
        nn.init.normal_(group.router_ED, std=std)
        nn.init.normal_(group.w1_EDF, std=std)
        nn.init.normal_(group.w2_EFD, std=out_std)


__all__ = ["FeedForward", "ExpertGroup", "ModalityRoutedMoE", "GroupRouting", "init_moe_"]
