"""``moe-gato plan``: a training run past this machine, from a scaling law and a cost model.

    moe-gato plan --budget 1e21 --hardware 64xH100 --hz 20
    moe-gato plan --table 1e19,1e20,1e21,1e22,1e23 --hardware 64xH100 --hz 20
    moe-gato plan --budget 1e21 --hardware 8xH200 --fit runs/sweep/tiny/fit/fit.json --law joint
    moe-gato plan --budget 1e20 --hardware 64xH100 --hz 20 --mfu 0.3 --json plan.json
    moe-gato plan --budget 1e20 --hardware 8xH100 --global-batch 512 --data-tokens 2e9

    from scaling.plan import plan, plans
    row = plan(1e21, "64xH100", hz=20)                    # Epoch's Chinchilla fit
    rows = plans([1e19, 1e21], "64xH100", hz=20, fit_doc=json.load(open("fit.json")))

The model. Candidates are members of the sweep's model family (``scaling.family``: width
d_model, depth d_model / 32, FF 4 x d_model, on the family's base preset) for widths that
are multiples of its head_dim from 2 heads to 8192 (``default_widths``: every multiple up to
16 heads, then steps of at most 6.25%) and the expert choices ``EXPERT_GRID``: dense, and
8, 16, 32 or 64 experts per modality group with k = 1 or 2 and granularity G = 1 or 2
(a law without a term for experts ranks only the members of the expansion rate it was
fitted at: chinchilla, and Epoch's prior, dense members only).
For a budget C each trains on D = C / (training FLOPs per token) tokens
(``moe_gato.model.accounting``, attention at the context included); the law predicts its loss
(``scaling.optimum``). The plan takes the lowest predicted loss among candidates whose
predicted batch-1 control rate on ONE device of the hardware's kind (the latency model of
benchmarks/latency_model.json, ``moe_gato.eval.latency.predict_hz``) meets ``hz`` and that
fit the hardware's memory in some layout.

The layout (``scaling.layout``): data parallelism over all devices, expert parallelism
``ep`` (a divisor of the experts per group and of the device count; ep devices hold
disjoint experts, each expert is replicated over devices / ep), ZeRO stage s over
data-parallel ranks (experts: over the
devices / ep ranks that hold the same experts). No tensor or pipeline parallelism: each
device holds the whole dense part. For each ep, the smallest stage whose memory per device
fits ``(1 - headroom)`` of the device's memory at some micro-batch, with the largest
micro-batch that fits; of those, the ep with the fastest step. Memory per device: bf16
weights (2 bytes/param) + bf16 gradients (2, sharded from stage 2) + AdamW fp32 master
weights and two moments (12, sharded from stage 1) + the activations one micro-batch saves
for backward (``accounting.activation_bytes``: no recomputation). Stage 3 is not offered:
the trainer does not run it (moe_gato/train/config.py), nor does DeepSpeed's MoE.

The global batch follows the rule of ``scaling.hyper`` (DeepSeek LLM's exponent, anchored
at this project's recipe: ~1M tokens at 1e21 FLOPs), in whole sequences, a multiple of the
devices; ``--global-batch`` fixes it. The plan notes when D exceeds the unique tokens of
the data (``--data-tokens``; default the default suite's 12.6M): a law fitted on fresh
tokens says nothing of repeated ones (Muennighoff et al. 2023: up to ~4 epochs cost little,
beyond ~16 the returns vanish).

Time: compute = tokens x FLOPs per token / (devices x peak x MFU), MFU by model size from
this project's measurements on that device (``scaling.mfu``), or 0.4 where none was made
near the size (said so), or ``--mfu``.
Expert-parallel all-to-all per step and device: per MoE layer 2 all-to-alls forward
(dispatch, combine) and 2 backward, each of tokens per device x k G copies x d_model x 2
bytes (bf16), the share (ep - 1) / ep under uniform routing leaving the device; the peers
within the node go over NVLink, the rest over InfiniBand, the slower of the two sets the
time; no overlap with compute (all of it is exposed). Data-parallel gradient reduction (ring:
2 (n - 1) / n x bf16 gradients) is assumed to overlap the backward pass; only what exceeds
the backward time (2/3 of compute) is added. Wall-clock = steps x (compute + all-to-all +
that excess); GPU-hours = devices x wall-clock.

Read the output as a sketch, not a forecast. A law fitted to this project's sweep was
fitted on tiny CPU runs (about 1e12-1e13 FLOPs): at 1e19-1e23 FLOPs it extrapolates by
seven to eleven orders of magnitude. Epoch AI's refit of Chinchilla (the default without
``--fit``) is a text-LM law (MassiveText) for dense models: its losses are not this
project's losses, and it has no term for experts. The latency model was fitted on presets
up to 84M active parameters (gato-79m); larger models' rates are extrapolated. Hardware
figures are vendor data-sheet numbers (``scaling.hardware``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from scaling.hardware import Hardware, parse_hardware
from scaling.layout import (HEADROOM, ZERO_STAGES, Layout, all_to_all, choose_layout,
                            fitting_layouts, gradient_reduction, memory_per_gpu, split_params,
                            step_time)
from scaling.mfu import mfu_for

if TYPE_CHECKING:
    from scaling.family import FamilyConfig
    from scaling.optimum import Candidate

#: Epoch AI's refit of Chinchilla's approach 3 (Besiroglu et al. 2024, "Chinchilla Scaling: A
#: replication attempt"): L = E + A / N^alpha + B / D^beta, dense text LMs
EPOCH_CHINCHILLA = {"A": 482.01, "B": 2085.43, "E": 1.8172, "alpha": 0.3478, "beta": 0.3658}
CONTEXT = 1024            # Gato's context
#: unique tokens of the default suite (configs/collect/default.yaml, README: 12.6M)
DEFAULT_DATA_TOKENS = 12.6e6
MAX_WIDTH = 8192
LATENCY_FIT_MAX_ACTIVE = 84e6  # gato-79m's active parameters, the largest latency-model preset
#: (experts, k, G): dense, then 8-64 experts per group, top-1 or top-2, granularity 1 or 2
EXPERT_GRID = [(1, 1, 1)] + [(e, k, g) for e in (8, 16, 32, 64) for k in (1, 2) for g in (1, 2)]


def default_experts() -> list:
    from scaling.family import ExpertChoice

    return [ExpertChoice(experts=e, k=k, G=g) for e, k, g in EXPERT_GRID]


def default_widths(head_dim: int, max_width: int = MAX_WIDTH, step: float = 0.0625) -> list[int]:
    """Multiples of head_dim from 2 heads to max_width: every one up to 16 heads, then the
    next multiple at least ``step`` (relative) wider."""
    if head_dim < 1 or max_width < 2 * head_dim:
        raise ValueError(f"widths: need head_dim >= 1 and max_width >= 2 x head_dim, got "
                         f"{head_dim}, {max_width}")
    out, w = [], 2 * head_dim
    while w <= max_width:
        out.append(w)
        w = w + head_dim if w < 16 * head_dim else math.ceil(w * (1 + step) / head_dim) * head_dim
    return out


# ------------------------------------------------------------------------------ the law


def resolve_law(fit_doc: dict | None, law: str | None, coefs: dict | None, E_values=None
                ) -> tuple[str, dict, str]:
    """(law, coefficients, where they come from and why it may be used). ``coefs`` given:
    used as is; ``fit_doc`` (a fit.json): its ``law`` if usable, else the usable law with a
    data term and the lowest held-out error among those that may compare the expansion
    rates ``E_values`` (then any usable one: the candidates are cut to its rate); neither:
    Epoch's Chinchilla fit. A law without a held-out error, or with a coefficient at a bound,
    is never used (``scaling.identify``)."""
    from scaling.fit import LAWS
    from scaling.identify import choose_law, unusable

    if law is not None and law not in LAWS:
        raise ValueError(f"law: unknown law {law!r}; choose from {', '.join(LAWS)}")
    if law == "clark":
        raise ValueError("law: clark has no data term (its loss falls with N at any budget), so "
                         "it cannot trade N against D; choose chinchilla, krajewski or joint")
    if coefs is not None:
        if law is None:
            raise ValueError("coefs given without law: name the law they belong to")
        return law, _finite_coefs(law, coefs), "given coefficients"
    if fit_doc is None:
        if law not in (None, "chinchilla"):
            raise ValueError(f"law {law!r} needs a fit.json (--fit); without one only Epoch's "
                             f"Chinchilla fit (law chinchilla) is built in")
        return "chinchilla", dict(EPOCH_CHINCHILLA), (
            "Epoch AI's refit of Chinchilla (Besiroglu et al. 2024): a dense text-LM law, "
            "not fitted on this project's data")
    laws = fit_doc.get("laws")
    if not isinstance(laws, dict):
        raise ValueError("fit document has no 'laws' mapping (is it a moe-gato fit.json?)")
    for name, c in laws.items():  # a malformed document is an error, whichever law is used
        if "skipped" not in c:
            _finite_coefs(name, c)
    if law is None:
        law, why = choose_law(fit_doc, E_values=E_values, exclude=("clark",))
        if law is None:
            law, why = choose_law(fit_doc, exclude=("clark",))
        if law is None:
            raise ValueError(f"fit document: {why} (laws: {_law_states(laws)})")
    else:
        if law not in laws:
            raise ValueError(f"fit document has no law {law!r} (it has: {_law_states(laws)})")
        if "skipped" in laws[law]:
            raise ValueError(f"law {law!r} was not fitted: {laws[law]['skipped']}")
        bad = unusable(fit_doc, law)
        if bad:
            raise ValueError(f"law {law!r} may not be used: {bad}")
        why = f"{law}: asked for (usable: a held-out error, no coefficient at a bound)"
    source = (f"fitted to {fit_doc.get('results', 'a sweep')}: an extrapolation past its "
              f"runs; {why}")
    return law, _finite_coefs(law, laws[law]), source


def _law_states(laws: dict) -> str:
    return ", ".join(f"{k} (skipped)" if "skipped" in v else k for k, v in laws.items()) or "none"


def _finite_coefs(law: str, coefs: dict) -> dict:
    from scaling.fit import REGISTRY

    params = REGISTRY[law].params
    bad = [k for k in params if not isinstance(coefs.get(k), (int, float))
           or not math.isfinite(coefs[k])]
    if bad:
        raise ValueError(f"law {law!r}: coefficients {bad} are missing or not finite numbers")
    out = {k: float(coefs[k]) for k in params}
    for k in ("E_max", "E_scope"):
        if coefs.get(k) is not None:
            out[k] = float(coefs[k])
    if coefs.get("n_column"):
        out["n_column"] = str(coefs["n_column"])
    return out


# -------------------------------------------------------------------------------- plans


def _check(budgets, hz, mfu, headroom, zero_stages, global_batch, context, data_tokens
           ) -> None:
    for b in budgets:
        if not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0):
            raise ValueError(f"budget must be a finite number of FLOPs > 0, got {b}")
    if not (math.isfinite(hz) and hz > 0):
        raise ValueError(f"hz must be a control rate > 0, got {hz}")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"mfu must lie in (0, 1], got {mfu}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must lie in [0, 1), got {headroom}")
    if not zero_stages or any(s not in (0, 1, 2) for s in zero_stages):
        raise ValueError(f"zero_stages must be a non-empty subset of 0, 1, 2 (the trainer "
                         f"runs no ZeRO-3), got {list(zero_stages)}")
    if (global_batch is not None and global_batch < 1) or context < 1:
        raise ValueError(f"global_batch and context must be >= 1, got {global_batch}, {context}")
    if data_tokens is not None and not data_tokens > 0:
        raise ValueError(f"data_tokens must be > 0 (unique tokens of the data), got "
                         f"{data_tokens}")


def build_candidates(hardware: Hardware, *, family: FamilyConfig | None = None,
                     base_model: dict | None = None, experts=None, widths=None,
                     context: int = CONTEXT, shape: str = "metaworld") -> list[Candidate]:
    """The family's members, with their control rate on one device of ``hardware``."""
    from scaling.family import FamilyConfig
    from scaling.optimum import candidates

    family = family or FamilyConfig()
    return candidates(family, base_model or family.base_model(),
                      widths=widths or default_widths(family.head_dim),
                      experts=experts or default_experts(), context=context,
                      device=hardware.latency_device, shape=shape)


