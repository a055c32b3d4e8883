"""Training checkpoints that restore everything, written atomically, verified on load.

A checkpoint is a folder ``RUN/checkpoints/step_00000100/``:

    model.safetensors, config.yaml   the model (``moe_gato.model.save_checkpoint``)
    optimizer.safetensors            every optimizer state tensor, keyed state/<param>/<name>
                                     (under DeepSpeed: deepspeed/, its ZeRO shards instead)
    rng.safetensors                  torch CPU (and CUDA) generator states
    state.json                       step, tokens, optimizer param groups, scheduler, data
                                     position, numpy/python RNG, anything the trainer adds
    train_config.yaml                the resolved training config
    checksums.json                   sha256 of every file above (written last)

It is written into ``step_X.tmp`` and renamed into place, so a crash never leaves a
half-written folder under the final name. Loading verifies the checksums; a corrupt or
truncated checkpoint is skipped with a warning and the previous one is used. Nothing is
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moe_gato.config import save_config
from moe_gato.model import save_checkpoint as save_model

CHECKSUMS = "checksums.json"
PREFIX = "step_"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Splits ``optimizer.state_dict()`` into tensors (for safetensors) and JSON groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state/{idx}/{name}"] = t.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda/")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))


def save_training_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer | None, train_cfg: Any,
                             state: dict[str, Any], keep_last: int = 3,
                             model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes ``run_dir/checkpoints/step_<step>`` atomically; keeps the newest ``keep_last``.
    ``optimizer=None`` when the optimizer state was already written into the ``.tmp``
    folder by every rank (DeepSpeed's ZeRO shards under ``deepspeed/``, or expert-parallel
    shards under ``optimizer/``). ``model_state`` replaces the model's own state dict."""
    tmp = staging_dir(run_dir, step, clear=optimizer is not None)
    save_model(model, tmp, model_state)
    if optimizer is not None:
        opt_tensors, groups = optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {**state, "optimizer_groups": groups}
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    full_state = {"step": step, "rng": rng_meta, **state}
    (tmp / "state.json").write_text(json.dumps(full_state, indent=1, default=_json_default))
    save_config(train_cfg, tmp / "train_config.yaml")
    sums = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    final = tmp.with_name(f"{PREFIX}{step:08d}")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def staging_dir(run_dir: str | Path, step: int, clear: bool = True) -> Path:
    """The ``.tmp`` folder a checkpoint is written into before it is renamed."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{PREFIX}{step:08d}.tmp"
    if clear and tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot store {type(o).__name__} in state.json")


def save_optimizer_shard(run_dir: str | Path, step: int, rank: int,
                         optimizer: torch.optim.Optimizer) -> None:
    """One rank's optimizer state into the staging folder (expert parallelism: every rank
    holds different experts, so every rank's state is its own)."""
    folder = staging_dir(run_dir, step, clear=False) / "optimizer"
    folder.mkdir(parents=True, exist_ok=True)
    tensors, groups = optimizer_tensors(optimizer)
    save_file(tensors, str(folder / f"rank_{rank}.safetensors"))
    (folder / f"rank_{rank}.json").write_text(json.dumps(groups, default=_json_default))


def load_optimizer_shard(path: Path, rank: int, optimizer: torch.optim.Optimizer) -> None:
    folder = path / "optimizer"
    if not (folder / f"rank_{rank}.safetensors").is_file():
        raise ValueError(f"checkpoint {path} holds no optimizer shard for rank {rank}: it was "
                         f"written with another expert-parallel layout")
    restore_optimizer(optimizer, load_file(str(folder / f"rank_{rank}.safetensors")),
                      json.loads((folder / f"rank_{rank}.json").read_text()))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (``.tmp`` leftovers are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp"))


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches its checksum, else what is wrong."""
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        return f"{CHECKSUMS} is missing"
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError as exc:
        return f"{CHECKSUMS} is not valid JSON ({exc})"
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum (corrupt or truncated)"
    return None


def latest_valid_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose checksums verify; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}; trying the previous one",
                      stacklevel=2)
    return None


def load_training_state(path: Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None,
                        localize=None) -> dict[str, Any]:
    """Loads weights, optimizer and RNG from ``path`` into the given objects; returns the
    JSON state (step, tokens, scheduler, data position, ...). ``localize`` maps the full
    state dict to this rank's part (expert parallelism)."""
    weights = load_file(str(path / "model.safetensors"))
    if localize is not None:
        weights = localize(weights)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    state = json.loads((path / "state.json").read_text())
    if optimizer is not None:
        restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")),
                          state.pop("optimizer_groups"))
    restore_rng(load_file(str(path / "rng.safetensors")), state.pop("rng"))
    return state
