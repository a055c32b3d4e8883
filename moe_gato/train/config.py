"""Training configuration: ``TrainConfig`` with its optimizer and DeepSpeed parts.

Layers (STYLE.md item 3): dataclass defaults, then ``configs/train/<name>.yaml``, then
dotted overrides (``train.tokens=2000000``, ``model.moe.num_experts=8``,
``optim.lr=3e-4``). In the YAML, ``model`` may name a preset file
(``model: configs/model/tiny-moe.yaml``), a preset plus changes
(``model: {preset: configs/model/tiny-moe.yaml, context_length: 256}``) or the whole
model config inline; ``data`` likewise names or holds the mixture. Dotted overrides of
``model.*`` and ``data.*`` apply on top.

The training context is set once, by ``model.context_length``: the mixture's
``context_len`` is derived from it (a ``data.context_len`` that differs is an error).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from moe_gato.config import apply_overrides, deep_merge, from_dict, load_yaml
from moe_gato.data.mixture import MixtureConfig
from moe_gato.model import ModelConfig

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio`` of the peak (Gato)."""

    lr: float = 1e-3
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1           # matrices only; norms, biases, vectors: 0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        numbers = {f: getattr(self, f) for f in ("lr", "eps", "weight_decay", "min_lr_ratio",
                                                 "grad_clip")}
        numbers.update({f"betas[{i}]": b for i, b in enumerate(self.betas)})
        for field, value in numbers.items():  # nan/inf pass every comparison below
            if not math.isfinite(value):
                raise ValueError(f"optim.{field} must be a finite number, got {value}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("optim.weight_decay, optim.warmup_steps and optim.grad_clip must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(kw_only=True)
class DeepSpeedConfig:
    """Used when the trainer runs under ``deepspeed`` (``enabled: true``)."""

    enabled: bool = False
    zero_stage: int = 1
    #: merged into the generated DeepSpeed JSON config (e.g. {"zero_optimization":
    #: {"overlap_comm": true}}); keys the trainer sets itself may be overridden here
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage} "
                             f"(ZeRO-3 partitions parameters, which the model's direct use of "
                             f"its stacked expert weights does not support yet)")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: MixtureConfig
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    #: sequences per optimizer step, over all ranks and micro-batches
    batch_size: int = 8
    #: sequences per forward pass on one rank; batch_size / (micro * ranks) = accumulation
    micro_batch_size: int = 8
    #: token budget D (context positions seen); sets the steps when given
    tokens: int | None = None
    #: steps; used when ``tokens`` is null
    steps: int | None = 100
    expert_parallel_size: int = 1
    #: processes building micro-batches ahead of the step (moe_gato.data.prefetch); 0 builds
    #: them in the training process. The batches are the same either way.
    data_workers: int = 0
    #: who builds the batches: "loader" (SequenceLoader, in Python, or its data_workers),
    #: "planner" (moe_gato.data.planner: the split tokenized once, batches gathered by index,
    #: patches on the device; equal batches, ~2x the loader's sequences/s on one core, a
    #: minute and a few GiB to flatten the default suite), "auto": the planner on a GPU
    batches: Literal["auto", "loader", "planner"] = "auto"
    #: where the output head runs in a training step: "all" positions (the logits of every
    #: position, as evaluation and distillation need them), or only the text and action
    #: "targets" the loss is taken on (the same loss to float rounding; on the 2-core CPU
    #: the head is most of a small model's step: benchmarks/RESULTS.md, bench_cpu_path);
    #: "fused": the head and the cross-entropy together in chunks of positions, every
    #: position, no logits tensor and no host read (moe_gato.model.head); "auto": targets
    #: on the CPU, fused on a GPU (selecting the targets reads their count back to the
    #: host, a sync the GPU step avoids)
    head_logits: Literal["auto", "all", "targets", "fused"] = "all"
    #: torch.compile: "blocks" compiles each transformer block in place (``nn.Module.compile``;
    #: parameter names and checkpoints unchanged), the first steps paying the compilation
    #: (about 45 s for tiny-moe on the 2-core CPU); "none" runs eagerly. Not with expert
    #: parallelism (its all-to-all runs inside the MoE blocks)
    compile: Literal["none", "blocks"] = "none"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1
    eval_every: int = 50
    eval_sequences: int = 8            # validation sequences per task per evaluation
    checkpoint_every: int = 50
    #: also by wall time: a record, an evaluation or a checkpoint is due when this many
    #: seconds have passed since the last one (null: by steps only). On a GPU a step may take
    #: milliseconds or seconds depending on the model, so a cadence in steps is either too
    #: chatty or too rare. With several ranks the decision is agreed by one all-reduce a step.
    log_every_s: float | None = None
    eval_every_s: float | None = None
    checkpoint_every_s: float | None = None
    keep_last: int = 3
    resume: Literal["auto", "never"] = "auto"
    #: peak FLOP/s for MFU; null measures a large fp32 matmul on CPU, or uses the card's
    #: bf16 dense peak on known GPUs
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        for field in ("batch_size", "micro_batch_size", "expert_parallel_size", "log_every",
                      "eval_every", "checkpoint_every", "eval_sequences"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        for field in ("log_every_s", "eval_every_s", "checkpoint_every_s"):
            value = getattr(self, field)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{field} must be a finite number of seconds >= 0 or null, "
                                 f"got {value}")
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be >= 0 (0: no worker processes), "
                             f"got {self.data_workers}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.peak_flops is not None and not (math.isfinite(self.peak_flops)
                                                and self.peak_flops > 0):
            raise ValueError(f"peak_flops must be a finite number > 0 or null, got {self.peak_flops}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
        if self.tokens is None and self.steps is None:
            raise ValueError("set either tokens (the token budget) or steps")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.compile != "none" and self.expert_parallel_size > 1:
            raise ValueError("compile: blocks is not supported with expert_parallel_size > 1 "
                             "(the experts' all-to-all runs inside the blocks); use "
                             "compile: none")
        if self.deepspeed.enabled and self.expert_parallel_size > 1:
            raise ValueError("expert_parallel_size > 1 runs on torch.distributed (torchrun), not "
                             "under deepspeed.enabled: true; choose one of the two")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")
        if self.data.context_len != self.model.context_length:
            if self.data.context_len > self.model.context_length:
                raise ValueError(f"data.context_len ({self.data.context_len}) exceeds "
                                 f"model.context_length ({self.model.context_length})")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.data.context_len

    @property
    def num_steps(self) -> int:
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / self.tokens_per_step))
        return int(self.steps)


