"""Loader throughput: packed training sequences per second and tokens per second, on one
core, from a collected suite (default: data/ with configs/data/default.yaml).

    python benchmarks/bench_data.py                     # prints and appends to RESULTS.md
    python benchmarks/bench_data.py --config configs/data/tiny.yaml --sequences 500

Cold: the first pass over a fresh loader (every row tokenized once). Warm: the next pass
with the tokenized rows cached. Counts all positions of each sequence (context_len) and,
separately, the non-padding ones.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run(config: str, sequences: int, data_dir: str | None) -> dict:
    import numpy as np
    import torch

    from moe_gato.data import SequenceLoader, load_mixture
    from moe_gato.tokenizer import Kind

    torch.set_num_threads(1)
    cfg = load_mixture(config)
    loader = SequenceLoader(cfg, seed=0, data_dir=data_dir)
    out = {}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        real = 0
        for _ in range(sequences):
            seq = next(loader)
            real += int(np.count_nonzero(seq.kinds != Kind.PAD))
        dt = time.perf_counter() - start
        out[phase] = {"seq_s": sequences / dt, "tok_s": sequences * cfg.context_len / dt,
                      "real_tok_s": real / dt}
        loader.position = 0  # the same sequences again: now from the cache
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/data/default.yaml")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sequences", type=int, default=1000)
    p.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = p.parse_args()
    res = run(args.config, args.sequences, args.data_dir)
    lines = [f"\n### data loader ({datetime.date.today()}, {platform.node()}, "
             f"{platform.processor() or platform.machine()}, 1 thread)\n",
             f"`python benchmarks/bench_data.py --config {args.config} --sequences {args.sequences}`\n",
             "| pass | sequences/s | tokens/s (context) | tokens/s (non-pad) |", "|---|---:|---:|---:|"]
    for phase, r in res.items():
        lines.append(f"| {phase} | {r['seq_s']:.0f} | {r['tok_s']:,.0f} | {r['real_tok_s']:,.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
