"""What a training step minimises, as a part the loop takes (``Trainer(objective=...)``).

    objective = LanguageModelLoss()                   # the default
    part = objective(model, batch)                    # -> ObjectivePart
    loss = part.loss * targets / step_targets + part.aux / accumulation

An objective runs the model on one micro-batch and returns ``loss``: the mean over that
micro-batch's target tokens (``batch["loss_mask"][:, 1:]``), which the loop weights by the
micro-batch's share of the step's targets so that any split over ranks and micro-batches
gives the same gradients; ``aux``: terms already averaged per micro-batch (the MoE
load-balancing and z losses); ``out``: the model's output, for the per-kind losses and
routing metrics; ``parts``: named per-target means to log, averaged over the step's
micro-batches by their targets like the loss (``objective/<name>``, this rank's). Distillation (a teacher's soft targets beside the hard ones) is the
next objective.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class ObjectivePart:
    loss: torch.Tensor                      # mean over this micro-batch's targets
    aux: torch.Tensor                       # added as is (per micro-batch, before averaging)
    out: object                             # the model's output
    parts: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


class LanguageModelLoss:
    """Gato's objective: next-token cross-entropy on the text and action targets, plus the
    MoE auxiliary losses the model computes. ``logits``: where the head runs ("all"
    positions, only the "targets", or "fused" with the cross-entropy;
    ``TrainConfig.head_logits``)."""

    def __init__(self, logits: str = "all") -> None:
        if logits not in ("all", "targets", "fused"):
            raise ValueError(f"logits must be 'all', 'targets' or 'fused', got {logits!r}")
        self.logits = logits

    def __call__(self, model, batch: dict) -> ObjectivePart:
        # the keyword only when it asks for something: any model takes the plain call
        out = model(batch) if self.logits == "all" else model(batch, logits=self.logits)
        return ObjectivePart(loss=out.lm_loss, aux=out.aux_loss + out.z_loss, out=out)
