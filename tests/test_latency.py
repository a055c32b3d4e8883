"""The control-step latency measurement and the latency model: structure, not speed (no
timing assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moe_gato.eval import latency
from moe_gato.eval.latency import (FEATURES, fit_latency_model, measure_control_latency,
                                   predict_hz, step_features)
from moe_gato.model import build_model, load_config

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"


def tiny(name="tiny-moe", *overrides):
    return load_config(PRESETS / f"{name}.yaml", ["context_length=400", *overrides])


@pytest.fixture(scope="module")
def tiny_moe():
    torch.manual_seed(0)
    return build_model(tiny()).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """measure_control_latency(threads=...) sets torch's threads for the process: restore."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", ["metaworld", "babyai"])
def test_measure_returns_sane_structure(tiny_moe, shape):
    r = measure_control_latency(tiny_moe, shape, steps=3, warmup=1, threads=1)
    assert r.shape == shape and r.steps == 3 and len(r.times_ms) == 3
    assert 0 < r.p50_ms <= r.p99_ms and math.isfinite(r.p99_ms)
    assert r.hz_p50 == pytest.approx(1e3 / r.p50_ms) and r.hz_p99 <= r.hz_p50
    # the context was filled before timing: more than one step of it is in the cache
    obs, actions = latency.shape_tokens(shape)
    step = sum(obs.values()) + 1 + actions
    assert step < r.context_tokens <= tiny_moe.cfg.context_length
    assert r.use_cache and r.threads == 1
    d = r.to_dict()
    assert "times_ms" not in d and d["p50_ms"] == r.p50_ms
    json.dumps(r.to_dict(times=True))


def test_measure_accepts_a_policy_and_recompute(tiny_moe):
    policy = latency.make_policy(tiny_moe, use_cache=False)
    r = measure_control_latency(policy, "metaworld", steps=2, warmup=0, threads=1)
    assert not r.use_cache and r.steps == 2 and r.context_tokens > 0


@pytest.mark.parametrize("kw, field", [(dict(shape="atari"), "shape"), (dict(steps=0), "steps"),
                                       (dict(warmup=-1), "warmup"), (dict(threads=0), "threads")])
def test_measure_bad_input_names_the_field(tiny_moe, kw, field):
    with pytest.raises(ValueError, match=field):
        measure_control_latency(tiny_moe, **{"shape": "metaworld", "steps": 1, **kw})
    with pytest.raises(ValueError, match="model_or_policy"):
        measure_control_latency(object(), "metaworld", steps=1)


def test_step_features_count_the_step():
    dense, moe = tiny("tiny-dense"), tiny("tiny-moe")
    f_dense, f_moe = step_features(dense, "metaworld"), step_features(moe, "metaworld")
    assert set(f_dense) == set(FEATURES)
    # Meta-World: the observation chunk, then 3 more forwards for 4 action tokens
    assert f_dense["layer_calls"] == 4 * dense.num_layers and f_dense["moe_layer_calls"] == 0
    assert f_moe["moe_layer_calls"] == 4 * moe.num_layers
    # equal active parameters, but the observation chunk touches more experts than K
    assert f_moe["bytes"] > f_dense["bytes"]
    assert step_features(moe, "babyai")["layer_calls"] == moe.num_layers  # one action token
    assert step_features(moe, "metaworld", context=0)["flops"] < f_moe["flops"]
    with pytest.raises(ValueError, match="shape"):
        step_features(moe, "atari")


