"""Modality-routed mixture of experts: each token kind's group has its own router and experts.

Shape letters: T tokens (all kinds), t tokens of one group, D width, F expert hidden
width, E experts of a group, K experts per token (top_k * granularity).

Per group: router logits in fp32, softmax, top-K (optionally on probabilities plus a
DeepSeek-V3 balancing bias that only steers selection), optional renormalisation of the
chosen gates, times ``gate_scale`` (default the granularity G: G experts of hidden
``ffn_hidden / G`` then sum like one dense FFN, as the dense twin's two halves do), dropless or capacity dispatch, optional shared expert. A token only ever
reaches experts of its own group. Expert weights are stacked parameters ``w1_EDF`` /
``w2_EFD`` per group, so an expert-parallel wrapper can shard them along E.

Added experts (``MoEConfig.added_experts``, appended by ``moe-gato finetune --mode
new-expert``): expert a of a group has a router row r_a and a bias b_a, and is routed *in
addition to* the top-K, which it never displaces: a token takes it when its logit
``x . r_a + b_a`` beats the lowest logit the token chose (it would have made the top-K),
with gate ``gate_scale * sigmoid(logit - logsumexp(the logits the chosen gates were
normalised over))``, the share it would have had among them. Why not one more column of the
top-K: a column that may win a slot changes some token's experts or gates, and one that
never wins (a very negative logit) gets no gradient, so a new expert could not both leave
the pretrained model's outputs untouched and learn. Added, it does both: its output
weights start at zero, so every output is the pretrained model's bit for bit while the
tokens routed to it already give those weights a gradient.

Inference fast path (no gradients recorded, no expert parallelism, dropless, at most
``FEW_TOKENS`` tokens: a control step's observation chunk and its decoded actions): every
group's router at once as one matmul over the concatenated routers (C = all groups' experts,
logits of other groups' columns masked to -inf), one top-K, then ``expert_ffn_few`` over the
used columns only. Same outputs and routing records as the per-group path, which stays for
training and for many tokens.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_gato.model.config import ModelConfig
from moe_gato.model.dispatch import (expert_capacity, expert_ffn, expert_ffn_columns,
                                     expert_ffn_few)
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
    #: (A,) tokens routed to each added expert; none by default (no class attribute: a
    #: field with a factory has none, so that ``DeferredRouting`` computes it when read)
    added_load_A: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long))


class DeferredRouting(GroupRouting):
    """A ``GroupRouting`` whose tensors ``compute()`` returns on the first field read (the
    fields it leaves out take their defaults)."""

    def __init__(self, compute):  # not the dataclass __init__: the fields come later
        self._compute = compute

    def __getattr__(self, name: str):
        if name.startswith("__") or "_compute" not in self.__dict__:
            raise AttributeError(name)
        compute = self.__dict__.pop("_compute")
        values = compute()
        for f in dataclasses.fields(GroupRouting):
            if f.name not in values and f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
        self.__dict__.update(values)
        return getattr(self, name)


class ColumnRouting(collections.abc.Mapping):
    """One layer's routing by the column-space dispatch (``MoEConfig.dispatch``). The loss
    terms stay on the device: ``aux_sum`` and ``z_sum`` over the groups that had tokens,
    ``present`` their count. Read as a mapping (metrics, bias balancing, tests) it holds a
    ``GroupRouting`` per group with tokens, computed then; that read waits for the device."""

    def __init__(self, names: list[str], present_G: torch.Tensor, aux_G: torch.Tensor,
                 z_G: torch.Tensor, record):
        self.names, self.present_G, self._record = names, present_G, record
        self.aux_G, self.z_G = aux_G, z_G
        self.aux_sum = (aux_G * present_G).sum()
        self.z_sum = (z_G * present_G).sum()
        self.present = present_G.sum()
        self._groups: dict[str, GroupRouting] | None = None

    def _read(self) -> dict[str, GroupRouting]:
        if self._groups is None:
            present = self.present_G.tolist()
            self._groups = {name: DeferredRouting(functools.partial(self._record, g))
                            for g, name in enumerate(self.names) if present[g]}
        return self._groups

    def __getitem__(self, name: str) -> GroupRouting:
        return self._read()[name]

    def __iter__(self):
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())


class FeedForward(nn.Module):
    """The dense FFN: D -> F -> D with GELU, no biases."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class AddedExpert(nn.Module):
    """An expert appended to a group after pretraining: router row, router bias, FFN."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.router_D = nn.Parameter(torch.empty(d_model))
        self.bias_1 = nn.Parameter(torch.zeros(1))
        self.w1_DF = nn.Parameter(torch.empty(d_model, hidden))
        self.w2_FD = nn.Parameter(torch.empty(hidden, d_model))


class ExpertGroup(nn.Module):
    """One modality group: router, E stacked experts, optional shared expert, added experts."""

    def __init__(self, d_model: int, hidden: int, num_experts: int, shared: bool,
                 added: int = 0):
        super().__init__()
        self.router_ED = nn.Parameter(torch.empty(num_experts, d_model))
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.register_buffer("expert_bias_E", torch.zeros(num_experts))
        self.shared = FeedForward(d_model, hidden) if shared else None
        self.added = nn.ModuleList(AddedExpert(d_model, hidden) for _ in range(added))
        #: set by moe_gato.train.expert_parallel.shard_experts: this rank then holds E / P
        #: experts and exchanges tokens with all-to-all instead of calling expert_ffn
        self.expert_parallel = None

    @property
    def num_experts(self) -> int:
        """All experts of the group (the router's rows), also under expert parallelism."""
        return self.router_ED.shape[0]


#: most tokens for the inference fast path; above it the per-group path (sorted per-expert
#: GEMMs) is as fast (crossover measured in benchmarks/RESULTS.md, "MoE inference fast path")
FEW_TOKENS = 512


class ModalityRoutedMoE(nn.Module):
    #: run every group, with or without tokens, so that every rank builds the same backward
    #: graph; set by the training code (``GatoModel.set_uniform_graph``), never inferred
    uniform_graph: bool = False
    #: shapes from the inputs' shapes only, no host read: the column-space dispatch for any
    #: number of tokens (``GatoModel.static_shapes``, what a CUDA graph captures)
    static_shapes: bool = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.moe = cfg.moe
        self.groups = nn.ModuleDict({
            name: ExpertGroup(cfg.d_model, cfg.expert_hidden, cfg.moe.num_experts_of(name),
                              cfg.moe.shared_expert, cfg.moe.added_experts)
            for name in cfg.moe.groups})
        names = list(cfg.moe.groups)
        self.register_buffer("group_of_kind", torch.tensor(
            [names.index(cfg.moe.group_of(k)) for k in Kind]), persistent=False)
        sizes = [cfg.moe.num_experts_of(name) for name in names]
        #: columns of the concatenated routers: group g's experts are [offsets[g], offsets[g+1])
        self.offsets = [sum(sizes[:g]) for g in range(len(names) + 1)]
        # output_size given: on the meta device (a model sized before it is allocated) the
        # result's length cannot be read from the sizes
        self.register_buffer("group_of_col", torch.repeat_interleave(
            torch.arange(len(names)), torch.tensor(sizes), output_size=sum(sizes)),
            persistent=False)
        self.register_buffer("experts_G", torch.tensor(sizes, dtype=torch.float32),
                             persistent=False)
        self._stacked: tuple[tuple, dict[str, torch.Tensor]] | None = None

    def columns_supported(self) -> bool:
        """The column-space dispatch can run this layer: dropless, no added experts, no
        expert parallelism."""
        return (self.moe.capacity_factor is None and not self.moe.added_experts
                and all(g.expert_parallel is None for g in self.groups.values()))

    def forward(self, x_TD: torch.Tensor, kinds_T: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, GroupRouting]]:
        if self.static_shapes:
            if not self.columns_supported():
                raise ValueError("static shapes need the column-space dispatch: a dropless "
                                 "layer (capacity_factor null) without added experts or "
                                 "expert parallelism")
            return self._forward_columns(x_TD, kinds_T)
        if self._fast_path_applies(x_TD.shape[0]):
            return self._forward_few(x_TD, kinds_T)
        if self._columns_apply(x_TD):
            return self._forward_columns(x_TD, kinds_T)
        group_T = self.group_of_kind[kinds_T]
        # Asked for by the training code when ranks must build the same backward graph:
        # every group runs, with or without tokens. Expert parallelism needs every rank in
        # every exchange, and reductions that bucket gradients in the order they become
        # ready (ZeRO-2) would otherwise mix up parameters between ranks.
        uniform = self.uniform_graph or any(
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

    def _fast_path_applies(self, num_tokens: int) -> bool:
        return (num_tokens <= FEW_TOKENS and not torch.is_grad_enabled()
                and self.moe.capacity_factor is None
                and all(g.expert_parallel is None for g in self.groups.values()))

    def _columns_apply(self, x_TD: torch.Tensor) -> bool:
        dispatch = self.moe.dispatch
        if dispatch == "groups" or (dispatch == "auto" and not x_TD.is_cuda):
            return False
        return self.columns_supported()

    def _column_weights(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Every group's routers, balancing biases and experts (shared experts as one more
        column each) stacked in column order; the experts in ``dtype`` (None: as they are).
        With gradients the stacks are built per call (they must be part of the graph);
        without, they are kept until a parameter changes, so that an inference step neither
        copies every expert nor casts it again (and a CUDA graph replays the stacks it
        captured)."""
        groups = list(self.groups.values())
        tensors = [t for g in groups for t in (g.router_ED, g.expert_bias_E, g.w1_EDF, g.w2_EFD)]
        if self.moe.shared_expert:
            tensors += [t for g in groups for t in (g.shared.fc1.weight, g.shared.fc2.weight)]
        # a parameter changed in place bumps its version; moved or cast, its storage
        key = (dtype, tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))
        if not torch.is_grad_enabled() and self._stacked is not None and self._stacked[0] == key:
            return self._stacked[1]
        w1s, w2s = [g.w1_EDF for g in groups], [g.w2_EFD for g in groups]
        if self.moe.shared_expert:
            w1s += [g.shared.fc1.weight.t()[None] for g in groups]
            w2s += [g.shared.fc2.weight.t()[None] for g in groups]
        w1_CDF, w2_CFD = torch.cat(w1s), torch.cat(w2s)
        if dtype is not None:
            w1_CDF, w2_CFD = w1_CDF.to(dtype), w2_CFD.to(dtype)
        stacked = dict(router_CD=torch.cat([g.router_ED for g in groups]),
                       bias_C=torch.cat([g.expert_bias_E for g in groups]),
                       w1_CDF=w1_CDF, w2_CFD=w2_CFD)
        self._stacked = None if torch.is_grad_enabled() else (key, stacked)
        return stacked

    def _forward_columns(self, x_TD: torch.Tensor, kinds_T: torch.Tensor
                         ) -> tuple[torch.Tensor, ColumnRouting]:
        """Every group at once, without host reads (the module docstring's column space):
        one router matmul over all groups' columns, other groups' columns masked, one
        top-K; per-group loads, balancing and z losses by scatter over device counts; the
        experts of all groups (and a shared expert per group as one more column, gate 1) in
        one grouped GEMM with device offsets."""
        cfg, K = self.moe, self.moe.experts_per_token
        groups = list(self.groups.values())
        G, C = len(groups), self.offsets[-1]
        group_T = self.group_of_kind.index_select(0, kinds_T)
        other_TC = self.group_of_col[None, :] != group_T[:, None]   # columns of other groups
        autocast = x_TD.is_cuda and torch.is_autocast_enabled("cuda")
        stacked = self._column_weights(torch.get_autocast_dtype("cuda") if autocast else None)
        logits_TC = (x_TD.float() @ stacked["router_CD"].float().t()).masked_fill(other_TC,
                                                                                 -math.inf)
        probs_TC = logits_TC.softmax(dim=-1)
        select_TC = probs_TC
        if cfg.bias_balancing:
            select_TC = probs_TC + stacked["bias_C"]
        cols_TK = select_TC.masked_fill(other_TC, -math.inf).topk(K, dim=-1).indices
        gates_TK = probs_TC.gather(1, cols_TK)
        if cfg.renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        gates_TK = gates_TK * cfg.gate_scale
        # per column: slots routed; per group: tokens, Switch loss, z-loss
        ones_T = torch.ones_like(group_T, dtype=torch.float32)
        load_C = logits_TC.new_zeros(C).index_add_(
            0, cols_TK.reshape(-1), ones_T.repeat_interleave(K, output_size=ones_T.numel() * K))
        tokens_G = logits_TC.new_zeros(G).index_add_(0, group_T, ones_T)
        denom_C = tokens_G.clamp(min=1).index_select(0, self.group_of_col)
        share_C = (load_C / (denom_C * K)) * (probs_TC.sum(0) / denom_C)
        aux_G = self.experts_G * logits_TC.new_zeros(G).index_add(0, self.group_of_col, share_C)
        z_G = (logits_TC.new_zeros(G).index_add(0, group_T,
                                                torch.logsumexp(logits_TC, dim=-1).square())
               / tokens_G.clamp(min=1))
        ffn_cols_TK, ffn_gates_TK = cols_TK, gates_TK.to(x_TD.dtype)
        if cfg.shared_expert:  # group g's shared expert is column C + g, gate 1
            ffn_cols_TK = torch.cat([cols_TK, C + group_T[:, None]], dim=1)
            ffn_gates_TK = torch.cat([ffn_gates_TK, ffn_gates_TK.new_ones(len(group_T), 1)], 1)
        y_TD = expert_ffn_columns(x_TD, ffn_cols_TK, ffn_gates_TK, stacked["w1_CDF"],
                                  stacked["w2_CFD"])

        def record(g: int) -> dict[str, torch.Tensor]:
            lo, hi = self.offsets[g], self.offsets[g + 1]
            index_t = (group_T == g).nonzero().squeeze(1)
            return dict(token_index_t=index_t,
                        expert_ids_tK=cols_TK.index_select(0, index_t).detach() - lo,
                        load_E=load_C[lo:hi].long(), dropped=load_C.new_zeros((), dtype=torch.long),
                        aux_loss=aux_G[g], z_loss=z_G[g])

        return y_TD, ColumnRouting(list(self.groups), tokens_G > 0, aux_G, z_G, record)

    def _forward_few(self, x_TD: torch.Tensor, kinds_T: torch.Tensor
                     ) -> tuple[torch.Tensor, dict[str, GroupRouting]]:
        """Inference fast path (see the module docstring). Columns: the experts of the groups
        routed here, concatenated (all groups; only its own when every token is in one)."""
        cfg, K = self.moe, self.moe.experts_per_token
        group_T = self.group_of_kind.index_select(0, kinds_T)
        present = group_T.tolist() if len(group_T) == 1 else group_T.unique().tolist()
        everyone = list(self.groups.values())
        if len(present) == 1:  # a decode step: one group, its router alone, no mask
            groups, offsets = [everyone[present[0]]], [0, everyone[present[0]].num_experts]
            first_col = {present[0]: 0}
            router_CD, other_TC = groups[0].router_ED, None
        else:
            groups, offsets = everyone, self.offsets
            first_col = {g: self.offsets[g] for g in present}
            router_CD = torch.cat([g.router_ED for g in groups])
            other_TC = self.group_of_col != group_T[:, None]  # columns of other groups
        logits_TC = x_TD.float() @ router_CD.float().t()
        if other_TC is not None:
            logits_TC.masked_fill_(other_TC, -math.inf)
        probs_TC = None
        if cfg.bias_balancing or not cfg.renormalize:
            probs_TC = logits_TC.softmax(dim=-1)
        if cfg.bias_balancing:
            select_TC = probs_TC + torch.cat([g.expert_bias_E for g in groups])
            if other_TC is not None:
                select_TC.masked_fill_(other_TC, -math.inf)
            cols_TK = select_TC.topk(K, dim=-1).indices
            top_TK = logits_TC.gather(1, cols_TK)
        else:  # softmax is monotone: the top-K logits are the top-K probabilities
            top_TK, cols_TK = logits_TC.topk(K, dim=-1)
        # renormalized gates p_k / sum_j p_j over the chosen = a softmax of their logits
        gates_TK = top_TK.softmax(dim=-1) if cfg.renormalize else probs_TC.gather(1, cols_TK)
        gates_TK = (gates_TK * cfg.gate_scale).to(x_TD.dtype)
        added_loads = {}
        if self.moe.added_experts:  # the chosen logits and their normaliser, per token
            norm_T = torch.logsumexp(top_TK if cfg.renormalize else logits_TC, dim=-1)
        routing = self._few_routing(group_T, present, first_col, logits_TC, cols_TK,
                                    added_loads)
        w1s, w2s = [g.w1_EDF for g in groups], [g.w2_EFD for g in groups]
        if cfg.shared_expert:  # a group's shared expert is one more column, gate 1
            C = offsets[-1]
            w1s += [g.shared.fc1.weight.t()[None] for g in groups]
            w2s += [g.shared.fc2.weight.t()[None] for g in groups]
            offsets = offsets + [C + i + 1 for i in range(len(groups))]
            shared_T1 = (C + group_T[:, None]) if len(groups) > 1 else torch.full_like(
                cols_TK[:, :1], C)
            cols_TK = torch.cat([cols_TK, shared_T1], dim=1)
            gates_TK = torch.cat([gates_TK, gates_TK.new_ones(len(group_T), 1)], dim=1)
        y_TD = expert_ffn_few(x_TD, cols_TK, gates_TK, w1s, w2s, offsets)
        if self.moe.added_experts:
            for g in present:
                index_t = (group_T == g).nonzero().squeeze(1)
                y_tD, added_loads[g] = self._add_experts(
                    everyone[g], x_TD.index_select(0, index_t), y_TD.index_select(0, index_t),
                    top_TK.index_select(0, index_t), norm_T.index_select(0, index_t))
                y_TD = y_TD.index_copy(0, index_t, y_tD)
        return y_TD, routing

    def _few_routing(self, group_T, present, first_col, logits_TC, cols_TK, added_loads
                     ) -> dict[str, GroupRouting]:
        """The fast path's per-group records, equal to ``_route``'s; their tensors are
        computed when first read (a control step never reads them). ``added_loads`` is
        filled by the caller after this returns, before any record is read."""
        names = list(self.groups)

        def record(g: int) -> dict[str, torch.Tensor]:
            lo = first_col[g]
            E = self.offsets[g + 1] - self.offsets[g]
            index_t = (group_T == g).nonzero().squeeze(1)
            ids_tK = cols_TK.index_select(0, index_t) - lo
            logits_tE = logits_TC.index_select(0, index_t)[:, lo:lo + E]
            probs_tE = logits_tE.softmax(dim=-1)
            load_E = torch.bincount(ids_tK.reshape(-1), minlength=E)
            aux_loss = E * torch.dot(load_E.float() / ids_tK.numel(), probs_tE.mean(0))
            z_loss = torch.logsumexp(logits_tE, dim=-1).square().mean()
            added = added_loads.get(g, load_E.new_zeros(0))
            return dict(token_index_t=index_t, expert_ids_tK=ids_tK, load_E=load_E,
                        dropped=load_E.new_zeros(()), aux_loss=aux_loss, z_loss=z_loss,
                        added_load_A=added)

        return {names[g]: DeferredRouting(functools.partial(record, g)) for g in present}

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
        gates_tK = gates_tK * cfg.gate_scale
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
        added_load_A = load_E.new_zeros(len(group.added))
        if len(group.added):
            chosen_tK = logits_tE.gather(1, expert_ids_tK)
            norm_t = torch.logsumexp(chosen_tK if cfg.renormalize else logits_tE, dim=-1)
            y_tD, added_load_A = self._add_experts(group, x_tD, y_tD, chosen_tK, norm_t)
        routing = GroupRouting(token_index_t=index_t, expert_ids_tK=expert_ids_tK.detach(),
                               load_E=load_E, dropped=expert_ids_tK.numel() - kept_E.sum(),
                               aux_loss=aux_loss, z_loss=z_loss, added_load_A=added_load_A)
        return y_tD, routing

    def _add_experts(self, group: ExpertGroup, x_tD: torch.Tensor, y_tD: torch.Tensor,
                     chosen_tK: torch.Tensor, norm_t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``y_tD`` plus the group's added experts (module docstring): added expert a takes
        the tokens whose logit beats the lowest of their chosen logits ``chosen_tK``, with
        gate ``gate_scale * sigmoid(logit - norm_t)``. Returns the sum and each one's
        token count. Outputs of the routed experts are left as they are, bit for bit."""
        lowest_t = chosen_tK.min(dim=-1).values
        loads = []
        for added in group.added:
            logit_t = x_tD.float() @ added.router_D.float() + added.bias_1.float()
            index_n = (logit_t > lowest_t).nonzero().squeeze(1)
            loads.append(index_n.numel())
            if index_n.numel() == 0 and not self.uniform_graph:
                continue
            gate_n = (logit_t.index_select(0, index_n) - norm_t.index_select(0, index_n)
                      ).sigmoid() * self.moe.gate_scale
            x_nD = x_tD.index_select(0, index_n)
            out_nD = F.gelu(x_nD @ added.w1_DF) @ added.w2_FD
            y_tD = y_tD.index_add(0, index_n, out_nD * gate_n.to(out_nD.dtype)[:, None])
        return y_tD, torch.tensor(loads, dtype=torch.long, device=x_tD.device)

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
        for added in group.added:
            nn.init.normal_(added.router_D, std=std)
            nn.init.zeros_(added.bias_1)
            nn.init.normal_(added.w1_DF, std=std)
            nn.init.normal_(added.w2_FD, std=out_std)


__all__ = ["FeedForward", "AddedExpert", "ExpertGroup", "ModalityRoutedMoE", "GroupRouting",
           "init_moe_"]
