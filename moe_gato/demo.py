"""``moe-gato demo`` (the main job) and ``moe-gato tokenize``.

    moe-gato demo                         # collect (or reuse) data/, train the default agent
                                          # (tiny-moe), score it in the environments
    moe-gato demo --twin                  # also its dense twin on the same tokens, compared
    moe-gato demo --steps 100 --out runs/quick
    moe-gato tokenize --task babyai/BabyAI-GoToRedBall-v0 --seed 3
    moe-gato tokenize --task metaworld/reach-v3 --steps 2

The demo writes ``<out>/tiny-moe`` (the run), ``<out>/eval/eval.{md,json,png}`` (normalized
scores with intervals) and with ``--twin`` ``<out>/loss_curves.png`` (training loss per
modality against tokens, both models) and ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from moe_gato.tokenizer import GatoTokenizer, TokenSequence

MODALITIES = ("text", "discrete_action", "continuous_action")


# ------------------------------------------------------------------------ tokenize
def expert_episode(task: str, seed: int):
    """Runs the task's expert for real (the collectors' code); returns (episode, spec)."""
    from moe_gato.envs import TASKS, ExpertActor, make_control_task, run_episode

    spec = TASKS.get(task)
    if spec is None or spec.kind != "control":
        known = sorted(n for n, s in TASKS.items() if s.kind == "control")
        raise ValueError(f"unknown control task {task!r}; known: {', '.join(known)}")
    env = make_control_task(spec)
    try:
        episode = run_episode(env, ExpertActor(), seed)
    finally:
        env.close()
    return episode, env


def tokenize_expert_episode(tok: GatoTokenizer, task: str, seed: int) -> tuple[TokenSequence, float]:
    episode, env = expert_episode(task, seed)
    seq = tok.tokenize_episode(episode.observations, episode.actions, action_kind=env.action_kind,
                               spec={k: v.modality for k, v in env.obs_spec.items()})
    return seq, episode.episode_return


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="babyai/BabyAI-GoToLocal-v0",
                   help="a control task (domain/env-id), e.g. metaworld/reach-v3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1, help="timesteps to print")


def run_tokenize(args: argparse.Namespace) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    tok = GatoTokenizer()
    seq, ret = tokenize_expert_episode(tok, args.task, args.seed)
    steps = int(seq.timestep.max()) + 1
    print(f"{args.task} seed {args.seed}: expert return {ret:.2f}, {steps} timesteps, "
          f"{len(seq)} tokens, {int(seq.loss_mask.sum())} targets")
    print(tok.describe(seq, args.steps))
    return 0


# ---------------------------------------------------------------------------- demo
#: the tasks the demo's agent is scored on: the suite's classic control and the BabyAI levels
#: the default recipe's targets name, plus the held-out BabyAI level (the full suite:
#: ``moe-gato eval --checkpoint runs/demo/tiny-moe --out ...``, about 40 minutes here)
DEMO_EVAL_TASKS = ("classic/CartPole-v1", "classic/Acrobot-v1", "classic/MountainCar-v0",
                   "classic/Pendulum-v1", "classic/MountainCarContinuous-v0",
                   "babyai/BabyAI-GoToRedBall-v0", "babyai/BabyAI-GoToLocal-v0",
                   "babyai/BabyAI-GoToObj-v0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data", help="suite folder (collected if missing)")
    p.add_argument("--out", default="runs/demo", help="where the runs, evaluation and plots go")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per model (default: the train configs' own)")
    p.add_argument("--episodes", type=int, default=20,
                   help="rollouts per evaluated task (default 20)")
    p.add_argument("--twin", action="store_true",
                   help="also train the dense twin (tiny-dense) on the same tokens and plot "
                        "both models' losses")


def run(args: argparse.Namespace) -> int:
    from moe_gato.data.cli import collect_options
    from moe_gato.data.collect import collect
    from moe_gato.eval.evaluate import EvalConfig, evaluate
    from moe_gato.train import load_train_config, train

    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.out)
    names = ("tiny-moe", "tiny-dense") if args.twin else ("tiny-moe",)
    total = 2 + len(names)
    print(f"[1/{total}] data: collecting the default suite into {args.data}/ "
          f"(configs/collect/default.yaml; finished tasks are kept)")
    opts = collect_options(None)
    collect(opts.pop("suite"), args.data, **opts)
    runs = {}
    for i, name in enumerate(names):
        print(f"[{2 + i}/{total}] training {name} (configs/train/{name}.yaml) -> {out / name}")
        overrides = [f"steps={args.steps}", "tokens=null"] if args.steps else []
        cfg = load_train_config(f"configs/train/{name}.yaml", overrides)
        train(cfg, out / name, data_dir=args.data)
        runs[name] = out / name
    print(f"[{total}/{total}] evaluating tiny-moe in the environments: {len(DEMO_EVAL_TASKS)} "
          f"tasks x {args.episodes} rollouts -> {out / 'eval'}")
    evaluate(out / "tiny-moe", data_dir=args.data, out=out / "eval",
             tasks=list(DEMO_EVAL_TASKS), cfg=EvalConfig(episodes=args.episodes))
    if args.twin:
        png, table = compare_runs(runs, out)
        print(table)
        print(f"wrote {png} and {out / 'summary.md'}")
    print(f"wrote {out / 'eval' / 'eval.md'}")
    return 0


def _smooth(y: np.ndarray, window: int = 25) -> np.ndarray:
    if len(y) < window:
        return y
    kernel = np.ones(window) / window
    return np.convolve(np.pad(y, (window - 1, 0), mode="edge"), kernel, mode="valid")


def compare_runs(runs: dict[str, Path], out: Path) -> tuple[Path, str]:
    """One PNG with a panel per modality (smoothed training loss and evaluation loss against
    tokens, every run) and a markdown table of final losses, parameters and throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    from moe_gato.model import build_model, load_config
    from moe_gato.train.metrics import read_metrics

    fig, axes = plt.subplots(1, len(MODALITIES) + 1, figsize=(5 * (len(MODALITIES) + 1), 4))
    rows = []
    for (name, run), colour in zip(runs.items(), ("tab:red", "tab:blue", "tab:green")):
        records = read_metrics(run)
        tokens = np.array([r["tokens"] for r in records])
        for ax, key in zip(axes, ("loss",) + tuple(f"loss/{m}" for m in MODALITIES)):
            sel = [i for i, r in enumerate(records) if key in r]
            if sel:
                ax.plot(tokens[sel], _smooth(np.array([records[i][key] for i in sel])),
                        color=colour, label=f"{name} train")
            ev = [r for r in records if f"eval/{key}" in r]
            if ev:
                ax.plot([r["tokens"] for r in ev], [r[f"eval/{key}"] for r in ev], "o--",
                        color=colour, label=f"{name} eval")
            ax.set_title(key)
            ax.set_xlabel("training tokens")
        cfg = yaml.safe_load((run / "config.yaml").read_text())["model"]
        from moe_gato.config import from_dict
        from moe_gato.model import ModelConfig

        model = build_model(from_dict(ModelConfig, cfg))
        last = records[-20:]
        evals = [r for r in records if "eval/loss" in r]
        row = {"run": name, "params": model.num_params(), "active": model.num_active_params(),
               "tokens": records[-1]["tokens"],
               "tokens_per_s": float(np.median([r["tokens_per_s"] for r in records]))}
        for m in ("loss",) + tuple(f"loss/{m}" for m in MODALITIES):
            vals = [r[m] for r in last if m in r]
            row[m] = float(np.mean(vals)) if vals else float("nan")
        row["eval/loss"] = evals[-1]["eval/loss"] if evals else float("nan")
        rows.append(row)
    axes[0].set_ylabel("next-token loss (nats)")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("MoE-Gato tiny-moe vs its dense twin (equal active parameters, same tokens)")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    png = out / "loss_curves.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    head = ("| run | params | active/token | tokens | tokens/s | train loss | text | "
            "discrete action | continuous action | eval loss |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [
        f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | {r['tokens']:,} | "
        f"{r['tokens_per_s']:.0f} | {r['loss']:.3f} | {r['loss/text']:.3f} | "
        f"{r['loss/discrete_action']:.3f} | {r['loss/continuous_action']:.3f} | {r['eval/loss']:.3f} |"
        for r in rows]
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n\nTrain losses: mean of the last 20 steps.\n")
    return png, table