def _resolve_path(path: str, base: Path | None) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    for root in ([base] if base else []) + [REPO]:
        if (root / p).is_file():
            return root / p
    raise ValueError(f"config file {path} does not exist")


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                      ) -> TrainConfig:
    """Defaults, then the YAML at ``path`` (with ``model``/``data`` preset files expanded),
    then dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    return train_config_from_dict(data, Path(path).parent if path is not None else None,
                                  overrides)


def train_config_from_dict(data: dict, base: Path | None = None,
                           overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """``load_train_config`` of a mapping already read; preset and mixture paths resolve
    against ``base`` (the config file's folder), then the repository."""
    data = dict(data)
    for key in ("model", "data"):
        value = data.get(key)
        if isinstance(value, str):
            data[key] = load_yaml(_resolve_path(value, base))
        elif isinstance(value, dict) and "preset" in value:
            rest = {k: v for k, v in value.items() if k != "preset"}
            data[key] = deep_merge(load_yaml(_resolve_path(value["preset"], base)), rest)
    data = apply_overrides(data, overrides)
    if "data" not in data:
        raise ValueError("the training config needs data: a mixture file or mapping")
    _derive_context(data)
    return from_dict(TrainConfig, data)


def _derive_context(data: dict) -> None:
    """``data.context_len`` := ``model.context_length`` (the one source of the context)."""
    model, mixture = data.get("model") or {}, data["data"]
    if not isinstance(model, dict) or not isinstance(mixture, dict):
        return  # from_dict reports the wrong type
    context = model.get("context_length", ModelConfig.context_length)
    given = mixture.get("context_len")
    if given is not None and given != context:
        raise ValueError(f"data.context_len ({given}) differs from model.context_length "
                         f"({context}): the training context is set once, by "
                         f"model.context_length; drop data.context_len")
    mixture["context_len"] = context
