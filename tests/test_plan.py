"""`moe-gato plan`: hardware presets, memory and ZeRO arithmetic, all-to-all volume, the
latency-constrained plan across budgets, and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys

import pytest

from scaling import plan as planner
from scaling.hardware import parse_hardware

# Epoch AI's refit of Chinchilla (Besiroglu et al. 2024)
EPOCH = {"A": 482.01, "B": 2085.43, "E": 1.8172, "alpha": 0.3478, "beta": 0.3658}
# Chinchilla's terms plus a benefit of experts on the parameter term (delta < 0)
JOINT = {"a": 482.01, "alpha": 0.3478, "gamma": 0.0, "delta": -0.2, "b": 2085.43,
         "beta": 0.3658, "zeta": 0.0, "omega": 0.0, "c": 1.8172}


@pytest.fixture(scope="module")
def h100_cands():
    return planner.build_candidates(parse_hardware("64xH100"))


def _tiny(experts=4, k=1, G=2):
    from scaling.family import ExpertChoice, FamilyConfig, model_config

    choice = ExpertChoice(experts=experts, k=k, G=G)
    return model_config(FamilyConfig(), d_model=128, experts=choice, context_length=1024)


def _cli(*argv):
    """``moe-gato plan ARGV`` in this process: (exit code)."""
    from moe_gato import cli

    if "plan" in cli.SUBCOMMANDS:
        return cli.main(["plan", *argv])
    p = argparse.ArgumentParser(prog="moe-gato plan")
    planner.add_arguments(p)
    try:
        return planner.run(p.parse_args(list(argv)))
    except ValueError as exc:  # as moe_gato.cli.main reports it
        print(f"moe-gato plan: error: {exc}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------- hardware


def test_hardware_presets():
    hw = parse_hardware("64xH100")
    assert (hw.gpus, hw.gpus_per_node, hw.nodes) == (64, 8, 8)
    assert hw.memory_bytes == 80e9 and hw.peak_flops == 989e12
    assert hw.intra_node_bytes_per_s == 450e9 and hw.inter_node_bytes_per_s == 50e9
    assert hw.latency_device == "cuda-nvidia-h100-80gb-hbm3" and not hw.latency_note
    h200 = parse_hardware(" 8xh200 ")
    assert (h200.name, h200.gpus, h200.memory_bytes) == ("8xH200", 8, 141e9)
    assert h200.latency_device == hw.latency_device and "H200" in h200.latency_note
    assert parse_hardware("4XH100").gpus_per_node == 4
    assert parse_hardware("cpu-2core").latency_device == "cpu-2core"


@pytest.mark.parametrize("spec, words", [("64xA100", "allowed forms"), ("H100", "allowed forms"),
                                         ("", "allowed forms"), ("12xH100", "whole nodes"),
                                         ("0xH100", "GPU count")])
def test_bad_hardware_is_a_clear_error(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_hardware(spec)


# ------------------------------------------------------------------------- memory, layout


def test_memory_bytes_by_hand():
    from moe_gato.model import accounting

    cfg = _tiny()  # 4 layers x 4 groups x 4 experts of 2 x 128 x 256
    dense, expert = planner.split_params(cfg)
    assert expert == 4 * 4 * 4 * 2 * 128 * 256 == 4_194_304
    assert dense + expert == accounting.num_params(cfg)
    hw = parse_hardware("8xH100")
    act = accounting.activation_bytes(cfg, seq_len=1024, batch=2)
    # expert parallel 2: 2_097_152 expert params per GPU, their state over 8 / 2 = 4 ranks
    m1 = planner.memory_per_gpu(cfg, hw, expert_parallel=2, zero_stage=1, micro_batch=2,
                                seq_len=1024)
    assert m1["weights"] == 2 * (dense + 2_097_152)
    assert m1["grads"] == 2 * (dense + 2_097_152)
    assert m1["optimizer"] == 12 * (math.ceil(dense / 8) + 524_288)
    assert m1["activations"] == act and m1["total"] == sum(v for k, v in m1.items() if k != "total")
    m2 = planner.memory_per_gpu(cfg, hw, expert_parallel=2, zero_stage=2, micro_batch=2,
                                seq_len=1024)
    assert m2["grads"] == 2 * (math.ceil(dense / 8) + 524_288)
    m0 = planner.memory_per_gpu(cfg, hw, expert_parallel=1, zero_stage=0, micro_batch=2,
                                seq_len=1024)
    assert m0["total"] == 16 * (dense + expert) + act
    with pytest.raises(ValueError, match="zero_stage"):
        planner.memory_per_gpu(cfg, hw, expert_parallel=1, zero_stage=3, micro_batch=1,
                               seq_len=1024)


def _small_gpus(total_bytes, gpus=8):
    return dataclasses.replace(parse_hardware(f"{gpus}xH100"), memory_bytes=total_bytes)


def test_zero_stage_then_expert_parallelism_when_memory_is_short():
    cfg = _tiny()  # 4 experts per group: expert parallel 1, 2 or 4 on 8 GPUs
    mem = lambda ep, s: planner.memory_per_gpu(cfg, _small_gpus(1), expert_parallel=ep,  # noqa
                                               zero_stage=s, micro_batch=1, seq_len=1024)
    fit = lambda hw, **kw: [(x.expert_parallel, x.zero_stage, x.micro_batch)  # noqa
                            for x in planner.fitting_layouts(cfg, hw, global_batch=8,
                                                             seq_len=1024, headroom=0.0, **kw)]
    # the weights, grads and Adam state of stage 1 exceed the GPU, stage 2's fit: stage 2
    hw = _small_gpus((mem(1, 1)["total"] + mem(1, 2)["total"]) / 2)
    assert mem(2, 1)["total"] < hw.memory_bytes  # (expert parallelism 2 also fits at stage 1)
    assert fit(hw) == [(1, 2, 1), (2, 1, 1), (4, 1, 1)]
    assert fit(hw, zero_stages=(1,)) == [(2, 1, 1), (4, 1, 1)]
    # short of stage 2 without expert parallelism and of stage 1 with 2: experts split
    hw = _small_gpus((mem(1, 2)["total"] + mem(2, 2)["total"]) / 2)
    assert mem(2, 1)["total"] > hw.memory_bytes
    assert fit(hw) == [(2, 2, 1), (4, 1, 1)]
    # of those the faster step: 2 (less all-to-all, and the reduction hides behind backward)
    lay = planner.choose_layout(cfg, hw, global_batch=8, seq_len=1024, headroom=0.0)
    steps = [planner.step_time(cfg, hw, x, global_batch=8, seq_len=1024)["step_s"]
             for x in planner.fitting_layouts(cfg, hw, global_batch=8, seq_len=1024,
                                              headroom=0.0)]
    assert lay.expert_parallel == 2 and steps[0] < steps[1]
    assert mem(1, 2)["total"] > hw.memory_bytes >= lay.memory["total"]
    # the largest micro-batch that fits; headroom counts
    roomy = _small_gpus(80e9)
    lay = planner.choose_layout(cfg, roomy, global_batch=64, seq_len=1024)
    assert (lay.zero_stage, lay.micro_batch, lay.grad_accum) == (1, 8, 1)
    assert lay.limit_bytes == 0.8 * 80e9
    assert planner.choose_layout(cfg, _small_gpus(mem(4, 2)["total"] * 0.99), global_batch=8,
                                 seq_len=1024, headroom=0.0) is None
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        planner.choose_layout(cfg, roomy, global_batch=12, seq_len=1024)


def test_step_time_by_hand():
    from moe_gato.model import accounting

    cfg = _tiny()
    hw = parse_hardware("8xH100")
    lay = planner.fitting_layouts(cfg, hw, global_batch=8, seq_len=1024)[1]  # ep 2, stage 1
    t = planner.step_time(cfg, hw, lay, global_batch=8, seq_len=1024, mfu=0.5)
    fpt = accounting.flops_per_token(cfg, training=True, seq_len=1024)
    assert t["compute_s"] == pytest.approx(1024 * fpt / (989e12 * 0.5))
    dense, expert = planner.split_params(cfg)
    red = 2 * 7 / 8 * 2 * dense + 2 * 3 / 4 * 2 * expert / 2  # rings over 8 and over 4 GPUs
    assert t["gradient_reduction"]["seconds"] == pytest.approx(red / 450e9)
    assert t["reduction_exposed_s"] == pytest.approx(max(0, red / 450e9 - 2 / 3 * t["compute_s"]))
    assert t["step_s"] == pytest.approx(t["compute_s"] + t["all_to_all"]["seconds"]
                                        + t["reduction_exposed_s"])


def test_all_to_all_volume_by_hand():
    cfg = _tiny()  # 4 MoE layers, d 128, k G = 2 copies per token
    hw = parse_hardware("8xH100")
    a = planner.all_to_all(cfg, hw, expert_parallel=2, tokens_per_gpu=1000)
    assert a["bytes"] == 4 * 4 * 1000 * 2 * 128 * 2 * 1 / 2 and a["inter_bytes"] == 0
    assert a["seconds"] == a["bytes"] / 450e9
    assert planner.all_to_all(cfg, hw, expert_parallel=1, tokens_per_gpu=1000)["bytes"] == 0
    wide = _tiny(experts=16, k=1, G=1)  # 16 experts over 2 nodes: 7 peers on NVLink, 8 on IB
    a = planner.all_to_all(wide, parse_hardware("64xH100"), expert_parallel=16,
                           tokens_per_gpu=1000)
    per_peer = 4 * 4 * 1000 * 1 * 128 * 2 / 16
    assert (a["intra_bytes"], a["inter_bytes"]) == (7 * per_peer, 8 * per_peer)
    assert a["seconds"] == max(7 * per_peer / 450e9, 8 * per_peer / 50e9)


# ------------------------------------------------------------------------------ plans


def test_plans_meet_the_rate_and_grow_with_budget(h100_cands):
    from scaling.optimum import best

    budgets = [1e18, 1e19, 1e20, 1e21, 1e22, 1e23]
    for law, coefs in (("chinchilla", EPOCH), ("joint", JOINT)):
        # a fixed 1M-token batch (the rule's is checked below): the arithmetic by hand
        rows = planner.plans(budgets, "64xH100", hz=20, law=law, coefs=coefs, cands=h100_cands,
                             global_batch=1024)
        chosen = [r["chosen"] for r in rows]
        assert all(c is not None and c["hz"] >= 20 for c in chosen)
        dn = [c["D"] * c["N_active"] for c in chosen]
        assert all(b >= a for a, b in zip(dn, dn[1:])), dn
        for r, c in zip(rows, chosen, strict=True):
            assert c["steps"] == math.ceil(c["D"] / (1024 * 1024))
            assert r["time"]["gpu_hours"] == pytest.approx(64 * r["time"]["wall_s"] / 3600)
            assert r["time"]["compute_s_per_step"] == pytest.approx(
                1024 * 1024 / 64 * c["flops_per_token"] / (989e12 * 0.4))
            assert r["layout"]["memory"]["total"] <= 0.8 * 80e9
            # nothing fits better: the plan is the law's constrained optimum
            pool = [x for x in h100_cands if law != "chinchilla" or x.experts.dense]
            assert c["model"] == best(law, coefs, r["budget"], pool, hz=20)["constrained"]["model"]
        if law == "chinchilla":
            assert all(c["experts"] == 1 for c in chosen)


def test_no_candidate_meets_the_rate(h100_cands):
    r = planner.plan(1e21, "64xH100", hz=1e4, cands=h100_cands)
    assert r["chosen"] is None and r["free"] is not None
    assert "no candidate meets 10000 Hz" in r["notes"][0]
    assert "none meets the rate" in planner.markdown([r])


def test_memory_moves_the_plan_to_a_model_that_fits(h100_cands):
    # one GPU, a low rate: the law's favourites (tens of billions of expert parameters) do
    # not fit, the plan takes the best that does
    r = planner.plan(1e22, "1xH100", hz=2, law="joint", coefs=JOINT, cands=h100_cands)
    assert "did not fit in memory" in r["notes"][0]
    assert r["chosen"]["loss"] > r["free"]["loss"]
    assert r["layout"]["memory"]["total"] <= 0.8 * 80e9
    tiny = dataclasses.replace(parse_hardware("1xH100"), memory_bytes=1e6)
    r = planner.plan(1e22, tiny, hz=2, law="joint", coefs=JOINT, cands=h100_cands)
    assert r["chosen"] is None and "tensor or pipeline parallelism" in r["notes"][0]


@pytest.mark.parametrize("kw, words", [
    ({"budget": -1e19}, "budget must be"), ({"budget": math.nan}, "budget must be"),
    ({"hz": 0}, "hz must be"), ({"hardware": "64xTPU"}, "allowed forms"),
    ({"mfu": 1.5}, "mfu"), ({"zero_stages": (3,)}, "ZeRO-3"),
    ({"law": "clark"}, "no data term"), ({"law": "joint"}, "needs a fit.json"),
    ({"fit_doc": {"laws": {"chinchilla": {"skipped": "too few runs"}}}, "law": "chinchilla"},
     "not fitted: too few runs"),
    ({"fit_doc": {"laws": {"chinchilla": EPOCH}}, "law": "joint"}, "no law 'joint'"),
    ({"fit_doc": {"laws": {"joint": {**JOINT, "a": None}}}}, r"\['a'\]")])
def test_bad_input_is_a_clear_error(kw, words):
    args = {"budget": 1e19, "hardware": "64xH100", "hz": 20.0, **kw}
    with pytest.raises(ValueError, match=words):
        planner.plan(args.pop("budget"), args.pop("hardware"), cands=[], **args)


# ------------------------------------------------------------------------------- CLI


@pytest.fixture
def fit_json(tmp_path):
    doc = {"results": "runs/sweep/synthetic/results.csv",
           "laws": {"chinchilla": {**EPOCH, "objective": 1e-3, "n": 18},
                    "joint": {**JOINT, "objective": 1e-3, "n": 18},
                    "krajewski": {"skipped": "the runs have one granularity"},
                    "clark": {"a": -0.1, "b": -0.05, "c": 0.0, "d": 1.0, "E_start": 1.5,
                              "E_max": 100.0, "objective": 1e-4, "n": 18}},
           "held_out": {"chinchilla": {"rmse_log": 0.05}, "joint": {"rmse_log": 0.02},
                        "clark": {"rmse_log": 0.001}}}
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(doc))
    return path


def test_cli_prints_a_table_per_budget(fit_json, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert _cli("--table", "1e19,1e20,1e21", "--hardware", "64xH100", "--hz", "20",
                "--fit", str(fit_json), "--json", str(out)) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| 1e")]
    assert [r.split(" | ")[0] for r in rows] == ["| 1e19", "| 1e20", "| 1e21"]
    assert "Law: joint" in text and "extrapolation" in text  # clark has no data term
    doc = json.loads(out.read_text())
    assert [r["budget"] for r in doc] == [1e19, 1e20, 1e21]
    assert all(r["law"] == "joint" and r["chosen"]["hz"] >= 20 for r in doc)
    assert _cli("--budget", "1e20", "--hardware", "8xH200", "--hz", "20", "--fit", str(fit_json),
                "--law", "chinchilla") == 0
    text = capsys.readouterr().out
    assert "Law: chinchilla" in text and "no measured H200 latency model" in text


@pytest.mark.parametrize("argv, words", [
    (["--budget=-1e19", "--hardware", "64xH100"], "budget must be"),
    (["--budget", "1e19", "--hardware", "64xV100"], "allowed forms"),
    (["--budget", "1e19", "--hardware", "64xH100", "--hz", "0"], "hz must be"),
    (["--budget", "1e19", "--hardware", "64xH100", "--law", "krajewski", "--fit", "FIT"],
     "not fitted: the runs have one granularity"),
    (["--budget", "1e19", "--hardware", "64xH100", "--fit", "nope.json"], "no such file")])
def test_cli_bad_input(argv, words, fit_json, capsys):
    argv = [str(fit_json) if a == "FIT" else a for a in argv]
    assert _cli(*argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_import_is_cheap():
    code = "import sys, scaling.plan; print(sorted({'torch', 'numpy', 'scipy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------- the law, MFU, batch, data (issue 21)
HELD = {"rmse_log": 0.01, "mode": "largest"}


def test_expert_counts_are_ranked_only_by_a_law_with_a_term_for_them(h100_cands):
    """A fit whose usable law has no term for E (Krajewski's, fitted at E = 4) plans among
    the members of that rate only; it used to rank E = 16-32 MoEs by it."""
    krajewski = {"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58,
                 "c": 0.47, "E_scope": 4.0}
    doc = {"laws": {"krajewski": krajewski, "joint": {**JOINT, "flags": {"c": "at a bound"}}},
           "held_out": {"krajewski": HELD, "joint": HELD}}
    rows = planner.plans([1e19, 1e21], "64xH100", hz=20, fit_doc=doc, cands=h100_cands)
    assert {r["chosen"]["E"] for r in rows} == {4.0}
    assert "of E = 4" in rows[0]["candidates"] and rows[0]["law"] == "krajewski"
    doc["laws"]["joint"].pop("flags")  # usable now: the law with a term for E is preferred
    rows = planner.plans([1e21], "64xH100", hz=20, fit_doc=doc, cands=h100_cands)
    assert rows[0]["law"] == "joint"


@pytest.mark.parametrize("doc, words", [
    ({"laws": {"joint": JOINT}, "held_out": {}}, "joint: no held-out error"),
    ({"laws": {"joint": {**JOINT, "flags": {"c": "0 is at or past its lower bound"}}},
      "held_out": {"joint": HELD}}, "joint: flagged: c 0 is at or past")])
def test_a_law_without_held_out_error_or_with_flags_is_never_used(doc, words, h100_cands):
    with pytest.raises(ValueError, match=words):
        planner.plan(1e21, "64xH100", hz=20, fit_doc=doc, cands=h100_cands)
    with pytest.raises(ValueError, match="may not be used"):
        planner.plan(1e21, "64xH100", hz=20, fit_doc=doc, law="joint", cands=h100_cands)


def test_mfu_by_size_from_our_measurements():
    from scaling.mfu import DEFAULT_MFU, mfu_for

    mfu, source = mfu_for("H100", 2.22e6)
    assert mfu == 0.0014 and source.startswith("measured") and "RESULTS.md" in source
    assert mfu_for("H100", 3e6)[0] == 0.0014  # within 2x of the measured size
    mfu, source = mfu_for("H100", 1e9)
    assert mfu == DEFAULT_MFU and source.startswith("assumed")
    assert mfu_for("cpu", 2.0e6)[0] == pytest.approx(0.348)
    assert mfu_for("H200", 2.22e6)[0] == DEFAULT_MFU  # nothing measured on an H200
    # a plan of a tiny model on one H100 times it at the MFU measured at that size
    tiny = [c for c in planner.build_candidates(parse_hardware("1xH100"), widths=[128],
                                                experts=[_choice(1)])]
    r = planner.plan(3e13, "1xH100", hz=1, law="chinchilla", coefs=EPOCH, cands=tiny,
                     global_batch=8)
    c = r["chosen"]
    assert r["mfu"] == 0.0014 and r["mfu_source"].startswith("measured")
    assert r["time"]["compute_s_per_step"] == pytest.approx(
        8 * 1024 * c["flops_per_token"] / (989e12 * 0.0014))


def _choice(experts, k=1, G=1):
    from scaling.family import ExpertChoice

    return ExpertChoice(experts=experts, k=k, G=G)


def test_the_global_batch_follows_the_rule_and_repeated_data_is_noted(h100_cands):
    from scaling.hyper import HyperRule

    budgets = [1e19, 1e21, 1e23]
    rows = planner.plans(budgets, "64xH100", hz=20, cands=h100_cands)
    batches = [r["global_batch"] for r in rows]
    assert batches == [HyperRule().batch_sequences(b, 1024, multiple_of=64) for b in budgets]
    assert batches == sorted(batches) and len(set(batches)) == 3
    assert all(b % 64 == 0 and r["batch_source"] == "rule" for b, r in zip(batches, rows,
                                                                          strict=True))
    for r in rows:
        c = r["chosen"]
        assert c["steps"] == math.ceil(c["D"] / (r["global_batch"] * 1024))
        # D is far past the default suite's 12.6M unique tokens: said, with the epochs
        assert any(f"{c['D'] / 12.6e6:.3g} epochs" in n for n in r["notes"]), r["notes"]
    quiet = planner.plan(1e19, "64xH100", hz=20, cands=h100_cands, data_tokens=None)
    assert not any("epochs" in n for n in quiet["notes"])
    assert "epochs of the" not in planner.markdown([quiet])
    assert "epochs of the" in planner.markdown(rows)


def test_a_law_fitted_on_non_embedding_parameters_predicts_from_them(h100_cands):
    import numpy as np

    from scaling.laws import predict
    from scaling.optimum import predicted_losses

    cands = h100_cands[:6]
    got = predicted_losses("joint", {**JOINT, "n_column": "N_active_nonemb"}, 1e20, cands)
    want = predict("joint", JOINT, N=[c.N_active_nonemb for c in cands],
                   D=[1e20 / c.flops_per_token for c in cands],
                   E=[c.experts.expansion for c in cands])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert all(c.N_active_nonemb < c.N_active for c in cands)
    assert (got > predicted_losses("joint", JOINT, 1e20, cands)).all()


def test_the_optimum_uses_only_an_allowed_law_on_the_models_it_may_rank(h100_cands):
    from scaling.optimum import allowed_law

    doc = {"laws": {"chinchilla": {**EPOCH, "E_scope": 1.0}, "joint": {"skipped": "2 levels"}},
           "held_out": {"chinchilla": HELD}}
    law, why, cands = allowed_law(doc, h100_cands)
    assert law == "chinchilla" and cands and all(c.experts.dense for c in cands)
    assert "only the models of E = 1" in why
    doc["held_out"] = {}
    assert allowed_law(doc, h100_cands)[0] is None
    doc = {"laws": {"joint": JOINT}, "held_out": {"joint": HELD}}
    law, _, cands = allowed_law(doc, h100_cands)
    assert law == "joint" and len(cands) == len(h100_cands)
