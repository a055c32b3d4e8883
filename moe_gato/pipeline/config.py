"""The main job's configuration: ``configs/demo/<name>.yaml``, then dotted overrides.

    cfg = load_pipeline_config("configs/demo/default.yaml", ["teacher.budget=2e13"])

Each stage reads its own part; the components' configs (collection, sweep, training
recipe) are named by path and keep their own validation.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from moe_gato.config import load_config
from moe_gato.train.distill import INITS


@dataclasses.dataclass(kw_only=True)
class TeacherStage:
    #: training compute of the teacher in FLOPs: the pick trains D = budget / (training
    #: FLOPs per token of the picked model) tokens
    budget: float
    #: control rate the pick must meet (default: the sweep's ``fit.hz``)
    hz: float | None = None
    #: training context (default: the sweep's training recipe's)
    context: int | None = None
    #: pick among the mixture-of-experts members only (false: dense ones too)
    moe_only: bool = True
    #: when no fitted law may be used (too few runs, a coefficient at a bound, no held-out
    #: error): ``measured`` picks the sweep's best measured run, ``none`` stops the pipeline
    fallback: str = "measured"

    def __post_init__(self) -> None:
        if self.fallback not in ("none", "measured"):
            raise ValueError(f"teacher.fallback must be none or measured, got {self.fallback!r}")
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise ValueError(f"teacher.budget must be a finite number of FLOPs > 0, "
                             f"got {self.budget}")
        if self.hz is not None and not self.hz > 0:
            raise ValueError(f"teacher.hz must be > 0 or null, got {self.hz}")
        if self.context is not None and self.context < 2:
            raise ValueError(f"teacher.context must be >= 2 or null, got {self.context}")


@dataclasses.dataclass(kw_only=True)
class StudentStage:
    #: tokens the dense student (and its from-scratch baseline) train on
    tokens: int
    init: str = "copy+fit"
    alpha: float = 0.75
    temperature: float = 1.0
    load_sequences: int = 64

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"student.tokens must be >= 1, got {self.tokens}")
        if self.init not in INITS:
            raise ValueError(f"student.init must be one of {list(INITS)}, got {self.init!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"student.alpha must lie in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"student.temperature must be > 0, got {self.temperature}")
        if self.load_sequences < 1:
            raise ValueError(f"student.load_sequences must be >= 1, got {self.load_sequences}")


@dataclasses.dataclass(kw_only=True)
class EvalStage:
    #: control tasks the teacher, the student and the scratch model are rolled out on
    tasks: list[str]
    episodes: int = 20
    max_steps: int | None = None
    #: models rolled out at once, one process (and one thread) each
    workers: int = 2

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"eval.workers must be >= 1, got {self.workers}")
        if not self.tasks:
            raise ValueError("eval.tasks must name at least one control task")
        if self.episodes < 2:
            raise ValueError(f"eval.episodes must be >= 2 (an interval needs two), "
                             f"got {self.episodes}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"eval.max_steps must be >= 1 or null, got {self.max_steps}")


@dataclasses.dataclass(kw_only=True)
class LatencyStage:
    steps: int = 200              # timed batch-1 control steps per model
    threads: int = 2
    #: observation shape (``moe_gato.eval.latency.SHAPES``; default: the sweep's fit.shape)
    shape: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 10:
            raise ValueError(f"latency.steps must be >= 10, got {self.steps}")
        if self.threads < 1:
            raise ValueError(f"latency.threads must be >= 1, got {self.threads}")


@dataclasses.dataclass(kw_only=True)
class PipelineConfig:
    name: str
    #: where every stage writes (runs, sweep, evaluations); empty = runs/<name>
    out: str = ""
    #: the report's folder; empty = reports/<date of the report>
    report: str = ""
    #: the collected suite
    data: str = "data"
    collect: str = "configs/collect/default.yaml"
    collect_workers: int = 2
    sweep: str = "configs/sweep/tiny.yaml"
    #: dotted overrides of the sweep config (``launcher.max_parallel=1``)
    sweep_overrides: list[str] = dataclasses.field(default_factory=list)
    teacher: TeacherStage
    student: StudentStage
    eval: EvalStage
    latency: LatencyStage = dataclasses.field(default_factory=LatencyStage)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        for field in ("collect", "sweep"):
            if not Path(getattr(self, field)).is_file():
                raise ValueError(f"{field}: no config at {getattr(self, field)}")
        if self.collect_workers < 1:
            raise ValueError(f"collect_workers must be >= 1, got {self.collect_workers}")
        self.out = self.out or f"runs/{self.name}"


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                         ) -> PipelineConfig:
    if not Path(path).is_file():
        raise ValueError(f"no pipeline config at {path} (configs/demo/default.yaml, "
                         f"configs/demo/quick.yaml)")
    return load_config(PipelineConfig, path, overrides)
