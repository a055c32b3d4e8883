"""What a training run measures and where it goes: per-kind losses, routing load and
entropy, teacher-forced action accuracy, the peak FLOP/s behind MFU, and the metrics log
(``metrics.jsonl`` plus TensorBoard)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from moe_gato.tokenizer import KIND_NAMES
from moe_gato.tokenizer.layout import ACTION_KINDS, Kind

KIND_NAMES_INDEX = {name: int(k) for k, name in KIND_NAMES.items()}


def measure_peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        from moe_gato.peaks import card_peaks

        peaks = card_peaks(torch.cuda.get_device_name(device))
        if peaks is not None:
            return peaks.bf16_flops
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * n**3 / (time.perf_counter() - start)


# ------------------------------------------------------------------------ metrics
def routing_metrics(routing: list[dict]) -> dict[str, float]:
    """Per layer and group: load of each expert (fraction), dropped slots, router entropy
    of the load distribution (1.0 = perfectly balanced), and the share of the group's
    tokens each added expert took (``added/<a>``)."""
    out: dict[str, float] = {}
    for layer, groups in enumerate(routing):
        for name, r in groups.items():
            load = r.load_E.float()
            frac = load / load.sum().clamp(min=1)
            ent = -(frac * frac.clamp(min=1e-12).log()).sum() / math.log(max(len(frac), 2))
            prefix = f"moe/{layer}/{name}"
            out[f"{prefix}/max_load"] = float(frac.max()) * len(frac)
            out[f"{prefix}/entropy"] = float(ent)
            out[f"{prefix}/dropped"] = float(r.dropped)
            for e, f in enumerate(frac.tolist()):
                out[f"{prefix}/load/{e}"] = f
            tokens = max(int(r.token_index_t.numel()), 1)
            for a, n in enumerate(r.added_load_A.tolist()):
                out[f"{prefix}/added/{a}"] = n / tokens
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (a line cut short by a kill is left out)."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [r for line in text.splitlines() if (r := _parse_json(line)) is not None]


def _parse_json(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def add_kind_losses(sums_K2: torch.Tensor, batch: dict, out) -> None:
    """Adds (sum of losses, targets) of each target kind in ``out`` to its row (on the
    device of ``sums_K2``; nothing is read back)."""
    if out.kind_sums_K2 is not None:
        sums_K2 += out.kind_sums_K2.to(sums_K2.dtype).to(sums_K2.device)


def action_hits(logits_BLV: torch.Tensor, batch: dict, layout,
                num_choices: int | None = None) -> tuple[int, int]:
    """(correct, total) teacher-forced action predictions: the argmax over the ids a policy
    decodes among (the target kind's range; for discrete actions only its first
    ``num_choices``, the task's actions) equals the expert's action token."""
    targets_BL, kinds_BL = batch["tokens"][:, 1:], batch["kinds"][:, 1:]
    logits_BLV = logits_BLV[:, :-1]
    correct = total = 0
    for kind in ACTION_KINDS:
        sel_BL = batch["loss_mask"][:, 1:] & (kinds_BL == kind)
        if sel_BL.any():
            lo, hi = layout.id_range(kind)
            if kind == Kind.DISCRETE_ACTION and num_choices is not None:
                hi = lo + num_choices
            pred = logits_BLV[sel_BL][:, lo:hi].argmax(-1) + lo
            correct += int((pred == targets_BL[sel_BL]).sum())
            total += int(sel_BL.sum())
    return correct, total


def kind_means(sums_K2: torch.Tensor, prefix: str) -> dict[str, float]:
    return {f"{prefix}{name}": float(sums_K2[k, 0] / sums_K2[k, 1])
            for name, k in KIND_NAMES_INDEX.items() if sums_K2[k, 1] > 0}


class MetricsLog:
    """metrics.jsonl (one object per logged step) and TensorBoard, written by rank 0."""

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # drop the steps after the checkpoint, and a last line cut short by a kill
            keep = [ln for ln in self.path.read_text().splitlines()
                    if (record := _parse_json(ln)) is not None and record.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")  # a kill mid-write must not empty it
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------ trainer
