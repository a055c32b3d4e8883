"""Control-step latency: how fast a model acts in a robot loop, and a latency model of it.

    moe-gato bench-latency --preset configs/model/tiny-moe.yaml --shape metaworld --steps 200
    moe-gato bench-latency --checkpoint runs/demo/teacher --shape babyai --recompute
    python benchmarks/bench_latency.py      # every preset, interleaved; RESULTS.md + the model

    result = measure_control_latency(model_or_policy, shape="metaworld", steps=200)
    result.p50_ms, result.p99_ms, result.hz_p50
    predict_hz(cfg, device="cpu-2core", shape="metaworld")

One control step is ``Policy.act`` for one environment (batch 1): tokenize the step's
fields, feed them with the previous step's last action token and '|' into the KV cache,
decode the action tokens greedily. Before timing, steps run until the cache holds a full
context (``context_length`` tokens, rolling: the policy evicts the oldest whole timesteps),
then ``warmup`` more. Observations are random values of the shape's fields (seeded).

Shapes (``SHAPES``): ``metaworld`` = 39 continuous values in, 4 continuous actions out;
``babyai`` = direction (discrete int), 7x7x3 uint8 grid (discrete), the mission text and a
56x56x3 uint8 image (16 patches), 1 discrete action of 7.

Latency model. Seconds per step = a + b * layer_calls + c * moe_layer_calls + d * bytes +
e * flops, non-negative coefficients fitted to measured steps (``fit_latency_model``), with
per-step features from the config (``step_features``): a step is one forward pass over the
observation chunk then one per further action token; ``bytes`` = fp32 weights each forward
streams (attention, dense FFNs, the routed experts its tokens touch in expectation under
uniform routing, routers, shared experts, the head rows of the action ids) plus the KV cache
it reads; ``flops`` = 2 x active matmul weights per token + attention 4 x context x D per
layer and token. The coefficients live in ``benchmarks/latency_model.json`` per device.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moe_gato.envs.episode import FieldSpec, TaskInfo
from moe_gato.tokenizer.layout import Kind

LATENCY_MODEL = Path(__file__).resolve().parents[2] / "benchmarks" / "latency_model.json"
FEATURES = ("const", "layer_calls", "moe_layer_calls", "bytes", "flops")
MISSION = "go to the red ball"

SHAPES: dict[str, TaskInfo] = {
    "metaworld": TaskInfo(
        name="latency/metaworld",
        obs_spec={"state": FieldSpec(modality="continuous", dtype="float32", shape=(39,))},
        action_kind="continuous", action_dim=4, action_low=(-1.0,) * 4, action_high=(1.0,) * 4),
    "babyai": TaskInfo(
        name="latency/babyai",
        obs_spec={"direction": FieldSpec(modality="discrete", dtype="int64", shape=()),
                  "grid": FieldSpec(modality="discrete", dtype="uint8", shape=(7, 7, 3)),
                  "mission": FieldSpec(modality="text", dtype="str"),
                  "rgb": FieldSpec(modality="image", dtype="uint8", shape=(56, 56, 3))},
        action_kind="discrete", action_dim=7),
}


def _check_shape(shape: str) -> TaskInfo:
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    return SHAPES[shape]


def observation(shape: str, rng: np.random.Generator) -> dict[str, Any]:
    """One step's stored fields of ``shape``, random."""
    _check_shape(shape)
    if shape == "metaworld":
        return {"state": rng.uniform(-1, 1, 39).astype(np.float32)}
    return {"direction": np.int64(rng.integers(4)),
            "grid": rng.integers(0, 11, (7, 7, 3)).astype(np.uint8),
            "mission": MISSION, "rgb": rng.integers(0, 256, (56, 56, 3)).astype(np.uint8)}


# ------------------------------------------------------------------------- measuring

