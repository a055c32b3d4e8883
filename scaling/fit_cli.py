"""``moe-gato fit``: scaling laws fitted to a sweep's results table.

    moe-gato fit --results runs/sweep/results.csv --out runs/sweep/fit
    moe-gato fit --results runs/sweep/results.csv --law joint --bootstrap 1000 --out runs/sweep/fit
    moe-gato fit --results runs/sweep/results.csv --n nonemb --noise-floor 0.01 --out fit-ne

Reads the runs with ``status == done`` (columns ``N_active`` (as N; ``--n nonemb``:
``N_active_nonemb``), ``D``, ``C``, ``E``, ``G``, ``loss``; ``budget`` groups the runs when
present; runs repeated with several ``seed`` values give the seed noise), fits the law(s)
the runs identify (``scaling.identify``: flags, held-out errors, which law may be used) and,
for each (E, G) family run at several budgets, Chinchilla's approaches 1 and 2
(``scaling.fit``); reads off N_opt, D_opt, the optimal loss and the MoE compute multiplier
with bootstrap intervals (``scaling.readoff``). Writes ``OUT/fit.json``, ``OUT/fit.md``
(tables) and ``OUT/isoflop.png``, ``OUT/law_fit.png``, ``OUT/frontier.png``,
``OUT/published.png`` (``scaling.plots``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True, help="a sweep's results.csv")
    p.add_argument("--law", default="all",
                   help="chinchilla, clark, krajewski, joint, or all (default: every law the "
                        "table can identify)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bootstrap", type=int, default=0,
                   help="resamples for 95%% intervals of the coefficients (default 0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--n", choices=("active", "nonemb"), default="active",
                   help="N of the laws: active parameters (default) or active non-embedding")
    p.add_argument("--noise-floor", type=float, default=None,
                   help="seed noise as an RMSE of log L (default: from runs repeated with "
                        "several seeds in the table, else none)")


def run(args: argparse.Namespace) -> int:
    from scaling.identify import seed_noise
    from scaling.fit import LAWS, fit_table, read_results

    if args.law != "all" and args.law not in LAWS:
        raise ValueError(f"--law: unknown law {args.law!r}; choose from {', '.join(LAWS)}, all")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ValueError(f"--bootstrap: 0 (none) or at least 2, got {args.bootstrap}")
    if args.noise_floor is not None and not args.noise_floor >= 0:
        raise ValueError(f"--noise-floor: an RMSE of log L >= 0, got {args.noise_floor}")
    table = read_results(args.results)
    noise = args.noise_floor if args.noise_floor is not None else seed_noise(table)
    n_column = "N_active_nonemb" if args.n == "nonemb" else "N_active"
    doc = {"results": str(args.results), **fit_table(table, args.law, bootstrap=args.bootstrap,
                                                     seed=args.seed, n_column=n_column,
                                                     noise_floor=noise)}
    out = write_fit(table, doc, args.out)
    print(markdown(doc))
    print(f"\nwrote {out}/fit.json, fit.md, isoflop.png, law_fit.png, frontier.png, "
          f"published.png")
    return 0


def write_fit(table, doc: dict, out: str | Path) -> Path:
    """``fit.json``, ``fit.md`` and the three PNGs of a fit document into ``out``."""
    from scaling.fit import finite_json
    from scaling.plots import plot_all

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit.json").write_text(json.dumps(finite_json(doc), indent=1) + "\n")
    (out / "fit.md").write_text(markdown(doc) + "\n")
    plot_all(table, doc, out)
    return out


def _g(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _ci(iv) -> str:
    return f"{_g(iv[0])} - {_g(iv[1])}" if iv else ""


def markdown(doc: dict) -> str:
    """fit.json as tables: coefficients per law with flags, held-out errors, which law may
    be used, the read-offs, approaches 1 and 2."""
    from scaling.identify import choose_law
    from scaling.laws import REGISTRY

    noise = doc.get("noise_floor")
    noise = "unknown (no repeated seeds)" if noise is None else f"{noise:.3g} (RMSE of log L)"
    lines = [f"# Scaling-law fit of {doc.get('results', 'a results table')}", "",
             f"{doc['n_runs']} finished runs; N = {doc.get('n_column', 'N_active')}; "
             f"C = {doc['flops_per_param_token']:.3g} N D; seed noise {noise}.", ""]
    for law, c in doc["laws"].items():
        lines.append(f"## {law}")
        lines.append("")
        if "skipped" in c:
            lines += [f"skipped: {c['skipped']}", ""]
            continue
        ci, flags = c.get("ci", {}), c.get("flags", {})
        lines += ["| coefficient | value | 95% interval | flag |", "| --- | --- | --- | --- |"]
        for k in REGISTRY[law].params:
            lines.append(f"| {k} | {_g(c[k])} | {_ci(ci.get(k))} | {flags.get(k, '')} |")
        scope = f"; fitted to the runs at E = {c['E_scope']:g}" if "E_scope" in c else ""
        lines += ["", f"Huber objective {c['objective']:.6g} over {c['n']} runs; in-sample "
                      f"RMSE of log L {c.get('rmse_log', float('nan')):.4f}{scope}."]
        if "fit" in flags:
            lines.append(f"Flag: {flags['fit']}.")
        lines.append("")
    if "chinchilla_exponents" in doc:
        e = doc["chinchilla_exponents"]
        lines += [f"Chinchilla law: N_opt ~ C^{e['a']:.3f}, D_opt ~ C^{e['b']:.3f}.", ""]
    if doc["held_out"]:
        lines += ["## Held-out error", "",
                  "| law | mode | runs held out | RMSE of log L | mean abs rel | max abs rel |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for law, h in doc["held_out"].items():
            if "error" in h:
                lines.append(f"| {law} | {h['error']} | | | | |")
            else:
                lines.append(f"| {law} | {h['mode']} | {h['n_held_out']} | {h['rmse_log']:.4f} | "
                             f"{100 * h['mean_abs_rel']:.2f}% | {100 * h['max_abs_rel']:.2f}% |")
        lines.append("")
    law, why = choose_law(doc)
    lines += ["## The law used downstream (pick, optimum, plan)", "",
              f"{'**' + law + '**' if law else 'none'}: {why}.", ""]
    lines += readoff_markdown(doc)
    lines += ["## Approaches 1 (best run per budget) and 2 (IsoFLOP parabolas)", "",
              "| family | runs | budgets | approach 1: a, b | approach 2: a, b |",
              "| --- | --- | --- | --- | --- |"]
    for name, f in doc["families"].items():
        a1, a2 = f.get("approach1", {}), f.get("approach2", {})
        lines.append(f"| {name} | {f['runs']} | {f['budgets']} | {_g(a1.get('a'))}, "
                     f"{_g(a1.get('b'))} | {_g(a2.get('a'))}, {_g(a2.get('b'))} |")
    lines += ["", "a, b: exponents of N_opt ~ C^a, D_opt ~ C^b (- : fewer than 2 budgets)."]
    return "\n".join(lines)


def readoff_markdown(doc: dict) -> list[str]:
    """The compute-optimal N, D, loss and the MoE multiplier, with their intervals."""
    lines = []
    for law, rows in doc.get("optimum", {}).items():
        lines += [f"## Compute-optimal models by the {law} law ({_usability(doc, law)})",
                  "", "| C | E | G | N_opt (95%) | D_opt (95%) | D/N | loss (95%) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            ext = " (extrapolated)" if r["extrapolated"] else ""
            lines.append(f"| {r['C']:.3g}{ext} | {r['E']:g} | {r['G']:g} | {_g(r['N_opt'])} "
                         f"({_ci(r.get('N_ci'))}) | {_g(r['D_opt'])} ({_ci(r.get('D_ci'))}) | "
                         f"{r['tokens_per_param']:.3g} | {r['L_opt']:.4f} ({_ci(r.get('L_ci'))}) |")
        lines.append("")
    if doc.get("multiplier"):
        lines += ["## MoE compute multiplier over dense at equal loss (joint law, "
                  f"{_usability(doc, 'joint')})", "",
                  "C_dense / C: the compute a dense model needs to reach the loss the MoE reaches "
                  "with C (> 1: the MoE saves compute).", "",
                  "| C | E | multiplier (95%) |", "| --- | --- | --- |"]
        for r in doc["multiplier"]:
            ext = " (extrapolated)" if r["extrapolated"] else ""
            lines.append(f"| {r['C']:.3g}{ext} | {r['E']:g} | {_g(r['multiplier'])} "
                         f"({_ci(r.get('ci'))}) |")
        lines.append("")
    return lines


def _usability(doc: dict, law: str) -> str:
    """"usable", or "not usable: " and why (``scaling.identify.unusable``)."""
    from scaling.identify import unusable

    why = unusable(doc, law)
    return "usable" if not why else f"not usable: {why}"
