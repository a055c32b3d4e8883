"""The Gato transformer: embeddings, attention, block, model — top to bottom.

Shape letters: B batch, L positions of this call, S positions in the KV cache (past and
present), D width, H heads, Dh head width, V vocabulary, P image patches in the batch,
C patch channels. T = B * L flattened positions.

Batch format: ``moe_gato.tokenizer.layout.collate``. Logits at position i predict token
i + 1; the loss counts position i + 1 when ``loss_mask[i + 1]`` (text and actions only),
weighted by ``loss_weight[i + 1]`` when the batch has one (``target_weights``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_gato.model.config import SCALAR_VALUE_SCALES, ModelConfig
from moe_gato.model.head import fused_linear_cross_entropy
from moe_gato.model.kv_cache import KVCache, attention_mask, hidden_past_actions
from moe_gato.model.moe import (ColumnRouting, FeedForward, GroupRouting, ModalityRoutedMoE,
                                init_moe_)
from moe_gato.model.positions import (Rotary, coordinates, rotate, step_bias_mask, step_slopes,
                                      timestep_starts)
from moe_gato.tokenizer.layout import ACTION_KINDS, ACTION_LOCAL_POS, Kind


def target_weights(batch: dict) -> torch.Tensor:
    """(B, L - 1) weight of each next-token target: ``batch["loss_weight"]`` where the loader
    weighted the targets (``MixtureConfig.loss_weighting``), else 1 on every target."""
    weight_BL = batch.get("loss_weight")
    if weight_BL is None:
        return batch["loss_mask"][:, 1:].float()
    return weight_BL[:, 1:] * batch["loss_mask"][:, 1:]


class PatchEmbedding(nn.Module):
    """A 16x16 patch -> D through one ResNet-v2 (pre-activation) block: a 4x4/stride-4
    stem to (C, 4, 4), then GroupNorm-GELU-conv3x3 twice plus the skip, then a linear map."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, groups = cfg.patch_channels, cfg.patch_norm_groups
        self.stem = nn.Conv2d(3, C, kernel_size=4, stride=4, bias=False)
        self.norm1, self.norm2 = nn.GroupNorm(groups, C), nn.GroupNorm(groups, C)
        self.conv1 = nn.Conv2d(C, C, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(C, C, kernel_size=3, padding=1, bias=False)
        self.out = nn.Linear(C * 16, cfg.d_model, bias=False)

    def forward(self, patches_P3SS: torch.Tensor) -> torch.Tensor:
        h_PC44 = self.stem(patches_P3SS)
        r_PC44 = self.conv1(F.gelu(self.norm1(h_PC44)))
        h_PC44 = h_PC44 + self.conv2(F.gelu(self.norm2(r_PC44)))
        return self.out(h_PC44.flatten(1))  # (P, D)


def value_features(num_bins: int, n: int) -> torch.Tensor:
    """(num_bins, n) Fourier features of the bin index: sin and cos of ``pi * f * x`` for
    ``n / 2`` frequencies ``f`` from 1 to ``num_bins / 4`` (geometric), ``x`` the bin
    centre in [0, 1]; scaled to unit mean square per row."""
    x_B1 = ((torch.arange(num_bins, dtype=torch.float64) + 0.5) / num_bins)[:, None]
    f_F = torch.logspace(0, math.log10(num_bins / 4), n // 2, dtype=torch.float64)
    phase_BF = math.pi * x_B1 * f_F
    return (torch.cat([phase_BF.sin(), phase_BF.cos()], 1) * math.sqrt(2 / n)).float()


def scalar_features(num_bins: int) -> torch.Tensor:
    """(num_bins, 5) ``tanh(s * v)`` for the scales of ``SCALAR_VALUE_SCALES``, v the bin
    centre's mu-law value in [-1, 1]: the value itself, resolved finely near 0."""
    v_B1 = ((torch.arange(num_bins, dtype=torch.float64) + 0.5) / num_bins * 2 - 1)[:, None]
    return torch.tanh(v_B1 * torch.tensor(SCALAR_VALUE_SCALES, dtype=torch.float64)).float()


class GatoEmbedding(nn.Module):
    """Token table for every id; image positions take their patch embedding plus row and
    column embeddings; every position adds its local position (shared one for actions).
    ``uniform_graph`` (``GatoModel.set_uniform_graph``) runs the patch block with no image
    too, so that every rank builds the same backward graph.

    ``value_embedding="smooth"``: the continuous-value bins' rows are the table's plus
    ``value_features @ value_basis``, a learned map shared by all bins, so a bin seen
    rarely still sits between its neighbours; ``"scalar"`` adds a learned map of the bin's
    value at five resolutions (``scalar_features``) to Gato's table. With tied embeddings
    the output head uses the same rows (``weight()``)."""

    uniform_graph: bool = False
    #: skip the local-position check (``GatoModel.static_shapes``: a step replayed by a
    #: CUDA graph cannot read the maximum back; the policy built the positions)
    static_shapes: bool = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.patches = PatchEmbedding(cfg)
        self.rows = nn.Embedding(cfg.position_bins, cfg.d_model)
        self.cols = nn.Embedding(cfg.position_bins, cfg.d_model)
        self.local_pos = nn.Embedding(cfg.max_local_positions, cfg.d_model)
        self.action_pos_D = nn.Parameter(torch.zeros(cfg.d_model))
        self.value_basis = None
        self._rows: tuple[tuple, torch.Tensor] | None = None  # weight() without gradients
        if cfg.value_embedding != "table":
            self.value_basis = nn.Parameter(torch.zeros(cfg.num_value_features, cfg.d_model))
            features_BF = (value_features(cfg.num_bins, cfg.value_features)
                           if cfg.value_embedding == "smooth" else scalar_features(cfg.num_bins))
            self.register_buffer("value_features_BF", features_BF, persistent=False)

    def _check_local_positions(self, local_pos_BL: torch.Tensor) -> None:
        """Local positions must index the table: checked here on the CPU, by an assertion
        the device runs on its own on an accelerator (reading the maximum back would stall
        the host; the loader and the policy check their timesteps' sizes beforehand)."""
        limit = self.cfg.max_local_positions
        if self.static_shapes:
            return
        if local_pos_BL.device.type != "cpu":
            torch._assert_async(local_pos_BL.max() < limit,
                                f"a local position is >= max_local_positions ({limit})")
        elif int(local_pos_BL.max()) >= limit:
            raise ValueError(f"local position {int(local_pos_BL.max())} >= "
                             f"max_local_positions ({limit})")

    def weight(self) -> torch.Tensor:
        """(V, D) rows of every token id, as the input embedding and a tied head use them.
        Without gradients the rows of a value embedding are kept until a parameter changes,
        so that a decode step does not copy the whole table (nor a CUDA graph replay it)."""
        w_VD = self.tokens.weight
        if self.value_basis is None:
            return w_VD
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in (w_VD, self.value_basis))
        if not torch.is_grad_enabled() and self._rows is not None and self._rows[0] == key:
            return self._rows[1]
        lo = self.cfg.layout.continuous_start
        hi = lo + self.cfg.num_bins
        smooth_BD = self.value_features_BF.to(w_VD.dtype) @ self.value_basis
        rows_VD = torch.cat([w_VD[:lo], w_VD[lo:hi] + smooth_BD, w_VD[hi:]])
        self._rows = None if torch.is_grad_enabled() else (key, rows_VD)
        return rows_VD

    def _bins(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Interval [lo, hi) in [0, 1] -> bin: uniform within it at training, mean at eval."""
        u = lo + torch.rand_like(lo) * (hi - lo) if self.training else (lo + hi) / 2
        return (u * self.cfg.position_bins).long().clamp(0, self.cfg.position_bins - 1)

    def forward(self, batch: dict, weight_VD: torch.Tensor | None = None) -> torch.Tensor:
        """``weight_VD``: ``weight()`` when the caller has it already."""
        kinds_BL, local_pos_BL = batch["kinds"], batch["local_pos"]
        x_BLD = F.embedding(batch["tokens"], self.weight() if weight_VD is None else weight_VD)
        patches = batch.get("patches")
        if patches is not None and (patches.shape[0] > 0 or self.uniform_graph):
            # the P image positions in row-major order: as many as patches, no host read
            B, L, D = x_BLD.shape
            image_P = torch.nonzero_static((kinds_BL == Kind.IMAGE).reshape(-1),
                                           size=patches.shape[0]).squeeze(1)
            rc_P4 = batch["image_rc"].reshape(B * L, 4).index_select(0, image_P)
            image_PD = (self.patches(patches.to(x_BLD.dtype))
                        + self.rows(self._bins(rc_P4[:, 0], rc_P4[:, 1]))
                        + self.cols(self._bins(rc_P4[:, 2], rc_P4[:, 3])))
            x_BLD = x_BLD.reshape(B * L, D).index_copy(0, image_P, image_PD.to(x_BLD.dtype)
                                                        ).view(B, L, D)
        self._check_local_positions(local_pos_BL)
        is_action_BL1 = (local_pos_BL == ACTION_LOCAL_POS).unsqueeze(-1)
        pos_BLD = torch.where(is_action_BL1, self.action_pos_D,
                              self.local_pos(local_pos_BL.clamp(min=0)))
        return x_BLD + pos_BLD


@dataclasses.dataclass
class AttentionInputs:
    """What every layer's attention shares in one forward call: the mask (None: plain
    causal; bool; or float with the timestep bias added) and the rotary angles of this
    call's positions (``positions="rope"``)."""

    mask: torch.Tensor | None = None       # (B, 1 or H, L, S)
    cos: torch.Tensor | None = None        # (B, 1, L, Dh / 2)
    sin: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BLD: torch.Tensor, cache: KVCache | None, layer: int,
                attn: AttentionInputs) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q_BHLd, k_BHSd, v_BHSd = (self.qkv(x_BLD).view(B, L, 3, self.num_heads, -1)
                                  .permute(2, 0, 3, 1, 4))  # (3, B, H, L, Dh)
        if attn.cos is not None:  # keys enter the cache rotated by their own position
            q_BHLd, k_BHSd = rotate(q_BHLd, attn.cos, attn.sin), rotate(k_BHSd, attn.cos, attn.sin)
        past = 0
        if cache is not None:
            past = cache.length
            k_BHSd, v_BHSd = cache.append(layer, k_BHSd, v_BHSd)
        mask = attn.mask
        if mask is not None:
            if mask.is_floating_point():
                mask = mask.to(q_BHLd.dtype)
            o_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, attn_mask=mask)
        elif past == 0:
            o_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, is_causal=True)
        else:  # query i sits at position past + i and sees keys 0 .. past + i
            S = past + L
            mask_LS = (torch.arange(S, device=x_BLD.device)[None, :]
                       <= past + torch.arange(L, device=x_BLD.device)[:, None])
            o_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, attn_mask=mask_LS)
        return self.proj(o_BHLd.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = (ModalityRoutedMoE(cfg) if cfg.is_moe_layer(layer)
                    else FeedForward(cfg.d_model, cfg.ffn_hidden))

    def forward(self, x_BLD: torch.Tensor, kinds_BL: torch.Tensor, cache: KVCache | None,
                attn: AttentionInputs):
        x_BLD = x_BLD + self.attn(self.norm1(x_BLD), cache, self.layer, attn)
        h_BLD = self.norm2(x_BLD)
        if isinstance(self.ffn, FeedForward):
            return x_BLD + self.ffn(h_BLD), None
        y_TD, routing = self.ffn(h_BLD.reshape(-1, h_BLD.shape[-1]), kinds_BL.reshape(-1))
        return x_BLD + y_TD.view_as(h_BLD), routing


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor | None               # (B, L, V); None: forward(logits="targets")
    loss: torch.Tensor | None = None          # lm_loss + aux_loss + z_loss
    lm_loss: torch.Tensor | None = None       # masked next-token cross-entropy
    aux_loss: torch.Tensor | None = None      # scaled Switch balancing loss
    z_loss: torch.Tensor | None = None        # scaled router z-loss
    #: (len(Kind), 2) per target kind: sum of its targets' losses, count (unweighted, on
    #: the device; ``kind_losses`` reads the means)
    kind_sums_K2: torch.Tensor | None = None
    routing: list[dict[str, GroupRouting]] = dataclasses.field(default_factory=list)

    @property
    def kind_losses(self) -> dict[str, torch.Tensor]:
        """Mean loss per target kind present in the batch (a host read of the counts)."""
        if self.kind_sums_K2 is None:
            return {}
        counts = self.kind_sums_K2[:, 1].tolist()
        return {Kind(k).name.lower(): self.kind_sums_K2[k, 0] / counts[k]
                for k in range(len(counts)) if counts[k] > 0}


class GatoModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = GatoEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                               bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base) if cfg.positions == "rope" else None
        if cfg.positions == "timestep_bias":  # fixed, derived from the config: not saved
            self.register_buffer("step_slopes_H", step_slopes(cfg.num_heads), persistent=False)
        # a buffer, not built per call: a tensor made from a list on a GPU is a blocking
        # copy, which a CUDA graph cannot capture
        self.register_buffer("action_kinds_K", torch.tensor([int(k) for k in ACTION_KINDS]),
                             persistent=False)
        self.reset_parameters()

    def set_uniform_graph(self, uniform: bool) -> None:
        """Every expert group and the patch block run for every batch, with or without
        tokens for them, so that data-parallel and expert-parallel ranks build the same
        backward graph. Asked for by the training code (``moe_gato.train.parallelize``);
        off by default: one process skips what a batch does not use."""
        for module in self.modules():
            if isinstance(module, (GatoEmbedding, ModalityRoutedMoE)):
                module.uniform_graph = bool(uniform)

    @contextlib.contextmanager
    def static_shapes(self):
        """Inside: every op's shapes follow from the inputs' shapes, never from their data,
        and nothing is read back to the host, so that a forward call can be captured in a
        CUDA graph (``moe_gato.inference.graphs``): the MoE layers take the column-space
        dispatch (``ModalityRoutedMoE.forward``) and the embedding skips its position check.
        Use with a ``StaticKVCache``; inference only (no gradients)."""
        modules = [m for m in self.modules() if isinstance(m, (GatoEmbedding, ModalityRoutedMoE))]
        for m in modules:
            m.static_shapes = True
        try:
            yield self
        finally:
            for m in modules:
                m.static_shapes = False

    def reset_parameters(self) -> None:
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            if p.dim() >= 2 and ".groups." not in name:
                nn.init.normal_(p, std=out_std if name.endswith(("proj.weight", "fc2.weight"))
                                else std)
        for block in self.blocks:
            if isinstance(block.ffn, ModalityRoutedMoE):
                init_moe_(block.ffn, std, out_std)
        if self.embed.value_basis is not None:
            if self.cfg.value_embedding == "smooth":  # the bins start as the smooth map alone
                lo = self.cfg.layout.continuous_start
                with torch.no_grad():
                    self.embed.tokens.weight[lo:lo + self.cfg.num_bins].zero_()
            nn.init.normal_(self.embed.value_basis, std=std)

    def forward(self, batch: dict, *, cache: KVCache | None = None, compute_loss: bool = True,
                last_only: bool = False, id_range: tuple[int, int] | None = None,
                logits: str = "all") -> ModelOutput:
        """``batch["valid"]`` (B, L) bool, optional: positions a row does not use (padding
        that lines up rows of different lengths); no valid position attends to them.
        ``last_only`` computes logits of the last position only, and ``id_range`` = (lo, hi)
        only for ids [lo, hi) (what decoding needs; then ``logits`` is (B, 1 or L, hi - lo)
        and no loss is computed). ``logits="targets"`` computes the head only where a loss
        is taken (the text and action targets, ``batch["loss_mask"]``) and leaves
        ``ModelOutput.logits`` None: the same loss (to float rounding) for a fraction of the
        head's work, which dominates small models with a large vocabulary; it reads the
        number of targets back to the host (a sync on a GPU). ``logits="fused"`` runs the
        head and the cross-entropy together in chunks of positions
        (``moe_gato.model.head``): every position, no logits tensor, no host read; the same
        loss and gradients (to float rounding), ``ModelOutput.logits`` None."""
        if logits not in ("all", "targets", "fused"):
            raise ValueError(f"logits must be 'all', 'targets' or 'fused', got {logits!r}")
        kinds_BL = batch["kinds"]
        B, L = kinds_BL.shape
        attn = self._attention_inputs(batch, cache)
        token_rows_VD = self.embed.weight()  # once: the input table and a tied head
        x_BLD = self.embed(batch, token_rows_VD)
        routing = []
        for block in self.blocks:
            x_BLD, r = block(x_BLD, kinds_BL, cache, attn)
            if r is not None:
                routing.append(r)
        if cache is not None:
            cache.end()
        if last_only:
            x_BLD = x_BLD[:, -1:]
        x_BLD = self.norm(x_BLD)
        weight_VD = token_rows_VD if self.head is None else self.head.weight
        if id_range is not None:
            weight_VD = weight_VD[id_range[0]:id_range[1]]
        losses = compute_loss and cache is None and L > 1 and not last_only and id_range is None
        if logits != "all" and losses:
            out = ModelOutput(logits=None, routing=routing)
            self._losses(out, batch, head=(x_BLD, weight_VD), fused=logits == "fused")
            return out
        out = ModelOutput(logits=F.linear(x_BLD, weight_VD), routing=routing)
        if losses:
            self._losses(out, batch)
        return out

    def _attention_inputs(self, batch: dict, cache: KVCache | None) -> AttentionInputs:
        """The mask and position signals of this call, from each position's coordinates
        (``moe_gato.model.positions``); with a cache, the cache numbers the call's
        positions after the slots it holds."""
        cfg, kinds_BL, valid_BL = self.cfg, batch["kinds"], batch.get("valid")
        B, L = kinds_BL.shape
        hide, bias = cfg.past_actions == "hide", cfg.positions == "timestep_bias"
        if cache is None and not (hide or bias or self.rotary is not None):
            if valid_BL is None or bool(valid_BL.all()):
                return AttentionInputs()
            return AttentionInputs(mask=attention_mask(valid_BL, 0, L))
        starts_BL = timestep_starts(kinds_BL, batch["local_pos"])
        is_action_BL = torch.isin(kinds_BL, self.action_kinds_K)
        if cache is not None:
            cache.begin(valid_BL, B, L, kinds_BL.device, starts_BL=starts_BL,
                        is_action_BL=is_action_BL)
            mask_B1LS, pos_BL = cache.attn_mask, cache.call_pos_BL
            step_BL, key_step_BS = cache.call_step_BL, cache.key_step_BS
        else:
            pos_BL, step_BL = coordinates(starts_BL, valid_BL)
            key_step_BS = step_BL
            mask_B1LS = None
            if hide or bias or (valid_BL is not None and not bool(valid_BL.all())):
                valid_BS = valid_BL if valid_BL is not None else torch.ones_like(starts_BL)
                hidden_BLS = hidden_past_actions(is_action_BL, step_BL, step_BL) if hide else None
                mask_B1LS = attention_mask(valid_BS, 0, L, hidden_BLS)
        attn = AttentionInputs(mask=mask_B1LS)
        if bias:
            attn.mask = step_bias_mask(mask_B1LS, step_BL, key_step_BS, self.step_slopes_H,
                                       torch.float32)
        if self.rotary is not None:
            attn.cos, attn.sin = self.rotary.cos_sin(pos_BL)
        return attn

    def _losses(self, out: ModelOutput, batch: dict,
                head: tuple[torch.Tensor, torch.Tensor] | None = None,
                fused: bool = False) -> None:
        """The losses of ``out``; ``head`` = (final hidden states, head rows): the logits
        are computed here, at the target positions only (``forward(logits="targets")``),
        or fused with the cross-entropy at every position (``fused``)."""
        targets_BL, mask_BL = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
        weight_BL = target_weights(batch)
        if fused:
            x_BLD, weight_VD = head
            weighted, nll_N = fused_linear_cross_entropy(
                x_BLD[:, :-1].flatten(0, 1), weight_VD, targets_BL.flatten(),
                weight_BL.flatten())
            out.lm_loss = weighted / weight_BL.sum().clamp(min=1e-12)
            self._kind_and_aux_losses(out, batch, nll_N.view_as(targets_BL))
            return
        if head is None:
            nll_BL = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1),
                                     targets_BL.flatten(), reduction="none").view_as(targets_BL)
        else:  # positions without a target keep a loss of 0 (their weight is 0 anyway)
            x_BLD, weight_VD = head
            rows = mask_BL.nonzero(as_tuple=True)
            logits_NV = F.linear(x_BLD[:, :-1][rows], weight_VD)
            nll_N = F.cross_entropy(logits_NV.float(), targets_BL[rows], reduction="none")
            nll_BL = nll_N.new_zeros(targets_BL.shape).index_put(rows, nll_N)
        weight_BL = weight_BL.to(nll_BL.dtype)
        out.lm_loss = (nll_BL * weight_BL).sum() / weight_BL.sum().clamp(min=1e-12)
        self._kind_and_aux_losses(out, batch, nll_BL)

    def _kind_and_aux_losses(self, out: ModelOutput, batch: dict, nll_BL: torch.Tensor) -> None:
        """Per target kind (sum, count) of ``nll_BL``, and the MoE auxiliary losses; then
        ``out.loss``."""
        mask_BL = batch["loss_mask"][:, 1:]
        # per target kind: (sum, count) by scatter, no host read
        kind_BL = torch.where(mask_BL, batch["kinds"][:, 1:], len(Kind))
        sums_K2 = nll_BL.new_zeros(len(Kind) + 1, 2).index_put_(
            (kind_BL.reshape(-1),), torch.stack([nll_BL.detach().reshape(-1),
                                                 torch.ones_like(nll_BL).reshape(-1)], 1),
            accumulate=True)
        out.kind_sums_K2 = sums_K2[:len(Kind)]
        # means over the (layer, group) pairs that routed tokens; the column-space
        # dispatch keeps its sums and count on the device
        aux_sum = z_sum = n = out.lm_loss.new_zeros(())
        for layer in out.routing:
            if isinstance(layer, ColumnRouting):
                aux_sum, z_sum, n = aux_sum + layer.aux_sum, z_sum + layer.z_sum, n + layer.present
            else:
                for g in layer.values():
                    aux_sum, z_sum, n = aux_sum + g.aux_loss, z_sum + g.z_loss, n + 1
        n = n.clamp(min=1)
        out.aux_loss = self.cfg.moe.aux_loss_coef * aux_sum / n
        out.z_loss = self.cfg.moe.z_loss_coef * z_sum / n
        out.loss = out.lm_loss + out.aux_loss + out.z_loss

    # ---- balancing, decoding --------------------------------------------------------

    def update_router_biases(self, routing: list[dict[str, GroupRouting]]) -> None:
        """Aux-loss-free balancing step (``moe.bias_balancing``); call after each step."""
        moes = [b.ffn for b in self.blocks if isinstance(b.ffn, ModalityRoutedMoE)]
        for moe, r in zip(moes, routing, strict=True):
            moe.update_bias(r)

    def new_cache(self, capacity: int = 0) -> KVCache:
        return KVCache(self.cfg.num_layers, capacity=capacity,
                       hide_past_actions=self.cfg.past_actions == "hide",
                       always_mask=self.cfg.positions == "timestep_bias", rotary=self.rotary)

    def new_static_cache(self, *, rows: int, capacity: int, device) -> "StaticKVCache":
        """A ``StaticKVCache`` for CUDA-graphed decoding (``moe_gato.inference.graphs``)."""
        from moe_gato.model.static_cache import StaticKVCache
        return StaticKVCache(self.cfg.num_layers, rows=rows, capacity=capacity, device=device,
                             hide_past_actions=self.cfg.past_actions == "hide",
                             rotary=self.rotary)

    @torch.no_grad()
    def generate(self, batch: dict, num_tokens: int, *, kind: Kind = Kind.DISCRETE_ACTION,
                 num_choices: int | None = None, temperature: float = 1.0,
                 cache: KVCache | None = None, generator: torch.Generator | None = None,
                 feed_last: bool = True, step_logits=None) -> torch.Tensor:
        """Samples ``num_tokens`` tokens of ``kind`` (text or an action kind) after the
        prefix ``batch`` (all rows the same length; ``batch["valid"]`` marks padding),
        restricted to the kind's id range and to its first ``num_choices`` ids if given;
        temperature 0 is greedy. Returns (B, n) ids on the batch's device. With ``cache``,
        ``batch`` continues the positions already in it, and on return the cache holds the
        prefix and the generated tokens — all of them, or all but the last when
        ``feed_last`` is False (a control loop feeds the last action with the next
        observation, saving one forward pass per step). ``step_logits(batch, id_range)``:
        what runs each forward call on the cache and returns its (B, N) last-position
        logits (default: this model's forward; ``moe_gato.inference.graphs.StepGraphs``
        replays captured CUDA graphs of it)."""
        kind = Kind(kind)
        if kind not in (Kind.TEXT, *ACTION_KINDS):
            raise ValueError(f"kind must be text or an action kind, got {kind.name}")
        lo, hi = self.cfg.layout.id_range(kind)
        if num_choices is not None:
            if not 1 <= num_choices <= hi - lo:
                raise ValueError(f"num_choices must be in [1, {hi - lo}], got {num_choices}")
            hi = lo + num_choices
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        cache = cache if cache is not None else self.new_cache()
        if step_logits is None:
            def step_logits(b: dict, id_range: tuple[int, int]) -> torch.Tensor:
                return self(b, cache=cache, last_only=True, id_range=id_range).logits[:, -1]
        logits_BN = step_logits(batch, (lo, hi))
        B, device = logits_BN.shape[0], logits_BN.device
        local_pos_B = batch["local_pos"][:, -1]
        timestep_B1 = batch["timestep"][:, -1:]
        out = []
        for i in range(num_tokens):
            if temperature == 0:
                ids_B = logits_BN.float().argmax(-1)
            else:
                probs_BN = (logits_BN.float() / temperature).softmax(-1)
                ids_B = torch.multinomial(probs_BN, 1, generator=generator).squeeze(1)
            tokens_B = ids_B + lo
            out.append(tokens_B)
            if i == num_tokens - 1 and not feed_last:
                break
            local_pos_B = (torch.full_like(local_pos_B, ACTION_LOCAL_POS) if kind != Kind.TEXT
                           else (local_pos_B + 1).clamp(max=self.cfg.max_local_positions - 1))
            step = {"tokens": tokens_B[:, None], "kinds": torch.full_like(tokens_B, kind)[:, None],
                    "local_pos": local_pos_B[:, None],
                    "loss_mask": torch.zeros(B, 1, dtype=torch.bool, device=device),
                    "timestep": timestep_B1,
                    "image_rc": torch.zeros(B, 1, 4, device=device), "patches": None}
            logits_BN = step_logits(step, (lo, hi))
        return torch.stack(out, dim=1)

    # ---- accounting (see moe_gato.model.accounting) ----------------------------------

    def num_params(self, *, non_embedding: bool = False) -> int:
        from moe_gato.model import accounting
        if non_embedding:
            return accounting.num_non_embedding_params(self.cfg)
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self, *, group: str | None = None, kinds=None,
                          non_embedding: bool = False) -> float:
        from moe_gato.model import accounting
        return accounting.num_active_params(self.cfg, group=group, kinds=kinds,
                                            non_embedding=non_embedding)

    def flops_per_token(self, *, training: bool = False, seq_len: int | None = None,
                        kinds=None) -> float:
        from moe_gato.model import accounting
        return accounting.flops_per_token(self.cfg, training=training, seq_len=seq_len,
                                          kinds=kinds)

    def mfu(self, tokens_per_second: float, peak_flops: float, **kw) -> float:
        """Model FLOPs utilisation: training FLOPs per token x throughput / peak FLOP/s."""
        return self.flops_per_token(training=True, **kw) * tokens_per_second / peak_flops