def make_policy(model, *, use_cache: bool = True, device: str = "cpu", graphs: bool = False):
    """A greedy ``Policy`` for ``model`` on ``device`` (bf16 autocast on CUDA; ``graphs``:
    CUDA-graphed steps, ``Policy``'s option). A model whose text vocabulary is larger than
    the shipped SentencePiece model's (Gato's 32000) gets that tokenizer with the model's
    layout: its text ids are not the model's pieces, which does not change the cost."""
    from moe_gato.inference import Policy
    from moe_gato.tokenizer import GatoTokenizer

    tok = GatoTokenizer()
    layout = model.cfg.layout
    if tok.layout != layout:
        if layout.text_vocab_size < tok.layout.text_vocab_size:
            raise ValueError(f"text_vocab_size {layout.text_vocab_size} is smaller than the "
                             f"shipped text model's {tok.layout.text_vocab_size}")
        tok.layout = layout
    return Policy(model, device=device, temperature=0.0, use_cache=use_cache, tokenizer=tok,
                  graphs=graphs)


class ControlLoop:
    """One environment of ``shape`` driven by ``policy`` on random fields: ``fill()`` runs
    steps until the context is full (the policy starts evicting), ``step()`` times one."""

    def __init__(self, policy, shape: str, *, seed: int = 0):
        self.policy, self.shape = policy, shape
        self.rng = np.random.default_rng(seed)
        policy.reset(_check_shape(shape), seed=seed)
        self.steps = 0

    def context_tokens(self) -> int:
        """Positions the next step attends to besides its own (cache or recompute window)."""
        p = self.policy
        if p.use_cache:
            return p.cache.live()
        return sum(len(s) for s in p.history[0])

    def step(self) -> float:
        """Seconds of one ``policy.act`` (the observation is made before the clock starts)."""
        obs = observation(self.shape, self.rng)
        t0 = time.perf_counter()
        self.policy.act(obs)
        dt = time.perf_counter() - t0
        self.steps += 1
        return dt

    def fill(self, warmup: int = 5, max_steps: int = 10_000) -> None:
        """Steps until one of them evicts (the context is full), then ``warmup`` more."""
        before = -1
        for _ in range(max_steps):
            self.step()
            now = self.context_tokens()
            if now <= before:
                break
            before = now
        for _ in range(warmup):
            self.step()

    def time(self, n: int) -> list[float]:
        """``n`` step latencies in seconds (garbage collection held off while timing)."""
        gc.collect()
        gc.disable()
        try:
            return [self.step() for _ in range(n)]
        finally:
            gc.enable()


