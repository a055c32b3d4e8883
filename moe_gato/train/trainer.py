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
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moe_gato.config import save_config, to_dict
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
                        "data_workers", "batches", "log_every_s", "eval_every_s",
                        "checkpoint_every_s")
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


def _defaults(cls) -> dict:
    """The defaults of a (nested) config dataclass as a mapping; fields without one are left out."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = _defaults(hints[f.name])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def config_changes(saved: dict, cfg: TrainConfig) -> dict[str, list]:
    """``{dotted key: [saved value, new value]}`` of every setting that differs. A key the
    saved config does not have (it was added since) counts as its default, which new
    options keep equal to the earlier behaviour (where it is not, ``upgrade_saved`` fills
    in what the run was trained with)."""
    import yaml

    def flat(mapping: dict) -> dict:
        return _flatten(yaml.safe_load(yaml.safe_dump(mapping, sort_keys=False)))

    new = flat(to_dict(cfg))
    old = {**flat(_defaults(TrainConfig)), **_flatten(saved)}
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
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run directory {self.run_dir} exists and is not a folder")
        self.overwrite = overwrite
        self.dist = setup_distributed(cfg)
        head = cfg.head_logits
        if head == "auto":
            head = "fused" if self.dist.device.type == "cuda" else "targets"
        #: what a step minimises (moe_gato.train.objective); Gato's next-token loss by default
        self.objective = objective or LanguageModelLoss(logits=head)
        self.data_dir = Path(data_dir or cfg.data.data_dir)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = build_model(cfg.model).to(self.dist.device)
        if init_model is not None:  # before the optimizer (and DeepSpeed's copies) exist
            init_model(self.model)
        if cfg.compile == "blocks":  # in place: the parameters and their names stay
            for block in self.model.blocks:
                block.compile()
        # fused on a GPU: one kernel for all parameters, its step counts on the device
        fused = {"fused": True} if self.dist.device.type == "cuda" else {}
        self.engine, self.optimizer = parallelize(self.model, cfg, self.dist, lambda m: (
            torch.optim.AdamW(param_groups(m, cfg.optim.weight_decay), lr=cfg.optim.lr,
                              betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, **fused)))
        self.accum = cfg.batch_size // (cfg.micro_batch_size * self.dist.world)
        self.loader = SequenceLoader(cfg.data, split="train", seed=cfg.seed, data_dir=self.data_dir)
        for task, n in self.loader.max_timestep_tokens().items():
            if n > cfg.data.context_len:
                raise ValueError(f"the context ({cfg.data.context_len}, model.context_length) "
                                 f"cannot hold one timestep of {task} ({n} tokens): nothing "
                                 f"would be learned; set model.context_length to >= {n}")
        self._prefetch = None  # data workers' Prefetcher, made at the first micro-batch
        self._planner = None  # the SequencePlanner (batches: planner), at the first micro-batch
        self.step = 0
        self.tokens = 0
        #: on a GPU a step's numbers are read back only when a record is due (log, eval,
        #: checkpoint, the last step): every read stalls the host until the device catches up
        self.defer_reads = self.dist.device.type == "cuda"
        self._interval_start: float | None = None   # tokens/s over the steps since a read
        self._steps_since_read = 0
        self.peak_flops = cfg.peak_flops or measure_peak_flops(self.dist.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.dist.device.type == "cuda" else None)

    # -------------------------------------------------------------- data
    def host_batch(self, step: int, micro: int) -> dict:
        """Micro-batch ``micro`` of ``step`` as the loader (or its workers) built it, on the
        host (pinned for a GPU when workers build it); or as the planner gathered it, its
        patches already on the device (``batches``)."""
        cfg, d = self.cfg, self.dist
        start = self._micro_start(step, micro)
        if cfg.batches == "planner" or (cfg.batches == "auto" and d.device.type == "cuda"):
            if self._planner is None:
                from moe_gato.data.planner import SequencePlanner

                self._planner = SequencePlanner(self.loader, device=d.device)
            return self._planner.batch(start, cfg.micro_batch_size)
        if cfg.data_workers:
            if self._prefetch is None:  # planned from the step the loop starts at (resume)
                from moe_gato.data.prefetch import Prefetcher

                plan = (self._micro_start(s, m) for s in range(step, cfg.num_steps)
                        for m in range(self.accum))
                self._prefetch = Prefetcher(
                    cfg.data, seed=cfg.seed, data_dir=self.data_dir, size=cfg.micro_batch_size,
                    starts=plan, workers=cfg.data_workers, pin_memory=d.device.type == "cuda")
            return self._prefetch.take(start)
        return self.loader.batch(start, cfg.micro_batch_size)

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
        """One optimizer step; returns its metrics record (``step_async``, then ``read``)."""
        return self.read(self.step_async())

    def step_async(self) -> "_PendingStep":
        """One optimizer step whose numbers stay on the device: nothing here waits for it
        (the batches' target weights are summed on the host before they are moved). ``read``
        turns the step into its record."""
        cfg, d, model = self.cfg, self.dist, self._module()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self._interval_start is None:
            self._interval_start = time.perf_counter()
        host = [self.host_batch(self.step, m) for m in range(self.accum)]
        targets, total_targets = self._host_targets(host)
        if total_targets == 0:
            raise TrainingError(f"the batch of step {self.step} holds no target token "
                                f"(context too short for a timestep?); stopping. Last good "
                                f"checkpoint: {self._last_good()}")
        device = d.device
        # loss sum, aux + z, then (loss sum, targets) per kind: one all-reduce for all of it
        sums = torch.zeros(2 + len(KIND_NAMES) * 2, dtype=torch.float64, device=device)
        routing_last = None
        logged: dict[str, torch.Tensor] = {}
        for micro, cpu_batch in enumerate(host):
            batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
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
            share = targets[micro] / total_targets
            loss = part.loss * (share * d.world) + part.aux / self.accum
            if d.world > 1 or self.engine is not None:
                # every parameter joins the graph, so that data-parallel reductions see the
                # same gradients on every rank (the model already runs every expert group and
                # the patch block without tokens when asked; this covers any parameter left out)
                loss = loss + sum(p.view(-1)[0] for p in model.parameters()) * 0.0
            if self.engine is not None:
                self.engine.backward(loss, scale_wrt_gas=False)
            else:
                loss.backward()
            sums[0] += part.loss.detach().double() * targets[micro]
            sums[1] += part.aux.detach().double() / self.accum
            local_share = targets[micro] / sum(targets)  # per target, like the loss
            for name, value in part.parts.items():
                logged[name] = logged.get(name, 0.0) + value.detach().double() * local_share
            add_kind_losses(sums[2:].view(-1, 2), batch, out)
            routing_last = out.routing
        grad_norm = self._optimizer_step(model)
        if cfg.model.ffn == "moe" and cfg.model.moe.bias_balancing and routing_last:
            model.update_router_biases(routing_last)
        # the update itself may break the weights (a huge lr): checked after the step, read
        # with the record
        norms = torch._foreach_norm([p.detach() for p in model.parameters()])
        finite = torch.isfinite(torch.stack(norms).sum()) & torch.isfinite(sums[0])
        self.step += 1
        self.tokens += cfg.tokens_per_step
        self._steps_since_read += 1
        return _PendingStep(step=self.step, tokens=self.tokens, lr=lr, sums=sums,
                            total_targets=total_targets, logged=logged, grad_norm=grad_norm,
                            finite=finite, routing=routing_last)

    def _host_targets(self, host: list[dict]) -> tuple[list[float], float]:
        """Each micro-batch's target weight (the count of targets unless the loader weights
        them) and the step's over all ranks, from the batches still on the host."""
        targets = [float(b.pop("target_weight_host")) if "target_weight_host" in b
                   else float(target_weights(b).sum()) for b in host]
        if self.dist.world == 1:
            return targets, sum(targets)
        # several ranks: summed where the process group runs (NCCL takes device tensors)
        total = torch.tensor(sum(targets), dtype=torch.float64, device=self.dist.device)
        return targets, float(all_reduce_sum(total))

    def read(self, p: "_PendingStep") -> dict:
        """The record of step ``p`` (waits for the device): loss, learning rate, gradient
        norm, per-kind losses, routing; tokens/s over the steps since the last read. Raises
        ``TrainingError`` when the loss, the gradient norm or the weights are not finite."""
        cfg, d = self.cfg, self.dist
        flags = torch.stack([(~p.finite).double(),
                             torch.as_tensor(p.grad_norm, dtype=torch.float64,
                                             device=p.sums.device)]).to(p.sums.device)
        all_reduce_sum(p.sums)
        all_reduce_sum(flags[:1])
        bad_weights, grad_norm = float(flags[0]), float(flags[1])
        loss = float(p.sums[0]) / p.total_targets
        if not math.isfinite(loss) or not math.isfinite(grad_norm) or bad_weights > 0:
            what = "the weights after the update are non-finite" if bad_weights > 0 else ""
            self.step = p.step - 1  # the step that broke them, for the message
            raise TrainingError(
                f"loss is {loss} (grad norm {grad_norm}) at step {p.step - 1}"
                f"{'; ' + what if what else ''}; stopping. "
                f"Last good checkpoint: {self._last_good()}")
        now = time.perf_counter()
        tps = cfg.tokens_per_step * self._steps_since_read / max(now - self._interval_start, 1e-9)
        self._interval_start, self._steps_since_read = now, 0
        # time: when the step ended (Unix seconds), for wall time per step and per run
        record = {"step": p.step, "tokens": p.tokens, "time": time.time(),
                  "loss": loss, "lr": p.lr,
                  "grad_norm": grad_norm, "aux_loss": float(p.sums[1]) / d.world,
                  "tokens_per_s": tps,
                  "mfu": self._module().mfu(tps / d.world, self.peak_flops,
                                            seq_len=cfg.data.context_len)}
        record.update(kind_means(p.sums[2:].view(-1, 2).cpu(), "loss/"))
        record.update({f"objective/{k}": float(v) for k, v in p.logged.items()})
        if p.routing:
            record.update(routing_metrics(p.routing))
        return record

    def _last_good(self) -> str:
        """The newest checkpoint of this run's timeline whose checksums verify (checkpoints
        are never written with non-finite tensors)."""
        for path in reversed(ckpt.list_checkpoints(self.run_dir)):
            if ckpt.checkpoint_step(path) <= self.step and ckpt.verify_checkpoint(path) is None:
                return str(path)
        return "none"

    def _optimizer_step(self, model: torch.nn.Module) -> torch.Tensor | float:
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        from moe_gato.train.expert_parallel import all_reduce_gradients, clip_grad_norm

        # a parameter the batch did not use still takes its step (weight decay, moments), as
        # under DeepSpeed: its gradient is zero, not missing (one process builds no graph
        # term for it; several ranks do, see step_async)
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.dist.world > 1:
            all_reduce_gradients(model, self.dist.world)
        norm = clip_grad_norm(model, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        return norm

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
        cadence = Cadence(cfg, d.device)
        try:
            while self.step < cfg.num_steps:
                pending = self.step_async()
                due = cadence.due(self.step)
                if not due and self.defer_reads:
                    bar.update(1)
                    continue
                record = self.read(pending)
                if "eval" in due:
                    record.update(self.evaluate())
                if "log" in due or "eval/loss" in record:
                    log.write(record)
                if "checkpoint" in due:
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


class Cadence:
    """When a record, an evaluation and a checkpoint are due: every ``<kind>_every`` steps
    (evaluation and checkpoint also at the last step), or once ``<kind>_every_s`` seconds
    have passed since the last one. Ranks agree on the time-based part by one all-reduce."""

    KINDS = ("log", "eval", "checkpoint")

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.every = {k: getattr(cfg, f"{k}_every") for k in self.KINDS}
        self.every_s = {k: getattr(cfg, f"{k}_every_s") for k in self.KINDS}
        self.timed = any(v is not None for v in self.every_s.values())
        self.last = dict.fromkeys(self.KINDS, time.monotonic())

    def due(self, step: int) -> set[str]:
        now = time.monotonic()
        out = {k for k in self.KINDS if step % self.every[k] == 0}
        if step == self.cfg.num_steps:
            out |= {"eval", "checkpoint"}
        if self.timed:
            late = [k not in out and self.every_s[k] is not None
                    and now - self.last[k] >= self.every_s[k] for k in self.KINDS]
            if dist.is_initialized():  # every rank must take the same branch
                flags = torch.tensor(late, dtype=torch.float32, device=self.device)
                late = (all_reduce_sum(flags) > 0).tolist()
            out |= {k for k, flag in zip(self.KINDS, late) if flag}
        for k in out:
            self.last[k] = now
        return out


@dataclasses.dataclass
class _PendingStep:
    """A step's numbers, still on the device (``Trainer.step_async``)."""

    step: int                    # the step count after it
    tokens: int
    lr: float
    sums: torch.Tensor           # loss sum, aux, then (loss sum, targets) per kind
    total_targets: float         # the step's target weight, all ranks
    logged: dict                 # objective parts, per target
    grad_norm: torch.Tensor | float
    finite: torch.Tensor         # loss and weights finite after the update
    routing: list | None


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
