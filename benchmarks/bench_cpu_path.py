"""The 2-core CPU training path of this checkout against an earlier commit, same recipe.

    python benchmarks/bench_cpu_path.py --data data --old f12eb31   # appends to RESULTS.md

The GPU path (issue 20) changed the trainer for every device: zeroed gradients instead of
the multi-rank touch term on one rank, a foreach gradient clip in fp64, kind losses by
scatter, the step split into ``step_async`` / ``read``. This checks that the CPU path did
not get slower for it: the real ``moe-gato train`` command of each checkout (the old one
from a ``git worktree`` of ``--old``), ``--rounds`` interleaved rounds of ``--steps``
steps each, two threads, nothing written but a scratch run folder. Tokens/s is the wall
rate of whole steps (data included): tokens per step over the median interval between
consecutive steps' end times, after the first five.

More entries run this checkout with the output head only at the loss's targets
(``head_logits=targets``, the CPU's ``auto``: the head is most of a small model's step),
with the head fused with the cross-entropy at every position (``head_logits=fused``, the
GPU's ``auto``: no logits tensor, no host read), and with the targets' head and every block
compiled (``compile=blocks``; its compilation falls in the first five steps, which the rate
leaves out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import append_results  # noqa: E402

#: the default recipe without what the old commit may not know (positions came later)
RECIPE = ["model.context_length=576", "batch_size=8", "micro_batch_size=8", "log_every=1",
          "eval_every=100000", "checkpoint_every=100000", "peak_flops=1e11"]
#: this checkout's recipe set back to the old one's (the default now has positions)
NEW_ONLY = ["model.positions=none"]
#: batch x context of RECIPE; the run length is set as tokens, which the recipe's own
#: ``tokens`` budget would otherwise override (``steps`` is used only when tokens is null)
TOKENS_PER_STEP = 8 * 576


def wall_rate(run: Path, tokens_per_step: int) -> float:
    ends = [json.loads(line)["time"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    gaps = np.diff(ends[5:])
    return tokens_per_step / float(np.median(gaps))


def train(code: Path, data: str, steps: int, out: Path, extra: list[str]) -> float:
    config = code / "configs/train/tiny-moe.yaml"
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "2",
           "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "moe_gato.cli", "train", "--config", str(config), "--data",
           data, "--out", str(out), f"tokens={steps * TOKENS_PER_STEP}", *RECIPE, *extra]
    subprocess.run(cmd, env=env, cwd=code, check=True, capture_output=True, text=True)
    return wall_rate(out, TOKENS_PER_STEP)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data", help="collected suite (default: data)")
    p.add_argument("--old", default="f12eb31", help="the commit to compare with (default: "
                   "f12eb31, before the GPU path)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--note", default="", help="what else ran on the machine")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory(prefix="bench_cpu_path_") as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.old],
                       check=True, capture_output=True)
        try:
            entries = {f"{args.old} (before)": (old, []),
                       "this checkout": (REPO, NEW_ONLY + ["head_logits=all"]),
                       "this checkout, head at the targets": (REPO,
                                                              NEW_ONLY + ["head_logits=targets"]),
                       "this checkout, fused head": (REPO, NEW_ONLY + ["head_logits=fused"]),
                       "this checkout, head at the targets, compiled blocks": (
                           REPO, NEW_ONLY + ["head_logits=targets", "compile=blocks"])}
            rates: dict[str, list[float]] = {name: [] for name in entries}
            for r in range(args.rounds):
                for i, (name, (code, extra)) in enumerate(entries.items()):
                    rates[name].append(train(code, data, args.steps,
                                             Path(tmp) / f"run-{r}-{i}", extra))
                    print(f"round {r}: {name} {rates[name][-1]:,.0f} tokens/s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)],
                           check=False, capture_output=True)
    before, full = (statistics.median(v) for v in list(rates.values())[:2])
    lines = [f"tiny-moe, the default recipe without positions (context 576, batch 8), "
             f"`moe-gato train`, two threads, {args.rounds} interleaved rounds of {args.steps} "
             f"steps; wall tokens/s over whole steps after the fifth. {args.note}".strip(), "",
             "| code | tokens/s (median) | spread (min-max) | / before | / full head |",
             "|---|---:|---|---:|---:|"]
    lines += [f"| {name} | {statistics.median(v):,.0f} | {min(v):,.0f}-{max(v):,.0f} | "
              f"{statistics.median(v) / before:.2f}x | {statistics.median(v) / full:.2f}x |"
              for name, v in rates.items()]
    lines += ["", f"this checkout / {args.old}: **{full / before:.2f}x** (target: not slower, "
              f">= 1.05x wanted)."]
    print("\n".join(lines))
    if not args.no_save:
        append_results("The CPU training path against the code before the GPU path "
                       "(bench_cpu_path.py)", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
