"""The model-shape family of a sweep: one model per (width, expert choice).

    from scaling.family import ExpertChoice, FamilyConfig, model_config
    cfg = model_config(FamilyConfig(), d_model=128, experts=ExpertChoice(experts=4, k=1, G=2))

Rules at a fixed aspect ratio (as Kaplan et al. 2020 and Hoffmann et al. 2022 scale width
and depth together): ``num_layers = d_model / width_per_layer`` (at least ``min_layers``),
``num_heads = d_model / head_dim``, ``ffn_hidden = ffn_mult * d_model``; the rest (text
vocabulary, patch block, groups, losses) comes from the ``base`` model preset. The tiny
presets are this family's d_model = 128 member.

An expert choice names the fine-grained experts per modality group (``experts``), the
dense-FFN equivalents each token picks (``k``) and the granularity ``G`` (expert hidden =
ffn_hidden / G, each token picks k * G of them). ``experts = 1`` is the dense twin. The
scaling laws take the expansion rate ``E = experts / G`` (total FFN parameters of a group
over one dense FFN's; 1 for the dense twin), the quantity Clark et al. 2022 and
Ludziejewski et al. 2025 call the number of experts at granularity 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moe_gato.config import deep_merge, from_dict, load_yaml
from moe_gato.model.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(kw_only=True)
class FamilyConfig:
    #: model preset every member starts from (vocabulary, patch block, MoE groups and losses)
    base: str = "configs/model/tiny-moe.yaml"
    width_per_layer: int = 32
    head_dim: int = 32
    ffn_mult: int = 4
    min_layers: int = 2

    def __post_init__(self) -> None:
        for field in ("width_per_layer", "head_dim", "ffn_mult", "min_layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"family.{field} must be >= 1, got {getattr(self, field)}")

    def base_model(self) -> dict:
        """The ``base`` preset's model mapping (a path, or one relative to the repository)."""
        path = Path(self.base)
        return load_yaml(path if path.is_file() else REPO / path)


@dataclasses.dataclass(kw_only=True, frozen=True)
class ExpertChoice:
    experts: int = 1   # fine-grained experts per modality group; 1 = the dense twin
    k: int = 1         # dense-FFN equivalents per token (top_k)
    G: int = 1         # granularity: expert hidden = ffn_hidden / G

    def __post_init__(self) -> None:
        for field in ("experts", "k", "G"):
            if getattr(self, field) < 1:
                raise ValueError(f"experts.{field} must be >= 1, got {getattr(self, field)}")
        if self.dense and (self.k, self.G) != (1, 1):
            raise ValueError(f"experts: 1 is the dense twin; it takes k = 1 and G = 1, "
                             f"got k = {self.k}, G = {self.G}")
        if not self.dense and self.k * self.G > self.experts:
            raise ValueError(f"experts: k * G = {self.k * self.G} exceeds the {self.experts} "
                             f"experts per group")

    @property
    def dense(self) -> bool:
        return self.experts == 1

    @property
    def expansion(self) -> float:
        """E of the scaling laws: the group's FFN parameters in dense-FFN units."""
        return self.experts / self.G

    @property
    def tag(self) -> str:
        return "dense" if self.dense else f"E{self.experts}k{self.k}G{self.G}"


def model_config(family: FamilyConfig, *, d_model: int, experts: ExpertChoice,
                 base: dict | None = None, context_length: int | None = None) -> ModelConfig:
    """The family's member of width ``d_model`` with ``experts``. ``base`` (a model config
    mapping, e.g. a training recipe's resolved model) replaces the ``family.base`` preset:
    its options (value embedding, past actions, groups) carry over, its shape does not."""
    if d_model % family.head_dim:
        raise ValueError(f"d_model ({d_model}) must be a multiple of family.head_dim "
                         f"({family.head_dim})")
    data = dict(family.base_model() if base is None else base)
    ffn_hidden = family.ffn_mult * d_model
    if not experts.dense and ffn_hidden % experts.G:
        raise ValueError(f"ffn_hidden {ffn_hidden} (ffn_mult x d_model) is not divisible by "
                         f"G = {experts.G}")
    shape = {"d_model": d_model, "num_heads": d_model // family.head_dim,
             "num_layers": max(family.min_layers, round(d_model / family.width_per_layer)),
             "ffn_hidden": ffn_hidden}
    if experts.dense:
        shape["ffn"] = "dense"
    else:
        shape["ffn"] = "moe"
        shape["moe"] = {"num_experts": experts.experts, "top_k": experts.k,
                        "granularity": experts.G}
    if context_length is not None:
        shape["context_length"] = context_length
    if experts.dense:
        data.pop("moe", None)
    return from_dict(ModelConfig, deep_merge(data, shape))
