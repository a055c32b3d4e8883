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


COLUMNS = ("N_active", "D", "C", "E", "G", "loss")
#: read when present: the non-embedding N, the nominal budget, the seed of repeated runs,
#: and how often a run saw its data
OPTIONAL = ("N_active_nonemb", "budget", "seed", "unique_tokens", "epochs")
N_COLUMNS = ("N_active", "N_active_nonemb")


def read_results(path) -> list[dict]:
    """The runs with ``status == "done"`` of a sweep's results CSV, as dicts of floats over
    ``COLUMNS`` (+ the ``OPTIONAL`` ones present; E and G default to 1 when absent)."""
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
            for k in OPTIONAL:
                if r.get(k):
                    row[k] = float(r[k])
            rows.append(row)
    return rows


def columns(table, n_column: str = "N_active") -> dict[str, np.ndarray]:
    """{column: array} from a table: a list of dicts or a pandas DataFrame; ``N`` is the
    ``n_column`` the laws take (``N_active`` or ``N_active_nonemb``)."""
    if n_column not in N_COLUMNS:
        raise ValueError(f"n_column: {n_column!r} is not one of {', '.join(N_COLUMNS)}")
    if hasattr(table, "to_dict"):
        table = table.to_dict("records")
    if not table:
        raise ValueError("the results table has no finished runs")
    keys = [k for k in (*COLUMNS, *OPTIONAL) if k in table[0]]
    out = {k: np.array([float(r.get(k, 1.0)) for r in table]) for k in keys}
    for k in ("E", "G"):
        out.setdefault(k, np.ones(len(table)))
    out.setdefault("budget", out["C"])
    if n_column not in out:
        raise ValueError(f"the results table has no {n_column} column (has {sorted(out)})")
    out["N"] = out[n_column]
    return out


def law_inputs(law: str, cols) -> dict:
    """fit_law's keyword arguments for a law from ``columns(table)``: N, D, L, and E and G
    (a law without them ignores them, but they tell its runs apart)."""
    return {"N": cols["N"], "D": cols["D"], "L": cols["loss"], "E": cols["E"], "G": cols["G"]}


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

