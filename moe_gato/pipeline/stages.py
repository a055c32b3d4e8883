"""The main job's stages, each resumable and each one ``moe-gato`` subcommand.

A stage is done when ``<out>/stages.json`` says so and its outputs are on disk; a rerun
skips it. An interrupted stage resumes inside: collection keeps finished tasks, the sweep
finished runs, training and distillation their last checkpoint, evaluation finished tasks.
``<out>/pipeline.yaml`` holds the resolved configuration; a rerun with another one is
refused (a finished stage would no longer match it).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path

import yaml

from moe_gato.config import to_dict, write_json
from moe_gato.pipeline.config import PipelineConfig

#: the models the pipeline trains: the MoE teacher, its distilled dense student and the
#: dense model of the student's shape trained from scratch on the student's tokens
MODELS = ("teacher", "student", "scratch")
#: the models timed in the control loop (the scratch model has the student's shape)
TIMED = ("teacher", "student")


class Paths:
    """Where each stage reads and writes, under ``cfg.out``."""

    def __init__(self, cfg: PipelineConfig, report: str | Path | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.data = Path(cfg.data)
        self.sweep = self.out / "sweep"
        self.fit = self.sweep / "fit"
        self.pick = self.out / "pick.json"
        self.teacher_yaml = self.out / "teacher.yaml"
        self.student_yaml = self.out / "student.yaml"
        self.student_model = self.out / "student.model.yaml"
        self.state = self.out / "stages.json"
        self.report = Path(report or cfg.report or Path("reports") / date.today().isoformat())

    def run(self, model: str) -> Path:
        return self.out / model

    def eval(self, model: str) -> Path:
        return self.out / "eval" / model

    def latency(self, model: str) -> Path:
        return self.out / "latency" / f"{model}.json"

    def sweep_overrides(self) -> list[str]:
        return [f"out={self.sweep}", f"data={self.data}", *self.cfg.sweep_overrides]

    def latency_shape(self) -> str:
        return self.cfg.latency.shape or self.sweep_config().fit.shape

    def sweep_config(self):
        from scaling.sweep import load_sweep_config

        return load_sweep_config(self.cfg.sweep, self.sweep_overrides())


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    help: str
    run: Callable[[Paths], None]
    command: Callable[[Paths], list[list[str]]]   # the moe-gato command(s) that run it alone
    outputs: Callable[[Paths], list[Path]]    # what must exist once it is done
    needs: tuple[str, ...] = ()               # stages whose outputs it reads


def _cmd(*parts) -> list[list[str]]:
    return [["moe-gato", *[str(p) for p in parts]]]


# ---------------------------------------------------------------------------- stages
def run_collect(p: Paths) -> None:
    from moe_gato.data.cli import collect_options
    from moe_gato.data.collect import collect

    opts = collect_options(p.cfg.collect)
    collect(opts.pop("suite"), p.data, **opts, workers=p.cfg.collect_workers)


def run_sweep(p: Paths) -> None:
    from scaling.sweep import run_sweep as sweep

    rows = sweep(p.sweep_config())
    done = [r for r in rows if r["status"] == "done"]
    failed = [f"{r['name']}: {r['error']}" for r in rows if r["status"] != "done"]
    if failed:
        print(f"sweep: {len(failed)} run(s) failed after their attempts; the fit uses the "
              f"{len(done)} finished:\n  " + "\n  ".join(failed), flush=True)
    if len(done) < 3:
        raise RuntimeError(f"only {len(done)} sweep run(s) finished; a law needs more (see "
                           f"{p.sweep}/results.csv). The failed runs:\n  " + "\n  ".join(failed))


def run_fit(p: Paths) -> None:
    from scaling.sweep import fit_finished

    fit_finished(p.sweep_config())


def run_pick(p: Paths) -> None:
    from scaling.pick import markdown, pick, student, write_train

    t = p.cfg.teacher
    sweep = p.sweep_config()
    doc = pick(sweep, json.loads((p.fit / "fit.json").read_text()), t.budget, hz=t.hz,
               context=t.context, moe_only=t.moe_only, fallback=t.fallback)
    write_train(doc["train"], p.teacher_yaml)
    write_train(student(sweep, doc, p.cfg.student.tokens), p.student_yaml)
    write_json(p.pick, doc)
    print(markdown(doc), flush=True)


def _train(config: Path, run_dir: Path, data: Path) -> None:
    from moe_gato.train import load_train_config, train

    train(load_train_config(config), run_dir, data_dir=data)


def run_teacher(p: Paths) -> None:
    _train(p.teacher_yaml, p.run("teacher"), p.data)


def run_scratch(p: Paths) -> None:
    _train(p.student_yaml, p.run("scratch"), p.data)


def run_distill(p: Paths) -> None:
    from moe_gato.train.distill import distill

    s = p.cfg.student
    distill(teacher=p.run("teacher"), student=p.student_model, config=p.student_yaml,
            out=p.run("student"), data=p.data, alpha=s.alpha, temperature=s.temperature,
            init=s.init, load_sequences=s.load_sequences)


def _evaluate(run: str, data: str, out: str, tasks: list[str], episodes: int,
              max_steps: int | None) -> str:
    from moe_gato.eval.evaluate import EvalConfig, evaluate

    evaluate(run, data_dir=data, out=out, tasks=tasks, progress=False,
             cfg=EvalConfig(episodes=episodes, max_steps=max_steps))
    return out


def run_eval(p: Paths) -> None:
    """The three models' rollouts, ``eval.workers`` models at once: a rollout steps its
    environments and a batch-1 model on one thread, so two processes fill two cores."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, wait

    from tqdm import tqdm

    e = p.cfg.eval
    with ProcessPoolExecutor(max_workers=min(e.workers, len(MODELS)),
                             mp_context=mp.get_context("spawn")) as pool:
        pending = {pool.submit(_evaluate, str(p.run(m)), str(p.data), str(p.eval(m)),
                               list(e.tasks), e.episodes, e.max_steps) for m in MODELS}
        bar = tqdm(total=len(MODELS) * len(e.tasks), unit="task",
                   desc=f"eval {'/'.join(MODELS)}, {e.episodes} rollouts per task")
        while pending:
            done, pending = wait(pending, timeout=2.0)
            for job in done:
                job.result()  # a failed evaluation raises here
            # each finished task leaves its result file (tasks/<domain>__<env>.json)
            bar.update(sum(len(list((p.eval(m) / "tasks").glob("*.json")))
                           for m in MODELS) - bar.n)
        bar.close()


