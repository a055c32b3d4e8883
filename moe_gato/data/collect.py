"""Builds a suite on disk: one dataset folder per task and ``manifest.json``.

    from moe_gato.data.collect import collect
    manifest = collect("default", "data/", tasks=["classic/CartPole-v1"], episodes=5)

Tasks run in parallel worker processes (``workers``, default 2, one per core) with a tqdm
progress bar counting episodes. A task folder is written atomically, so an interrupted run
leaves complete folders and ``.partial`` leftovers; running the same command again keeps
the complete folders (same collection options) and redoes the rest. A folder that is in
the way (another version, truncated, other options) is an error unless ``overwrite``.
Workers die with the collecting process (a SIGKILL included), so nothing writes folders
the manifest does not know about; a ``manifest.json`` that cannot be read is rebuilt from
the complete task folders on disk under ``overwrite``.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np

from moe_gato.data import storage
from moe_gato.envs import (RETURN_EPISODES, TASKS, ExpertActor, RandomActor, TaskSpec,
                           make_control_task, resolve_tasks, run_episode)


def rows_stored(spec: TaskSpec, episodes: int | Mapping[str, int] | None) -> int:
    """Rows a collection stores for ``spec``: ``episodes`` (one count, or a task -> count
    mapping), else the registry's count."""
    if isinstance(episodes, Mapping):
        episodes = episodes.get(spec.name)
    return int(episodes or spec.episodes)


def _options(spec: TaskSpec, episodes: int | Mapping[str, int] | None, seed: int,
             return_episodes: int = RETURN_EPISODES) -> dict:
    return {"episodes": rows_stored(spec, episodes), "seed": int(seed), "images": spec.images,
            "return_episodes": int(return_episodes)}


def _work_units(spec: TaskSpec, opts: dict) -> int:
    n, r = opts["episodes"], opts["return_episodes"]
    return max(n, r) + r if spec.kind == "control" else 1


def _tick(progress, n: int = 1) -> None:
    if progress is not None:
        progress.put(n)


def _collect_control(spec: TaskSpec, opts: dict, progress) -> tuple[dict, object, dict]:
    task = make_control_task(spec)
    n_store, seed, n_returns = opts["episodes"], opts["seed"], opts["return_episodes"]
    expert_actor, rand = ExpertActor(), RandomActor()
    expert, returns, successes = [], [], []
    for i in range(max(n_store, n_returns)):
        ep = run_episode(task, expert_actor, seed * 1_000_000 + i, record=i < n_store)
        returns.append(ep.episode_return)
        successes.append(ep.success)
        if i < n_store:
            expert.append(ep)
        _tick(progress)
    random_returns = []
    for i in range(n_returns):
        ep = run_episode(task, rand, seed * 1_000_000 + 500_000 + i, record=False)
        random_returns.append(ep.episode_return)
        _tick(progress)
    task.close()
    meta = {
        "kind": "control", "domain": spec.domain, "held_out": spec.held_out, "collect": opts,
        "obs_spec": {k: v.to_json() for k, v in task.obs_spec.items()},
        "action_kind": task.action_kind, "action_dim": task.action_dim,
        "action_low": task.action_low, "action_high": task.action_high,
        "max_steps": task.max_steps,
        "expert_return": float(np.mean(returns)), "expert_return_std": float(np.std(returns)),
        "expert_success_rate": float(np.mean(successes)) if task.has_success else None,
        "random_return": float(np.mean(random_returns)),
        "random_return_std": float(np.std(random_returns)),
        "return_episodes": len(returns), "episodes": len(expert),
        "steps": int(sum(len(e) for e in expert)),
    }
    rows, features = storage.control_rows(spec.name, expert, meta)
    return rows, features, meta


def _collect_other(spec: TaskSpec, opts: dict) -> tuple[dict, object, dict]:
    import datasets

    from moe_gato.data import captions

    meta = {"kind": spec.kind, "domain": spec.domain, "held_out": spec.held_out, "collect": opts,
            "expert_return": None, "random_return": None}
    if spec.kind == "text":
        docs, texts = captions.shakespeare_rows(max_documents=opts["episodes"])
        rows = {"task": [spec.name] * len(texts), "document": docs, "text": texts}
        feats = {"task": datasets.Value("string"), "document": datasets.Value("string"),
                 "text": datasets.Value("string")}
    else:
        if spec.env_id == "digits":
            images, caps = captions.digits_rows(opts["episodes"], opts["seed"])
        else:
            images, caps = captions.babyai_rows(opts["episodes"], opts["seed"])
        meta["image_shape"] = list(images[0].shape)
        rows = {"task": [spec.name] * len(images), "image": [im.tobytes() for im in images],
                "caption": caps}
        feats = {"task": datasets.Value("string"), "image": datasets.Value("binary"),
                 "caption": datasets.Value("string")}
    meta["episodes"] = len(rows["task"])
    return rows, datasets.Features(feats), meta


