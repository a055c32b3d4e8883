"""One HF ``datasets`` folder per task (Arrow, memory-mapped) plus ``task.json``.

Layout of a suite directory::

    DIR/manifest.json                          the suite: {"tasks": {name: entry}}
    DIR/<domain>/<env-id>/                     ``Dataset.save_to_disk`` + task.json

Row schema of a control task (one row per episode)::

    task str, episode int32, seed int64, length int32, return float32, success bool,
    expert_return float32, random_return float32,
    actions binary   (T,) int64 or (T, A) float32 in [-1, 1], C order
    rewards binary   (T,) float32
    obs/<key> binary (T, *shape) of the field's dtype, or list[str] for text fields

A caption task has ``image binary`` (H, W[, C] uint8) and ``caption str``; a text task has
``document str`` and ``text str``. ``task.json`` holds what decodes the bytes (field
dtypes and shapes, action kind, dimension and range) and the measured returns; a copy of
what decodes the bytes also goes into the dataset's own ``dataset_info.json``. A folder
is written under ``<name>.partial`` and renamed when complete, so a folder without
``task.json`` or with fewer rows than it declares was not written by this code. Opening a
task checks ``task.json`` against the stored data: its decoding keys against the copy,
and the byte size of every row's arrays against length x shape x dtype.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from moe_gato.envs.episode import Episode, FieldSpec

FORMAT_VERSION = 1
TASK_FILE = "task.json"
MANIFEST = "manifest.json"
PARTIAL = ".partial"
#: the task.json keys that decode the stored bytes (copied into dataset_info.json)
DECODING_KEYS = ("kind", "obs_spec", "action_kind", "action_dim", "image_shape")


def _datasets():
    """``datasets``, offline (nothing here ever downloads)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    return datasets


class DataError(ValueError):
    """A dataset folder that is missing, truncated, from another version, or in the way."""


def task_dir(root: str | Path, name: str) -> Path:
    return Path(root) / name  # "babyai/BabyAI-GoToLocal-v0" -> root/babyai/BabyAI-GoToLocal-v0


def control_rows(task: str, episodes: list[Episode], meta: dict) -> tuple[dict, Any]:
    datasets = _datasets()

    obs_spec = {k: FieldSpec.from_json(v) for k, v in meta["obs_spec"].items()}
    rows: dict[str, list] = {
        "task": [task] * len(episodes), "episode": list(range(len(episodes))),
        "seed": [e.seed for e in episodes], "length": [len(e) for e in episodes],
        "return": [e.episode_return for e in episodes], "success": [e.success for e in episodes],
        "expert_return": [meta["expert_return"]] * len(episodes),
        "random_return": [meta["random_return"]] * len(episodes),
        "actions": [np.ascontiguousarray(e.actions).tobytes() for e in episodes],
        "rewards": [np.ascontiguousarray(e.rewards, np.float32).tobytes() for e in episodes],
    }
    feats = {"task": datasets.Value("string"), "episode": datasets.Value("int32"),
             "seed": datasets.Value("int64"), "length": datasets.Value("int32"),
             "return": datasets.Value("float32"), "success": datasets.Value("bool"),
             "expert_return": datasets.Value("float32"), "random_return": datasets.Value("float32"),
             "actions": datasets.Value("binary"), "rewards": datasets.Value("binary")}
    for key, spec in obs_spec.items():
        col = f"obs/{key}"
        if spec.modality == "text":
            rows[col] = [list(e.observations[key]) for e in episodes]
            feats[col] = datasets.Sequence(datasets.Value("string"))
        else:
            rows[col] = [np.ascontiguousarray(e.observations[key], spec.dtype).tobytes()
                         for e in episodes]
            feats[col] = datasets.Value("binary")
    return rows, datasets.Features(feats)