def plans(budgets, hardware: str | Hardware, *, hz: float, fit_doc: dict | None = None,
          law: str | None = None, coefs: dict | None = None, family: FamilyConfig | None = None,
          base_model: dict | None = None, experts=None, widths=None, context: int = CONTEXT,
          mfu: float | None = None, shape: str = "metaworld", zero_stages=ZERO_STAGES,
          global_batch: int | None = None, headroom: float = HEADROOM,
          data_tokens: float | None = DEFAULT_DATA_TOKENS,
          cands: list[Candidate] | None = None) -> list[dict]:
    """One plan per budget (see ``plan``); the candidates are built once. ``mfu`` None: by
    model size (``scaling.mfu``); ``global_batch`` None: the batch rule (``scaling.hyper``);
    ``data_tokens``: unique tokens of the data (None: not checked)."""
    from scaling.identify import ranks_experts

    budgets = [float(b) if isinstance(b, (int, float)) else b for b in budgets]
    _check(budgets, hz, mfu, headroom, zero_stages, global_batch, context, data_tokens)
    hw = parse_hardware(hardware) if isinstance(hardware, str) else hardware
    if global_batch is not None and global_batch % hw.gpus:
        raise ValueError(f"global_batch ({global_batch} sequences) must be a multiple of the "
                         f"{hw.gpus} devices of {hw.name}")
    from scaling.family import FamilyConfig

    family = family or FamilyConfig()
    if cands is None:
        cands = build_candidates(hw, family=family, base_model=base_model, experts=experts,
                                 widths=widths, context=context, shape=shape)
    law, coefs, source = resolve_law(fit_doc, law, coefs,
                                     E_values={c.experts.expansion for c in cands})
    base_model = base_model or family.base_model()
    pool = f"{len(cands)} family members"
    if not ranks_experts(law):  # it would rank an MoE as a dense model of its active N
        scope = coefs.get("E_scope", 1.0 if law == "chinchilla" else None)
        if scope is None:
            raise ValueError(f"law {law}: no term for the number of experts and no E_scope "
                             f"(the expansion rate it was fitted at) to restrict the "
                             f"candidates to")
        cands = [c for c in cands if c.experts.expansion == scope]
        pool = (f"{len(cands)} family members of E = {scope:g} (the {law} law has no term for "
                f"experts: it ranks only the rate it was fitted at)")
        if not cands:
            raise ValueError(f"law {law}: no candidate of E = {scope:g} to choose from")
    layouts: dict[tuple, tuple] = {}  # (label, batch): (config, layout or None)
    return [_plan_one(b, hw, hz=hz, law=law, coefs=coefs, source=source, pool=pool, family=family,
                      base_model=base_model, context=context, mfu=mfu, shape=shape,
                      zero_stages=tuple(zero_stages),
                      global_batch=global_batch or _rule_batch(b, context, hw),
                      batch_source="given" if global_batch else "rule", headroom=headroom,
                      data_tokens=data_tokens, cands=cands, layouts=layouts) for b in budgets]