def fitted_model(tmp_path) -> Path:
    """A latency model fitted to synthetic points with known coefficients."""
    truth = {"const": 1e-3, "layer_calls": 2e-5, "moe_layer_calls": 1e-5, "bytes": 1e-10,
             "flops": 2e-11}
    points = []
    for name in ("tiny-dense", "tiny-moe", "gato-25m-dense", "gato-25m-moe"):
        for shape in ("metaworld", "babyai"):
            for context in (0, 512, 1024):
                f = step_features(load_config(PRESETS / f"{name}.yaml"), shape, context)
                points.append((f, sum(truth[k] * f[k] for k in FEATURES)))
    coef = fit_latency_model(points)
    for k in FEATURES:
        assert coef[k] == pytest.approx(truth[k], rel=1e-3, abs=1e-12)
    path = tmp_path / "latency_model.json"
    path.write_text(json.dumps({"devices": {"cpu-2core": {"coef": coef}}}))
    return path


def test_fit_recovers_coefficients_and_predicts_monotonically(tmp_path):
    path = fitted_model(tmp_path)
    hz = [predict_hz(tiny("tiny-moe"), path=path, context=c) for c in (0, 256, 1024, 4096)]
    assert all(math.isfinite(h) and h > 0 for h in hz)
    assert hz == sorted(hz, reverse=True)  # more context, slower
    sizes = [predict_hz(load_config(PRESETS / "tiny-moe.yaml", [f"d_model={d}"]), path=path)
             for d in (64, 128, 256, 512)]
    assert sizes == sorted(sizes, reverse=True)  # wider, slower
    f = step_features(tiny("tiny-moe"), "metaworld")
    numbers = {k: v for k, v in f.items() if k != "const"}
    assert predict_hz(numbers, path=path) == pytest.approx(predict_hz(tiny("tiny-moe"), path=path))
    with pytest.raises(ValueError, match="device"):
        predict_hz(tiny(), "tpu", path=path)
    with pytest.raises(ValueError, match="unknown features"):
        predict_hz({"params": 1.0}, path=path)
    with pytest.raises(ValueError, match="bench_latency"):
        predict_hz(tiny(), path=tmp_path / "missing.json")


def test_shipped_latency_model_predicts_finite_monotone():
    if not latency.LATENCY_MODEL.is_file():
        pytest.fail(f"{latency.LATENCY_MODEL} is missing: run benchmarks/bench_latency.py")
    names = ["tiny-dense", "gato-25m-dense", "gato-79m-dense", "gato-364m-dense"]
    hz = [predict_hz(load_config(PRESETS / f"{n}.yaml")) for n in names]
    assert all(math.isfinite(h) and h > 0 for h in hz)
    assert hz == sorted(hz, reverse=True)


def test_cli_subcommand_is_thin(tmp_path, capsys):
    from moe_gato.cli import main

    out = tmp_path / "r.json"
    preset = tmp_path / "tiny.yaml"
    text = (PRESETS / "tiny-dense.yaml").read_text()
    preset.write_text(text.replace("context_length: 1024", "context_length: 128"))
    rc = main(["bench-latency", "--preset", str(preset), "--steps", "2", "--warmup", "0",
               "--threads", "1", "--json", str(out)])
    assert rc == 0
    assert "Hz" in capsys.readouterr().out
    assert json.loads(out.read_text())["steps"] == 2


def test_cli_graphs_and_devices(tmp_path, capsys):
    """``bench-latency --graphs`` times the static step the graphs replay (eagerly on a CPU);
    a CUDA device that is not there is a clear error."""
    from moe_gato.cli import main

    preset = tmp_path / "tiny.yaml"
    text = (PRESETS / "tiny-moe.yaml").read_text()
    preset.write_text(text.replace("context_length: 1024", "context_length: 128"))
    out = tmp_path / "new" / "folder" / "r.json"  # folders made as needed
    rc = main(["bench-latency", "--preset", str(preset), "--steps", "2", "--warmup", "0",
               "--threads", "1", "--graphs", "--json", str(out)])
    assert rc == 0 and "cache on, graphs" in capsys.readouterr().out
    assert json.loads(out.read_text())["steps"] == 2
    if not torch.cuda.is_available():
        assert main(["bench-latency", "--preset", str(preset), "--device", "cuda"]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err
