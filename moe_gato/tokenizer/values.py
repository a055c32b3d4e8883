"""Continuous and discrete values <-> token ids, as Gato specifies them.

Continuous: mu-law F(x) = sgn(x) * log(|x| * mu + 1) / log(M * mu + 1), mu = 100, M = 256,
clipped to [-1, 1], then 1024 uniform bins over [-1, 1], shifted to the layout's continuous
range. Decoding maps a bin to its centre and inverts mu-law.
Discrete: integers in [0, 1024), shifted to the layout's discrete range (0 in Gato's layout).

Every function takes numpy arrays or torch tensors and returns the same kind.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moe_gato.tokenizer.layout import NUM_BINS, VocabLayout

MU = 100.0
M = 256.0


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def mu_law_encode(x, mu: float = MU, M: float = M):
    """F(x) = sgn(x) * log(|x| mu + 1) / log(M mu + 1), clipped to [-1, 1]."""
    denom = math.log(M * mu + 1.0)
    if _is_torch(x):
        x = x.double() if not x.is_floating_point() else x
        return (torch.sign(x) * torch.log1p(x.abs() * mu) / denom).clamp(-1.0, 1.0)
    x = np.asarray(x, dtype=np.float64 if np.asarray(x).dtype == np.float64 else np.float32)
    return np.clip(np.sign(x) * np.log1p(np.abs(x) * mu) / denom, -1.0, 1.0).astype(x.dtype)


def mu_law_decode(y, mu: float = MU, M: float = M):
    """Inverse of ``mu_law_encode`` on [-1, 1]: sgn(y) * ((M mu + 1)^|y| - 1) / mu."""
    base = M * mu + 1.0
    if _is_torch(y):
        y = y.double() if not y.is_floating_point() else y
        return torch.sign(y) * torch.expm1(y.abs() * math.log(base)) / mu
    y = np.asarray(y, dtype=np.float64 if np.asarray(y).dtype == np.float64 else np.float32)
    return (np.sign(y) * np.expm1(np.abs(y) * math.log(base)) / mu).astype(y.dtype)


def bin_index(y, num_bins: int = NUM_BINS):
    """[-1, 1] -> bin in [0, num_bins): floor((y + 1) / 2 * num_bins), 1.0 goes to the last."""
    if _is_torch(y):
        return torch.floor((y + 1.0) * (num_bins / 2.0)).long().clamp(0, num_bins - 1)
    return np.clip(np.floor((y + 1.0) * (num_bins / 2.0)), 0, num_bins - 1).astype(np.int64)


def bin_centre(b, num_bins: int = NUM_BINS):
    """Bin -> its centre in [-1, 1]: (b + 0.5) * 2 / num_bins - 1."""
    if _is_torch(b):
        return (b.double() + 0.5) * (2.0 / num_bins) - 1.0
    return (np.asarray(b, np.float64) + 0.5) * (2.0 / num_bins) - 1.0


def continuous_to_tokens(x, layout: VocabLayout, *, mu_law: bool = True):
    """Real values -> token ids in the layout's continuous range (same shape). Computed in
    float64 so that values next to a bin edge land in the same bin whatever their dtype."""
    x = x.double() if _is_torch(x) else np.asarray(x, np.float64)
    y = mu_law_encode(x) if mu_law else (x.clamp(-1, 1) if _is_torch(x) else np.clip(x, -1, 1))
    return bin_index(y, layout.num_bins) + layout.continuous_start


def tokens_to_continuous(ids, layout: VocabLayout, *, mu_law: bool = True):
    """Continuous token ids -> bin centres through the inverse mu-law (float64)."""
    lo, hi = layout.continuous_start, layout.continuous_start + layout.num_bins
    _check_range(ids, lo, hi, "continuous token ids")
    y = bin_centre(ids - lo, layout.num_bins)
    return mu_law_decode(y) if mu_law else y


def discrete_to_tokens(v, layout: VocabLayout):
    """Integers in [0, num_bins) -> token ids in the layout's discrete range."""
    _check_range(v, 0, layout.num_bins, "discrete values")
    if _is_torch(v):
        return v.long() + layout.discrete_start
    return np.asarray(v, np.int64) + layout.discrete_start


def tokens_to_discrete(ids, layout: VocabLayout):
    lo = layout.discrete_start
    _check_range(ids, lo, lo + layout.num_bins, "discrete token ids")
    return ids - lo


def _check_range(v, lo: int, hi: int, what: str) -> None:
    if _is_torch(v):
        if v.numel() and (int(v.min()) < lo or int(v.max()) >= hi):
            raise ValueError(f"{what} must lie in [{lo}, {hi}), got min {int(v.min())} "
                             f"max {int(v.max())}")
        return
    v = np.asarray(v)
    if v.size and (v.min() < lo or v.max() >= hi):
        raise ValueError(f"{what} must lie in [{lo}, {hi}), got min {v.min()} max {v.max()}")
