"""The Gato model, dense or with modality-routed experts.

    cfg = load_config("configs/model/tiny-moe.yaml", ["moe.top_k=2"])
    model = build_model(cfg)
    out = model(batch)          # batch from moe_gato.tokenizer.layout.collate
    out.loss.backward()
    model.num_params(), model.num_active_params(), model.flops_per_token()
"""

from __future__ import annotations

from pathlib import Path

from moe_gato import config as _config
from moe_gato.model.checkpoint import load_checkpoint, save_checkpoint
from moe_gato.model.config import ModelConfig, MoEConfig
from moe_gato.model.model import GatoModel, KVCache, ModelOutput
from moe_gato.model.moe import GroupRouting, ModalityRoutedMoE


def load_config(path: str | Path | None = None, overrides=()) -> ModelConfig:
    """Dataclass defaults, then the preset YAML at ``path``, then dotted overrides."""
    return _config.load_config(ModelConfig, path, list(overrides))


def build_model(cfg: ModelConfig) -> GatoModel:
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    return GatoModel(cfg)


__all__ = ["ModelConfig", "MoEConfig", "GatoModel", "KVCache", "ModelOutput", "GroupRouting",
           "ModalityRoutedMoE", "build_model", "load_config", "save_checkpoint",
           "load_checkpoint"]
