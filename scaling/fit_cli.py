"""``moe-gato fit``: scaling laws fitted to a sweep's results table.

    moe-gato fit --results runs/sweep/results.csv --out runs/sweep/fit
    moe-gato fit --results runs/sweep/results.csv --law joint --bootstrap 1000 --out runs/sweep/fit

Reads the runs with ``status == done`` (columns ``N_active`` (as N), ``D``, ``C``, ``E``,
``G``, ``loss``; ``budget`` groups the runs when present), fits the law(s) and, for each
(E, G) family run at several budgets, Chinchilla's approaches 1 and 2 (``scaling.fit``).
Writes ``OUT/fit.json``, ``OUT/fit.md`` (tables) and ``OUT/isoflop.png``,
``OUT/law_fit.png``, ``OUT/frontier.png`` (``scaling.plots``).
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


def run(args: argparse.Namespace) -> int:
    from scaling.fit import LAWS, fit_table, read_results

    if args.law != "all" and args.law not in LAWS:
        raise ValueError(f"--law: unknown law {args.law!r}; choose from {', '.join(LAWS)}, all")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ValueError(f"--bootstrap: 0 (none) or at least 2, got {args.bootstrap}")
    table = read_results(args.results)
    doc = {"results": str(args.results), **fit_table(table, args.law, bootstrap=args.bootstrap,
                                                     seed=args.seed)}
    out = write_fit(table, doc, args.out)
    print(markdown(doc))
    print(f"\nwrote {out}/fit.json, fit.md, isoflop.png, law_fit.png, frontier.png")
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


def markdown(doc: dict) -> str:
    """fit.json as tables: coefficients per law, held-out errors, approaches 1 and 2."""
    lines = [f"# Scaling-law fit of {doc.get('results', 'a results table')}", "",
             f"{doc['n_runs']} finished runs; C = {doc['flops_per_param_token']:.3g} N D.", ""]
    for law, c in doc["laws"].items():
        lines.append(f"## {law}")
        lines.append("")
        if "skipped" in c:
            lines += [f"skipped: {c['skipped']}", ""]
            continue
        ci = c.get("ci", {})
        lines += ["| coefficient | value | 95% interval |", "| --- | --- | --- |"]
        for k, v in c.items():
            if k in ("objective", "n", "ci") or v is None:
                continue
            iv = f"{_g(ci[k][0])} - {_g(ci[k][1])}" if k in ci else ""
            lines.append(f"| {k} | {_g(v)} | {iv} |")
        lines += ["", f"Huber objective {c['objective']:.6g} over {c['n']} runs.", ""]
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
    lines += ["## Approaches 1 (best run per budget) and 2 (IsoFLOP parabolas)", "",
              "| family | runs | budgets | approach 1: a, b | approach 2: a, b |",
              "| --- | --- | --- | --- | --- |"]
    for name, f in doc["families"].items():
        a1, a2 = f.get("approach1", {}), f.get("approach2", {})
        lines.append(f"| {name} | {f['runs']} | {f['budgets']} | {_g(a1.get('a'))}, "
                     f"{_g(a1.get('b'))} | {_g(a2.get('a'))}, {_g(a2.get('b'))} |")
    lines += ["", "a, b: exponents of N_opt ~ C^a, D_opt ~ C^b (- : fewer than 2 budgets)."]
    return "\n".join(lines)