def write_task(root: str | Path, name: str, rows: dict, features: Any, meta: dict,
               *, overwrite: bool = False) -> Path:
    """Writes the task's dataset atomically (``.partial`` folder, then rename)."""
    datasets = _datasets()

    final = task_dir(root, name)
    if final.exists() and not overwrite:
        raise DataError(f"{final} exists; pass --overwrite to replace it")
    partial = final.with_name(final.name + PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    decoding = {k: meta[k] for k in DECODING_KEYS if k in meta}
    info = datasets.DatasetInfo(description=json.dumps({"moe_gato_decoding": decoding}),
                                features=features)
    ds = datasets.Dataset.from_dict(rows, features=features, info=info)
    ds.save_to_disk(str(partial))
    meta = dict(meta, format_version=FORMAT_VERSION, task=name, rows=len(ds))
    (partial / TASK_FILE).write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def read_meta(path: str | Path) -> dict:
    """``task.json`` of a task folder; ``DataError`` if missing, unreadable or another version."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"dataset folder {path} is missing; run `moe-gato collect` first")
    meta_file = path / TASK_FILE
    if not meta_file.is_file():
        raise DataError(f"{path} has no {TASK_FILE}: not a moe_gato task folder, or its "
                        f"collection was interrupted; collect it again with --overwrite")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_file} is unreadable ({exc}); collect again with --overwrite") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_file} does not hold an object; collect again with --overwrite")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} holds data format version {meta.get('format_version')}, this "
                        f"code reads version {FORMAT_VERSION}; collect again with --overwrite")
    return meta


class TaskData:
    """A stored task, memory-mapped. ``episode(i)``, ``caption(i)`` or ``text(i)`` by kind."""

    def __init__(self, path: str | Path) -> None:
        datasets = _datasets()

        self.path = Path(path)
        self.meta = read_meta(self.path)
        try:
            self.ds = datasets.load_from_disk(str(self.path))
        except Exception as exc:  # noqa: BLE001 - any reader failure means a broken folder
            raise DataError(f"{self.path} could not be read as a dataset ({type(exc).__name__}: "
                            f"{exc}); collect again with --overwrite") from None
        meta_file = self.path / TASK_FILE
        required = {"rows", "kind", "task"}
        if self.meta.get("kind") == "control":
            required |= {"obs_spec", "action_kind", "action_dim"}
        if self.meta.get("kind") == "caption":
            required |= {"image_shape"}
        if missing := sorted(required - set(self.meta)):
            raise DataError(f"{meta_file} lacks {missing}; collect again with --overwrite")
        if len(self.ds) != self.meta["rows"]:
            raise DataError(f"{self.path} is truncated: {len(self.ds)} rows, task.json "
                            f"declares {self.meta['rows']}; collect again with --overwrite")
        self.kind = self.meta["kind"]
        self.name = self.meta["task"]
        self._recent: dict[int, Episode] = {}
        self._check_decoding(meta_file)
        if self.kind == "control":
            try:
                self.obs_spec = {k: FieldSpec.from_json(v) for k, v in self.meta["obs_spec"].items()}
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{meta_file}: obs_spec of task {self.name} is invalid "
                                f"({type(exc).__name__}: {exc}); collect again with "
                                f"--overwrite") from None
            self._check_sizes(meta_file)
        elif self.kind == "caption":
            self._check_image_sizes(meta_file)

    def _check_image_sizes(self, meta_file: Path) -> None:
        import pyarrow.compute as pc

        try:
            size = int(np.prod([int(n) for n in self.meta["image_shape"]]))
        except (TypeError, ValueError):
            raise DataError(f"{meta_file}: image_shape of task {self.name} is not a list of "
                            f"sizes; collect again with --overwrite") from None
        got = pc.binary_length(self.ds.data.column("image")).to_numpy(zero_copy_only=False)
        if (np.asarray(got) != size).any():
            raise DataError(f"{meta_file} does not describe the stored images of task "
                            f"{self.name}: image_shape makes {size} bytes, rows hold "
                            f"{sorted(set(np.asarray(got).tolist()))[:3]}; restore task.json "
                            f"or collect again with --overwrite")

    def _check_decoding(self, meta_file: Path) -> None:
        """task.json's decoding keys equal the copy stored with the data (when there is one:
        folders written before it was added carry none)."""
        try:
            stored = json.loads(self.ds.info.description or "{}").get("moe_gato_decoding")
        except (json.JSONDecodeError, AttributeError):
            stored = None
        if not isinstance(stored, dict):
            return
        for key in DECODING_KEYS:
            if stored.get(key) != self.meta.get(key):
                raise DataError(f"{meta_file}: {key} of task {self.name} is {self.meta.get(key)!r}, "
                                f"but the data was written as {stored.get(key)!r}; the file was "
                                f"edited or mixed up: restore it or collect again with --overwrite")

    def _check_sizes(self, meta_file: Path) -> None:
        """The bytes of every row's arrays are length x shape x itemsize of task.json."""
        import pyarrow.compute as pc

        table = self.ds.data
        lengths = np.asarray(table.column("length").to_numpy(), np.int64)
        per_step = {"rewards": 4}
        if self.meta["action_kind"] == "discrete":
            per_step["actions"] = 8
        else:
            per_step["actions"] = 4 * int(self.meta["action_dim"])
        for key, spec in self.obs_spec.items():
            if spec.modality != "text":
                per_step[f"obs/{key}"] = np.dtype(spec.dtype).itemsize * int(np.prod(spec.shape))
        for col, size in per_step.items():
            if col not in table.column_names:
                raise DataError(f"{meta_file} declares {col} of task {self.name}, which the "
                                f"stored data lacks; collect again with --overwrite")
            got = np.asarray(pc.binary_length(table.column(col)).to_numpy(zero_copy_only=False),
                             np.int64)
            bad = np.flatnonzero(got != lengths * size)
            if len(bad):
                i = int(bad[0])
                raise DataError(f"{meta_file} does not describe the stored {col} of task "
                                f"{self.name}: row {i} holds {got[i]} bytes, task.json's dtype "
                                f"and shape make {lengths[i]} x {size}; restore task.json or "
                                f"collect again with --overwrite")

    def __len__(self) -> int:
        return len(self.ds)

    def episode(self, i: int) -> Episode:
        """Episode ``i`` (arrays are read-only views of the row's bytes). The last two rows
        read are kept: a long episode (Atari: ~20k frames) is cropped many times over."""
        i = int(i)
        hit = self._recent.get(i)
        if hit is None:
            hit = self._read_episode(i)
            self._recent = {**dict(list(self._recent.items())[-1:]), i: hit}
        return hit

    def _read_episode(self, i: int) -> Episode:
        row = self.ds[int(i)]
        T = row["length"]
        obs: dict[str, Any] = {}
        for key, spec in self.obs_spec.items():
            value = row[f"obs/{key}"]
            if spec.modality == "text":
                obs[key] = value
            else:
                obs[key] = np.frombuffer(value, spec.dtype).reshape(T, *spec.shape)
        if self.meta["action_kind"] == "discrete":
            actions = np.frombuffer(row["actions"], np.int64)
        else:
            actions = np.frombuffer(row["actions"], np.float32).reshape(T, self.meta["action_dim"])
        return Episode(observations=obs, actions=actions,
                       rewards=np.frombuffer(row["rewards"], np.float32),
                       success=row["success"], seed=row["seed"])

    def caption(self, i: int) -> tuple[np.ndarray, str]:
        row = self.ds[int(i)]
        image = np.frombuffer(row["image"], np.uint8).reshape(self.meta["image_shape"])
        return image, row["caption"]

    def text(self, i: int) -> str:
        return self.ds[int(i)]["text"]


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing; run `moe-gato collect --out {root}` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); collect again with --overwrite") from None
    tasks = manifest.get("tasks", {}) if isinstance(manifest, dict) else None
    if not isinstance(tasks, dict) or not all(isinstance(e, dict) for e in tasks.values()):
        raise DataError(f"{path} does not hold a manifest (an object with a \"tasks\" mapping); "
                        f"collect again with --overwrite")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} is data format version {manifest.get('format_version')}, this "
                        f"code reads {FORMAT_VERSION}; collect again with --overwrite")
    return manifest


def write_manifest(root: str | Path, manifest: dict) -> None:
    path = Path(root) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(manifest, format_version=FORMAT_VERSION), indent=1))
    os.replace(tmp, path)
