"""The main job's report: ``report.md`` with its tables and PNG plots, from a pipeline's
run folder. The pipeline (``moe_gato.pipeline``, which calls it, and ``moe-gato report``)
passes what the report cannot know: the models it trained, each stage's command and the
sweep's config; the report imports nothing from the pipeline.

    write_report("runs/demo", "reports/2026-11-26", models=("teacher", "student", "scratch"),
                 commands={"collect": ["moe-gato collect ..."], ...}, sweep=sweep_config)

Reads ``<run>/pipeline.yaml`` and ``stages.json``, the sweep's results and fit
(``sweep/results.jsonl``, ``sweep/fit/``), the pick (``pick.json``), the three training runs
(``teacher``, ``student``, ``scratch``: ``metrics.jsonl``, ``config.yaml``), their
evaluations (``eval/<model>/eval.json``) and control-loop timings (``latency/<model>.json``).
Writes ``report.md``, ``summary.json`` (every number of the tables) and the figures:
``summary.png`` (the main figure), ``isoflop_law.png``, ``law_fit.png``,
``latency_frontier.png``, ``loss_curves.png``, ``expert_load.png``, ``scores.png`` and
``latency.png``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import yaml

from moe_gato.config import write_json
from moe_gato.report import figures
from moe_gato.report.numbers import (domain_scores, expert_load, family_latency,
                                     final_losses, mean_score, model_numbers, retained)
from moe_gato.train.metrics import read_metrics

#: the three models of the main job, in the report's order: the MoE teacher, its distilled
#: dense student and the student's shape trained from scratch
MODELS = ("teacher", "student", "scratch")
LABELS = {"teacher": "MoE teacher", "student": "distilled dense student",
          "scratch": "dense, from scratch"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} is missing: run the stage that writes it first "
                         f"(moe-gato demo --stage ...)")
    return json.loads(path.read_text())


def check_run(run: Path) -> None:
    if not (run / "pipeline.yaml").is_file():
        raise ValueError(f"{run} is not a pipeline run folder (no pipeline.yaml); pass the "
                         f"--out of `moe-gato demo`")


def gather(run: Path, histories: dict[str, list[dict]], sweep) -> dict:
    """Every number the report shows, from the pipeline's run folder, the three runs'
    metrics records (``histories``) and the sweep's config (``scaling.sweep.SweepConfig``)."""
    from scaling.identify import choose_law

    run = Path(run)
    check_run(run)
    cfg = yaml.safe_load((run / "pipeline.yaml").read_text())
    fit = _read_json(run / "sweep" / "fit" / "fit.json")
    rows = [json.loads(line) for line in
            (run / "sweep" / "results.jsonl").read_text().splitlines() if line]
    # the law drawn through every family's runs may compare their expert counts
    rates = {r["E"] for r in rows if r["status"] == "done"}
    doc = {"config": cfg, "stages": _read_json(run / "stages.json"), "sweep": rows,
           "fit": fit, "law": choose_law(fit, E_values=rates)[0],
           "pick": _read_json(run / "pick.json"), "models": {}}
    doc["pick"].pop("train", None)
    doc["family_latency"] = family_latency(sweep, doc["pick"])
    for name in MODELS:
        evals = _read_json(run / "eval" / name / "eval.json")
        m = model_numbers(run / name, histories[name])
        m.update(final_losses(run / name, histories[name]), scores=mean_score(evals["tasks"]),
                 domains=domain_scores(evals["tasks"]),
                 tasks={t: {k: r[k] for k in ("domain", "held_out", "episodes", "normalized_score",
                                              "normalized_ci95", "success_rate", "return_mean")}
                        for t, r in evals["tasks"].items()})
        lat = run / "latency" / f"{name}.json"
        if lat.is_file():
            m["latency"] = {k: v for k, v in json.loads(lat.read_text()).items()
                            if k != "times_ms"}
        doc["models"][name] = m
    if doc["models"]["teacher"]["ffn"] == "moe":
        doc["expert_load"] = expert_load(run / "teacher", histories["teacher"])
    t, s, c = (doc["models"][k] for k in MODELS)
    doc["retained"] = {"val_loss": retained(c["val_loss"], s["val_loss"], t["val_loss"],
                                            lower_is_better=True),
                       "score": retained(c["scores"]["mean"], s["scores"]["mean"],
                                         t["scores"]["mean"], lower_is_better=False)}
    lo, hi = sorted((t["val_loss"], c["val_loss"]))
    doc["student_between"] = bool(lo <= s["val_loss"] <= hi)
    return doc


