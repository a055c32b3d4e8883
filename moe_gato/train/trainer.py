"""One trainer for MoE-Gato: one CPU process, several processes (torchrun or deepspeed), GPUs.

    moe-gato train --config configs/train/tiny-moe.yaml --data data --out runs/tiny-moe
    torchrun --nproc-per-node 2 -m moe_gato.cli train --config ... expert_parallel_size=2
    deepspeed --num_gpus 8 -m moe_gato.cli train --config ... deepspeed.enabled=true

Step ``s`` consumes global sequences ``[s * B, (s + 1) * B)`` of the loader (a pure function
of seed and index); rank ``r`` takes micro-batch ``m`` = sequences
``s * B + (m * ranks + r) * b ...``. The loss is normalised by the target count of the whole
step (all ranks, all micro-batches), so any split of the same global batch gives the same
gradients as one process. Resume restores weights, optimizer, step, tokens, data position
and RNG; metrics of steps after the checkpoint are dropped from ``metrics.jsonl``.

The loop is assembled from parts: what a step minimises (``objective``, default
``moe_gato.train.objective.LanguageModelLoss``), the distribution applied to the plain
model (``moe_gato.train.parallelize``: process groups, expert sharding, DeepSpeed, the
uniform backward graph ranks need) and what is measured (``moe_gato.train.metrics``).

A run directory is never overwritten unless asked (``overwrite=True``, ``--overwrite``: the
old run is moved aside to ``RUN.old-<time>``); a resumed run keeps its saved config except
for the budget and the bookkeeping keys in ``CHANGEABLE_ON_RESUME``, whose changes are
applied, warned about and recorded in ``config_changes.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moe_gato.config import save_config, to_dict
from moe_gato.data.mixture import upgrade_saved_mixture
from moe_gato.model import build_model
from moe_gato.model.model import target_weights
from moe_gato.model.config import upgrade_saved
from moe_gato.tokenizer import KIND_NAMES, collate
from moe_gato.train import checkpoint as ckpt
from moe_gato.train.config import TrainConfig
from moe_gato.train.metrics import (MetricsLog, action_hits, add_kind_losses, kind_means,
                                    measure_peak_flops, routing_metrics)
from moe_gato.train.objective import LanguageModelLoss
from moe_gato.train.parallelize import all_reduce_sum, parallelize, setup_distributed

class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or weights, a step without targets); the
    message names the step and the last good checkpoint."""