@dataclasses.dataclass(kw_only=True)
class LatencyResult:
    shape: str
    steps: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    hz_p50: float                 # control rate at the median step
    hz_p99: float                 # control rate at the 99th-percentile step
    context_tokens: float         # mean positions attended to besides the step's own
    threads: int
    use_cache: bool
    omp_wait_policy: str
    times_ms: list[float] = dataclasses.field(repr=False, default_factory=list)

    def to_dict(self, *, times: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not times:
            d.pop("times_ms")
        return d


def summarize(times_s: list[float], **kw) -> LatencyResult:
    """p50 / p99 / mean of step times (seconds) as a ``LatencyResult``."""
    if not times_s:
        raise ValueError("steps must be >= 1")
    ms = np.asarray(times_s) * 1e3
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    import torch
    kw.setdefault("threads", torch.get_num_threads())
    kw.setdefault("omp_wait_policy", os.environ.get("OMP_WAIT_POLICY", "unset"))
    return LatencyResult(steps=len(ms), p50_ms=p50, p99_ms=p99, mean_ms=float(ms.mean()),
                         hz_p50=1e3 / p50, hz_p99=1e3 / p99, times_ms=ms.tolist(), **kw)


def measure_control_latency(model_or_policy, shape: str = "metaworld", steps: int = 200, *,
                            warmup: int = 5, threads: int | None = None, seed: int = 0,
                            use_cache: bool = True, device: str = "cpu",
                            graphs: bool = False) -> LatencyResult:
    """Batch-1 control-step latency of a ``GatoModel`` (wrapped in a greedy ``Policy`` on
    ``device``, CUDA-graphed with ``graphs``) or of a ``Policy``, with the context already
    full: p50 / p99 over ``steps`` steps. ``threads`` sets torch's intra-op threads
    (default: leave as is). ``use_cache=False`` times the recompute policy (the whole window
    per token) when given a model."""
    import torch

    _check_shape(shape)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    policy = model_or_policy
    if isinstance(model_or_policy, torch.nn.Module):
        policy = make_policy(model_or_policy, use_cache=use_cache, device=device,
                             graphs=graphs)
    elif not hasattr(policy, "act") or not hasattr(policy, "reset"):
        raise ValueError(f"model_or_policy must be a GatoModel or a Policy, "
                         f"got {type(policy).__name__}")
    loop = ControlLoop(policy, shape, seed=seed)
    loop.fill(warmup)
    times, context = [], []
    gc.collect()
    gc.disable()
    try:
        for _ in range(steps):
            context.append(loop.context_tokens())
            times.append(loop.step())
    finally:
        gc.enable()
    return summarize(times, shape=shape, context_tokens=float(np.mean(context)),
                     use_cache=policy.use_cache)


# ------------------------------------------------------------------ latency model

def shape_tokens(shape: str) -> tuple[dict[Kind, int], int]:
    """({kind: positions} of one step's observation chunk, action tokens) of ``shape``."""
    info = _check_shape(shape)
    if shape == "metaworld":
        return {Kind.CONTINUOUS_OBS: 39}, info.action_dim
    from moe_gato.tokenizer.text import TextTokenizer
    mission = len(TextTokenizer().encode(MISSION))
    return {Kind.DISCRETE_OBS: 1 + 7 * 7 * 3, Kind.TEXT: mission, Kind.IMAGE: 16}, 1


def step_features(cfg, shape: str = "metaworld", context: int | None = None) -> dict[str, float]:
    """Per-step features of the latency model for ``cfg`` (a ``ModelConfig``) at ``context``
    positions attended to (default: its context_length): see the module docstring."""
    from moe_gato.model.accounting import patch_flops

    obs, A = shape_tokens(shape)
    S = cfg.context_length if context is None else context
    if S < 0:
        raise ValueError(f"context must be >= 0, got {S}")
    D, L = cfg.d_model, cfg.num_layers
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(L))
    action = Kind.CONTINUOUS_ACTION if _check_shape(shape).action_kind == "continuous" \
        else Kind.DISCRETE_ACTION
    head_rows = cfg.num_bins if action == Kind.CONTINUOUS_ACTION else SHAPES[shape].action_dim
    # the observation chunk (led by the previous action token, closed by '|'), then A - 1
    # forwards of one action token each
    prefill = dict(obs)
    prefill[action] = prefill.get(action, 0) + 1
    prefill[Kind.SEPARATOR] = 1
    forwards = [prefill] + [{action: 1}] * (A - 1)
    dense_w = L * 4 * D * D + (L - moe_layers) * 2 * D * cfg.ffn_hidden
    out = dict.fromkeys(FEATURES, 0.0)
    out["const"] = 1.0
    for kinds in forwards:
        n = sum(kinds.values())
        weights = dense_w + head_rows * D
        flops = 2 * n * dense_w + 2 * head_rows * D + n * L * 4 * S * D
        flops += kinds.get(Kind.IMAGE, 0) * patch_flops(cfg)
        if moe_layers:
            groups: dict[str, int] = {}
            for kind, k in kinds.items():
                groups[cfg.moe.group_of(kind)] = groups.get(cfg.moe.group_of(kind), 0) + k
            Fe, K = cfg.expert_hidden, cfg.moe.experts_per_token
            for g, n_g in groups.items():
                E = cfg.moe.num_experts_of(g)
                touched = E * (1 - (1 - K / E) ** n_g)  # expected, uniform routing
                A = cfg.moe.added_experts  # routed on top of the K: counted as taken
                shared = 2 * D * Fe * (cfg.moe.shared_expert + A)
                weights += moe_layers * (touched * 2 * D * Fe + shared + (E + A) * D)
                flops += moe_layers * 2 * n_g * (K * 2 * D * Fe + shared + (E + A) * D)
        out["layer_calls"] += L
        out["moe_layer_calls"] += moe_layers
        out["bytes"] += 4 * (weights + 2 * L * (S + n) * D)  # fp32 weights + KV read
        out["flops"] += flops
    return out