def run_latency(p: Paths) -> None:
    from moe_gato.eval.latency import measure_control_latency
    from moe_gato.inference import Policy

    lat = p.cfg.latency
    shape = p.latency_shape()
    for model in TIMED:
        result = measure_control_latency(Policy.from_checkpoint(p.run(model)), shape,
                                         lat.steps, threads=lat.threads)
        p.latency(model).parent.mkdir(parents=True, exist_ok=True)
        write_json(p.latency(model), result.to_dict(times=True))
        print(f"latency: {model} p50 {result.p50_ms:.2f} ms ({result.hz_p50:.1f} Hz), "
              f"p99 {result.p99_ms:.2f} ms", flush=True)


def run_report(p: Paths) -> None:
    from moe_gato.report.report import write_report

    write_report(p.out, p.report, commands=stage_commands(p), sweep=p.sweep_config())


def _eval_command(p: Paths) -> list[list[str]]:
    e = p.cfg.eval
    steps = ["--max-steps", e.max_steps] if e.max_steps else []
    return [_cmd("eval", "--checkpoint", p.run(m), "--data", p.data, "--tasks",
                 ",".join(e.tasks), "--episodes", e.episodes, *steps, "--out", p.eval(m))[0]
            for m in MODELS]


def _latency_command(p: Paths) -> list[list[str]]:
    lat = p.cfg.latency
    return [_cmd("bench-latency", "--checkpoint", p.run(m), "--shape", p.latency_shape(),
                 "--steps", lat.steps,
                 "--threads", lat.threads, "--json", p.latency(m))[0] for m in TIMED]


def _pick_command(p: Paths) -> list[list[str]]:
    t = p.cfg.teacher
    parts = ["pick", "--sweep", p.cfg.sweep, "--budget", f"{t.budget:g}", "--out", p.teacher_yaml,
             "--student-out", p.student_yaml, "--student-tokens", p.cfg.student.tokens,
             "--json", p.pick]
    parts += ["--hz", t.hz] if t.hz else []
    parts += ["--context", t.context] if t.context else []
    parts += [] if t.moe_only else ["--any"]
    parts += ["--fallback", t.fallback]
    return _cmd(*parts, *p.sweep_overrides())


