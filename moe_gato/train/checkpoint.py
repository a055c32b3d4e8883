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
half-written folder under the final name, and it is never written when a weight or an
optimizer tensor is non-finite. Resuming (``resume_checkpoint``) takes the newest
checkpoint that loads: its checksums verify, its files parse, every tensor has the
model's (optimizer's) names, shapes and dtypes and is finite. One that fails is skipped
with a warning; when every one fails, ``CheckpointError`` lists them all and nothing is
touched. Keep-last prunes by step number, among the steps up to the one just written.
Nothing is unpickled.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe_gato.config import save_config
from moe_gato.model import save_checkpoint as save_model
from moe_gato.model.checkpoint import (CHECKSUMS, checksum_problem, state_mismatch,
                                       write_checksums)

PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (non-finite state) or loaded, or a run none of
    whose checkpoints loads."""


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a nan or an inf."""
    return [k for k, t in tensors.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


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
    weights = model_state if model_state is not None else model.state_dict()
    opt_tensors, groups = optimizer_tensors(optimizer) if optimizer is not None else ({}, [])
    bad = non_finite(weights) + non_finite(opt_tensors)
    if bad:
        raise CheckpointError(f"not writing checkpoint step {step}: {len(bad)} tensor(s) hold "
                              f"non-finite values, e.g. {bad[:3]}")
    tmp = staging_dir(run_dir, step, clear=optimizer is not None)
    save_model(model, tmp, model_state)
    if optimizer is not None:
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {**state, "optimizer_groups": groups}
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    full_state = {"step": step, "rng": rng_meta, **state}
    (tmp / "state.json").write_text(json.dumps(full_state, indent=1, default=_json_default))
    save_config(train_cfg, tmp / "train_config.yaml")
    write_checksums(tmp)
    final = tmp.with_name(f"{PREFIX}{step:08d}")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    # later steps are a broken timeline this run resumed before (they are replaced when
    # it gets there); never let them push the checkpoints of this one out
    ours = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= step]
    for old in ours[:-keep_last] if keep_last > 0 else []:
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


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoint folders ``step_<digits>``, by step number, oldest first (``.tmp``
    leftovers are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches its checksum, else what is wrong."""
    return checksum_problem(Path(path))


def latest_valid_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose checksums verify; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}; trying the previous one",
                      stacklevel=2)
    return None


def resume_checkpoint(run_dir: str | Path, load) -> Path | None:
    """Calls ``load(path)`` on the newest checkpoint whose checksums verify, then on the
    previous ones while it raises; returns the checkpoint that loaded. Each one skipped is
    a warning. None when the run has no checkpoint; ``CheckpointError`` listing every
    checkpoint and its problem when it has some and none loads."""
    problems = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                load(path)
                return path
            except Exception as exc:  # noqa: BLE001 - anything unreadable: the previous one
                problem = f"cannot be loaded ({type(exc).__name__}: {exc})"
        problems.append(f"{path.name}: {problem}")
        warnings.warn(f"skipping checkpoint {path}: {problem}; trying the previous one",
                      stacklevel=2)
    if problems:
        raise CheckpointError(
            f"no checkpoint of {run_dir} can be resumed from; nothing was changed. Fix or move "
            f"them (or start over with --overwrite, which moves the run aside):\n  "
            + "\n  ".join(problems))
    return None


def _check_tensors(path: Path, file: str, got: dict[str, torch.Tensor],
                   want: dict[str, torch.Tensor]) -> None:
    problem = state_mismatch(got, want, wanted_by="the model")
    if problem:
        raise CheckpointError(f"{path / file} does not match the model: {problem}")
    bad = non_finite(got)
    if bad:
        raise CheckpointError(f"{path / file} holds non-finite values in {bad[:3]}")


def _optimizer_shapes(optimizer: torch.optim.Optimizer, groups: list,
                      tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``tensors`` must look like for ``optimizer`` (per-parameter state shaped as
    the parameter, scalars as scalars)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not isinstance(groups, list) or [len(g.get("params", [])) for g in groups] != [
            len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError("the optimizer's parameter groups do not match the model")
    want = {}
    for key, t in tensors.items():
        parts = key.split("/", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() \
                or int(parts[1]) >= len(params):
            raise CheckpointError(f"optimizer.safetensors holds an unknown tensor {key!r}")
        p = params[int(parts[1])]
        want[key] = (torch.empty((), dtype=t.dtype) if t.dim() == 0
                     else torch.empty(p.shape, dtype=p.dtype))
    return want


def load_training_state(path: Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None,
                        localize=None) -> dict[str, Any]:
    """Loads weights, optimizer and RNG from ``path`` into the given objects; returns the
    JSON state (step, tokens, scheduler, data position, ...). ``localize`` maps the full
    state dict to this rank's part (expert parallelism). Everything is read and checked
    (names, shapes, dtypes, finite values) before anything is applied: a checkpoint that
    cannot be loaded raises ``CheckpointError`` and leaves the objects as they were."""
    path = Path(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = json.loads((path / "state.json").read_text())
        opt = load_file(str(path / "optimizer.safetensors")) if optimizer is not None else None
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, OSError, UnicodeDecodeError, json.JSONDecodeError,
            RuntimeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not {"step", "tokens", "rng"} <= set(state):
        raise CheckpointError(f"{path / 'state.json'} lacks step, tokens or rng")
    if localize is not None:
        weights = localize(weights)
    _check_tensors(path, "model.safetensors", weights, model.state_dict())
    if optimizer is not None:
        groups = state.pop("optimizer_groups", None)
        _check_tensors(path, "optimizer.safetensors", opt, _optimizer_shapes(optimizer, groups, opt))
    torch_rng = torch.get_rng_state()
    if "torch" not in rng or rng["torch"].shape != torch_rng.shape \
            or rng["torch"].dtype != torch_rng.dtype:
        raise CheckpointError(f"{path / 'rng.safetensors'} holds no valid torch generator state")
    rng_meta = state.pop("rng")
    try:
        v, py_state, gauss = rng_meta["python"]
        random.Random().setstate((v, tuple(py_state), gauss))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'state.json'}: bad python RNG state ({exc})") from None
    model.load_state_dict(weights)
    if optimizer is not None:
        restore_optimizer(optimizer, opt, groups)
    restore_rng(rng, rng_meta)
    return state


def model_folder(path: str | Path) -> Path:
    """The model checkpoint ``path`` names: a checkpoint folder (``model.safetensors`` +
    ``config.yaml``, checked against ``checksums.json`` where there is one) or a training
    run directory, whose newest checkpoint that verifies is taken."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        if (path / CHECKSUMS).is_file() and (problem := verify_checkpoint(path)):
            raise ValueError(f"checkpoint {path}: {problem}")
        return path
    if (path / "checkpoints").is_dir():
        folder = latest_valid_checkpoint(path)
        if folder is None:
            raise ValueError(f"run directory {path} holds no checkpoint that verifies "
                             f"(see the warnings above)")
        return folder
    raise ValueError(f"{path} is neither a checkpoint folder (model.safetensors + "
                     f"config.yaml) nor a training run directory (checkpoints/step_*)")
