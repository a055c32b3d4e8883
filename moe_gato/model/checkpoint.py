"""Checkpoints: ``model.safetensors`` (tensors only, never pickles) plus ``config.yaml``
(the resolved ``ModelConfig``). Bad or mismatched files raise ``ValueError``.

    save_checkpoint(model, "runs/x/step_100")
    model = load_checkpoint("runs/x/step_100")
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe_gato.config import load_config, save_config
from moe_gato.model.config import ModelConfig

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"


def save_checkpoint(model, directory: str | Path, state_dict: dict | None = None) -> Path:
    """Writes ``model.safetensors`` and ``config.yaml``; ``state_dict`` replaces
    ``model.state_dict()`` (e.g. expert shards gathered from several ranks)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu()
             for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "moe_gato"})
    tmp.replace(directory / WEIGHTS)
    save_config(model.cfg, directory / CONFIG)
    return directory


def load_checkpoint(directory: str | Path, *, map_location: str | torch.device = "cpu"):
    from moe_gato.model import build_model

    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise ValueError(f"checkpoint {directory} has no {name}")
    cfg = load_config(ModelConfig, directory / CONFIG)
    try:
        state = load_file(str(directory / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"checkpoint {directory / WEIGHTS} is not a valid safetensors "
                         f"file: {exc}") from None
    model = build_model(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not match its config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
            raise ValueError(f"checkpoint {directory}: {k} has shape {tuple(v.shape)} "
                             f"{v.dtype}, the config wants {tuple(expected[k].shape)} "
                             f"{expected[k].dtype}")
    model.load_state_dict(state)
    return model.to(map_location)
