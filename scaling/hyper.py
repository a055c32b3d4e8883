"""The rule that sets a run's learning rate, batch and warm-up from its compute and size,
for designed sweeps (``hyper:`` in a sweep config) and for ``moe-gato plan``.

    rule = HyperRule()
    rule.lr(C, N), rule.batch_sequences(C, context), rule.warmup_steps(steps)

Exponents from DeepSeek LLM (Bi et al. 2024, their Eq. 1, fitted on IsoFLOP runs of
1e17-3e20 FLOPs): the optimal learning rate falls as C^-0.125 and the optimal batch (in
tokens) grows as C^0.3271, with the optimum nearly flat in model size at a given compute.
The anchor is this project's tuned recipe (configs/train/tiny-moe.yaml, issue 10): lr 2e-3,
8 x 576 = 4608 tokens per step, 1000 steps of a 2.22M-active-parameter model = 7.07e13
training FLOPs (the model's own accounting), warm-up 5% of the steps (50 of 1000). So

    lr(C, N)      = ref_lr (C / ref_compute)^lr_exp (N / ref_params)^lr_size_exp
    batch(C)      = ref_batch_tokens (C / ref_compute)^batch_exp tokens, whole sequences
    warm-up steps = max(min_warmup_steps, warmup_fraction x steps)

``lr_size_exp`` is 0 (DeepSeek's finding); -1 would give a muP-like 1 / width rule. Far
from the anchor the rule is an extrapolation of a text-LM result; it is a starting point a
sweep's seeds and held-out errors can check, not a tuned optimum.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(kw_only=True)
class HyperRule:
    ref_compute: float = 7.07e13        # training FLOPs of the anchor recipe
    ref_params: float = 2.22e6          # its active parameters
    ref_lr: float = 2e-3
    ref_batch_tokens: float = 4608.0    # 8 sequences of 576 tokens
    lr_exp: float = -0.125              # DeepSeek LLM: eta_opt ~ C^-0.125
    lr_size_exp: float = 0.0
    batch_exp: float = 0.3271           # DeepSeek LLM: B_opt ~ C^0.3271
    warmup_fraction: float = 0.05       # the anchor's 50 of 1000 steps
    min_warmup_steps: int = 1
    min_batch_sequences: int = 1
    max_batch_sequences: int = 65536

    def __post_init__(self) -> None:
        for field in ("ref_compute", "ref_params", "ref_lr", "ref_batch_tokens"):
            if not getattr(self, field) > 0:
                raise ValueError(f"hyper.{field} must be > 0, got {getattr(self, field)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"hyper.warmup_fraction must be in [0, 1), got "
                             f"{self.warmup_fraction}")
        if self.min_warmup_steps < 0:
            raise ValueError(f"hyper.min_warmup_steps must be >= 0, got {self.min_warmup_steps}")
        if not 1 <= self.min_batch_sequences <= self.max_batch_sequences:
            raise ValueError(f"hyper.min_batch_sequences ({self.min_batch_sequences}) must be "
                             f">= 1 and <= max_batch_sequences ({self.max_batch_sequences})")

    def lr(self, compute: float, params: float) -> float:
        """Peak learning rate of a run of ``compute`` FLOPs and ``params`` active parameters."""
        return (self.ref_lr * (compute / self.ref_compute) ** self.lr_exp
                * (params / self.ref_params) ** self.lr_size_exp)

    def batch_tokens(self, compute: float) -> float:
        return self.ref_batch_tokens * (compute / self.ref_compute) ** self.batch_exp

    def batch_sequences(self, compute: float, context: int, multiple_of: int = 1) -> int:
        """Sequences per optimizer step: the rule's tokens in whole sequences of
        ``context``, within [min, max], rounded up to a multiple of ``multiple_of``."""
        n = round(self.batch_tokens(compute) / context)
        n = min(max(n, self.min_batch_sequences), self.max_batch_sequences)
        return max(multiple_of, math.ceil(n / multiple_of) * multiple_of)

    def warmup_steps(self, steps: int) -> int:
        return max(self.min_warmup_steps, round(self.warmup_fraction * steps))
