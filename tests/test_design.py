"""Sweeps designed to find the optimum (scaling/design.py) and the rule of learning rate,
batch and warm-up (scaling/hyper.py): the CPU design's grid, its centring on a prior law,
the automatic widening, the seed noise, and refusals. Nothing here trains: the design's
runs are planned, and rounds of results are written by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from scaling.design import centre_index, family_sizes, spaced, widen, widening_seconds
from scaling.hyper import HyperRule
from scaling.sweep import load_sweep_config, plan

REPO = Path(__file__).resolve().parents[1]
DESIGN_CPU = REPO / "configs" / "sweep" / "design-cpu.yaml"


def _design(tmp_path, *overrides):
    return load_sweep_config(DESIGN_CPU, [f"out={tmp_path / 'out'}", *overrides])


def test_the_cpu_design_finds_room_for_the_optimum_within_25_minutes(tmp_path):
    from scaling.design import estimate_seconds

    cfg = _design(tmp_path)
    runs, notes = plan(cfg)
    budgets = sorted({r.budget for r in runs})
    assert math.log10(budgets[-1] / budgets[0]) >= 2  # two decades of compute
    dense = [r for r in runs if r.experts.dense and r.seed == 0]
    for b in budgets:  # >= 5 sizes per budget, distinct
        assert len({r.d_model for r in dense if r.budget == b}) >= 5, b
    # E varied at fixed G (>= 3 levels besides dense) and G varied at fixed E (>= 3 levels)
    moe = [r for r in runs if not r.experts.dense]
    assert len({r.experts.expansion for r in moe if r.experts.G == 1}) >= 3
    assert len({r.experts.G for r in moe if r.experts.expansion == 4}) >= 3
    # repeated seeds of one point: the seed noise
    point = [r for r in runs if r.seed]
    assert len(point) >= 1 and len({(r.budget, r.d_model) for r in point}) == 1
    twin = [r for r in dense if (r.budget, r.d_model) == (point[0].budget, point[0].d_model)]
    assert len(twin) == 1 and twin[0].config_hash != point[0].config_hash
    # lr, batch and warm-up follow the rule of size and compute
    rule = cfg.hyper
    for r in runs:
        assert r.train["batch_size"] == rule.batch_sequences(r.budget, 256)
        assert r.train["optim"]["lr"] == pytest.approx(rule.lr(r.budget, r.N_active))
        assert r.train["optim"]["warmup_steps"] == rule.warmup_steps(r.steps)
        assert r.train["batch_size"] % r.train["micro_batch_size"] == 0
    # the whole sweep, widening included at its worst, fits 25 minutes on this CPU
    total = estimate_seconds(runs, cfg) + widening_seconds(cfg)
    assert total < 25 * 60, total / 60
    assert any("centred on the compute-optimal size" in n for n in notes)


def test_widths_are_centred_on_the_prior_laws_optimum(tmp_path):
    """A prior whose optimum lies inside the family: the design's widths straddle it."""
    from moe_gato.config import to_dict
    from moe_gato.train import load_train_config

    cfg = _design(tmp_path, "budgets=[1.0e+13, 1.0e+15]", "design.moe_budgets=[]",
                  "design.max_width=512")
    base = to_dict(load_train_config(cfg.train, cfg.train_overrides).model)
    widths, N, fpt = family_sizes(cfg, base, 256, "N_active_nonemb")
    epoch = {"A": 482.01, "B": 2085.43, "E": 1.8172, "alpha": 0.3478, "beta": 0.3658}
    from scaling.laws import predict

    for budget in cfg.budgets:
        c = centre_index("chinchilla", epoch, budget, N, fpt)
        loss = predict("chinchilla", epoch, N=N, D=budget / fpt)
        assert c == int(np.argmin(loss)) and 0 < c < len(widths) - 1
        chosen = spaced(N, c, 5, 4.0)
        assert len(chosen) == 5 and min(chosen) < c < max(chosen)
        assert N[max(chosen)] / N[min(chosen)] == pytest.approx(16, rel=0.6)
    runs, _ = plan(cfg)
    dense = sorted(r.d_model for r in runs if r.budget == 1e15 and r.seed == 0)
    c = centre_index("chinchilla", epoch, 1e15, N, fpt)
    assert dense[0] < widths[c] < dense[-1]


