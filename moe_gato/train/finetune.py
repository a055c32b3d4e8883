"""``moe-gato finetune``: a pretrained checkpoint trained on the demonstrations of one or
more tasks, in the manner of Gato's fine-tuning study (Reed et al. 2022, section 5.2).

    moe-gato finetune --checkpoint runs/recipe/tiny-moe --data data --out runs/ft/gotoobj-16 \\
        --tasks babyai/BabyAI-GoToObj-v0 --episodes 16 --mode new-expert --steps 200
    moe-gato finetune ... --mode experts --replay 0.25 optim.lr=3e-4
    moe-gato finetune ... --collect        # tasks the data folder lacks are collected first
    moe-gato finetune ... --mode scratch   # the baseline: same model, data and steps
    torchrun --nproc-per-node 2 -m moe_gato.cli finetune ... deepspeed.enabled=true

Modes (``moe_gato.train.finetune_modes``): ``full`` trains every weight; ``experts`` the MoE
layers' routers and experts; ``new-expert`` one expert added to every group of every MoE
layer (router row, bias and FFN; routed on top of the top-K, outputs bit-identical to the
checkpoint's at step 0), every pre-existing weight frozen bit for bit; ``scratch`` the
checkpoint's architecture from random weights.

Data. The demonstrations are the first ``--episodes`` rows of each task's training split in
``--data`` (default: every row), held-out tasks included. A task the folder lacks is an
error, unless ``--collect`` collects it into the folder first (the episodes asked for plus
the validation rows, and the expert and random returns that scores need; one process).
``--replay r`` mixes the checkpoint's own training mixture back in: a share r of the draws
from its tasks by their weights, 1 - r from the fine-tuning tasks in equal parts.

Settings. The checkpoint's training config (``train_config.yaml`` beside its weights, or
``--config``) gives the optimizer, batch and mixture options, ``--steps`` the budget, and
dotted overrides go on top (``optim.lr=3e-4``). The run directory is a training run like
``train``'s (config, metrics.jsonl, TensorBoard, atomic checkpoints, exact resume);
``finetune.json`` records the checkpoint, the settings and the parameters trained, and a
resume with other settings is refused. The fine-tuned checkpoints load wherever a trained
one does (``Policy``, ``eval``, ``bench-latency``, ``distill``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from moe_gato.train.finetune_modes import MODES, mode_model_config, start_model

#: demonstration sequences ``new-expert`` routes through the checkpoint to start its experts
START_SEQUENCES = 16
SETTINGS_FILE = "finetune.json"


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig:
    """What a fine-tuning run is: ``mode`` (``MODES``), the control ``tasks`` it learns,
    ``episodes`` per task (None: every training row), the ``replay`` share of the
    checkpoint's own mixture in [0, 1), and ``steps``."""

    tasks: list[str]
    mode: str = "full"
    episodes: int | None = None
    replay: float = 0.0
    steps: int = 100

    def __post_init__(self) -> None:
        from moe_gato.envs import TASKS

        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: {self.tasks} names a task twice")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks: unknown task(s) {unknown}; known tasks:\n  "
                             + "\n  ".join(TASKS))
        other = [t for t in self.tasks if TASKS[t].kind != "control"]
        if other:
            raise ValueError(f"tasks: {other} hold no demonstrations (kind "
                             f"{TASKS[other[0]].kind}); fine-tuning learns control tasks")
        if self.episodes is not None and self.episodes < 1:
            raise ValueError(f"episodes must be >= 1 or None (every row), got {self.episodes}")
        if not 0.0 <= self.replay < 1.0:
            raise ValueError(f"replay must lie in [0, 1), got {self.replay}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def mixture(self, pretraining: dict[str, float]) -> dict[str, float]:
        """Task weights: the fine-tuning tasks share 1 - replay equally, the pretraining
        mixture's tasks ``replay`` by their weights (a task in both gets both)."""
        out = {t: (1.0 - self.replay) / len(self.tasks) for t in self.tasks}
        total = sum(pretraining.values())
        for t, w in pretraining.items() if self.replay else ():
            out[t] = out.get(t, 0.0) + self.replay * w / total
        return out


def finetune_config(ft: FinetuneConfig, model_cfg, data: str | Path, *, base: str | Path,
                    overrides=()):
    """The ``TrainConfig`` of a fine-tuning run: ``base`` (a training config file) with the
    checkpoint's model (as ``ft.mode`` trains it), the fine-tuning mixture and steps."""
    from moe_gato.config import to_dict
    from moe_gato.train.config import load_train_config, train_config_from_dict

    pre = load_train_config(base)
    mixture = to_dict(pre.data)
    mixture.pop("context_len")  # derived from the model's context
    mixture.update(data_dir=str(data), tasks=ft.mixture(pre.data.tasks), allow_held_out=True,
                   train_episodes={t: ft.episodes for t in ft.tasks} if ft.episodes else {})
    top = to_dict(pre)
    top.update(model=to_dict(mode_model_config(model_cfg, ft.mode)), data=mixture,
               steps=ft.steps, tokens=None)
    return train_config_from_dict(top, None, list(overrides))


def check_data(ft: FinetuneConfig, tasks: dict[str, float], data: Path,
               collect: bool) -> list[str]:
    """The mixture's tasks must be in ``data``; returns the fine-tuning tasks to collect
    (``collect``), else refuses the missing ones naming them."""
    from moe_gato.data.storage import MANIFEST, read_manifest

    known = read_manifest(data).get("tasks", {}) if (data / MANIFEST).is_file() or not collect \
        else {}
    missing = [t for t in tasks if t not in known]
    replayed = [t for t in missing if t not in ft.tasks]
    if replayed:
        raise ValueError(f"the replayed task(s) {replayed} of the checkpoint's mixture are not "
                         f"in {data}/manifest.json; pass the data folder it was trained on")
    if missing and not collect:
        raise ValueError(f"task(s) {missing} are not in {data}/manifest.json (collected there: "
                         f"{sorted(known)}); collect them (moe-gato collect --tasks "
                         f"{','.join(missing)} --out {data}) or pass --collect")
    return missing


def rows_to_collect(episodes: int, validation_fraction: float) -> int:
    """Rows to store so that the training split (``split_rows``) holds ``episodes``."""
    from moe_gato.data.loader import split_rows

    n = episodes
    while len(split_rows(n, validation_fraction, "train")) < episodes:
        n += 1
    return n


def finetune(*, checkpoint: str | Path, tasks: list[str], out: str | Path,
             data: str | Path = "data", mode: str = "full", episodes: int | None = None,
             collect: bool = False, replay: float = 0.0, steps: int = 100,
             config: str | Path | None = None, overrides=(), overwrite: bool = False) -> dict:
    """Fine-tunes ``checkpoint`` (a run directory or a checkpoint folder) into the run
    directory ``out`` (module docstring); returns the last logged record ({} when the run
    had already reached its budget)."""
    from moe_gato.data.loader import default_tokenizer
    from moe_gato.envs import TASKS
    from moe_gato.model import load_checkpoint
    from moe_gato.model.checkpoint import load_model_config
    from moe_gato.train import Trainer
    from moe_gato.train.checkpoint import model_folder

    ft = FinetuneConfig(tasks=list(tasks), mode=mode, episodes=episodes, replay=replay,
                        steps=steps)
    out, data = Path(out), Path(data)
    if not str(out).strip():
        raise ValueError("the run directory (--out) is empty; name a folder")
    folder = model_folder(checkpoint)
    model_cfg = load_model_config(folder)
    layout = default_tokenizer().layout
    if model_cfg.layout != layout:
        raise ValueError(f"checkpoint {folder} has the vocabulary text_vocab_size="
                         f"{model_cfg.text_vocab_size}, num_bins={model_cfg.num_bins}, "
                         f"discrete_offset={model_cfg.discrete_offset}; the data's tokenizer "
                         f"has text_vocab_size={layout.text_vocab_size}, num_bins="
                         f"{layout.num_bins}, discrete_offset={layout.discrete_offset}: "
                         f"fine-tune a checkpoint trained on this tokenizer")
    base = Path(config) if config is not None else folder / "train_config.yaml"
    if not base.is_file():
        raise ValueError(f"{base} does not exist: a checkpoint folder without its training "
                         f"config needs --config (optimizer, batch, mixture options)")
    cfg = finetune_config(ft, model_cfg, data, base=base, overrides=overrides)
    if cfg.expert_parallel_size > 1 and ft.mode == "new-expert":
        raise ValueError("expert_parallel_size > 1: new-expert runs in one process or under "
                         "DeepSpeed (deepspeed.enabled=true); sharding re-creates the expert "
                         "weights it must keep frozen")
    settings = {"checkpoint": str(folder.resolve()), "mode": ft.mode, "tasks": ft.tasks,
                "episodes": ft.episodes, "replay": ft.replay}
    saved = out / SETTINGS_FILE
    if saved.is_file() and not overwrite:
        before = json.loads(saved.read_text())
        changed = {k: [before.get(k), v] for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise ValueError(f"{out} was fine-tuned with other settings {changed} (before, "
                             f"now); resume it with its own, choose another --out, or pass "
                             f"--overwrite to move it aside")
    to_collect = check_data(ft, cfg.data.tasks, data, collect)
    if to_collect:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"--collect runs in one process; collect {to_collect} first "
                             f"(moe-gato collect, or this command without the launcher)")
        from moe_gato.data.collect import collect as collect_tasks

        n = ft.episodes or max(TASKS[t].episodes for t in to_collect)
        collect_tasks("default", data, tasks=to_collect, workers=min(2, len(to_collect)),
                      episodes={t: rows_to_collect(n, cfg.data.validation_fraction)
                                for t in to_collect})

    device = "cuda" if cfg.device == "cuda" or (
        cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    trained = {}

    def start(model: torch.nn.Module) -> None:
        pretrained = load_checkpoint(folder, map_location=device)
        episodes = {t: n for t, n in cfg.data.train_episodes.items() if t in ft.tasks}
        demos = dataclasses.replace(cfg.data, tasks={t: 1.0 for t in ft.tasks},
                                    train_episodes=episodes)
        batches = _batches(demos, data, cfg.seed, cfg.micro_batch_size, device) \
            if ft.mode == "new-expert" else ()
        trained["params"] = start_model(model, pretrained, ft.mode, batches)

    trainer = Trainer(cfg, out, data_dir=data, overwrite=overwrite, init_model=start)
    if overwrite:  # the old run goes aside now, so that the settings go into the new one
        trainer.prepare_run_dir()
        trainer.overwrite = False
    if trainer.dist.main:
        out.mkdir(parents=True, exist_ok=True)
        from moe_gato.config import write_json

        write_json(saved, {**settings, "steps": cfg.num_steps,
                           "trained_params": trained["params"],
                           "total_params": trainer.model.num_params()})
    last = trainer.fit()
    if last and trainer.dist.main:
        print(f"step {last['step']}: loss {last['loss']:.4f}"
              + (f", eval/loss {last['eval/loss']:.4f}" if "eval/loss" in last else "")
              + f"; {ft.mode}: {trained['params']:,} of {trainer.model.num_params():,} "
                f"parameters trained")
    return last


def _batches(mixture, data: Path, seed: int, size: int, device):
    """Demonstration micro-batches of the fine-tuning tasks (training split)."""
    from moe_gato.data.loader import SequenceLoader

    loader = SequenceLoader(mixture, split="train", seed=seed + 1, data_dir=data)
    for start in range(0, START_SEQUENCES, size):
        yield {k: v.to(device) for k, v in loader.batch(start, size).items()}


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="the pretrained model: a run directory or a checkpoint folder")
    p.add_argument("--tasks", required=True,
                   help="comma-separated control tasks to learn (domain/env-id)")
    p.add_argument("--data", default="data", help="the collected suite holding the tasks' "
                                                   "demonstrations (default: data)")
    p.add_argument("--out", required=True, help="the fine-tuning run directory")
    p.add_argument("--mode", choices=MODES, default="full",
                   help="what trains (default full; see the module docstring)")
    p.add_argument("--episodes", type=int, default=None,
                   help="demonstrations per task: the first N of its training split "
                        "(default: all)")
    p.add_argument("--collect", action="store_true",
                   help="collect the tasks the data folder lacks into it first")
    p.add_argument("--replay", type=float, default=0.0,
                   help="share of the draws from the checkpoint's own mixture (default 0)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--config", default=None,
                   help="training config for the optimizer, batch and mixture options "
                        "(default: the checkpoint's train_config.yaml)")
    p.add_argument("--overwrite", action="store_true",
                   help="move an existing run directory aside and start again")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the training config (optim.lr=3e-4)")


def run(args: argparse.Namespace) -> int:
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("MUJOCO_GL", "egl")
    from moe_gato.train import TrainingError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        finetune(checkpoint=args.checkpoint, tasks=tasks, out=args.out, data=args.data,
                 mode=args.mode, episodes=args.episodes, collect=args.collect,
                 replay=args.replay, steps=args.steps, config=args.config,
                 overrides=args.overrides, overwrite=args.overwrite)
    except TrainingError as exc:  # training broke down: one line, exit 1 (bad input is 2)
        print(f"moe-gato finetune: error: {exc}", file=sys.stderr)
        return 1
    return 0
