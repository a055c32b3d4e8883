"""Shared by the benchmark scripts: the machine's description and RESULTS.md appends."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """CPU model and core count, plus the GPU's name when one is visible."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return desc


def append_results(title: str, body: str) -> None:
    """Appends a dated section with the machine's description to benchmarks/RESULTS.md."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = "# Benchmark results\n\nEach section: date, machine, table. Newest last.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    text += f"\n## {title}\n\n{stamp} · {machine()}\n\n{body}\n"
    RESULTS.write_text(text)
