"""Hardware presets for planning a training run: ``64xH100``, ``8xH200``, ``1xH100``,
``cpu-2core``.

    from scaling.hardware import parse_hardware
    hw = parse_hardware("64xH100")   # 8 nodes of 8 GPUs
    hw.gpus, hw.memory_bytes, hw.peak_flops, hw.latency_device

Figures are assumptions from vendor data sheets (NVIDIA H100 SXM5 and H200 SXM, ConnectX-7),
not measurements; the cards' own peaks are ``moe_gato.peaks``'s:

- H100 SXM: 80 GB HBM3 at 3.35 TB/s; 989 TFLOP/s dense bf16.
- H200 SXM: 141 GB HBM3e at 4.8 TB/s; 989 TFLOP/s dense bf16 (the same compute die).
- NVLink 4 within a node of 8 GPUs: 900 GB/s per GPU as the data sheet counts it, both
  directions together, so 450 GB/s each way. InfiniBand NDR across nodes: one 400 Gb/s
  port per GPU, 50 GB/s each way.
- ``cpu-2core`` is this machine (no accelerator): 24 GiB, 160 GFLOP/s (2 cores x 2.5 GHz x
  two 8-wide fp32 FMA units, a theoretical peak), one device, so no interconnect.

``latency_device`` names the batch-1 latency model in benchmarks/latency_model.json that
predicts the control rate on ONE device of the kind. The H100 model was measured on an
H100 80GB HBM3; there is no measured H200 model, so an H200 uses the H100's
(``latency_note`` says so). An H200's higher HBM bandwidth would make it somewhat faster.
"""

from __future__ import annotations

import dataclasses
import re

from moe_gato.peaks import card_peaks

GB = 1e9
FORMS = ("<N>xH100", "<N>xH200", "cpu-2core")
H100_LATENCY = "cuda-nvidia-h100-80gb-hbm3"


@dataclasses.dataclass(kw_only=True, frozen=True)
class Hardware:
    name: str
    kind: str                    # "H100", "H200", "cpu"
    gpus: int                    # devices in all
    gpus_per_node: int
    memory_bytes: float          # per device
    peak_flops: float            # dense bf16 per device (fp32 on the CPU)
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float  # per device, each direction
    inter_node_bytes_per_s: float  # per device, each direction
    latency_device: str          # key of benchmarks/latency_model.json
    latency_note: str = ""

    def __post_init__(self) -> None:
        for field in ("gpus", "gpus_per_node"):
            if getattr(self, field) < 1:
                raise ValueError(f"hardware.{field} must be >= 1, got {getattr(self, field)}")
        for field in ("memory_bytes", "peak_flops", "hbm_bytes_per_s", "intra_node_bytes_per_s",
                      "inter_node_bytes_per_s"):
            if not getattr(self, field) > 0:
                raise ValueError(f"hardware.{field} must be > 0, got {getattr(self, field)}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ValueError(f"hardware.gpus ({self.gpus}) must fill whole nodes of "
                             f"{self.gpus_per_node}")

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)


_LATENCY = {  # kind: (latency model, note); the peaks are moe_gato.peaks's
    "H100": (H100_LATENCY, ""),
    "H200": (H100_LATENCY, "no measured H200 latency model: the H100 80GB HBM3 one is used"),
}
GPUS_PER_NODE = 8
NVLINK_EACH_WAY = 450 * GB   # 900 GB/s per GPU, both directions
IB_EACH_WAY = 50 * GB        # 400 Gb/s NDR per GPU


def parse_hardware(spec: str) -> Hardware:
    """A preset from its name; a ValueError lists the allowed forms."""
    text = spec.strip()
    if text.lower() == "cpu-2core":
        return Hardware(name="cpu-2core", kind="cpu", gpus=1, gpus_per_node=1,
                        memory_bytes=24 * 2**30, peak_flops=160e9, hbm_bytes_per_s=40 * GB,
                        intra_node_bytes_per_s=40 * GB, inter_node_bytes_per_s=40 * GB,
                        latency_device="cpu-2core")
    m = re.fullmatch(r"(\d+)\s*[xX]\s*(H100|H200)", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"hardware: unknown preset {spec!r}; allowed forms: "
                         f"{', '.join(FORMS)} (N GPUs: 1-8 in one node, or a multiple of "
                         f"{GPUS_PER_NODE} for whole nodes), e.g. 64xH100")
    n, kind = int(m.group(1)), m.group(2).upper()
    if n < 1 or (n > GPUS_PER_NODE and n % GPUS_PER_NODE):
        raise ValueError(f"hardware: {spec!r}: the GPU count must be 1-{GPUS_PER_NODE} (one "
                         f"node) or a multiple of {GPUS_PER_NODE} (whole nodes), got {n}")
    device, note = _LATENCY[kind]
    peaks = card_peaks(kind)
    return Hardware(name=f"{n}x{kind}", kind=kind, gpus=n,
                    gpus_per_node=min(n, GPUS_PER_NODE), memory_bytes=peaks.memory_bytes,
                    peak_flops=peaks.bf16_flops, hbm_bytes_per_s=peaks.hbm_bytes_per_s,
                    intra_node_bytes_per_s=NVLINK_EACH_WAY,
                    inter_node_bytes_per_s=IB_EACH_WAY, latency_device=device,
                    latency_note=note)
