"""Checkpoints: ``model.safetensors`` (tensors only, never pickles) plus ``config.yaml``
(the resolved ``ModelConfig``). A training checkpoint adds ``checksums.json`` (sha256 of
every file); loading verifies the model's two files against it when it is there and warns
when it is not (``verify=False`` skips both). Bad, corrupt or mismatched files raise
``ValueError``.

    save_checkpoint(model, "runs/x/step_100")
    model = load_checkpoint("runs/x/step_100")
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe_gato.config import from_dict, load_yaml, save_config
from moe_gato.model.config import ModelConfig, upgrade_saved

WEIGHTS, CONFIG, CHECKSUMS = "model.safetensors", "config.yaml", "checksums.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: Path) -> None:
    """``checksums.json``: sha256 of every file under ``directory`` (itself excluded)."""
    sums = {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory) != Path(CHECKSUMS)}
    (directory / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def checksum_problem(directory: Path, names: list[str] | None = None) -> str | None:
    """None if every file listed in ``checksums.json`` (or only ``names``, which must be
    listed) matches its checksum; else what is wrong."""
    sums_file = directory / CHECKSUMS
    if not sums_file.is_file():
        return f"{CHECKSUMS} is missing"
    try:
        sums = json.loads(sums_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{CHECKSUMS} is not valid JSON ({exc})"
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        return f"{CHECKSUMS} is not a mapping of file name to sha256"
    for name in names if names is not None else sums:
        if name not in sums:
            return f"{CHECKSUMS} does not list {name}"
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != sums[name]:
            return f"{name} does not match its checksum (corrupt or truncated)"
    return None


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


def load_checkpoint(directory: str | Path, *, map_location: str | torch.device = "cpu",
                    verify: bool = True):
    """The model in ``directory``. With ``verify`` (the default) its files are checked
    against ``checksums.json`` (a mismatch is a ``ValueError``); a folder without that file
    loads with a warning. ``verify=False``: no check, no warning (the caller verified)."""
    from moe_gato.model import build_model

    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise ValueError(f"checkpoint {directory} has no {name}")
    if verify:
        if not (directory / CHECKSUMS).is_file():
            warnings.warn(f"checkpoint {directory} has no {CHECKSUMS}: its files are loaded "
                          f"unverified", stacklevel=2)
        elif problem := checksum_problem(directory, [WEIGHTS, CONFIG]):
            raise ValueError(f"checkpoint {directory}: {problem}")
    cfg = load_model_config(directory)
    try:
        state = load_file(str(directory / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"checkpoint {directory / WEIGHTS} is not a valid safetensors "
                         f"file: {exc}") from None
    model = build_model(cfg)
    problem = state_mismatch(state, model.state_dict(), wanted_by="the config")
    if problem:
        raise ValueError(f"checkpoint {directory} does not match its config: {problem}")
    model.load_state_dict(state)
    return model.to(map_location)


def load_model_config(directory: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of the checkpoint in ``directory`` (its weights are not read)."""
    return from_dict(ModelConfig, upgrade_saved(load_yaml(Path(directory) / CONFIG)))


def state_mismatch(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *,
                   wanted_by: str) -> str | None:
    """What differs between two state dicts in names, shapes or dtypes; None if nothing."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        return f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    for k, t in got.items():
        if t.shape != want[k].shape or t.dtype != want[k].dtype:
            return (f"{k} has shape {tuple(t.shape)} {t.dtype}, {wanted_by} wants "
                    f"{tuple(want[k].shape)} {want[k].dtype}")
    return None