def collect_task(name: str, out: str, opts: dict, progress=None) -> dict:
    """Collects one task into ``out`` (replacing what is there); returns its manifest entry."""
    from moe_gato.data.loader import count_tokens

    spec = TASKS[name]
    start = time.perf_counter()
    if spec.kind == "control":
        rows, features, meta = _collect_control(spec, opts, progress)
    else:
        rows, features, meta = _collect_other(spec, opts)
        _tick(progress)
    path = storage.write_task(out, name, rows, features, meta, overwrite=True)
    data = storage.TaskData(path)
    meta = dict(data.meta, tokens=count_tokens(data), seconds=round(time.perf_counter() - start, 1))
    (path / storage.TASK_FILE).write_text(__import__("json").dumps(meta, indent=1))
    return manifest_entry(meta)


def manifest_entry(meta: dict) -> dict:
    keys = ("domain", "kind", "episodes", "tokens", "expert_return", "random_return", "held_out",
            "expert_success_rate", "action_kind", "action_dim", "steps", "seconds")
    return {k: meta.get(k) for k in keys} | {"path": meta["task"]}


def _existing(spec: TaskSpec, out: Path, opts: dict) -> dict | None:
    """Manifest entry of a complete folder with the same options; None if absent; DataError
    if a folder is in the way."""
    path = storage.task_dir(out, spec.name)
    partial = path.with_name(path.name + storage.PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted write of ours: never complete
    if not path.exists():
        return None
    data = storage.TaskData(path)  # raises DataError for missing/truncated/other version
    if "tokens" not in data.meta:
        raise storage.DataError(f"{path} was written but never finished (no token count); "
                                f"collect again with --overwrite")
    if data.meta.get("collect") != opts:
        raise storage.DataError(f"{path} was collected with {data.meta.get('collect')}, this run "
                                f"asks for {opts}; pass --overwrite to replace it")
    return manifest_entry(data.meta)


def check_episodes(episodes: int | Mapping[str, int] | None, suite: str = "default") -> None:
    """``episodes`` is None, a count >= 1, or a mapping of the suite's tasks to counts >= 1."""
    if episodes is None:
        return
    if isinstance(episodes, Mapping):
        resolve_tasks(suite, list(episodes))  # unknown task names are an error that lists them
        counts = episodes
    else:
        counts = {"episodes": episodes}
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"episodes of {name} must be an integer >= 1, got {n!r}")


