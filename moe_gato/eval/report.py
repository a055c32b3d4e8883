"""``eval.json``, ``eval.md`` and ``eval.png`` from the per-task results of an evaluation."""

from __future__ import annotations

from pathlib import Path

from moe_gato.config import write_json
from moe_gato.eval.scores import summarize

DOMAIN_ORDER = ("babyai", "metaworld", "classic", "atari")


def write_report(results: dict[str, dict], out: str | Path, *, checkpoint: str) -> dict:
    out = Path(out)
    control = {n: r for n, r in results.items() if r.get("kind") == "control"}
    other = {n: r for n, r in results.items() if r.get("kind") != "control"}
    doc = {"checkpoint": checkpoint, "tasks": dict(sorted(control.items())),
           "other": dict(sorted(other.items())), "summary": summarize(control)}
    write_json(out / "eval.json", doc)
    (out / "eval.md").write_text(markdown(doc) + "\n")
    if control:
        path = Path(checkpoint)
        title = f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" \
            else path.name
        plot_scores(control, out / "eval.png", title=title)
    return doc


def _order(name: str, r: dict) -> tuple:
    d = r["domain"]
    return (r["held_out"], DOMAIN_ORDER.index(d) if d in DOMAIN_ORDER else 99, name)


def markdown(doc: dict) -> str:
    lines = [f"Checkpoint: `{doc['checkpoint']}`", "",
             "| task | episodes | return (95% CI) | success | expert | random | normalized score |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(doc["tasks"].items(), key=lambda kv: _order(*kv)):
        label = name + (" (held out)" if r["held_out"] else "")
        success = "—" if r["success_rate"] is None else f"{r['success_rate']:.0%}"
        lines.append(f"| {label} | {r['episodes']} | {r['return_mean']:.1f} ± {r['return_ci95']:.1f} "
                     f"| {success} | {r['expert_return']:.1f} | {r['random_return']:.1f} | "
                     f"{r['normalized_score']:.2f} ± {r['normalized_ci95']:.2f} |")
    for part, title in (("train", "training tasks"), ("held_out", "held-out tasks")):
        s = doc["summary"][part]
        if not s["tasks"]:
            continue
        per_domain = ", ".join(f"{d} {v:.2f}" for d, v in s["domain_mean_normalized_score"].items())
        lines += ["", f"**{title}** ({s['tasks']}): mean normalized score "
                      f"{s['mean_normalized_score']:.2f} ({per_domain}); "
                      f"{s['tasks_at_50pct']} at >= 50% of expert, {s['tasks_at_80pct']} at >= 80%."]
    if doc["other"]:
        lines += ["", "| task | held-out metric |", "|---|---|"]
        for name, r in doc["other"].items():
            if "caption_exact_match" in r:
                metric = (f"caption token accuracy {r['caption_token_accuracy']:.1%}, exact match "
                          f"{r['caption_exact_match']:.1%} ({r['examples']} images)")
            else:
                metric = (f"perplexity {r['text_perplexity']:.1f} ({r['documents']} documents, "
                          f"{r['tokens']:,} tokens)")
            lines.append(f"| {name} | {metric} |")
    return "\n".join(lines)


def plot_scores(tasks: dict[str, dict], path: Path, *, title: str = "") -> None:
    """Normalized score per task with its 95% interval, grouped by domain; held-out tasks
    hatched; lines at 50% and 80% of expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(tasks, key=lambda n: (_order(n, tasks[n])[1], n))
    colours = dict(zip(DOMAIN_ORDER, ("tab:green", "tab:blue", "tab:orange", "tab:purple")))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4.5))
    for i, n in enumerate(names):
        r = tasks[n]
        ax.bar(i, r["normalized_score"], yerr=r["normalized_ci95"], capsize=2,
               color=colours.get(r["domain"], "grey"), hatch="//" if r["held_out"] else None,
               edgecolor="black", linewidth=0.4)
    for th in (0.5, 0.8):
        ax.axhline(th, color="grey", ls="--", lw=0.8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.split("/", 1)[1] for n in names], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("expert-normalized score")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for d, c in colours.items()
               if any(tasks[n]["domain"] == d for n in names)]
    labels = [d for d in colours if any(tasks[n]["domain"] == d for n in names)]
    ax.legend(handles, labels, fontsize=7, loc="upper right")
    ax.set_title(f"{title}: normalized score per task (hatched: held out; 95% CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
