"""Accelerator peaks from the vendors' data sheets: the one table MFU, the kernel benchmark's
roofline and the run planner read (no torch import, so that ``moe-gato plan`` stays cheap).

    from moe_gato.peaks import card_peaks
    card_peaks("NVIDIA H100 80GB HBM3")   # CardPeaks(bf16_flops=9.89e14, hbm_bytes_per_s=3.35e12, ...)

Dense bf16 tensor-core FLOP/s (no sparsity), HBM bytes/s, memory bytes. Name fragments are
tried in order, so the more specific ones come first (an "H100 PCIe" is no SXM "H100").
"""

from __future__ import annotations

import dataclasses

GB = 1e9


@dataclasses.dataclass(frozen=True)
class CardPeaks:
    bf16_flops: float
    hbm_bytes_per_s: float
    memory_bytes: float


#: name fragment -> peaks (NVIDIA H100 SXM5 / PCIe / NVL, H200 SXM, A100 SXM 80GB, L40S)
CARDS = {
    "H200": CardPeaks(989e12, 4.8e12, 141 * GB),
    "H100 PCIe": CardPeaks(756e12, 2.0e12, 80 * GB),
    "H100 NVL": CardPeaks(835e12, 3.9e12, 94 * GB),
    "H100": CardPeaks(989e12, 3.35e12, 80 * GB),
    "A100": CardPeaks(312e12, 2.039e12, 80 * GB),
    "L40S": CardPeaks(362e12, 0.864e12, 48 * GB),
}


def card_peaks(name: str) -> CardPeaks | None:
    """The peaks of the first card whose name fragment occurs in ``name`` (None if unknown)."""
    return next((peaks for key, peaks in CARDS.items() if key in name), None)