def _rule_batch(budget: float, context: int, hw: Hardware) -> int:
    from scaling.hyper import HyperRule

    return HyperRule().batch_sequences(budget, context, multiple_of=hw.gpus)


def plan(budget: float, hardware: str | Hardware, *, hz: float, **kw) -> dict:
    """The compute-optimal model meeting ``hz`` for ``budget`` FLOPs on ``hardware``, its
    layout and its time: a dict with ``chosen`` (model, N, E, k, G, D, steps, Hz, loss),
    ``layout``, ``comm``, ``time``, ``free`` (the optimum at any rate) and ``notes``.
    ``chosen`` is None, with ``notes`` saying why, when no candidate meets the rate and
    fits. Keywords as ``plans``."""
    return plans([budget], hardware, hz=hz, **kw)[0]


def _plan_one(budget, hw, *, hz, law, coefs, source, pool, family, base_model, context, mfu, shape,
              zero_stages, global_batch, batch_source, headroom, data_tokens, cands,
              layouts) -> dict:
    from scaling.optimum import predicted_losses

    loss = predicted_losses(law, coefs, budget, cands)
    ranked = sorted((float(v), i) for i, v in enumerate(loss) if math.isfinite(v))
    out = {"budget": budget, "hardware": hw.name, "hz_target": hz, "law": law, "coefs": coefs,
           "law_source": source, "candidates": pool, "latency_device": hw.latency_device,
           "latency_note": hw.latency_note, "shape": shape,
           "context": context, "mfu": mfu, "mfu_source": "given" if mfu else None,
           "headroom": headroom, "global_batch": global_batch, "batch_source": batch_source,
           "data_tokens": data_tokens, "chosen": None, "layout": None, "comm": None,
           "time": None, "free": None, "notes": []}
    notes = out["notes"]
    if not ranked:
        notes.append("the law gives no finite loss for any candidate")
        return out
    out["free"] = _model_row(cands[ranked[0][1]], budget, ranked[0][0], global_batch, context)
    fast = [(v, i) for v, i in ranked if cands[i].hz >= hz]
    if not fast:
        top = max(cands, key=lambda c: c.hz)
        notes.append(f"no candidate meets {hz:g} Hz on one {hw.kind} ({hw.latency_device}): "
                     f"the fastest, {top.label}, is predicted at {top.hz:.1f} Hz")
        return out
    found = _first_that_fits(fast, cands, layouts, hw, family=family, base_model=base_model,
                             context=context, global_batch=global_batch,
                             zero_stages=zero_stages, headroom=headroom, mfu=mfu)
    if found is None:
        notes.append(f"no candidate meeting {hz:g} Hz fits {hw.name} at ZeRO stages "
                     f"{list(zero_stages)} (needs tensor or pipeline parallelism, not modelled)")
        return out
    c, v, cfg, layout, skipped = found
    if skipped:
        notes.append(f"{skipped} better candidate(s) meeting the rate did not fit in memory")
    row = _model_row(c, budget, v, global_batch, context)
    used, out["mfu_source"] = (mfu, "given") if mfu else mfu_for(hw.kind, c.N_active)
    out["mfu"] = used
    t = step_time(cfg, hw, layout, global_batch=global_batch, seq_len=context, mfu=used)
    wall = row["steps"] * t["step_s"]
    out.update(chosen=row, layout={**dataclasses.asdict(layout),
                                   "trainer": layout.trainer_overrides(global_batch)},
               comm={k: t[k] for k in ("all_to_all", "gradient_reduction",
                                       "reduction_exposed_s")},
               time={"compute_s_per_step": t["compute_s"], "step_s": t["step_s"],
                     "wall_s": wall, "gpu_hours": hw.gpus * wall / 3600})
    if c.N_active > LATENCY_FIT_MAX_ACTIVE:
        notes.append(f"{c.label}: {c.N_active / 1e6:.0f}M active parameters, past the latency "
                     f"model's largest preset (84M): its rate is extrapolated")
    if row["steps"] < 1000:
        notes.append(f"{row['steps']} steps at {global_batch} sequences per step: a smaller "
                     f"global batch would give the optimizer more steps")
    if data_tokens and row["D"] > data_tokens:
        notes.append(f"{c.label} trains {row['D']:.3g} tokens = {row['D'] / data_tokens:.3g} "
                     f"epochs of the {data_tokens:.3g} unique tokens of the data: the law was "
                     f"fitted on fresh tokens; repeated ones are worth less (Muennighoff et al. "
                     f"2023: little lost up to ~4 epochs, next to nothing gained past ~16)")
    return out


