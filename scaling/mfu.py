"""Model FLOPs utilisation by model size, from this project's own measurements, for
``moe-gato plan``; a stated default where nothing was measured near a size.

    mfu, source = mfu_for("H100", N_active=2.2e6)   # (0.0014, "measured: ...")

A measurement is used for models within ``REACH`` (a factor) of the sizes measured on that
kind of device: log-linear in N between measured sizes, the nearest one's value just
outside. Farther away the plan assumes ``DEFAULT_MFU`` and says so. The figures are
benchmarks/RESULTS.md's; add a row here when a benchmark measures another size.
"""

from __future__ import annotations

import math

DEFAULT_MFU = 0.4  # a common planning figure for dense bf16 training on H100s, not measured here
REACH = 2.0

#: device kind -> [(active parameters, MFU, where it was measured)], sizes ascending
MEASURED = {
    "H100": [(2.22e6, 0.0014, "benchmarks/RESULTS.md 2026-11-26: tiny-moe, H100 80GB, bf16, "
                              "batch 16 x 576 (launch-bound)")],
    "cpu": [(2.22e6, 0.348, "benchmarks/RESULTS.md 2026-11-25: tiny-moe, 1 process x 2 "
                            "threads, fp32, against the measured 192 GFLOP/s")],
}


def mfu_for(kind: str, N_active: float) -> tuple[float, str]:
    """(MFU, its source) for a model of ``N_active`` parameters on a device of ``kind``
    (``scaling.hardware.Hardware.kind``)."""
    points = MEASURED.get(kind, [])
    near = [p for p in points if p[0] / REACH <= N_active <= p[0] * REACH]
    if not near:
        return DEFAULT_MFU, (f"assumed {DEFAULT_MFU:g}: nothing measured on {kind} within "
                             f"{REACH:g}x of {N_active:.3g} parameters")
    below = [p for p in points if p[0] <= N_active]
    above = [p for p in points if p[0] >= N_active]
    if below and above and below[-1][0] != above[0][0]:
        (n0, m0, s0), (n1, m1, s1) = below[-1], above[0]
        t = math.log(N_active / n0) / math.log(n1 / n0)
        return m0 * (m1 / m0) ** t, f"interpolated: {s0}; {s1}"
    n, m, s = min(near, key=lambda p: abs(math.log(p[0] / N_active)))
    return m, f"measured: {s}"
