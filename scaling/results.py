"""Results tables of sweeps and reference data: reading a sweep's ``results.csv``, the
columns a fit takes from it, its (E, G) families, Epoch AI's Chinchilla data, and JSON
without inf / nan.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from scaling.laws import REGISTRY


COLUMNS = ("N_active", "D", "C", "E", "G", "loss")


def read_results(path) -> list[dict]:
    """The runs with ``status == "done"`` of a sweep's results CSV, as dicts of floats over
    ``COLUMNS`` (+ ``budget`` when present; E and G default to 1 when absent)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such results table: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        head = reader.fieldnames or []
        missing = [c for c in ("N_active", "D", "C", "loss") if c not in head]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (has {head})")
        rows = []
        for line, r in enumerate(reader, start=2):
            if "status" in head and r["status"] != "done":
                continue
            row = {}
            for k in COLUMNS:
                v = r.get(k) or ("1" if k in ("E", "G") else "")  # absent E, G: dense
                try:
                    row[k] = float(v)
                except ValueError:
                    raise ValueError(f"{path}, line {line}: {k} = {v!r} is not a number "
                                     f"on a finished run") from None
            if r.get("budget"):
                row["budget"] = float(r["budget"])
            rows.append(row)
    return rows


def columns(table) -> dict[str, np.ndarray]:
    """{column: array} from a table: a list of dicts or a pandas DataFrame."""
    if hasattr(table, "to_dict"):
        table = table.to_dict("records")
    if not table:
        raise ValueError("the results table has no finished runs")
    keys = [k for k in (*COLUMNS, "budget") if k in table[0]]
    out = {k: np.array([float(r.get(k, 1.0)) for r in table]) for k in keys}
    for k in ("E", "G"):
        out.setdefault(k, np.ones(len(table)))
    out.setdefault("budget", out["C"])
    return out


def law_inputs(law: str, cols) -> dict:
    """fit_law's keyword arguments for a law from ``columns(table)`` (N = N_active)."""
    return {"N": cols["N_active"], "D": cols["D"], "L": cols["loss"],
            **({"E": cols["E"]} if "E" in REGISTRY[law].needs else {}),
            **({"G": cols["G"]} if "G" in REGISTRY[law].needs else {})}


def families(table) -> dict[str, np.ndarray]:
    """{"E=8 G=2": run indices} for each (E, G) of a table, dense (E = 1) first."""
    cols = columns(table)
    keys = sorted({(e, g) for e, g in zip(cols["E"], cols["G"], strict=True)})
    return {f"E={e:g} G={g:g}": np.flatnonzero((cols["E"] == e) & (cols["G"] == g))
            for e, g in keys}



EPOCH_CSV = Path(__file__).resolve().parent / "data" / "chinchilla_epoch.csv"


def load_epoch_chinchilla(path: str | Path | None = None):
    """(N, D, L) of Epoch AI's extraction of Chinchilla's runs (scaling/data/README.md), the
    5 highest losses dropped as Epoch did; D = C / (6 N). ``path`` (or the environment's
    MOE_GATO_CHINCHILLA_CSV) replaces the copy kept in the repo."""
    path = Path(path or os.environ.get("MOE_GATO_CHINCHILLA_CSV") or EPOCH_CSV)
    if not path.is_file():
        raise ValueError(f"Epoch's Chinchilla data not found at {path}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    N = np.array([float(r["Model Size"]) for r in rows])
    C = np.array([float(r["Training FLOP"]) for r in rows])
    L = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(L, kind="stable")[:-5]  # Epoch: the 5 highest losses dropped
    return N[keep], C[keep] / (6 * N[keep]), L[keep]


def finite_json(v):
    """A document with inf / nan as None (JSON has neither) and numpy scalars as Python
    numbers."""
    if isinstance(v, dict):
        return {k: finite_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite_json(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v