STAGES = (
    Stage("collect", "collect the suite's expert demonstrations",
          run_collect, lambda p: _cmd("collect", "--config", p.cfg.collect, "--out", p.data),
          lambda p: [p.data / "manifest.json"]),
    Stage("sweep", "the IsoFLOP sweep, dense and MoE",
          run_sweep, lambda p: _cmd("sweep", "--config", p.cfg.sweep, "--no-fit",
                                    *p.sweep_overrides()),
          lambda p: [p.sweep / "results.csv"], needs=("collect",)),
    Stage("fit", "fit the scaling laws and the latency-constrained frontier",
          run_fit, lambda p: _cmd("sweep", "--config", p.cfg.sweep, "--fit-only",
                                  *p.sweep_overrides()),
          lambda p: [p.fit / "fit.json", p.fit / "optimum.json"], needs=("sweep",)),
    Stage("pick", "pick the best MoE that meets the control rate at the teacher's budget",
          run_pick, _pick_command,
          lambda p: [p.pick, p.teacher_yaml, p.student_yaml, p.student_model], needs=("fit",)),
    Stage("teacher", "train the picked MoE with the default recipe",
          run_teacher, lambda p: _cmd("train", "--config", p.teacher_yaml, "--data", p.data,
                                      "--out", p.run("teacher")),
          lambda p: [p.run("teacher") / "metrics.jsonl"], needs=("pick", "collect")),
    Stage("scratch", "train the student's dense shape from scratch on the student's tokens",
          run_scratch, lambda p: _cmd("train", "--config", p.student_yaml, "--data", p.data,
                                      "--out", p.run("scratch")),
          lambda p: [p.run("scratch") / "metrics.jsonl"], needs=("pick", "collect")),
    Stage("distill", "distill the teacher into the dense student",
          run_distill, lambda p: _cmd(
              "distill", "--teacher", p.run("teacher"), "--student", p.student_model,
              "--config", p.student_yaml, "--data", p.data, "--out", p.run("student"),
              "--init", p.cfg.student.init, "--alpha", p.cfg.student.alpha,
              "--temperature", p.cfg.student.temperature,
              "--load-sequences", p.cfg.student.load_sequences),
          lambda p: [p.run("student") / "metrics.jsonl"], needs=("teacher",)),
    Stage("eval", "roll teacher, student and scratch model out in the environments",
          run_eval, _eval_command,
          lambda p: [p.eval(m) / "eval.json" for m in MODELS],
          needs=("teacher", "distill", "scratch")),
    Stage("latency", "time batch-1 control steps of teacher and student",
          run_latency, _latency_command,
          lambda p: [p.latency(m) for m in TIMED], needs=("teacher", "distill")),
    Stage("report", "write the report: tables and plots",
          run_report, lambda p: _cmd("report", "--run", p.out, "--out", p.report),
          lambda p: [p.report / "report.md"], needs=("fit", "pick", "eval", "latency")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_commands(p: Paths) -> dict[str, list[str]]:
    """The ``moe-gato`` command line(s) that rerun each stage alone, in order."""
    return {s.name: [shlex.join(c) for c in s.command(p)] for s in STAGES}


# ---------------------------------------------------------------------------- runner
def read_state(p: Paths) -> dict:
    if not p.state.is_file():
        return {}
    try:
        return json.loads(p.state.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p.state} is not valid JSON ({exc}); move it aside to rerun every "
                         f"stage (finished work inside the stages is kept)") from None


def is_done(p: Paths, state: dict, stage: Stage) -> bool:
    return state.get(stage.name, {}).get("status") == "done" and all(
        path.exists() for path in stage.outputs(p))


def check_config(p: Paths) -> None:
    """Saves the resolved config in ``<out>/pipeline.yaml``, or refuses another one."""
    resolved = to_dict(p.cfg)
    saved = p.out / "pipeline.yaml"
    if saved.is_file():
        before = yaml.safe_load(saved.read_text())
        if before != resolved:
            changed = sorted(k for k in set(before) | set(resolved)
                             if before.get(k) != resolved.get(k))
            raise ValueError(f"{p.out} was run with another configuration (changed: "
                             f"{changed}; saved in {saved}); use another out, or move "
                             f"{p.out} aside")
        return
    p.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(resolved, sort_keys=False))


def run_pipeline(cfg: PipelineConfig, *, stages: list[str] | None = None,
                 report: str | Path | None = None) -> dict:
    """Runs ``stages`` (default: every one, in order), skipping finished ones; returns the
    state: per stage its status and wall time in seconds."""
    p = Paths(cfg, report)
    names = list(stages or STAGE_NAMES)
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_NAMES)}")
    check_config(p)
    state = read_state(p)
    chosen = [s for s in STAGES if s.name in names]
    total_start = time.time()
    for i, stage in enumerate(chosen, 1):
        head = f"[{i}/{len(chosen)}] {stage.name}"
        if is_done(p, state, stage):
            print(f"{head}: done in an earlier run ({state[stage.name]['wall_s']:.0f} s); "
                  f"skipped", flush=True)
            continue
        missing = [n for n in stage.needs
                   if not is_done(p, state, next(s for s in STAGES if s.name == n))]
        if missing:
            raise ValueError(f"stage {stage.name} needs the outputs of {missing}: run "
                             f"`moe-gato demo --stage {' --stage '.join(missing)}` first")
        alone = "".join(f"\n    alone: {shlex.join(c)}" for c in stage.command(p))
        print(f"{head}: {stage.help}{alone}", flush=True)
        start = time.time()
        spent = state.get(stage.name, {}).get("spent_s", 0.0)
        try:
            stage.run(p)
        except BaseException:
            state[stage.name] = {"status": "interrupted",
                                 "spent_s": round(spent + time.time() - start, 1)}
            write_json(p.state, state)
            raise
        wall = time.time() - start
        state[stage.name] = {"status": "done", "wall_s": round(spent + wall, 1),
                             "finished": datetime.now().isoformat(timespec="seconds")}
        write_json(p.state, state)
        print(f"{head}: done in {wall / 60:.1f} min", flush=True)
    print(f"pipeline {cfg.name}: {len(chosen)} stage(s) in "
          f"{(time.time() - total_start) / 60:.1f} min; state in {p.state}", flush=True)
    return state