def fit_latency_model(points: list[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """Non-negative least squares of seconds per step on the features: ``points`` are
    (features, seconds) pairs; returns {feature: coefficient}."""
    from scipy.optimize import nnls

    if len(points) < 2:
        raise ValueError(f"points: need at least 2 measured steps to fit, got {len(points)}")
    X = np.array([[p[f] for f in FEATURES] for p, _ in points], dtype=np.float64)
    y = np.array([s for _, s in points], dtype=np.float64)
    scale = X.max(0)
    scale[scale == 0] = 1.0
    # relative error: weight each point by 1 / its time, so fast and slow presets count alike
    w = 1.0 / y
    coef, _ = nnls(X / scale * w[:, None], y * w)
    return {f: float(c / s) for f, c, s in zip(FEATURES, coef, scale, strict=True)}


def predict_seconds(features: Mapping[str, float], coef: Mapping[str, float]) -> float:
    return sum(float(coef[f]) * float(features.get(f, 0.0)) for f in FEATURES)


def load_latency_model(device: str = "cpu-2core", path: str | Path | None = None) -> dict:
    path = Path(path) if path is not None else LATENCY_MODEL
    if not path.is_file():
        raise ValueError(f"no latency model at {path}; run benchmarks/bench_latency.py")
    models = json.loads(path.read_text())["devices"]
    if device not in models:
        raise ValueError(f"device must be one of {sorted(models)} (fitted in {path}), "
                         f"got {device!r}")
    return models[device]


def predict_hz(cfg_or_numbers, device: str = "cpu-2core", *, shape: str = "metaworld",
               context: int | None = None, path: str | Path | None = None) -> float:
    """Predicted control rate (Hz) of a ``ModelConfig`` (features from ``step_features`` at
    ``shape`` and ``context``) or of a mapping of the features, on ``device``."""
    from moe_gato.model.config import ModelConfig

    model = load_latency_model(device, path)
    if isinstance(cfg_or_numbers, ModelConfig):
        features = step_features(cfg_or_numbers, shape, context)
    elif isinstance(cfg_or_numbers, Mapping):
        unknown = sorted(set(cfg_or_numbers) - set(FEATURES))
        if unknown:
            raise ValueError(f"cfg_or_numbers: unknown features {unknown}; known: "
                             f"{list(FEATURES)}")
        features = {"const": 1.0, **cfg_or_numbers}
    else:
        raise ValueError(f"cfg_or_numbers must be a ModelConfig or a mapping of "
                         f"{list(FEATURES)}, got {type(cfg_or_numbers).__name__}")
    seconds = predict_seconds(features, model["coef"])
    return math.inf if seconds <= 0 else 1.0 / seconds


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="model preset YAML (random weights: latency only)")
    what.add_argument("--checkpoint", help="checkpoint folder or training run directory")
    p.add_argument("--shape", choices=sorted(SHAPES), default="metaworld")
    p.add_argument("--steps", type=int, default=200, help="timed steps (default 200)")
    p.add_argument("--warmup", type=int, default=5, help="steps after the context is full")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--recompute", action="store_true",
                   help="time the policy without a KV cache (the whole window per token)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the policy runs (cuda: bf16 autocast)")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA-graphed steps (Policy(graphs=True); on a CPU the static step "
                        "the graphs replay, eagerly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result to this JSON file")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (use --device cpu)")

    if args.preset:
        from moe_gato.model import build_model, load_config
        torch.manual_seed(args.seed)
        target = build_model(load_config(args.preset)).eval()
    else:
        from moe_gato.inference import Policy
        target = Policy.from_checkpoint(args.checkpoint, device=args.device,
                                        use_cache=not args.recompute, graphs=args.graphs)
    result = measure_control_latency(target, args.shape, args.steps, warmup=args.warmup,
                                     threads=args.threads, seed=args.seed,
                                     use_cache=not args.recompute, device=args.device,
                                     graphs=args.graphs)
    print(f"{args.preset or args.checkpoint} {args.shape}: p50 {result.p50_ms:.2f} ms "
          f"({result.hz_p50:.1f} Hz), p99 {result.p99_ms:.2f} ms ({result.hz_p99:.1f} Hz), "
          f"{result.steps} steps, context {result.context_tokens:.0f} tokens, "
          f"{result.threads} threads, cache {'on' if result.use_cache else 'off'}"
          f"{', graphs' if args.graphs else ''}, "
          f"OMP_WAIT_POLICY={result.omp_wait_policy}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(times=True), indent=1))
    return 0


__all__ = ["SHAPES", "ControlLoop", "LatencyResult", "measure_control_latency", "make_policy",
           "step_features", "fit_latency_model", "predict_hz", "load_latency_model",
           "add_arguments", "run"]
