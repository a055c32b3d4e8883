"""Where a token sits: its position among a row's tokens and its timestep, and the two
position signals attention can use (``ModelConfig.positions``).

Shape letters: B rows, L positions of this call, S keys (cache slots), H heads, Dh head
width, d = Dh / 2 rotary frequencies.

Gato has only local positions (within a timestep's observation). With many timesteps in
context nothing then tells a query which observation tokens are the current ones, and a
policy can only average over its past (docs/recipe.md). Two relative signals, both
computed from *coordinates* that count valid tokens only, so that padding, a prompt and an
evicted cache slot are numbered exactly as in the window the model was trained on:

- ``pos``: the index of a token among the valid tokens of its row;
- ``step``: the index of its timestep: +1 at every position that opens a timestep
  (``timestep_starts``: the first observation token, local position 0).

``rope``: rotary embeddings of ``pos`` on queries and keys (Su et al. 2021). Only
differences of positions reach the attention scores; angles are computed in float64, so
that positions far beyond float32's exact integers still rotate correctly.
``timestep_bias``: a fixed per-head bias ``-slope_h * (step_q - step_k)`` on the scores
(ALiBi, Press et al. 2022, over timesteps instead of tokens): head 0 has slope 0 and sees
every timestep alike, the others look back over fewer and fewer timesteps.
"""

from __future__ import annotations

import math

import torch

from moe_gato.tokenizer.layout import ACTION_KINDS, Kind

POSITIONS = ("none", "rope", "timestep_bias")
#: kinds that never open a timestep (actions and the separator close one; padding has none)
_NOT_OPENING = (Kind.SEPARATOR, Kind.PAD, *ACTION_KINDS)


def timestep_starts(kinds_BL: torch.Tensor, local_pos_BL: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the position opens a timestep (local position 0 of an observation, a
    caption or a text document). Unlike a change of the stored timestep label this also
    separates a prompt's last timestep from an episode's first when both carry one label."""
    opens_BL = local_pos_BL == 0
    for kind in _NOT_OPENING:
        opens_BL = opens_BL & (kinds_BL != kind)
    return opens_BL


def coordinates(starts_BL: torch.Tensor, valid_BL: torch.Tensor | None = None,
                last_pos_B: torch.Tensor | None = None,
                last_step_B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_BL, step_BL) int64: each position's index among its row's valid positions and
    its timestep's index, continuing from a row's last valid position (``last_pos_B``,
    ``last_step_B``; default -1: a fresh row). Invalid positions repeat their
    predecessor's numbers (they are masked out of attention)."""
    counted_BL = torch.ones_like(starts_BL) if valid_BL is None else valid_BL
    pos_BL = counted_BL.long().cumsum(1)
    step_BL = (starts_BL & counted_BL).long().cumsum(1)
    first_pos = -1 if last_pos_B is None else last_pos_B[:, None]
    first_step = -1 if last_step_B is None else last_step_B[:, None]
    return pos_BL + first_pos, step_BL + first_step


class Rotary:
    """Rotary position embedding over the whole head width, in half-split layout: channel
    ``i`` and ``i + d`` rotate together by ``pos * base ** (-i / d)``. Holds no tensor, so
    that casting a model to bf16 cannot coarsen its frequencies."""

    def __init__(self, head_dim: int, base: float):
        if head_dim % 2:
            raise ValueError(f"positions='rope' needs an even head width, got {head_dim}")
        self.d, self.base = head_dim // 2, float(base)

    def angles(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``pos * inv_freq`` for integer positions of any shape (..., ) ->
        (..., d), computed in float64 and returned in ``dtype``."""
        inv_freq_d = self.base ** (-torch.arange(self.d, dtype=torch.float64,
                                                 device=pos.device) / self.d)
        theta = pos.to(torch.float64)[..., None] * inv_freq_d
        return theta.cos().to(dtype), theta.sin().to(dtype)

    def cos_sin(self, pos_BL: torch.Tensor, dtype: torch.dtype = torch.float32):
        """(B, 1, L, d) cos and sin, broadcast over heads."""
        cos_BLd, sin_BLd = self.angles(pos_BL, dtype)
        return cos_BLd[:, None], sin_BLd[:, None]


def rotate(x_BHLD: torch.Tensor, cos_B1Ld: torch.Tensor, sin_B1Ld: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (i, i + d) of the last axis by the given angles."""
    d = x_BHLD.shape[-1] // 2
    x1, x2 = x_BHLD[..., :d], x_BHLD[..., d:]
    cos, sin = cos_B1Ld.to(x_BHLD.dtype), sin_B1Ld.to(x_BHLD.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def step_slopes(num_heads: int) -> torch.Tensor:
    """(H,) slopes of ``timestep_bias``: 0 for head 0, then geometric from 8 down to 1/32
    (per timestep of distance: 8 keeps a head on the current timestep, 1/32 spreads it over
    ~100 timesteps)."""
    if num_heads == 1:
        return torch.zeros(1)
    k = torch.arange(num_heads - 1, dtype=torch.float64)
    rest = 8.0 * (1 / 256) ** (k / max(num_heads - 2, 1))
    return torch.cat([torch.zeros(1, dtype=torch.float64), rest]).float()


def step_bias_mask(mask_B1LS: torch.Tensor, step_q_BL: torch.Tensor, step_k_BS: torch.Tensor,
                   slopes_H: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, L, S) additive attention mask: ``-slope_h * (step_q - step_k)`` where the
    boolean ``mask_B1LS`` lets a query see a key, -inf elsewhere."""
    dist_B1LS = (step_q_BL[:, None, :, None] - step_k_BS[:, None, None, :]).clamp(min=0)
    bias_BHLS = -slopes_H.to(dtype)[None, :, None, None] * dist_B1LS.to(dtype)
    return bias_BHLS.masked_fill(~mask_B1LS, -math.inf)