def _rows(cfg, budget: float, loss_of) -> list[dict]:
    """Finished dense runs of one budget with losses from ``loss_of(d_model)``."""
    runs, _ = plan(cfg)
    return [{**r.row(), "status": "done", "loss": loss_of(r.d_model)}
            for r in runs if r.budget == budget and r.experts.dense and not r.seed]


def test_a_vertex_outside_the_widths_widens_the_grid(tmp_path):
    cfg = _design(tmp_path)
    top = max(cfg.budgets)
    rows = _rows(cfg, top, lambda w: 5.0 - w / 100)  # loss falls with width: vertex above
    widths = sorted({r["d_model"] for r in rows})
    added, said = widen(cfg, rows)
    assert added and f"adding [{widths[-1] + 16}]" in said[0] and "above" in said[0]
    state = json.loads((Path(cfg.out) / "design.json").read_text())
    assert state["rounds"] == 1 and state[f"{top:g}"]["dense"] == [widths[-1] + 16]
    runs, _ = plan(cfg)  # the rerun plans the added width too
    assert widths[-1] + 16 in {r.d_model for r in runs if r.budget == top}
    # a parabola with its vertex inside: nothing to add
    inside = _rows(cfg, top, lambda w: 5.0 + (math.log(w) - math.log(widths[2])) ** 2)
    assert widen(cfg, inside) == (False, [])
    # the rounds are bounded
    widen(cfg, rows)
    assert widen(cfg, rows) == (False, [])
    assert json.loads((Path(cfg.out) / "design.json").read_text())["rounds"] == 2


def test_the_seed_noise_is_the_spread_of_repeated_runs():
    from scaling.identify import seed_noise

    base = {"N_active": 1e6, "D": 1e7, "E": 1.0, "G": 1.0}
    rows = [{**base, "loss": v} for v in (3.0, 3.1, 2.9)] + [{**base, "D": 2e7, "loss": 2.5}]
    logs = np.log([3.0, 3.1, 2.9])
    assert seed_noise(rows) == pytest.approx(np.std(logs, ddof=1))
    assert seed_noise(rows[3:]) is None


def test_the_hyper_rule_by_hand():
    rule = HyperRule()
    assert rule.lr(7.07e13, 2.22e6) == pytest.approx(2e-3)          # the anchor recipe
    assert rule.batch_tokens(7.07e13) == pytest.approx(4608)
    assert rule.lr(7.07e15, 2.22e6) == pytest.approx(2e-3 * 100 ** -0.125)
    assert rule.batch_tokens(7.07e15) == pytest.approx(4608 * 100 ** 0.3271)
    assert rule.batch_sequences(7.07e13, 576) == 8
    assert rule.batch_sequences(1e21, 1024, multiple_of=64) % 64 == 0
    assert rule.warmup_steps(1000) == 50 and rule.warmup_steps(3) == 1
    with pytest.raises(ValueError, match="hyper.warmup_fraction"):
        HyperRule(warmup_fraction=1.5)


@pytest.mark.parametrize("override, words", [
    ("design.sizes=4", "design.sizes must be >= 5"),
    ("budgets=[3.0e+10, 1.4e+11]", "span 0.67 decades"),
    ("hyper=null", "needs the hyper rule"),
    ("design.expansions=[2, 4]", "design.expansions must list >= 3 different values"),
    ("design.seeds=1", "design.seeds must be >= 2"),
    ("design.moe_budgets=[1.0e+9]", r"design.moe_budgets \[1000000000.0\] are not among"),
])
def test_bad_designs_are_clear_errors(tmp_path, override, words):
    with pytest.raises(ValueError, match=words):
        _design(tmp_path, override, *(["design.moe_budgets=[]"] if "budgets=" in override
                                      and "moe" not in override else []))


def test_the_design_config_file_is_documented():
    text = DESIGN_CPU.read_text()
    assert "--plan-only" in text and yaml.safe_load(text)["design"]["sizes"] >= 5