#: config keys a resumed run may change (applied, warned about, recorded): the budget, and
#: bookkeeping that leaves the loss curve alone. Any other difference is refused.
#: also the peak learning rate: lowering it is how a run that diverged goes on from its
#: last finite checkpoint
CHANGEABLE_ON_RESUME = ("steps", "tokens", "optim.lr", "log_every", "eval_every", "eval_sequences",
                        "checkpoint_every", "keep_last", "device", "peak_flops",
                        "micro_batch_size", "resume", "data.cache_mb", "data.data_dir",
                        "data_workers")
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a training run."""
    return any((run_dir / name).exists() for name in RUN_FILES)


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in ("data.tasks", "data.train_episodes",
                                                     "deepspeed.extra"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, cfg: TrainConfig) -> dict[str, list]:
    """``{dotted key: [saved value, new value]}`` of every setting that differs."""
    import yaml

    new = _flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)))
    old = _flatten(saved)
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


# ----------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    o, total = cfg.optim, cfg.num_steps
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, total - o.warmup_steps - 1)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and stacked expert matrices) only."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def check_vocabulary(model_layout, tokenizer) -> None:
    """The model's token layout must be the one the data is tokenized with: otherwise the
    actions and the separator land on rows that never see data, silently."""
    data = tokenizer.layout
    if model_layout.text_vocab_size != data.text_vocab_size:
        raise ValueError(f"model.text_vocab_size is {model_layout.text_vocab_size} but the data's "
                         f"text tokenizer ({tokenizer.text.model_path.name}) has "
                         f"{data.text_vocab_size} pieces; set model.text_vocab_size="
                         f"{data.text_vocab_size}")
    if model_layout != data:
        raise ValueError(f"the model's vocabulary layout {model_layout} differs from the data's "
                         f"{data} (model.num_bins / model.discrete_offset)")


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, data_dir: str | Path | None = None,
                 overwrite: bool = False, objective=None, init_model=None):
        from moe_gato.data.loader import SequenceLoader, default_tokenizer

        if not str(run_dir).strip():
            raise ValueError("the run directory (--out) is empty; name a folder")
        check_vocabulary(cfg.model.layout, default_tokenizer())
        self.cfg = cfg
        #: what a step minimises (moe_gato.train.objective); Gato's next-token loss by default
        self.objective = objective or LanguageModelLoss()
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run directory {self.run_dir} exists and is not a folder")
        self.overwrite = overwrite
        self.dist = setup_distributed(cfg)
        self.data_dir = Path(data_dir or cfg.data.data_dir)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = build_model(cfg.model).to(self.dist.device)
        if init_model is not None:  # before the optimizer (and DeepSpeed's copies) exist
            init_model(self.model)
        self.engine, self.optimizer = parallelize(self.model, cfg, self.dist, lambda m: (
            torch.optim.AdamW(param_groups(m, cfg.optim.weight_decay), lr=cfg.optim.lr,
                              betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)))
        self.accum = cfg.batch_size // (cfg.micro_batch_size * self.dist.world)
        self.loader = SequenceLoader(cfg.data, split="train", seed=cfg.seed, data_dir=self.data_dir)
        for task, n in self.loader.max_timestep_tokens().items():
            if n > cfg.data.context_len:
                raise ValueError(f"the context ({cfg.data.context_len}, model.context_length) "
                                 f"cannot hold one timestep of {task} ({n} tokens): nothing "
                                 f"would be learned; set model.context_length to >= {n}")
        self._prefetch = None  # data workers' Prefetcher, made at the first micro-batch
        self.step = 0
        self.tokens = 0
        self.peak_flops = cfg.peak_flops or measure_peak_flops(self.dist.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.dist.device.type == "cuda" else None)

    # -------------------------------------------------------------- data
    def micro_batch(self, step: int, micro: int) -> dict:
        cfg, d = self.cfg, self.dist
        start = self._micro_start(step, micro)
        if cfg.data_workers:
            if self._prefetch is None:  # planned from the step the loop starts at (resume)
                from moe_gato.data.prefetch import Prefetcher

                plan = (self._micro_start(s, m) for s in range(step, cfg.num_steps)
                        for m in range(self.accum))
                self._prefetch = Prefetcher(
                    cfg.data, seed=cfg.seed, data_dir=self.data_dir, size=cfg.micro_batch_size,
                    starts=plan, workers=cfg.data_workers, pin_memory=d.device.type == "cuda")
            batch = self._prefetch.take(start)
        else:
            batch = self.loader.batch(start, cfg.micro_batch_size)
        return {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}

    def _micro_start(self, step: int, micro: int) -> int:
        """First global sequence of micro-batch ``micro`` of ``step`` on this rank."""
        cfg, d = self.cfg, self.dist
        return step * cfg.batch_size + (micro * d.world + d.rank) * cfg.micro_batch_size

    # ------------------------------------------------------------ resume
    def prepare_run_dir(self) -> dict[str, list]:
        """Moves an old run aside (``overwrite``), refuses to touch one otherwise unless
        resuming it with the same config; returns the allowed config changes."""
        import yaml

        run, d = self.run_dir, self.dist
        if self.overwrite:
            if d.main and holds_run(run):
                aside = run.with_name(f"{run.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                while aside.exists():
                    aside = aside.with_name(aside.name + "_")
                run.rename(aside)
                print(f"moved the old run {run} aside to {aside}")
            if dist.is_initialized():
                dist.barrier()
            return {}
        if not holds_run(run):
            return {}
        if self.cfg.resume == "never":
            raise ValueError(f"{run} holds a run and resume=never: pass --overwrite to move it "
                             f"aside and start over, or resume=auto to continue it")
        saved_file = run / "config.yaml"
        if not saved_file.is_file():
            return {}
        try:
            saved = yaml.safe_load(saved_file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{saved_file} is unreadable ({exc}); pass --overwrite to start "
                             f"over (the old run is moved aside)") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{saved_file} does not hold a config mapping; pass --overwrite "
                             f"to start over (the old run is moved aside)")
        if isinstance(saved.get("model"), dict):
            saved["model"] = upgrade_saved(saved["model"])
        if isinstance(saved.get("data"), dict):
            saved["data"] = upgrade_saved_mixture(saved["data"])
        changes = config_changes(saved, self.cfg)
        refused = {k: v for k, v in changes.items() if k not in CHANGEABLE_ON_RESUME}
        if refused:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
            raise ValueError(f"{run} was trained with another config ({listed}); resume it with "
                             f"its own settings, choose another --out, or pass --overwrite to "
                             f"move it aside and start over")
        return changes

    def maybe_resume(self) -> int | None:
        """Restores the newest checkpoint that loads (see ``checkpoint.resume_checkpoint``);
        None when starting fresh. ``CheckpointError`` when the run has checkpoints and none
        loads: nothing is changed."""
        if self.cfg.resume != "auto":
            return None
        if ckpt.resume_checkpoint(self.run_dir, self._load) is None:
            return None
        return self.step

    def _load(self, path: Path) -> None:
        localize = None
        if self.engine is not None:
            self.engine.load_checkpoint(str(path), tag="deepspeed", load_module_strict=True,
                                        load_lr_scheduler_states=False)
        elif self.cfg.expert_parallel_size > 1:
            from moe_gato.train.expert_parallel import local_state_dict

            ckpt.load_optimizer_shard(path, self.dist.rank, self.optimizer)
            localize = lambda full: local_state_dict(self.model, full)  # noqa: E731
        plain = self.engine is None and self.cfg.expert_parallel_size == 1
        state = ckpt.load_training_state(path, self._module(),
                                         self.optimizer if plain else None, localize)
        self.loader.load_state_dict(state["data"])
        np.random.set_state(_np_state_from_json(state["numpy"]))
        self.step, self.tokens = int(state["step"]), int(state["tokens"])

    def _module(self) -> torch.nn.Module:
        return self.engine.module if self.engine is not None else self.model

    def save(self) -> Path | None:
        """A checkpoint of everything (a collective when several ranks run)."""
        state = {"tokens": self.tokens, "data": self.loader.state_dict(),
                 "scheduler": {"step": self.step, "lr": lr_at(self.step, self.cfg)},
                 "numpy": _np_state_to_json()}
        keep = self.cfg.keep_last
        if self.engine is None and self.cfg.expert_parallel_size == 1:
            if not self.dist.main:  # data parallel: every rank holds the same state
                return None
            return ckpt.save_training_checkpoint(self.run_dir, self.step, self.model,
                                                 self.optimizer, self.cfg, state, keep_last=keep)
        # sharded optimizer state: every rank writes its part into the staging folder, then
        # rank 0 adds the (gathered) model, state and checksums and renames it into place
        model_state = None
        if self.engine is not None:
            tmp = ckpt.staging_dir(self.run_dir, self.step, clear=False)
            self.engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
        else:
            from moe_gato.train.expert_parallel import full_state_dict

            ckpt.save_optimizer_shard(self.run_dir, self.step, self.dist.rank, self.optimizer)
            model_state = full_state_dict(self.model)
        dist.barrier()
        path = None
        if self.dist.main:
            path = ckpt.save_training_checkpoint(self.run_dir, self.step, self._module(), None,
                                                 self.cfg, state, keep_last=keep,
                                                 model_state=model_state)
        dist.barrier()
        return path

    # ------------------------------------------------------------- steps
    def train_step(self) -> dict:
        cfg, d, model = self.cfg, self.dist, self._module()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.micro_batch(self.step, m) for m in range(self.accum)]
        # the step's target weight (the count of targets unless the loader weights them)
        targets = torch.tensor([float(target_weights(b).sum()) for b in batches])
        total_targets = all_reduce_sum(targets.sum().clone())
        if total_targets == 0:
            raise TrainingError(f"the batch of step {self.step} holds no target token "
                                f"(context too short for a timestep?); stopping. Last good "
                                f"checkpoint: {self._last_good()}")
        # loss sum, aux + z, then (loss sum, targets) per kind: one all-reduce for all of it
        sums = torch.zeros(2 + len(KIND_NAMES) * 2, dtype=torch.float64)
        routing_last = None
        logged: dict[str, float] = {}
        start = time.perf_counter()
        for micro, batch in enumerate(batches):
            # the model's randomness (patch positions within their interval) depends on the
            # global micro-batch only, so any split over ranks draws the same numbers
            torch.manual_seed(cfg.seed * 1_000_003 + self.step * cfg.batch_size
                              + (micro * d.world + d.rank) * cfg.micro_batch_size)
            if self.autocast is not None:
                with self.autocast:
                    part = self.objective(self.engine or model, batch)
            else:
                part = self.objective(self.engine or model, batch)
            out = part.out
            # sum over this micro-batch's targets / targets of the whole step, x ranks because
            # data parallelism averages gradients over ranks
            lm = part.loss * targets[micro] / total_targets * d.world
            aux = part.aux / self.accum
            # every parameter joins the graph, so that data-parallel reductions see the same
            # gradients on every rank (the model already runs every expert group and the patch
            # block without tokens while training; this covers any parameter left out)
            touch = sum(p.view(-1)[0] for p in model.parameters()) * 0.0
            loss = lm + aux + touch
            if self.engine is not None:
                self.engine.backward(loss, scale_wrt_gas=False)
            else:
                loss.backward()
            sums[0] += float(part.loss.detach()) * float(targets[micro])
            sums[1] += float(aux.detach())
            for name, value in part.parts.items():
                share = float(targets[micro] / targets.sum())  # per target, like the loss
                logged[name] = logged.get(name, 0.0) + float(value.detach()) * share
            add_kind_losses(sums[2:].view(-1, 2), batch, out)
            routing_last = out.routing
        grad_norm = self._optimizer_step(model)
        if cfg.model.ffn == "moe" and cfg.model.moe.bias_balancing and routing_last:
            model.update_router_biases(routing_last)
        elapsed = time.perf_counter() - start
        # the update itself may break the weights (a huge lr): check them after the step
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        bad_weights = (~finite).double().cpu()  # one device sync
        all_reduce_sum(sums)
        all_reduce_sum(bad_weights)
        loss = float(sums[0] / total_targets)
        if not math.isfinite(loss) or not math.isfinite(grad_norm) or bad_weights > 0:
            what = "the weights after the update are non-finite" if bad_weights > 0 else ""
            raise TrainingError(
                f"loss is {loss} (grad norm {grad_norm}) at step {self.step}"
                f"{'; ' + what if what else ''}; stopping. "
                f"Last good checkpoint: {self._last_good()}")
        self.step += 1
        self.tokens += cfg.tokens_per_step
        tps = cfg.tokens_per_step / max(elapsed, 1e-9)
        # time: when the step ended (Unix seconds), for wall time per step and per run
        record = {"step": self.step, "tokens": self.tokens, "time": time.time(),
                  "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "aux_loss": float(sums[1]) / d.world,
                  "tokens_per_s": tps,
                  "mfu": self._module().mfu(tps / d.world, self.peak_flops,
                                            seq_len=cfg.data.context_len)}
        record.update(kind_means(sums[2:].view(-1, 2), "loss/"))
        record.update({f"objective/{k}": v for k, v in logged.items()})
        if routing_last:
            record.update(routing_metrics(routing_last))
        return record

    def _last_good(self) -> str:
        """The newest checkpoint of this run's timeline whose checksums verify (checkpoints
        are never written with non-finite tensors)."""
        for path in reversed(ckpt.list_checkpoints(self.run_dir)):
            if ckpt.checkpoint_step(path) <= self.step and ckpt.verify_checkpoint(path) is None:
                return str(path)
        return "none"

    def _optimizer_step(self, model: torch.nn.Module) -> float:
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        from moe_gato.train.expert_parallel import all_reduce_gradients, clip_grad_norm

        if self.dist.world > 1:
            all_reduce_gradients(model, self.dist.world)
        norm = clip_grad_norm(model, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss per task and per target kind, on ``eval_sequences`` per task, and
        per control task the teacher-forced action accuracy (``eval/action_acc/<task>``)."""
        from moe_gato.data.loader import SequenceLoader, split_rows

        model = self._module()
        model.eval()
        record: dict[str, float] = {}
        total, count = 0.0, 0.0
        kinds_K2 = torch.zeros(len(KIND_NAMES), 2, dtype=torch.float64)
        for task in self.cfg.data.tasks:
            if not len(split_rows(len(self.loader.data[task]), self.cfg.data.validation_fraction,
                                  "validation")):
                continue  # a task with a single row has no validation split
            cfg = dataclasses.replace(self.cfg.data, tasks={task: 1.0}, train_episodes={})
            loader = SequenceLoader(cfg, split="validation", seed=12345, data_dir=self.data_dir,
                                    tokenizer=self.loader.tok)
            seqs = [loader.sequence(i) for i in range(self.cfg.eval_sequences)]
            meta = self.loader.data[task].meta
            choices = meta.get("action_dim") if meta.get("action_kind") == "discrete" else None
            t_sum, t_n, hits, actions = 0.0, 0.0, 0, 0
            for i in range(0, len(seqs), self.cfg.micro_batch_size):
                batch = {k: v.to(self.dist.device)
                         for k, v in collate(seqs[i:i + self.cfg.micro_batch_size]).items()}
                out = model(batch)
                n = float(batch["loss_mask"][:, 1:].sum())
                t_sum += float(out.lm_loss) * n
                t_n += n
                add_kind_losses(kinds_K2, batch, out)
                h, a = action_hits(out.logits, batch, model.cfg.layout, choices)
                hits, actions = hits + h, actions + a
            record[f"eval/loss/{task}"] = t_sum / max(t_n, 1)
            if actions:
                record[f"eval/action_acc/{task}"] = hits / actions
            total += t_sum
            count += t_n
        record["eval/loss"] = total / max(count, 1)
        record.update(kind_means(kinds_K2, "eval/loss/"))
        model.train()
        return record

    # -------------------------------------------------------------- loop
    def fit(self) -> dict:
        from tqdm import tqdm

        cfg, d = self.cfg, self.dist
        changes = self.prepare_run_dir()
        resumed = self.maybe_resume()  # raises, changing nothing, when no checkpoint loads
        if resumed is not None and resumed > cfg.num_steps:
            raise ValueError(f"{self.run_dir} is at step {resumed}, beyond this config's budget "
                             f"of {cfg.num_steps} steps; raise steps or tokens")
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if changes:
                listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
                warnings.warn(f"{self.run_dir}: resuming at step {resumed or 0} with changed "
                              f"settings ({listed}); recorded in config_changes.jsonl",
                              stacklevel=2)
                with open(self.run_dir / "config_changes.jsonl", "a") as f:
                    f.write(json.dumps({"step": resumed or 0, "changes": changes}) + "\n")
            save_config(cfg, self.run_dir / "config.yaml")
        if dist.is_initialized():
            dist.barrier()
        log = MetricsLog(self.run_dir, resumed, d.main)
        bar = tqdm(total=cfg.num_steps, initial=self.step, disable=not d.main,
                   desc=f"train {self.run_dir.name}", unit="step")
        last: dict = {}
        try:
            while self.step < cfg.num_steps:
                record = self.train_step()
                if self.step % cfg.eval_every == 0 or self.step == cfg.num_steps:
                    record.update(self.evaluate())
                if self.step % cfg.log_every == 0 or "eval/loss" in record:
                    log.write(record)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.num_steps:
                    self.save()
                    if dist.is_initialized():
                        dist.barrier()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                last = record
        finally:
            bar.close()
            log.close()
            if self._prefetch is not None:
                self._prefetch.close()
                self._prefetch = None
        return last


def _np_state_to_json() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _np_state_from_json(s: list):
    return (s[0], np.asarray(s[1], np.uint32), s[2], s[3], s[4])


def train(cfg: TrainConfig, run_dir: str | Path, *, data_dir: str | Path | None = None,
          overwrite: bool = False) -> dict:
    """Trains to the configured token/step budget; returns the last logged record ({} when
    the run had already reached it). ``overwrite`` moves an old run in ``run_dir`` aside."""
    return Trainer(cfg, run_dir, data_dir=data_dir, overwrite=overwrite).fit()