def write_report(run: str | Path, out: str | Path, *, commands: dict[str, list[str]],
                 sweep) -> Path:
    """Writes ``out/report.md`` with its figures and ``summary.json``; returns the path.
    ``commands``: each stage's command line(s) that rerun it alone, in the pipeline's order;
    ``sweep``: the sweep's config."""
    from scaling.fit import finite_json

    run, out = Path(run), Path(out)
    check_run(run)
    histories = {m: read_metrics(run / m) for m in MODELS}
    doc = gather(run, histories, sweep)
    doc["commands"] = commands
    out.mkdir(parents=True, exist_ok=True)
    fit_dir = run / "sweep" / "fit"
    for png in ("law_fit.png", "latency_frontier.png"):
        if (fit_dir / png).is_file():
            shutil.copyfile(fit_dir / png, out / png)
    figures.isoflop_law(doc, out / "isoflop_law.png")
    figures.loss_curves(histories, LABELS, out / "loss_curves.png")
    if "expert_load" in doc:
        figures.expert_load(doc["expert_load"], out / "expert_load.png")
    figures.scores(doc, LABELS, out / "scores.png")
    figures.latency(doc, out / "latency.png")
    figures.summary(doc, histories, LABELS, out / "summary.png")
    write_json(out / "summary.json", finite_json(doc))
    (out / "report.md").write_text(markdown(doc, run) + "\n")
    print(f"wrote {out / 'report.md'} with summary.json and the figures")
    return out / "report.md"


