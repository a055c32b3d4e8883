"""``moe-gato pick``: the model to train for a budget, from a finished sweep's fitted law.

    moe-gato pick --sweep configs/sweep/tiny.yaml --budget 4e13 --out runs/demo/teacher.yaml
    moe-gato pick --sweep configs/sweep/tiny.yaml --budget 4e13 --hz 50 --any --json pick.json
    moe-gato pick ... --student-out runs/demo/student.yaml --student-tokens 1152000

Candidates are the sweep's model family (``scaling.family``: every width that is a multiple
of its head_dim up to 64 heads) with the sweep's expert choices, built on the sweep's
training recipe (``train`` and ``train_overrides``: mixture, optimizer, model options) at
the recipe's context, or ``--context``. For the budget C each trains on D = C / (training
FLOPs per token at that context) tokens; a law of the sweep's ``fit/fit.json`` predicts its
loss, and the pick is the lowest predicted loss among the mixture-of-experts members
(``--any``: dense ones too) whose predicted batch-1 control rate on the sweep's
``fit.device`` meets ``fit.hz`` (or ``--hz``): the latency-constrained optimum
(``scaling.optimum``). The law is the usable one (fitted, with a held-out error, no
coefficient at a bound) with the lowest held-out error among those allowed to compare the
candidates' expert counts (``scaling.identify.choose_law``), or ``--law`` if it is usable;
the pick says which and why (``law_reason``). When no law may be used, the pick is an
error, or with ``--fallback measured`` the sweep's measured rule: the lowest validation
loss among the finished runs of the allowed expert choices that meet the rate, at the
sweep's largest budget, that member trained for the budget.

Writes the pick's training config (the recipe with the chosen shape and ``tokens`` = D
rounded to whole steps) as YAML for ``moe-gato train --config``, and with
``--student-out`` the dense twin at the pick's width (the family's ``experts: 1`` member,
equal active parameters) as the training config a distilled student and its from-scratch
baseline train with (``moe-gato distill --student <its model preset>``, written beside
it as ``<name>.model.yaml``). The law was fitted at the sweep's context; a different
training context moves every candidate's loss, and the pick assumes it moves them alike.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from moe_gato.config import to_dict
from scaling.family import ExpertChoice, model_config


FALLBACKS = ("none", "measured")


def pick(cfg, fit_doc: dict, budget: float, *, hz: float | None = None,
         context: int | None = None, moe_only: bool = True, law: str | None = None,
         fallback: str = "none", rows: list[dict] | None = None) -> dict:
    """{"law", "law_reason", "hz", "device", "context", "budget", "pick": row, "free": row,
    "train": the pick's resolved training config}; a row as ``scaling.optimum.best`` gives
    it. ``law`` None with ``fallback="measured"``: the measured rule decided (see the
    module's docstring) from the sweep's results ``rows`` (default: its results.jsonl)."""
    from moe_gato.train import load_train_config
    from scaling.optimum import best, candidates

    hz = cfg.fit.hz if hz is None else float(hz)
    if not hz > 0:
        raise ValueError(f"hz must be > 0, got {hz}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback: {fallback!r} is not one of {', '.join(FALLBACKS)}")
    choices = [e for e in cfg.experts if not (moe_only and e.dense)]
    if not choices:
        raise ValueError("the sweep has no mixture-of-experts choice to pick from "
                         "(every experts entry is 1); pass --any to pick a dense model")
    base = load_train_config(cfg.train, cfg.train_overrides)
    context = int(context or base.model.context_length)
    head = cfg.family.head_dim
    cands = candidates(cfg.family, to_dict(base.model), widths=range(head, 64 * head + 1, head),
                       experts=choices, context=context, device=cfg.fit.device,
                       shape=cfg.fit.shape)
    if not any(c.hz >= hz for c in cands):
        fastest = max(cands, key=lambda c: c.hz)
        raise ValueError(f"no {'mixture-of-experts ' if moe_only else ''}member of the family "
                         f"meets {hz:g} Hz on {cfg.fit.device} at context {context} (the "
                         f"fastest, {fastest.label}, is predicted at {fastest.hz:.1f} Hz); "
                         f"lower --hz or the context")
    law, reason = law_for(fit_doc, law, {e.expansion for e in choices})
    if law is None:
        if fallback != "measured":
            raise ValueError(f"{reason}; pass --fallback measured to pick the sweep's best "
                             f"measured run instead")
        row, rule = _measured(cfg, cands, budget, hz, rows)
        choice, reason = {"constrained": row, "free": None}, f"{reason}. {rule}"
    else:
        choice = best(law, fit_doc["laws"][law], float(budget), cands, hz=hz)
    row = choice["constrained"]
    if row is None:
        raise ValueError(f"the {law} law gives no finite loss for a member meeting {hz:g} Hz")
    per_step = base.batch_size * context
    steps = max(1, round(row["D"] / per_step))
    train = _recipe_with(base, cfg.family, row["d_model"], _choice(row), context,
                         steps * per_step, cfg.data)
    return {"law": law, "law_reason": reason, "hz": hz, "device": cfg.fit.device,
            "shape": cfg.fit.shape, "context": context, "budget": float(budget), "pick": row,
            "free": choice["free"], "steps": steps, "train": train}


def law_for(fit_doc: dict, law: str | None, E_values) -> tuple[str | None, str]:
    """(law, why) for models of the expansion rates ``E_values``: ``law`` if it may be used
    (else a ValueError saying why not), or the best usable one; (None, why) when none may."""
    from scaling.identify import choose_law, out_of_scope, unusable

    if law is None:
        return choose_law(fit_doc, E_values=E_values)
    laws = fit_doc.get("laws", {})
    fitted = [k for k, v in laws.items() if "skipped" not in v]
    if law not in laws or "skipped" in laws[law]:
        why = laws.get(law, {}).get("skipped", "not in this fit document")
        raise ValueError(f"law {law!r} was not fitted ({why}); fitted: {fitted}")
    why = unusable(fit_doc, law) or out_of_scope(law, laws[law], E_values)
    if why:
        raise ValueError(f"law {law!r} may not be used: {why}")
    return law, f"{law}: asked for (usable: fitted, held-out error, no coefficient at a bound)"


def _measured(cfg, cands, budget: float, hz: float, rows) -> tuple[dict, str]:
    """The measured rule: (the pick's row, how it was chosen)."""
    from scaling.optimum import candidate_row

    if rows is None:
        path = Path(cfg.out) / "results.jsonl"
        if not path.is_file():
            raise ValueError(f"no results at {path}: the measured rule needs the sweep's runs")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    by_label = {c.label: c for c in cands}
    done = [(r, by_label[lab]) for r in rows if r.get("status") == "done"
            and (lab := f"d{r['d_model']}-{_choice(r).tag}") in by_label
            and by_label[lab].hz >= hz]
    if not done:
        raise ValueError(f"the measured rule: no finished run of an allowed expert choice "
                         f"meets {hz:g} Hz")
    top = max(r["budget"] for r, _ in done)
    r, c = min(((r, c) for r, c in done if r["budget"] == top), key=lambda rc: rc[0]["loss"])
    row = {**candidate_row(c, float(budget), None), "measured_loss": r["loss"],
           "measured_at": top}
    rule = (f"The measured rule picked {c.label}: the lowest validation loss "
            f"({r['loss']:.3f}) among the finished runs meeting {hz:g} Hz at the sweep's "
            f"largest budget ({top:.3g} FLOPs), trained for {budget:.3g} FLOPs")
    return row, rule


def student(cfg, picked: dict, tokens: int) -> dict:
    """The dense twin of ``picked`` (same width, ``experts: 1``) as a training config of
    ``tokens`` (rounded to whole steps of the recipe's batch)."""
    from moe_gato.train import load_train_config

    base = load_train_config(cfg.train, cfg.train_overrides)
    per_step = base.batch_size * picked["context"]
    if tokens < per_step:
        raise ValueError(f"student tokens ({tokens}) must be at least one step of "
                         f"{per_step} tokens")
    return _recipe_with(base, cfg.family, picked["pick"]["d_model"], ExpertChoice(),
                        picked["context"], round(tokens / per_step) * per_step, cfg.data)


def _choice(row: dict) -> ExpertChoice:
    return ExpertChoice(experts=row["experts"], k=row["k"], G=row["G"])


def _recipe_with(base, family, d_model: int, experts: ExpertChoice, context: int,
                 tokens: int, data_dir: str) -> dict:
    from moe_gato.config import from_dict
    from moe_gato.train.config import TrainConfig

    train = to_dict(base)
    train["model"] = to_dict(model_config(family, d_model=d_model, experts=experts,
                                          base=to_dict(base.model), context_length=context))
    train["data"]["context_len"] = context
    train["data"]["data_dir"] = str(data_dir)
    train.update(tokens=int(tokens), steps=None)
    from_dict(TrainConfig, train)  # validated now, not when training starts
    return train


def write_train(train: dict, path: str | Path) -> tuple[Path, Path]:
    """The training config at ``path`` and its model alone at ``<stem>.model.yaml`` (the
    preset ``moe-gato distill --student`` takes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = path.with_name(path.stem + ".model.yaml")
    model.write_text(yaml.safe_dump(train["model"], sort_keys=False))
    path.write_text(yaml.safe_dump(train, sort_keys=False))
    return path, model


def markdown(doc: dict) -> str:
    r, f = doc["pick"], doc["free"]
    lines = [f"Budget C = {doc['budget']:.3g} FLOPs; {doc['law']} law; rate >= {doc['hz']:g} Hz "
             f"on {doc['device']} ({doc['shape']} observations, context {doc['context']}).", "",
             "| | model | layers | N active | N total | E | D (tokens) | predicted loss | "
             "predicted Hz |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in (("pick (constrained)", r), ("compute-optimal, any rate", f)):
        if row:
            lines.append(f"| {name} | {row['model']} | {row['num_layers']} | "
                         f"{row['N_active'] / 1e6:.2f}M | {row['N_total'] / 1e6:.2f}M | "
                         f"{row['E']:g} | {row['D']:.3g} | {_loss(row)} | {row['hz']:.1f} |")
    lines += ["", f"Trains {doc['steps']} steps ({doc['train']['tokens']:,} tokens).",
              f"Law: {doc['law_reason']}."]
    return "\n".join(lines)


def _loss(row: dict) -> str:
    if row.get("loss") is not None:
        return f"{row['loss']:.3f}"
    return f"({row['measured_loss']:.3f} measured at {row['measured_at']:.3g} FLOPs)"


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", required=True, help="the sweep config (configs/sweep/tiny.yaml)")
    p.add_argument("--fit", default=None,
                   help="its fit.json (default: <the sweep's out>/fit/fit.json)")
    p.add_argument("--budget", type=float, required=True, help="training compute C in FLOPs")
    p.add_argument("--hz", type=float, default=None,
                   help="control rate to meet (default: the sweep's fit.hz)")
    p.add_argument("--context", type=int, default=None,
                   help="training context (default: the recipe's)")
    p.add_argument("--law", default=None,
                   help="default: the usable law with the lowest held-out error")
    p.add_argument("--fallback", choices=FALLBACKS, default="none",
                   help="when no law may be used: an error (none, the default) or the "
                        "sweep's best measured run (measured)")
    p.add_argument("--any", action="store_true", help="dense members may be picked too")
    p.add_argument("--out", required=True, help="training config YAML to write")
    p.add_argument("--student-out", default=None,
                   help="also write the pick's dense twin as a training config here")
    p.add_argument("--student-tokens", type=int, default=None,
                   help="tokens of the student (default: a quarter of the pick's)")
    p.add_argument("--json", default=None, help="also write the pick to this JSON file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the sweep config (out=runs/demo/sweep)")


def run(args: argparse.Namespace) -> int:
    from scaling.sweep import load_sweep_config

    cfg = load_sweep_config(args.sweep, args.overrides)
    fit_path = Path(args.fit or Path(cfg.out) / "fit" / "fit.json")
    if not fit_path.is_file():
        raise ValueError(f"no fit at {fit_path}: run `moe-gato sweep --config {args.sweep}` "
                         f"(or `moe-gato fit`) first, or pass --fit")
    doc = pick(cfg, json.loads(fit_path.read_text()), args.budget, hz=args.hz,
               context=args.context, moe_only=not args.any, law=args.law,
               fallback=args.fallback)
    path, _ = write_train(doc["train"], args.out)
    print(markdown(doc))
    print(f"wrote {path}")
    if args.student_out:
        tokens = args.student_tokens or doc["train"]["tokens"] // 4
        spath, smodel = write_train(student(cfg, doc, tokens), args.student_out)
        print(f"wrote {spath} (dense twin, {tokens:,} tokens) and {smodel}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0
