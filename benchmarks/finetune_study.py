"""Gato's fine-tuning study (Reed et al. 2022, section 5.2, figure 10) on a checkpoint:
held-out tasks learned from 1 to 64 demonstrations in each fine-tuning mode, against the
same architecture trained from scratch on the same demonstrations and steps, and what the
training suite lost.

    python benchmarks/finetune_study.py --checkpoint runs/demo/teacher --data data \\
        --tasks babyai/BabyAI-GoToObj-v0,metaworld/drawer-close-v3,classic/Acrobot-v1 \\
        --out runs/finetune-study --doc docs/finetune.md
    python benchmarks/finetune_study.py ... --demos 1,4 --modes full,new-expert --steps 50 \\
        optim.lr=3e-4                                   # dotted overrides go to every run

Per held-out task T, number of demonstrations n (``--demos``, default 1, 4, 16, 64) and
mode (``--modes``, default full, experts, new-expert and the scratch baseline):
``moe-gato finetune`` on the first n demonstrations of T for ``--steps`` steps, then
``--rollouts`` rollouts of T (default 20: one point of the figure), and after every
fine-tune (not the scratch baseline) the mean normalized score on the training suite
(``--forget-tasks``, default the control tasks of the checkpoint's training mixture;
``--forget-episodes`` rollouts each): what was forgotten. Beside them the checkpoint
untouched: its score on T (zero-shot), prompted with ``--prompt-demos`` demonstrations
(the zero-update baseline; a count the context cannot hold is reported as such) and its
training-suite score. Each mode's step time is the median over its runs' steps.

Every fine-tune and evaluation is resumable: rerunning the command skips what is done.
Writes ``OUT/results.json`` and the report at ``--doc`` (markdown, with the figure beside it
as a PNG of the same name: score against demonstrations, one line per mode and the scratch
baseline, and the forgetting table with each mode's step time and trained parameters).

The data folder needs ``max(--demos)`` training episodes of every held-out task (the first
ones of its training split; the last tenth of a task's rows validate). The default suite
stores fewer for GoToObj (20) and drawer-close (5): collect more first, for example
``moe-gato collect --tasks babyai/BabyAI-GoToObj-v0,metaworld/drawer-close-v3 --episodes 72
--out data --overwrite`` (the study says how many when there are too few).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMOS = (1, 4, 16, 64)
PROMPT_DEMOS = (1, 4)


def _slug(task: str) -> str:
    return task.replace("/", "__")


def forget_tasks_of(checkpoint: Path) -> list[str]:
    """The control tasks, not held out, of the checkpoint's training mixture."""
    from moe_gato.envs import TASKS
    from moe_gato.train.config import load_train_config

    path = checkpoint / "train_config.yaml"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: name the training suite with --forget-tasks")
    tasks = load_train_config(path).data.tasks
    return [t for t in tasks if t in TASKS and TASKS[t].kind == "control"
            and not TASKS[t].held_out]


def training_episodes(data: Path, fraction: float) -> dict[str, int]:
    """Training-split episodes of every task in ``data``."""
    from moe_gato.data.loader import split_rows
    from moe_gato.data.storage import read_manifest

    return {t: len(split_rows(int(e["episodes"]), fraction, "train"))
            for t, e in read_manifest(data)["tasks"].items()}


def check_demonstrations(data: Path, tasks: list[str], need: int, fraction: float) -> None:
    """Every held-out task holds ``need`` training episodes; else the command that
    collects enough."""
    from moe_gato.train.finetune import rows_to_collect

    known = training_episodes(data, fraction)
    short = {t: known[t] for t in tasks if t in known and known[t] < need}
    missing = [t for t in tasks if t not in known]
    if short or missing:
        raise ValueError(f"{data} lacks demonstrations: {missing} not collected, {short} "
                         f"training episodes where {need} are needed; run `moe-gato collect "
                         f"--tasks {','.join(missing + list(short))} --episodes "
                         f"{rows_to_collect(need, fraction)} --out {data} --overwrite`")


