"""Batch-1 control-step latency of the presets (p50 / p99, Hz), MoE vs its dense twin, KV
cache vs recompute; fits the latency model (benchmarks/latency_model.json).

    .venv/bin/python benchmarks/bench_latency.py                    # the full run, ~15 min
    .venv/bin/python benchmarks/bench_latency.py --quick --no-save  # tiny presets, smoke test
    .venv/bin/python benchmarks/bench_latency.py --presets tiny-dense tiny-moe --steps 400
    .venv/bin/python benchmarks/bench_latency.py --layer   # one MoE layer: fast path vs not
    python benchmarks/bench_latency.py --device cuda        # on a GPU (bf16 autocast)
    python benchmarks/bench_latency.py --device cuda --graphs --presets gato-1.18b-moe

One step = ``Policy.act`` on one environment (``moe_gato.eval.latency``): the cache holds a
full context (1024 tokens, rolling) of earlier steps; greedy decoding; random weights (the
cost does not depend on them). Shapes: Meta-World (39 continuous values in, 4 continuous
actions out) and BabyAI (direction, 7x7x3 grid, mission text, 56x56x3 image; 1 action).

Timing: every preset's control loop is filled first, then ``--rounds`` rounds each time
``steps / rounds`` steps of every preset, in a rotated order, so that load from other
processes hits all presets alike. Reported per preset: p50 and p99 over all its steps, as ms
and Hz, and the spread of the per-round p50s; MoE / dense ratios are the median over
rounds of the paired per-round p50 ratio, with [min-max]. The cache / recompute speed-up
uses the recompute policy (the whole window per decoded token, no cache) at a full context.
``--graphs`` adds each preset's CUDA-graphed policy (``Policy(graphs=True)``, entries
``<preset>+graphs``, interleaved with the rest; on a CPU the static-shape step it replays,
eagerly): its MoE / dense ratio and its speed-up over the eager step. The latency model is
then fitted to every (preset, shape) p50 and written per device
(``cpu-2core`` here; ``cuda-<card>``, e.g. ``cuda-nvidia-h100-80gb-hbm3``, with ``--device
cuda``, where the step ends when its action is back on the host).

OpenMP: torch's libgomp spins its threads at every parallel region; with 2 threads on 2
cores that other processes also load, a region often waits for a descheduled thread
(measured: a tiny-dense step took 376-564 ms instead of 17 ms). ``OMP_WAIT_POLICY=PASSIVE``
(set below before torch loads, unless already set) makes waiting threads sleep instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp (docstring)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: (MoE preset, its dense twin); the 79m pair is measured with fewer steps by default
PAIRS = [("tiny-moe", "tiny-dense"), ("gato-25m-moe", "gato-25m-dense"),
         ("gato-79m-moe", "gato-79m-dense")]
RECOMPUTE = ["tiny-dense", "tiny-moe", "gato-25m-dense", "gato-25m-moe"]
DEVICE = "cpu-2core"  # the latency model's key; main() renames it for --device cuda
TORCH_DEVICE = "cpu"


def device_key(name: str) -> str:
    """``cuda-<card name>`` in lower case, runs of other characters as '-'."""
    import re

    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


GRAPHS = "+graphs"  # suffix of a preset's graphed entry


def base(name: str) -> str:
    """The preset of an entry (``tiny-moe+graphs`` -> ``tiny-moe``)."""
    return name.removesuffix(GRAPHS)


def build(preset: str):
    import torch

    from moe_gato.model import build_model, load_config

    torch.manual_seed(0)
    with torch.device(TORCH_DEVICE):  # on the card directly: a 1.18B MoE is 29 GB in fp32
        model = build_model(load_config(ROOT / "configs" / "model" / f"{preset}.yaml"))
    return model.eval()


def time_interleaved(loops: dict, steps: int, rounds: int) -> dict[str, list[list[float]]]:
    """{preset: [per-round step seconds]} with the presets rotated every round."""
    names = list(loops)
    per = max(1, steps // rounds)
    out = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n].append(loops[n].time(per))
    return out


def ratio_stats(moe_rounds, dense_rounds) -> tuple[float, float, float]:
    ratios = [statistics.median(m) / statistics.median(d)
              for m, d in zip(moe_rounds, dense_rounds, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def measure_shape(shape: str, presets: list[str], models: dict, steps: int, rounds: int,
                  warmup: int) -> tuple[dict, dict]:
    from moe_gato.eval.latency import ControlLoop, make_policy, summarize

    loops = {}
    for p in presets:
        policy = make_policy(models[base(p)], device=TORCH_DEVICE, graphs=p.endswith(GRAPHS))
        loops[p] = ControlLoop(policy, shape, seed=0)
        loops[p].fill(warmup)
    context = {p: loops[p].context_tokens() for p in presets}
    rounds_s = time_interleaved(loops, steps, rounds)
    results = {p: summarize([t for r in rounds_s[p] for t in r], shape=shape,
                            context_tokens=float(context[p]), use_cache=True)
               for p in presets}
    return results, rounds_s


def measure_recompute(presets: list[str], models: dict, steps: int, warmup: int) -> dict:
    """{preset: (recompute LatencyResult, cache LatencyResult)} on the Meta-World shape,
    interleaved the same way (one round per step)."""
    from moe_gato.eval.latency import ControlLoop, make_policy, summarize

    loops = {}
    for p in presets:
        for mode in (True, False):
            loop = ControlLoop(make_policy(models[p], use_cache=mode, device=TORCH_DEVICE),
                               "metaworld", seed=1)
            loop.fill(warmup)
            loops[(p, mode)] = loop
    times = {k: [] for k in loops}
    for _ in range(steps):
        for k, loop in loops.items():
            times[k] += loop.time(1)
    return {p: tuple(summarize(times[(p, mode)], shape="metaworld",
                               context_tokens=float(loops[(p, mode)].context_tokens()),
                               use_cache=mode) for mode in (False, True))
            for p in presets}


def fit_and_save(models: dict, results: dict, path: Path, machine: str, load: str) -> dict:
    """Fits the latency model to every measured (preset, shape) p50; writes it for DEVICE."""
    import torch

    from moe_gato.eval.latency import FEATURES, fit_latency_model, predict_seconds, step_features

    points, rows = [], []
    for shape, per in results.items():
        for p, r in per.items():
            if p.endswith(GRAPHS):  # the model is of the eager step
                continue
            f = step_features(models[p].cfg, shape, context=int(round(r.context_tokens)))
            points.append((f, r.p50_ms / 1e3))
            rows.append((p, shape, f))
    coef = fit_latency_model(points)
    fitted = []
    for (p, shape, f), (_, s) in zip(rows, points, strict=True):
        pred = predict_seconds(f, coef)
        fitted.append({"preset": p, "shape": shape, "features": f, "measured_s": s,
                       "predicted_s": pred, "error": pred / s - 1})
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("doc", "Seconds per batch-1 control step = sum(coef[f] * features[f]); "
                    "features from moe_gato.eval.latency.step_features; "
                    "predict with moe_gato.eval.latency.predict_hz.")
    data.setdefault("devices", {})
    data["devices"][DEVICE] = {
        "coef": coef, "features": list(FEATURES),
        "measured": datetime.date.today().isoformat(), "machine": machine,
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load": load, "points": fitted}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data["devices"][DEVICE]


def rate(coef: float, what: str, unit: str) -> str:
    """``what / <rate> unit`` for a seconds-per-unit coefficient; a 0 fit says so."""
    if coef <= 0:
        return f"0 x {what} (fitted to 0)"
    return f"{what} / {1 / coef / 1e9:.2f} {unit}"


def report(results, rounds_s, pairs, recompute, model_fit, params, args, load, minutes) -> str:
    precision = "bf16 autocast on CUDA" if TORCH_DEVICE == "cuda" else "fp32"
    lines = [f"{DEVICE}: {precision}, batch 1, greedy; torch threads {args.threads}; "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {args.rounds} interleaved "
             f"rounds; {args.steps} timed steps per preset and shape "
             f"({args.steps_79m} for the 79m pair) after filling the context; "
             f"1-min load average {load}; run took {minutes:.1f} min.", ""]
    lines += ["| preset | params | active (non-emb) | shape | context | p50 ms | p99 ms | "
              "Hz p50 | Hz p99 | round p50s ms [min-max] |", "|---" * 10 + "|"]
    for shape, per in results.items():
        for p, r in per.items():
            rp = [statistics.median(x) * 1e3 for x in rounds_s[shape][p]]
            n, a, ane = params[base(p)]
            lines.append(f"| {p} | {n / 1e6:.1f}M | {a / 1e6:.1f}M ({ane / 1e6:.1f}M) | {shape} "
                         f"| {r.context_tokens:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
                         f"{r.hz_p50:.1f} | {r.hz_p99:.1f} | {min(rp):.1f}-{max(rp):.1f} |")
    lines += ["", "| MoE / dense | shape | latency ratio (median of rounds) [min-max] | "
              "target <= 1.15x |", "|---|---|---|---|"]
    for moe, dense in pairs:
        for shape in results:
            if moe in results[shape] and dense in results[shape]:
                med, lo, hi = ratio_stats(rounds_s[shape][moe], rounds_s[shape][dense])
                lines.append(f"| {moe} / {dense} | {shape} | {med:.2f}x [{lo:.2f}-{hi:.2f}] | "
                             f"{'met' if med <= 1.15 else 'not met'} |")
    graphed = [(p, base(p)) for per in results.values() for p in per
               if p.endswith(GRAPHS) and base(p) in per]
    if graphed:
        if TORCH_DEVICE == "cpu":
            lines += ["", "On the CPU a `+graphs` entry is the static-shape step the graphs "
                      "replay, run eagerly (there are no graphs on a CPU)."]
        lines += ["", "| graphed / eager step | shape | latency ratio (median of rounds) "
                  "[min-max] |", "|---|---|---|"]
        for shape in results:
            for g, e in dict.fromkeys(graphed):
                if g in results[shape] and e in results[shape]:
                    med, lo, hi = ratio_stats(rounds_s[shape][g], rounds_s[shape][e])
                    lines.append(f"| {g} / {e} | {shape} | {med:.2f}x [{lo:.2f}-{hi:.2f}] |")
    if recompute:
        lines += ["", f"KV cache vs recompute (Meta-World shape, full context, "
                  f"{args.recompute_steps} interleaved steps each; recompute = the policy "
                  f"without a cache, one forward over the whole window per action token):", "",
                  "| preset | recompute p50 ms | cache p50 ms | speed-up |", "|---|---|---|---|"]
        for p, (rec, cache) in recompute.items():
            lines.append(f"| {p} | {rec.p50_ms:.1f} | {cache.p50_ms:.1f} | "
                         f"{rec.p50_ms / cache.p50_ms:.1f}x |")
    if model_fit:
        c = model_fit["coef"]
        errs = [abs(pt["error"]) for pt in model_fit["points"]]
        lines += ["", f"Latency model ({DEVICE}, benchmarks/latency_model.json): seconds per "
                  f"step = {c['const'] * 1e3:.2f} ms + {c['layer_calls'] * 1e6:.1f} us x "
                  f"layer_calls + {c['moe_layer_calls'] * 1e6:.1f} us x moe_layer_calls + "
                  f"{rate(c['bytes'], 'bytes', 'GB/s')} + {rate(c['flops'], 'flops', 'GFLOP/s')} "
                  f"(non-negative least squares on relative error over "
                  f"{len(errs)} points; |error| median {statistics.median(errs):.0%}, "
                  f"max {max(errs):.0%}). A coefficient fitted to 0 means that term "
                  f"was not separable from the others on these points."]
    return "\n".join(lines)


def bench_layer(args) -> str:
    """One MoE layer without gradients at the 25m and 79m presets' shapes, T tokens of the
    observation group (a '|' among them when T > 1): the fast path, the per-group path (what
    inference ran before), the dense twin's FFN, and for T = 1 the gather-then-bmm variant
    (the chosen experts' weights copied into one (K, D, F) buffer). Copies of each layer are
    cycled so that the weights come from memory, as in a model's forward pass."""
    import torch
    import torch.nn.functional as F

    from moe_gato.model import load_config
    from moe_gato.model import moe as moe_module
    from moe_gato.model.moe import FeedForward, ModalityRoutedMoE, init_moe_
    from moe_gato.tokenizer.layout import Kind

    def gather_bmm(m, x_1D, kinds_1):
        g = m.groups[m.moe.group_of(Kind(int(kinds_1[0])))]
        probs_1E = (x_1D @ g.router_ED.t()).softmax(-1)
        gates_1K, ids_1K = probs_1E.topk(m.moe.experts_per_token, dim=-1)
        gates_1K = gates_1K / gates_1K.sum(-1, keepdim=True)
        h_K1F = F.gelu(torch.bmm(x_1D.expand(ids_1K.shape[1], 1, -1),
                                 g.w1_EDF.index_select(0, ids_1K[0])))
        y_K1D = torch.bmm(h_K1F, g.w2_EFD.index_select(0, ids_1K[0]))
        return torch.mm(gates_1K, y_K1D[:, 0])

    lines = [f"One layer, no gradients, fp32; torch threads {args.threads}; median of "
             f"{args.layer_rounds} interleaved rounds, each over {args.layer_copies} copies of "
             f"the layer (weights from memory). T tokens of the observation group (the last "
             f"one '|', of the action group, when T > 1). us per layer call.", "",
             "| preset shape | T | dense FFN | MoE per-group path | MoE fast path | "
             "fast / per-group | fast / dense | gather+bmm (T=1) |", "|---" * 8 + "|"]
    few_tokens = moe_module.FEW_TOKENS
    for preset in ("gato-25m-moe", "gato-79m-moe"):
        cfg = load_config(ROOT / "configs" / "model" / f"{preset}.yaml")
        torch.manual_seed(0)
        moes = [ModalityRoutedMoE(cfg) for _ in range(args.layer_copies)]
        for m in moes:
            init_moe_(m, 0.02, 0.02)
        denses = [FeedForward(cfg.d_model, cfg.ffn_hidden) for _ in range(args.layer_copies)]
        for T in (1, 4, 41, 256, 1024):
            x_TD = torch.randn(T, cfg.d_model)
            kinds_T = torch.full((T,), int(Kind.CONTINUOUS_OBS))
            if T > 1:
                kinds_T[-1] = int(Kind.SEPARATOR)

            def moe_at(limit):
                def run(i):
                    moe_module.FEW_TOKENS = limit
                    moes[i](x_TD, kinds_T)
                return run

            fns = {"dense": lambda i: denses[i](x_TD), "per_group": moe_at(-1),
                   "fast": moe_at(10**9)}
            if T == 1:
                fns["gather"] = lambda i: gather_bmm(moes[i], x_TD, kinds_T)
            times = {k: [] for k in fns}
            with torch.no_grad():
                for r in range(args.layer_rounds + 1):
                    for k, f in fns.items():
                        t0 = time.perf_counter()
                        for i in range(args.layer_copies):
                            f(i)
                        if r:  # round 0 warms up
                            times[k].append((time.perf_counter() - t0) / args.layer_copies)
            us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            gather = f"{us['gather']:.0f}" if "gather" in us else ""
            lines.append(f"| {preset} | {T} | {us['dense']:.0f} | {us['per_group']:.0f} | "
                         f"{us['fast']:.0f} | {us['fast'] / us['per_group']:.2f} | "
                         f"{us['fast'] / us['dense']:.2f} | {gather} |")
            print(lines[-1], flush=True)
    moe_module.FEW_TOKENS = few_tokens
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny presets, few steps")
    parser.add_argument("--presets", nargs="+", help="only these presets (default: all pairs)")
    parser.add_argument("--shapes", nargs="+", default=["metaworld", "babyai"])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per preset, shape")
    parser.add_argument("--steps-79m", type=int, default=200, help="... for the 79m pair")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the policies run (cuda: the latency model is saved as "
                             "cuda-<card name>)")
    parser.add_argument("--recompute-steps", type=int, default=10,
                        help="steps per preset for cache vs recompute (0: skip)")
    parser.add_argument("--graphs", action="store_true",
                        help="also each preset's CUDA-graphed policy (<preset>+graphs)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--dump", help="also write every step time to this JSON file")
    parser.add_argument("--layer", action="store_true",
                        help="only the one-layer comparison (fast path, per-group, dense)")
    parser.add_argument("--layer-rounds", type=int, default=9)
    parser.add_argument("--layer-copies", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    from common import append_results, machine

    torch.set_num_threads(args.threads)
    global DEVICE, TORCH_DEVICE
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible")
        DEVICE, TORCH_DEVICE = device_key(torch.cuda.get_device_name(0)), "cuda"
    if args.layer:
        body = bench_layer(args)
        print(body)
        if not args.no_save:
            append_results("MoE inference fast path, one layer (bench_latency.py --layer)", body)
        return
    pairs = [pr for pr in PAIRS if not args.quick or pr[0].startswith("tiny")]
    presets = [p for pr in pairs for p in pr]
    if args.presets:
        presets = args.presets
        pairs = [pr for pr in pairs if pr[0] in presets and pr[1] in presets]
    if args.quick:
        args.steps, args.steps_79m, args.rounds, args.recompute_steps = 20, 20, 4, 2
    t0 = time.time()
    load0 = os.getloadavg()[0]
    models = {p: build(p) for p in presets}
    if args.graphs:
        pairs += [(m + GRAPHS, d + GRAPHS) for m, d in pairs]
        presets = presets + [p + GRAPHS for p in presets]
    params = {p: (m.num_params(), m.num_active_params(), m.num_active_params(non_embedding=True))
              for p, m in models.items()}
    results, rounds_s = {}, {}
    for shape in args.shapes:
        results[shape], rounds_s[shape] = {}, {}
        small = [p for p in presets if "79m" not in p]
        big = [p for p in presets if "79m" in p]
        for group, steps in ((small, args.steps), (big, args.steps_79m)):
            if group:
                r, rs = measure_shape(shape, group, models, steps, args.rounds, args.warmup)
                results[shape].update(r)
                rounds_s[shape].update(rs)
                for p in group:
                    print(f"{shape} {p}: p50 {r[p].p50_ms:.1f} ms ({r[p].hz_p50:.1f} Hz), "
                          f"p99 {r[p].p99_ms:.1f} ms", flush=True)
    recompute = {}
    if args.recompute_steps:
        chosen = [p for p in RECOMPUTE if p in models]
        recompute = measure_recompute(chosen, models, args.recompute_steps, args.warmup)
        for p, (rec, cache) in recompute.items():
            print(f"recompute {p}: {rec.p50_ms:.1f} ms vs cache {cache.p50_ms:.1f} ms", flush=True)
    load = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
    if args.dump:
        Path(args.dump).write_text(json.dumps({
            "results": {s: {p: r.to_dict(times=True) for p, r in per.items()}
                        for s, per in results.items()},
            "rounds_s": rounds_s, "params": params,
            "recompute": {p: [r.to_dict(times=True) for r in pair]
                          for p, pair in recompute.items()}}))
    fit = None
    if not args.no_save and len(models) > 2:
        fit = fit_and_save(models, results, ROOT / "benchmarks" / "latency_model.json",
                           machine(), load)
    body = report(results, rounds_s, pairs, recompute, fit, params, args, load,
                  (time.time() - t0) / 60)
    print(body)
    if not args.no_save:
        append_results("Control-step latency, batch 1 (bench_latency.py)", body)


if __name__ == "__main__":
    main()