def _first_that_fits(ranked, cands, layouts, hw, *, family, base_model, context, global_batch,
                     zero_stages, headroom, mfu):
    """(candidate, loss, config, layout, how many better ones did not fit) of the first
    candidate in ``ranked`` ((loss, index) pairs) with a layout; None if none has one.
    ``layouts`` caches {(label, global batch): (config, layout or None)} across budgets."""
    from scaling.family import model_config

    for skipped, (v, i) in enumerate(ranked):
        c = cands[i]
        key = (c.label, global_batch)
        if key not in layouts:
            cfg = model_config(family, d_model=c.d_model, experts=c.experts, base=base_model,
                               context_length=context)
            used = mfu or mfu_for(hw.kind, c.N_active)[0]
            layouts[key] = (cfg, choose_layout(cfg, hw, global_batch=global_batch,
                                               seq_len=context, zero_stages=zero_stages,
                                               headroom=headroom, mfu=used))
        cfg, layout = layouts[key]
        if layout is not None:
            return c, v, cfg, layout, skipped
    return None


def _model_row(c: Candidate, budget: float, loss: float, global_batch: int, context: int
               ) -> dict:
    D = budget / c.flops_per_token
    return {"model": c.label, "d_model": c.d_model, "num_layers": c.num_layers,
            "N_active": c.N_active, "N_total": c.N_total, "E": c.experts.expansion,
            "experts": c.experts.experts, "k": c.experts.k, "G": c.experts.G,
            "flops_per_token": c.flops_per_token, "D": D,
            "steps": max(1, math.ceil(D / (global_batch * context))), "hz": c.hz, "loss": loss}