def score(checkpoint: Path | str, data: Path, out: Path, tasks: list[str], cfg) -> dict:
    """``moe-gato eval`` of ``tasks``: {task: (normalized score, its 95% half-width)}, the
    mean normalized score over them, and whether every prompt fitted the context."""
    from moe_gato.eval.evaluate import evaluate

    doc = evaluate(checkpoint, data_dir=data, out=out, tasks=tasks, cfg=cfg, progress=False)
    rows = {t: (r["normalized_score"], r["normalized_ci95"]) for t, r in doc["tasks"].items()}
    return {"tasks": rows, "mean": statistics.fmean(s for s, _ in rows.values()),
            "prompt_fits": all(r["prompt_tokens"] > 0 for r in doc["tasks"].values())}


def step_ms(run: Path) -> float:
    """Median milliseconds of a run's optimizer steps (tokens per step / tokens per s)."""
    from moe_gato.train.metrics import read_metrics

    rows = read_metrics(run)
    per_step = rows[0]["tokens"] / rows[0]["step"]
    return 1e3 * statistics.median(per_step / r["tokens_per_s"] for r in rows)


def study(*, checkpoint: str | Path, data: str | Path, tasks: list[str], out: str | Path,
          doc: str | Path, demos=DEMOS, modes=None, steps: int = 200, rollouts: int = 20,
          forget_tasks: list[str] | None = None, forget_episodes: int = 10,
          prompt_demos=PROMPT_DEMOS, prompt_share: float = 0.5, max_steps: int | None = None,
          replay: float = 0.0, config: str | Path | None = None, overrides=()) -> dict:
    """Runs the study (module docstring); returns and writes ``OUT/results.json`` and the
    report at ``doc``."""
    from tqdm import tqdm

    from moe_gato.config import write_json
    from moe_gato.eval.evaluate import EvalConfig
    from moe_gato.report.finetune import write_finetune_report
    from moe_gato.train.checkpoint import model_folder
    from moe_gato.train.finetune import FinetuneConfig, finetune
    from moe_gato.train.finetune_modes import MODES

    modes = list(modes or MODES)
    demos = sorted(set(int(n) for n in demos))
    if not demos or demos[0] < 1:
        raise ValueError(f"demos must be counts >= 1, got {demos}")
    for mode in modes:  # every setting checked before the first run
        FinetuneConfig(tasks=tasks, mode=mode, episodes=demos[0], replay=replay, steps=steps)
    data, out, folder = Path(data), Path(out), model_folder(checkpoint)
    forget = list(forget_tasks) if forget_tasks else forget_tasks_of(folder)
    fraction = _validation_fraction(config or folder / "train_config.yaml")
    check_demonstrations(data, tasks, demos[-1], fraction)
    available = training_episodes(data, fraction)
    task_cfg = EvalConfig(episodes=rollouts, batch_size=min(rollouts, 20), max_steps=max_steps)
    suite_cfg = EvalConfig(episodes=forget_episodes, batch_size=min(forget_episodes, 20),
                           max_steps=max_steps)
    results: dict = {"checkpoint": str(folder.resolve()), "steps": steps, "rollouts": rollouts,
                     "forget_tasks": forget, "forget_episodes": forget_episodes,
                     "demos": demos, "modes": modes, "prompt_demos": list(prompt_demos),
                     "prompt_share": prompt_share, "replay": replay, "runs": []}
    base = out / "pretrained"
    suite = score(folder, data, base / "suite", forget, suite_cfg)
    pre = {"forget_score": suite["mean"], "forget_by_task": _by_task(suite), "tasks": {}}
    for task in tasks:
        row = {"zero_shot": score(folder, data, base / f"zero-{_slug(task)}", [task],
                                  task_cfg)["mean"], "prompted": {}}
        for k in prompt_demos:  # None: the context (or the data) does not hold k
            row["prompted"][str(k)] = None
            if k > available[task]:
                print(f"prompting {task} with {k}: the data holds {available[task]} training "
                      f"episodes", flush=True)
                continue
            cfg = EvalConfig(episodes=rollouts, batch_size=min(rollouts, 20),
                             max_steps=max_steps, prompt=True, prompt_demos=k,
                             prompt_share=prompt_share)
            try:  # PromptTooLong, or a prompt that leaves no room for a timestep
                got = score(folder, data, base / f"prompt{k}-{_slug(task)}", [task], cfg)
            except ValueError as exc:
                print(f"prompting {task} with {k}: {exc}", flush=True)
                continue
            if got["prompt_fits"]:
                row["prompted"][str(k)] = got["mean"]
            else:
                print(f"prompting {task} with {k}: not one timestep fits {prompt_share} of the "
                      f"context", flush=True)
        pre["tasks"][task] = row
    results["pretrained"] = pre
    points = [(t, n, m) for t in tasks for n in demos for m in modes]
    for task, n, mode in tqdm(points, desc="finetune study", unit="run"):
        run = out / "runs" / _slug(task) / f"{mode}-n{n}"
        finetune(checkpoint=folder, tasks=[task], out=run, data=data, mode=mode, episodes=n,
                 replay=replay, steps=steps, config=config, overrides=overrides)
        held = score(run, data, run / "eval-task", [task], task_cfg)["tasks"][task]
        after = None if mode == "scratch" else score(run, data, run / "eval-suite", forget,
                                                      suite_cfg)
        settings = json.loads((run / "finetune.json").read_text())
        results["runs"].append({"task": task, "mode": mode, "demos": n, "score": held[0],
                                "score_ci95": held[1],
                                "forget_score": None if after is None else after["mean"],
                                "forget_by_task": None if after is None else _by_task(after),
                                "step_ms": step_ms(run),
                                "trained_params": settings["trained_params"],
                                "total_params": settings["total_params"]})
        write_json(out / "results.json", results)
    write_json(out / "results.json", results)
    write_finetune_report(results, Path(doc))
    return results


