"""Tokenizer throughput on real expert episodes, one core.

    python benchmarks/bench_tokenizer.py            # appends to benchmarks/RESULTS.md

Episodes: a Meta-World reach-v3 episode (39 continuous observations, 4 continuous actions
per step) and a BabyAI GoTo episode (148 discrete values + mission text + 1 action).
The peer is a straightforward per-value Python tokenizer (the same rules, one value at a
time), so the ratio shows what vectorising buys. Target: >= 1M tokens/s for values.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import append_results, machine  # noqa: E402
from moe_gato.demo import expert_episode  # noqa: E402
from moe_gato.tokenizer import GatoTokenizer  # noqa: E402


def per_value_peer(tok: GatoTokenizer, flat_obs: dict, actions: np.ndarray, discrete: bool) -> list[int]:
    """The same rules, value by value in Python (what a first version looks like)."""
    L = tok.layout
    denom = math.log(256 * 100 + 1)
    out = []
    T = len(actions)
    for t in range(T):
        for key in sorted(flat_obs):
            v = flat_obs[key][t]
            if isinstance(v, str):
                out += [int(i) for i in tok.text.encode(v)]
                continue
            for x in np.asarray(v).reshape(-1).tolist():
                if isinstance(x, float):
                    y = max(-1.0, min(1.0, math.copysign(math.log1p(abs(x) * 100) / denom, x)))
                    out.append(L.continuous_start + min(1023, int((y + 1) * 512)))
                else:
                    out.append(L.discrete_start + int(x))
        out.append(L.separator_id)
        for x in np.atleast_1d(actions[t]).tolist():
            if discrete:
                out.append(L.discrete_start + int(x))
            else:
                y = max(-1.0, min(1.0, math.copysign(math.log1p(abs(x) * 100) / denom, x)))
                out.append(L.continuous_start + min(1023, int((y + 1) * 512)))
    return out


def timed(fn, min_seconds: float = 1.0) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    tok = GatoTokenizer()
    mw, _ = expert_episode("metaworld/reach-v3", seed=0)
    mw_obs, mw_act = mw.observations, mw.actions
    for seed in range(100):  # a typical-length GoTo episode (>= 20 steps), not a 3-step one
        ba, env = expert_episode("babyai/BabyAI-GoTo-v0", seed=seed)
        if len(ba) >= 20:
            break
    ba_obs = {k: v for k, v in ba.observations.items() if env.obs_spec[k].modality != "image"}
    ba_act = ba.actions
    rows = []
    for name, obs, act, kind in (("Meta-World reach-v3", mw_obs, mw_act, "continuous"),
                                 ("BabyAI GoTo", ba_obs, ba_act, "discrete")):
        seq = tok.tokenize_episode(obs, act, action_kind=kind)
        peer = per_value_peer(tok, obs, act, kind == "discrete")
        assert peer == seq.tokens.tolist(), "peer disagrees with the tokenizer"
        ours = timed(lambda: tok.tokenize_episode(obs, act, action_kind=kind))
        theirs = timed(lambda: per_value_peer(tok, obs, act, kind == "discrete"), 0.5)
        rows.append((name, len(act), len(seq), len(seq) / ours, len(seq) / theirs, theirs / ours))
    lines = ["| episode | timesteps | tokens | tokens/s (ours) | tokens/s (per-value peer) | ratio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {t} | {k} | {a / 1e6:.2f}M | {b / 1e6:.3f}M | {r:.0f}x |"
              for n, t, k, a, b, r in rows]
    table = "\n".join(lines)
    print(table)
    append_results("Tokenizer throughput (one core, real expert episodes; target >= 1M tokens/s)",
                   table)


if __name__ == "__main__":
    main()
