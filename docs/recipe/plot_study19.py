"""The position study's runs as a figure: docs/recipe/study-19.png from the "Every run"
table of docs/recipe.md (the run folders are gone; that table is what was recorded).

    python docs/recipe/plot_study19.py
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "recipe.md"


def _number(cell: str) -> float | None:
    m = re.match(r"\s*\**(-?\d+\.\d+)", cell)
    return float(m.group(1)) if m else None


def read_runs(doc: Path = DOC) -> list[tuple[str, str, float]]:
    """(run, tokens, mean normalized score) for every row of the "Every run" table."""
    text = doc.read_text()
    table = text[text.index("## Every run"):text.index("## What was found")]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or not re.match(r"^[a-z]\w*-", cells[0]):
            continue
        score = _number(cells[4])
        if score is not None:
            rows.append((cells[0], cells[2], score))
    if not rows:
        raise ValueError(f"{doc}: no rows in its 'Every run' table")
    return rows


def main() -> None:
    rows = read_runs()
    colours = {"cp": "tab:blue", "m": "tab:orange", "b": "tab:green", "d": "tab:green",
               "default": "tab:red"}
    fig, ax = plt.subplots(figsize=(11, 4))
    for i, (name, tokens, score) in enumerate(rows):
        prefix = "default" if name.startswith("default") else re.match(r"[a-z]+", name).group(0)
        ax.bar(i, score, color=colours.get(prefix, "grey"))
    ax.set_xticks(range(len(rows)), [f"{n} ({t})" for n, t, _ in rows], rotation=70,
                  ha="right", fontsize=7)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("mean expert-normalized score")
    ax.set_title("Position study (issue 19): blue CartPole alone, orange the 12-task mixture, "
                 "green one domain alone, red the default recipe", fontsize=9)
    fig.tight_layout()
    out = HERE / "study-19.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