# ---------------------------------------------------------------------------- markdown
def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _f(v, fmt: str = ".3f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{fmt}}"


def _pct(v) -> str:
    return "undefined" if v is None else f"{100 * v:.0f}%"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"


def main_table(doc: dict) -> str:
    lines = ["| model | shape | active / total params | tokens | validation loss | "
             "mean normalized score (95% CI) | >= 50% / >= 80% of expert | control step p50 |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for name in MODELS:
        m = doc["models"][name]
        lat = m.get("latency")
        lat_s = f"{lat['p50_ms']:.1f} ms ({lat['hz_p50']:.0f} Hz)" if lat else "(student's shape)"
        sc = m["scores"]
        lines.append(f"| {LABELS[name]} | {m['shape']} | {m['N_active'] / 1e6:.2f}M / "
                     f"{m['N_total'] / 1e6:.2f}M | {m['tokens']:,} | {_f(m['val_loss'])} | "
                     f"{_f(sc['mean'], '.2f')} ± {_f(sc['ci95'], '.2f')} | "
                     f"{sc['at_50']} / {sc['at_80']} of {sc['tasks']} | {lat_s} |")
    return "\n".join(lines)


def distillation_table(doc: dict) -> str:
    t, s, c = (doc["models"][k] for k in MODELS)
    r = doc["retained"]
    lines = ["| | teacher | student | scratch | teacher's gain retained (scratch - student) / "
             "(scratch - teacher) |", "|---|---:|---:|---:|---:|",
             f"| validation loss | {_f(t['val_loss'])} | {_f(s['val_loss'])} | "
             f"{_f(c['val_loss'])} | {_pct(r['val_loss'])} |",
             f"| mean normalized score | {_f(t['scores']['mean'], '.2f')} | "
             f"{_f(s['scores']['mean'], '.2f')} | {_f(c['scores']['mean'], '.2f')} | "
             f"{_pct(r['score'])} |"]
    if t.get("latency") and s.get("latency"):
        tl, sl = t["latency"], s["latency"]
        lines.append(f"| control step p50 / p99 (ms) | {tl['p50_ms']:.1f} / {tl['p99_ms']:.1f} | "
                     f"{sl['p50_ms']:.1f} / {sl['p99_ms']:.1f} | | student {tl['p50_ms'] / sl['p50_ms']:.2f}x "
                     f"faster at the median |")
    return "\n".join(lines)


def markdown(doc: dict, run: Path) -> str:
    cfg, pick = doc["config"], doc["pick"]
    t, s, c = (doc["models"][k] for k in MODELS)
    between = ("lies between" if doc["student_between"] else "does **not** lie between")
    stages = doc["stages"]
    total = sum(v.get("wall_s", 0) for v in stages.values())
    out = [f"# MoE-Gato main job: {cfg['name']} ({date.today().isoformat()})", "",
           f"Run folder `{run}`; machine: {machine()}. Every stage below reruns alone with the "
           f"command in its row; `moe-gato demo` reruns skip finished stages.", "",
           "## Summary", "", main_table(doc), "",
           f"The distilled student's validation loss ({_f(s['val_loss'])}) {between} the "
           f"scratch model's ({_f(c['val_loss'])}) and the teacher's ({_f(t['val_loss'])}). "
           f"Retained share of the teacher's gain over the scratch model: "
           f"{_pct(doc['retained']['val_loss'])} of the validation loss, "
           f"{_pct(doc['retained']['score'])} of the mean normalized score "
           f"(undefined where the teacher does not beat the scratch model).", "",
           "![main figure](summary.png)", "",
           "## Stages", "", "| stage | wall time | status | alone |", "|---|---:|---|---|"]
    for name, cmds in doc["commands"].items():
        v = stages.get(name, {"status": "this report" if name == "report" else "not run"})
        wall = v.get("wall_s", v.get("spent_s"))
        cmds = "<br>".join(f"`{c}`" for c in cmds)
        out.append(f"| {name} | {'—' if wall is None else _dur(wall)} | {v['status']} | "
                   f"{cmds} |")
    out += [f"| **all** | **{_dur(total)}** | | |", "",
            "## 1. IsoFLOP sweep and the fitted laws", "",
            _sweep_table(doc), "", _law_table(doc), "",
            "![IsoFLOP curves and the fitted law](isoflop_law.png)", "",
            "![predicted against measured loss](law_fit.png)", "",
            "## 2. The teacher: the best MoE that meets the control rate", "",
            f"Budget C = {pick['budget']:.3g} FLOPs, "
            f"{'the ' + pick['law'] + ' law' if pick['law'] else 'no law (the measured rule)'}, "
            f">= {pick['hz']:g} Hz batch 1 on `{pick['device']}` ({pick['shape']} observations) "
            f"at context {pick['context']} (the law was fitted at the sweep's context).", "",
            f"Which law picked the teacher, and why it was allowed to: "
            f"{pick.get('law_reason', 'not recorded')}.", "",
            _pick_table(pick), "",
            "![frontier: loss and control rate of the optimum per budget](latency_frontier.png)",
            "", "## 3. Training", "", _loss_table(doc), "",
            "![loss curves](loss_curves.png)", ""]
    if "expert_load" in doc:
        out += ["Expert load of the teacher (share of a group's routed tokens per expert x "
                "experts, 1 = balanced; mean over the last fifth of training):", "",
                "![expert load per modality group over layers](expert_load.png)", "",
                _load_table(doc["expert_load"]), ""]
    out += ["## 4. Distillation", "",
            f"Student: the teacher's dense twin ({s['shape']}), {s['tokens']:,} tokens, "
            f"init `{cfg['student']['init']}`, alpha {cfg['student']['alpha']}, T "
            f"{cfg['student']['temperature']}; the scratch model has its shape and tokens.", "",
            distillation_table(doc), "",
            "## 5. Scores in the environments", "",
            f"{cfg['eval']['episodes']} rollouts per task, greedy; expert-normalized "
            f"(0 = random, 1 = expert); intervals are 95% (per domain: from the tasks' "
            f"intervals); means over the training tasks, held-out tasks apart.", "", _domain_table(doc), "", _task_table(doc), "",
            "![scores per domain](scores.png)", "",
            "## 6. Control latency", "",
            "Measured batch-1 control steps (KV cache on, context full) against the latency "
            "model's prediction for the sweep's family (`benchmarks/latency_model.json`, "
            "fitted on earlier measurements on this machine; the pick trusts it):", "",
            _latency_table(doc), "",
            "![latency against active parameters](latency.png)", ""]
    return "\n".join(out)


def _latency_table(doc: dict) -> str:
    hz = doc["pick"]["hz"]
    predicted = {r["model"]: r["hz"] for r in doc["family_latency"]}
    lines = [f"| model | predicted rate | measured p50 | measured p99 | >= {hz:g} Hz as measured "
             f"(p50) |", "|---|---:|---:|---:|---|"]
    for name in ("teacher", "student"):
        m = doc["models"][name]
        lat = m.get("latency")
        if not lat:
            continue
        label = f"d{m['d_model']}-" + (m["expert_tag"] if m["ffn"] == "moe" else "dense")
        pred = predicted.get(label)
        lines.append(f"| {LABELS[name]} ({label}) | {_f(pred, '.0f')} Hz | "
                     f"{lat['p50_ms']:.1f} ms ({lat['hz_p50']:.0f} Hz) | {lat['p99_ms']:.1f} ms "
                     f"({lat['hz_p99']:.0f} Hz) | {'yes' if lat['hz_p50'] >= hz else 'no'} |")
    return "\n".join(lines)


def _sweep_table(doc: dict) -> str:
    lines = ["| run | N active | E | D (tokens) | C (FLOPs) | validation loss | status |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(doc["sweep"], key=lambda r: (r["budget"], r["E"], r["N_active"])):
        lines.append(f"| {r['name']} | {r['N_active'] / 1e6:.2f}M | {r['E']:g} | {r['D']:,} | "
                     f"{r['C']:.2e} | {_f(r.get('loss'))} | {r['status']} |")
    return "\n".join(lines)


def _law_table(doc: dict) -> str:
    from scaling.identify import unusable

    fit = doc["fit"]
    lines = ["| law | fitted | held-out mean abs. relative error | usable | picked the teacher |",
             "|---|---|---:|---|---|"]
    for law, c in fit["laws"].items():
        held = fit.get("held_out", {}).get(law, {})
        err = f"{100 * held['mean_abs_rel']:.2f}%" if "mean_abs_rel" in held else \
            held.get("error", "—")
        why = unusable(fit, law)
        lines.append(f"| {law} | {'no: ' + c['skipped'] if 'skipped' in c else 'yes'} | "
                     f"{err} | {'yes' if why is None else 'no: ' + why} | "
                     f"{'yes' if law == doc['pick']['law'] else ''} |")
    return "\n".join(lines)


def _predicted(row: dict) -> str:
    if row.get("loss") is not None:
        return f"{row['loss']:.3f}"
    return f"— ({row['measured_loss']:.3f} measured at {row['measured_at']:.3g} FLOPs)"


def _pick_table(pick: dict) -> str:
    lines = ["| | model | layers | N active | N total | D (tokens) | predicted loss | "
             "predicted rate |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, row in (("picked (>= rate, MoE)", pick["pick"]), ("compute-optimal, any rate",
                                                                  pick["free"])):
        if row:
            lines.append(f"| {label} | {row['model']} | {row['num_layers']} | "
                         f"{row['N_active'] / 1e6:.2f}M | {row['N_total'] / 1e6:.2f}M | "
                         f"{row['D']:.3g} | {_predicted(row)} | {row['hz']:.0f} Hz |")
    return "\n".join(lines)


def _loss_table(doc: dict) -> str:
    kinds = ("text", "discrete_action", "continuous_action")
    lines = ["| model | tokens | wall | validation loss | " + " | ".join(kinds) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(kinds)]
    for name in MODELS:
        m = doc["models"][name]
        lines.append(f"| {LABELS[name]} | {m['tokens']:,} | {_dur(m['wall_s'])} | "
                     f"{_f(m['val_loss'])} | "
                     + " | ".join(_f(m["val_kinds"].get(k)) for k in kinds) + " |")
    return "\n".join(lines)


def _load_table(load: dict) -> str:
    lines = ["| group | max load (layer) | min load (layer) |", "|---|---:|---:|"]
    for group, mat in load["groups"].items():
        a = np.asarray(mat)
        hi, lo = np.unravel_index(a.argmax(), a.shape), np.unravel_index(a.argmin(), a.shape)
        lines.append(f"| {group} | {a.max():.2f} ({hi[0]}) | {a.min():.2f} ({lo[0]}) |")
    return "\n".join(lines)


def _domain_table(doc: dict) -> str:
    domains = sorted({d for m in doc["models"].values() for d in m["domains"]})
    lines = ["| model | " + " | ".join(domains) + " | all |",
             "|---|" + "---:|" * (len(domains) + 1)]
    for name in MODELS:
        m = doc["models"][name]
        cells = [f"{m['domains'][d]['mean']:.2f} ± {m['domains'][d]['ci95']:.2f}"
                 if d in m["domains"] else "—" for d in domains]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) +
                     f" | {m['scores']['mean']:.2f} ± {m['scores']['ci95']:.2f} |")
    return "\n".join(lines)


def _task_table(doc: dict) -> str:
    tasks = sorted(doc["models"]["teacher"]["tasks"])
    lines = ["| task | " + " | ".join(LABELS[m] for m in MODELS) + " |",
             "|---|" + "---:|" * len(MODELS)]
    for task in tasks:
        cells = []
        for name in MODELS:
            r = doc["models"][name]["tasks"].get(task)
            cells.append("—" if r is None else
                         f"{r['normalized_score']:.2f} ± {r['normalized_ci95']:.2f}")
        held = doc["models"]["teacher"]["tasks"][task].get("held_out")
        lines.append(f"| {task}{' (held out)' if held else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
