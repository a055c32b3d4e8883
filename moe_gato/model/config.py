"""Model configuration: ``ModelConfig`` (the transformer) and ``MoEConfig`` (its routed FFN).

Both are keyword-only dataclasses validated in ``__post_init__``; every error is a
``ValueError`` that names the field. Load presets with ``moe_gato.model.load_config``.

Modality groups. ``MoEConfig.groups`` maps a group name to the token kinds
(``Kind`` names, lower case) routed among that group's experts; every kind belongs to
exactly one group. Default::

    text         text, pad
    image        image
    observation  discrete_obs, continuous_obs
    action       separator, discrete_action, continuous_action

The separator joins the action group because its output predicts the first action
token; padding joins text (it is never a target, so its group only costs compute).

Fine-grained experts. With granularity ``G`` each expert's hidden size is
``ffn_hidden // G`` and a token picks ``top_k * G`` experts, so active FFN FLOPs equal
``top_k`` dense FFNs whatever ``G`` is. ``num_experts`` counts the (fine-grained)
experts that exist per group.

Added experts. ``added_experts`` more experts per group, appended after pretraining by
``moe-gato finetune --mode new-expert`` (``moe_gato.train.finetune``): each has its own
router row and bias and is routed *in addition to* the top-K (``moe_gato.model.moe``), so
that a checkpoint with a zero-initialised added expert computes exactly what it did
without it. A group then holds ``num_experts_of(g) + added_experts`` experts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from moe_gato.tokenizer.layout import Kind, VocabLayout

KIND_NAMES = tuple(k.name.lower() for k in Kind)
#: scales s of ``value_embedding="scalar"``: features tanh(s * v) of a bin's value v
SCALAR_VALUE_SCALES = (1.0, 4.0, 16.0, 64.0, 256.0)


def _default_groups() -> dict[str, list[str]]:
    return {"text": ["text", "pad"], "image": ["image"],
            "observation": ["discrete_obs", "continuous_obs"],
            "action": ["separator", "discrete_action", "continuous_action"]}


@dataclasses.dataclass(kw_only=True)
class MoEConfig:
    groups: dict[str, list[str]] = dataclasses.field(default_factory=_default_groups)
    num_experts: int = 8                  # experts per group (fine-grained count)
    experts_per_group: dict[str, int] = dataclasses.field(default_factory=dict)  # overrides
    #: experts appended to every group after pretraining (see the module docstring)
    added_experts: int = 0
    top_k: int = 1                        # dense-FFN equivalents per token; picks top_k * G
    granularity: int = 1                  # G: expert hidden = ffn_hidden // G
    shared_expert: bool = False           # one always-on expert (hidden ffn_hidden // G) per group
    renormalize: bool = True              # gates of the chosen experts sum to one
    #: factor on the chosen experts' gates; null = granularity G, so that G fine-grained
    #: experts of hidden ffn_hidden / G add up like one dense FFN (with renormalized gates
    #: summing to 1 they gave 1/G of it); 1.0 = plain renormalized gates
    routed_scale: float | None = None
    moe_every: int = 1                    # layer i is MoE when (i + 1) % moe_every == 0
    aux_loss_coef: float = 0.01           # Switch load-balancing loss (0 disables)
    z_loss_coef: float = 0.001            # router z-loss (0 disables)
    bias_balancing: bool = False          # DeepSeek-V3 aux-loss-free bias on selection
    bias_update_rate: float = 0.001       # gamma of the bias update
    capacity_factor: float | None = None  # None: dropless; else capacity per expert
    impl: Literal["torch", "triton"] = "torch"
    gemm: Literal["auto", "grouped", "padded"] = "auto"  # see moe_gato.model.dispatch
    #: "groups": a loop over the modality groups, each dispatched on its own (host-side
    #: counts: fastest on the CPU); "columns": every group's experts in one column space,
    #: counts and offsets kept on the device, no host read (the GPU path); "auto": columns
    #: on CUDA where it applies (dropless, no expert parallelism), groups elsewhere
    dispatch: Literal["auto", "groups", "columns"] = "auto"

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("moe.groups must name at least one group")
        seen: dict[str, str] = {}
        for name, kinds in self.groups.items():
            for kind in kinds:
                if kind not in KIND_NAMES:
                    raise ValueError(f"groups.{name}: unknown kind {kind!r}; allowed: "
                                     f"{list(KIND_NAMES)}")
                if kind in seen:
                    raise ValueError(f"groups: kind {kind!r} is in both {seen[kind]!r} "
                                     f"and {name!r}")
                seen[kind] = name
        missing = [k for k in KIND_NAMES if k not in seen]
        if missing:
            raise ValueError(f"groups: kinds {missing} belong to no group; every kind "
                             f"needs one")
        for name, n in self.experts_per_group.items():
            if name not in self.groups:
                raise ValueError(f"experts_per_group: unknown group {name!r}; groups are "
                                 f"{list(self.groups)}")
            if n < 1:
                raise ValueError(f"experts_per_group.{name} must be >= 1, got {n}")
        for field in ("num_experts", "top_k", "granularity", "moe_every"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.added_experts < 0:
            raise ValueError(f"added_experts must be >= 0, got {self.added_experts}")
        for name in self.groups:
            if self.top_k * self.granularity > self.num_experts_of(name):
                raise ValueError(
                    f"top_k: top_k * granularity = {self.top_k * self.granularity} exceeds "
                    f"the {self.num_experts_of(name)} experts of group {name!r}")
        if self.routed_scale is not None and not (math.isfinite(self.routed_scale)
                                                  and self.routed_scale > 0):
            raise ValueError(f"routed_scale must be a finite number > 0 or null (= granularity), "
                             f"got {self.routed_scale}")
        for field in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or null (dropless), "
                             f"got {self.capacity_factor}")
        if self.impl not in ("torch", "triton"):
            raise ValueError(f"impl must be 'torch' or 'triton', got {self.impl!r}")
        if self.dispatch not in ("auto", "groups", "columns"):
            raise ValueError(f"dispatch must be 'auto', 'groups' or 'columns', got {self.dispatch!r}")
        if self.dispatch == "columns" and (self.capacity_factor is not None
                                           or self.added_experts):
            raise ValueError("dispatch='columns' is dropless and routes no added experts; it "
                             "cannot take a capacity_factor or added_experts (use 'groups' "
                             "or 'auto')")
        if self.gemm not in ("auto", "grouped", "padded"):
            raise ValueError(f"gemm must be 'auto', 'grouped' or 'padded', got {self.gemm!r}")

    def num_experts_of(self, group: str) -> int:
        """The group's routed experts (top-K among these); ``added_experts`` come on top."""
        return self.experts_per_group.get(group, self.num_experts)

    @property
    def gate_scale(self) -> float:
        return float(self.granularity if self.routed_scale is None else self.routed_scale)

    @property
    def experts_per_token(self) -> int:
        return self.top_k * self.granularity

    def group_of(self, kind: Kind) -> str:
        name = Kind(kind).name.lower()
        return next(g for g, kinds in self.groups.items() if name in kinds)


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    # vocabulary (see moe_gato.tokenizer.layout.VocabLayout)
    text_vocab_size: int = 32000
    num_bins: int = 1024
    discrete_offset: Literal["shared", "separate"] = "shared"
    # transformer
    num_layers: int = 8
    d_model: int = 768
    num_heads: int = 24
    ffn_hidden: int = 3072
    context_length: int = 1024
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True
    #: continuous-value bins: "table" (Gato: one learned row per bin) or "smooth" (a
    #: learned map of fixed Fourier features of the bin index added to the table, whose
    #: bin rows start at zero, so that neighbouring values share their embedding)
    #: "scalar": the table plus a learned map of ``tanh(s * v)``, v the bin's mu-law value in
    #: [-1, 1], s = 1, 4, 16, 64, 256 (the value itself at five resolutions)
    value_embedding: Literal["table", "smooth", "scalar"] = "table"
    value_features: int = 32              # Fourier features of "smooth" (sin and cos pairs)
    #: "attend" (Gato): every position attends to all earlier ones. "hide": action tokens
    #: of earlier timesteps are hidden from later timesteps' positions (an action still
    #: sees its own timestep's earlier action tokens), so the policy cannot predict an
    #: action by copying the previous one (the copycat problem of behaviour cloning with
    #: action history; de Haan et al. 2019, Wen et al. 2020)
    past_actions: Literal["attend", "hide"] = "attend"
    #: position signal in attention beyond Gato's local positions
    #: (``moe_gato.model.positions``): "none" (Gato), "rope" (rotary embeddings of each
    #: token's position among its row's tokens) or "timestep_bias" (a fixed per-head bias
    #: on the timestep distance between query and key). Checkpoints saved before the key
    #: existed load as "none", what they were trained with.
    positions: Literal["none", "rope", "timestep_bias"] = "none"
    rope_base: float = 10000.0            # rotary frequencies base ** (-i / (Dh / 2))
    # Gato embeddings
    max_local_positions: int = 1024       # observation / text positions 0..n-1
    position_bins: int = 128              # patch row / column bins
    patch_channels: int = 64              # channels of the patch ResNet-v2 block
    patch_norm_groups: int = 8            # GroupNorm groups in that block
    # feed-forward
    ffn: Literal["dense", "moe"] = "dense"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        for field in ("text_vocab_size", "num_layers", "d_model", "num_heads", "ffn_hidden",
                      "context_length", "max_local_positions", "position_bins",
                      "patch_channels", "patch_norm_groups"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.patch_channels % self.patch_norm_groups:
            raise ValueError(f"patch_channels ({self.patch_channels}) must be divisible by "
                             f"patch_norm_groups ({self.patch_norm_groups})")
        if self.value_embedding not in ("table", "smooth", "scalar"):
            raise ValueError(f"value_embedding must be 'table', 'smooth' or 'scalar', "
                             f"got {self.value_embedding!r}")
        if self.value_features < 2 or self.value_features % 2:
            raise ValueError(f"value_features must be an even number >= 2, "
                             f"got {self.value_features}")
        if self.past_actions not in ("attend", "hide"):
            raise ValueError(f"past_actions must be 'attend' or 'hide', got {self.past_actions!r}")
        if self.positions not in ("none", "rope", "timestep_bias"):
            raise ValueError(f"positions must be 'none', 'rope' or 'timestep_bias', "
                             f"got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"positions='rope' needs an even head width; d_model / num_heads "
                             f"= {self.d_model} / {self.num_heads} = {self.head_dim}")
        if not (math.isfinite(self.rope_base) and self.rope_base > 1):
            raise ValueError(f"rope_base must be a finite number > 1, got {self.rope_base}")
        if self.ffn not in ("dense", "moe"):
            raise ValueError(f"ffn must be 'dense' or 'moe', got {self.ffn!r}")
        if self.ffn == "moe" and self.ffn_hidden % self.moe.granularity:
            raise ValueError(f"ffn_hidden ({self.ffn_hidden}) must be divisible by "
                             f"moe.granularity ({self.moe.granularity})")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("norm_eps and init_std must be > 0")
        self.layout  # VocabLayout validates num_bins / discrete_offset

    @property
    def layout(self) -> VocabLayout:
        try:
            return VocabLayout(text_vocab_size=self.text_vocab_size, num_bins=self.num_bins,
                               discrete_offset=self.discrete_offset)
        except ValueError as exc:
            raise ValueError(f"text_vocab_size / num_bins / discrete_offset: {exc}") from None

    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size

    @property
    def num_value_features(self) -> int:
        """Features the value map reads (0 for Gato's table)."""
        return {"table": 0, "smooth": self.value_features,
                "scalar": len(SCALAR_VALUE_SCALES)}[self.value_embedding]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.ffn == "moe" and (i + 1) % self.moe.moe_every == 0

    @property
    def expert_hidden(self) -> int:
        return self.ffn_hidden // self.moe.granularity


def upgrade_saved(model: dict) -> dict:
    """A model config as saved by an earlier version, with the values it was trained
    with where a key was added since: ``moe.routed_scale`` (missing: plain renormalized
    gates, 1.0) and ``positions`` (missing: "none"). Used when loading checkpoints and
    comparing a resumed run's config."""
    if isinstance(model, dict) and "positions" not in model:  # kept explicit: a default may move
        model = {**model, "positions": "none"}
    moe = model.get("moe")
    if model.get("ffn") == "moe" and isinstance(moe, dict) and "routed_scale" not in moe:
        model = {**model, "moe": {**moe, "routed_scale": 1.0}}
    return model