def load_collect_config(path: str | Path) -> dict:
    """A collection config (``configs/collect/*.yaml``): ``suite``, ``seed``, ``episodes``
    (task -> rows stored) and optionally ``tasks`` (a list: only these tasks of the suite).
    Returns the keyword arguments of ``collect``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"collection config {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    allowed = {"suite", "seed", "episodes", "return_episodes", "tasks"}
    if not isinstance(raw, dict) or set(raw) - allowed:
        extra = sorted(set(raw) - allowed) if isinstance(raw, dict) else raw
        raise ValueError(f"{path}: unknown key(s) {extra}; allowed: {sorted(allowed)}")
    out = {"suite": raw.get("suite", "default"), "seed": int(raw.get("seed", 0)),
           "episodes": raw.get("episodes") or None,
           "return_episodes": int(raw.get("return_episodes", RETURN_EPISODES)),
           "tasks": raw.get("tasks")}
    if out["tasks"] is not None and (not isinstance(out["tasks"], list) or not out["tasks"]):
        raise ValueError(f"{path}: tasks must be a non-empty list of task names (or left out "
                         f"for the whole suite), got {out['tasks']!r}")
    if out["episodes"] is not None and not isinstance(out["episodes"], dict):
        raise ValueError(f"{path}: episodes must map task names to counts, got "
                         f"{out['episodes']!r}")
    try:  # unknown task names, bad counts: the error lists what is allowed
        if out["tasks"] is not None:
            resolve_tasks(out["suite"], out["tasks"])
        check_episodes(out["episodes"], out["suite"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return out


def collect(suite: str, out: str | Path, *, tasks: list[str] | None = None,
            episodes: int | Mapping[str, int] | None = None, overwrite: bool = False, workers: int = 2,
            seed: int = 0, progress: bool = True, return_episodes: int = RETURN_EPISODES) -> dict:
    """Collects ``tasks`` of ``suite`` (all by default) into ``out``; returns the manifest.

    Control tasks store ``episodes`` expert episodes and measure expert and random returns
    over at least ``return_episodes`` episodes each. ``episodes`` is one count for every
    task, or a mapping task -> count (``load_collect_config``); a task it does not name
    keeps the registry's count."""
    from tqdm import tqdm

    if not str(out).strip():
        raise ValueError("the output directory (--out) is empty; name a folder")
    if tasks is not None and not tasks:
        raise ValueError("tasks is an empty list; pass None to collect the whole suite")
    specs = resolve_tasks(suite, tasks)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    check_episodes(episodes, suite)
    if return_episodes < 1:
        raise ValueError(f"return_episodes must be >= 1, got {return_episodes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"suite": suite, "tasks": {}}
    if (out / storage.MANIFEST).exists():
        try:
            old = storage.read_manifest(out)
            manifest["tasks"] = {k: v for k, v in old.get("tasks", {}).items()
                                 if (out / k / storage.TASK_FILE).is_file()}
        except storage.DataError as exc:
            if not overwrite:
                raise
            manifest["tasks"] = _complete_folders(out)
            warnings.warn(f"{exc}; rebuilt it from the {len(manifest['tasks'])} complete task "
                          f"folder(s) in {out}", stacklevel=2)
    # check every folder before collecting anything: nothing is replaced without overwrite
    pending, options = [], {}
    for spec in specs:
        opts = options[spec.name] = _options(spec, episodes, seed, return_episodes)
        entry = None if overwrite else _existing(spec, out, opts)
        if entry is None:
            pending.append(spec)
        else:
            manifest["tasks"][spec.name] = entry
    storage.write_manifest(out, manifest)
    pending.sort(key=lambda s: -_cost(s))
    total = sum(_work_units(s, options[s.name]) for s in pending)
    bar = tqdm(total=total, unit="ep", desc=f"collect {len(pending)} tasks", disable=not progress)
    try:
        if workers == 1 or len(pending) <= 1:
            q = _ListQueue(bar)
            for spec in pending:
                manifest["tasks"][spec.name] = collect_task(spec.name, str(out), options[spec.name], q)
                storage.write_manifest(out, manifest)
        else:
            _collect_parallel(pending, out, options, workers, bar, manifest)
    finally:
        bar.close()
    manifest["tasks"] = dict(sorted(manifest["tasks"].items()))
    storage.write_manifest(out, manifest)
    return manifest


def _complete_folders(out: Path) -> dict:
    """Manifest entries of every complete task folder under ``out`` (any suite)."""
    found = {}
    for name in TASKS:
        if (storage.task_dir(out, name) / storage.TASK_FILE).is_file():
            try:
                data = storage.TaskData(storage.task_dir(out, name))
            except storage.DataError:
                continue
            if "tokens" in data.meta:
                found[name] = manifest_entry(data.meta)
    return found


_PROGRESS = None


def _worker_init(progress, parent: int) -> None:
    """Runs first in each worker: it dies with the collecting process (Linux: the kernel
    sends SIGKILL; elsewhere a thread watches the parent), and keeps the progress queue."""
    global _PROGRESS
    _PROGRESS = progress
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _collect_in_worker(name: str, out: str, opts: dict) -> dict:
    return collect_task(name, out, opts, _PROGRESS)


def _collect_parallel(pending, out, options, workers, bar, manifest) -> None:
    ctx = mp.get_context("spawn")  # MuJoCo/EGL and the emulators start fresh in each worker
    q = ctx.Queue()  # handed over at start-up (no manager process to outlive us)
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                    initargs=(q, os.getpid())) as pool:
            futures = {pool.submit(_collect_in_worker, s.name, str(out), options[s.name]): s
                       for s in pending}
            remaining = set(futures)
            while remaining:
                try:
                    bar.update(q.get(timeout=0.2))
                except queue_mod.Empty:
                    pass
                done = [f for f in remaining if f.done()]
                for f in done:
                    remaining.discard(f)
                    spec = futures[f]
                    manifest["tasks"][spec.name] = f.result()  # re-raises a worker's error
                    storage.write_manifest(out, manifest)
                    bar.set_postfix_str(f"done {spec.name}")
            while True:
                try:
                    bar.update(q.get_nowait())
                except queue_mod.Empty:
                    break
    finally:
        q.close()
        q.join_thread()


class _ListQueue:
    def __init__(self, bar) -> None:
        self.bar = bar

    def put(self, n: int) -> None:
        self.bar.update(n)


def _cost(spec: TaskSpec) -> float:
    """Rough seconds, to start the slow tasks first."""
    return {"atari": 100.0, "metaworld": 8.0, "text": 20.0, "vl": 5.0}.get(spec.domain, 1.0) * \
        (3.0 if spec.env_id == "Pong" else 1.0)

