"""Training throughput and MFU: tiny dense vs tiny MoE (equal active parameters), and one
process vs two DeepSpeed processes (ZeRO-1 over gloo), on the collected suite.

    python benchmarks/bench_train.py --data data --steps 30     # appends to RESULTS.md

Every configuration runs the real ``moe-gato train`` command on the same cores (two
threads for one process, one thread each for two processes) and reports the median
tokens/s and MFU of its steps after the first five. MFU uses the model's own FLOP count
against the measured fp32 matmul peak of this CPU (``measure_peak_flops``), the same peak
for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import append_results  # noqa: E402


def run(name: str, config: str, data: str, steps: int, procs: int, extra: list[str],
        peak: float) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    threads = str(max(1, (os.cpu_count() or 2) // procs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_DATASETS_OFFLINE": "1"}
    args = ["-m", "moe_gato.cli", "train", "--config", config, "--data", data, "--out", str(out),
            f"steps={steps}", "eval_every=100000", f"checkpoint_every={steps}", "resume=never",
            f"peak_flops={peak}", *extra]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), *args]
    subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][5:]
    return {"name": name, "procs": procs, "threads": int(threads),
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows])),
            # the trainer's MFU is per rank against the peak it is given; every rank here
            # shares one CPU whose whole peak is given, so the machine's MFU is the sum
            "mfu": procs * float(np.median([r["mfu"] for r in rows])),
            "loss": rows[-1]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    import torch

    from moe_gato.model import build_model
    from moe_gato.train import load_train_config
    from moe_gato.train.metrics import measure_peak_flops

    torch.set_num_threads(os.cpu_count() or 2)
    peak = measure_peak_flops(torch.device("cpu"))
    results = [
        run("tiny-dense", "configs/train/tiny-dense.yaml", args.data, args.steps, 1, [], peak),
        run("tiny-moe", "configs/train/tiny-moe.yaml", args.data, args.steps, 1, [], peak),
        run("tiny-moe, DeepSpeed ZeRO-1", "configs/train/tiny-moe.yaml", args.data, args.steps, 2,
            ["deepspeed.enabled=true", "micro_batch_size=4"], peak),
        run("tiny-moe, expert parallel", "configs/train/tiny-moe.yaml", args.data, args.steps, 2,
            ["expert_parallel_size=2", "micro_batch_size=4"], peak),
    ]
    base = results[0]["tokens_per_s"]
    dense_cfg = load_train_config("configs/train/tiny-dense.yaml")
    moe_cfg = load_train_config("configs/train/tiny-moe.yaml")
    active = {"tiny-dense": build_model(dense_cfg.model).num_active_params(),
              "tiny-moe": build_model(moe_cfg.model).num_active_params()}
    lines = [f"Measured fp32 matmul peak of this CPU: {peak / 1e9:.1f} GFLOP/s (MFU denominator). "
             f"Context 256, batch 8 sequences, {args.steps} steps, median after step 5; "
             f"active parameters per token: tiny-dense {active['tiny-dense'] / 1e6:.3f}M, "
             f"tiny-moe {active['tiny-moe'] / 1e6:.3f}M.", "",
             "| run | processes x threads | tokens/s | vs tiny-dense | MFU |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['procs']} x {r['threads']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / base:.2f}x | {r['mfu'] * 100:.1f}% |")
    table = "\n".join(lines)
    print(table)
    append_results("Training throughput and MFU (bench_train.py)", table)


if __name__ == "__main__":
    main()