# ----------------------------------------------------------------------------- output


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _duration(s: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s:.3g} s"


def markdown(rows: list[dict]) -> str:
    """The plans as a table, with the assumptions and caveats above it."""
    r0 = rows[0]
    coefs = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in r0["coefs"].items())
    data = f"{r0['data_tokens']:.3g} unique tokens" if r0["data_tokens"] else "not checked"
    lines = [
        f"Plan on {r0['hardware']}, control rate >= {r0['hz_target']:g} Hz (batch 1, "
        f"{r0['shape']} observations, context {r0['context']}, on ONE device, latency model "
        f"`{r0['latency_device']}`{'; ' + r0['latency_note'] if r0['latency_note'] else ''}).",
        f"Law: {r0['law']} ({coefs}); {r0['law_source']}. Candidates: {r0['candidates']}.",
        f"Cost model: MFU of dense bf16 peak by model size (per row: measured here near "
        f"that size, else 0.4 stated; or given); global batch per row (the rule of "
        f"scaling.hyper, or given); memory: bf16 weights + bf16 grads + 12 B/param AdamW fp32 "
        f"state (ZeRO-sharded) + activations, within {100 * (1 - r0['headroom']):.0f}% of "
        f"device memory; all-to-all not overlapped. Data: {data}. Beyond the fitted "
        f"ranges: an extrapolation, a sketch.",
        "",
        "| C (FLOPs) | model | N active | N total | E (experts, k, G) | D (tokens) | steps | "
        "global batch | Hz | loss | MFU | layout (DP, EP, ZeRO, micro x accum) | GiB/GPU | "
        "all-to-all/step | wall-clock | GPU-hours | at any rate: model, loss |",
        "|---" * 17 + "|"]
    notes = []
    for r in rows:
        C = f"{r['budget']:.0e}".replace("e+", "e")
        notes += [f"{C}: {n}" for n in r["notes"]]
        if r["chosen"] is not None:
            notes.append(f"{C}: MFU {r['mfu']:.3g} ({r['mfu_source']}); global batch "
                         f"{r['global_batch']} sequences ({r['batch_source']})")
        lines.append(f"| {C} | " + " | ".join(_cells(r)) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def _cells(r: dict) -> list[str]:
    """A plan's table cells after the budget."""
    free = r["free"]
    free = f"{free['model']}, {free['loss']:.3f}" if free else "-"
    c, lay = r["chosen"], r["layout"]
    if c is None:
        return ["none meets the rate and fits"] + [""] * 14 + [free]
    a2a = r["comm"]["all_to_all"]
    return [f"{c['model']} ({c['num_layers']} layers)", _si(c["N_active"]), _si(c["N_total"]),
            "dense" if c["experts"] == 1 else f"{c['E']:g} ({c['experts']}, {c['k']}, {c['G']})",
            f"{c['D']:.2e}", str(c["steps"]), str(r["global_batch"]), f"{c['hz']:.1f}",
            f"{c['loss']:.3f}", f"{r['mfu']:.3g}",
            f"{lay['data_parallel']}, {lay['expert_parallel']}, {lay['zero_stage']}, "
            f"{lay['micro_batch']} x {lay['grad_accum']}",
            f"{lay['memory']['total'] / 2**30:.1f}",
            f"{a2a['bytes'] / 1e9:.3g} GB, {a2a['seconds']:.3g} s" if a2a["bytes"] else "-",
            _duration(r["time"]["wall_s"]), f"{r['time']['gpu_hours']:.3g}", free]


# ----------------------------------------------------------------------------- CLI


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--budget", type=float, help="training compute C in FLOPs, e.g. 1e21")
    what.add_argument("--table", type=_floats, help="several budgets, e.g. 1e19,1e20,1e21")
    p.add_argument("--hardware", required=True,
                   help="64xH100, 8xH200, 1xH100, cpu-2core (N: 1-8 or whole nodes of 8)")
    p.add_argument("--hz", type=float, default=20.0,
                   help="batch-1 control rate to meet on one device (default 20)")
    p.add_argument("--fit", help="a fit.json from moe-gato fit / sweep (default: Epoch's "
                                 "Chinchilla fit, a dense text-LM law)")
    p.add_argument("--law", help="chinchilla, krajewski or joint (default: the fit's law with "
                                 "the lowest held-out error; chinchilla without --fit)")
    p.add_argument("--mfu", type=float, default=None,
                   help="MFU for every size (default: by model size, measured on the device "
                        "kind where near, else 0.4; scaling.mfu)")
    p.add_argument("--context", type=int, default=CONTEXT,
                   help=f"training and control context in tokens (default {CONTEXT})")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step (default: the batch rule of "
                        "scaling.hyper, per budget)")
    p.add_argument("--data-tokens", type=float, default=DEFAULT_DATA_TOKENS,
                   help=f"unique tokens of the training data; a plan that repeats them says "
                        f"so (default {DEFAULT_DATA_TOKENS:.3g}, the default suite)")
    p.add_argument("--zero-stages", type=_ints, default=list(ZERO_STAGES),
                   help="ZeRO stages to consider, smallest first (default 1,2)")
    p.add_argument("--headroom", type=float, default=HEADROOM,
                   help=f"share of device memory kept free (default {HEADROOM})")
    p.add_argument("--shape", default="metaworld", help="observation shape of the control "
                                                        "step: metaworld or babyai")
    p.add_argument("--json", help="also write the plans to this JSON file")


def run(args: argparse.Namespace) -> int:
    from scaling.fit import finite_json

    fit_doc = None
    if args.fit:
        path = Path(args.fit)
        if not path.is_file():
            raise ValueError(f"--fit: no such file {path}")
        try:
            fit_doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"--fit: {path} is not JSON ({exc})") from None
    budgets = args.table if args.table is not None else [args.budget]
    if not budgets:
        raise ValueError("--table: give at least one budget")
    rows = plans(budgets, args.hardware, hz=args.hz, fit_doc=fit_doc, law=args.law,
                 mfu=args.mfu, context=args.context, global_batch=args.global_batch,
                 data_tokens=args.data_tokens,
                 zero_stages=args.zero_stages, headroom=args.headroom, shape=args.shape)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(finite_json(rows), indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


__all__ = ["EPOCH_CHINCHILLA", "EXPERT_GRID", "Layout", "default_widths", "default_experts",
           "resolve_law", "split_params", "memory_per_gpu", "fitting_layouts", "step_time",
           "choose_layout", "all_to_all", "gradient_reduction", "build_candidates", "plans",
           "plan", "markdown", "add_arguments", "run"]