def _by_task(scored: dict) -> dict[str, float]:
    """{training task: its normalized score} of a ``score`` result."""
    return {t: s for t, (s, _) in scored["tasks"].items()}


def _validation_fraction(config: str | Path) -> float:
    """The mixture's validation share in a training config (0.1, the default, without one)."""
    from moe_gato.train.config import load_train_config

    return load_train_config(config).data.validation_fraction if Path(config).is_file() else 0.1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="the pretrained agent: a run directory "
                                                       "or a checkpoint folder")
    p.add_argument("--data", default="data", help="the collected suite (default: data)")
    p.add_argument("--tasks", required=True, help="comma-separated held-out control tasks")
    p.add_argument("--out", required=True, help="folder for the runs, evaluations, results.json")
    p.add_argument("--doc", default="docs/finetune.md", help="the report (default "
                                                             "docs/finetune.md; PNG beside it)")
    p.add_argument("--demos", default=",".join(map(str, DEMOS)),
                   help="demonstration counts (default 1,4,16,64)")
    p.add_argument("--modes", default=None, help="comma-separated modes (default: full, "
                                                 "experts, new-expert, scratch)")
    p.add_argument("--steps", type=int, default=200, help="steps of every fine-tune (default 200)")
    p.add_argument("--rollouts", type=int, default=20, help="rollouts per point (default 20)")
    p.add_argument("--forget-tasks", default=None,
                   help="comma-separated training suite (default: the control tasks of the "
                        "checkpoint's mixture)")
    p.add_argument("--forget-episodes", type=int, default=10,
                   help="rollouts per training-suite task (default 10)")
    p.add_argument("--prompt-demos", default=",".join(map(str, PROMPT_DEMOS)),
                   help="demonstration counts of the prompting baseline (default 1,4)")
    p.add_argument("--prompt-share", type=float, default=0.5,
                   help="share of the context a prompt may take (default 0.5)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap on a rollout's steps (default: the task's own limit)")
    p.add_argument("--replay", type=float, default=0.0, help="replay share of every fine-tune")
    p.add_argument("--config", default=None, help="training config of every fine-tune "
                                                  "(default: the checkpoint's)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of every fine-tune's training config")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("MUJOCO_GL", "egl")

    def names(text: str | None) -> list[str] | None:
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    try:
        study(checkpoint=args.checkpoint, data=args.data, tasks=names(args.tasks),
              out=args.out, doc=args.doc, demos=[int(n) for n in names(args.demos)],
              modes=names(args.modes), steps=args.steps, rollouts=args.rollouts,
              forget_tasks=names(args.forget_tasks), forget_episodes=args.forget_episodes,
              prompt_demos=[int(n) for n in names(args.prompt_demos)],
              prompt_share=args.prompt_share, max_steps=args.max_steps, replay=args.replay,
              config=args.config, overrides=args.overrides)
    except ValueError as exc:
        print(f"finetune_study: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/results.json and {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
