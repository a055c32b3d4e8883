"""Images -> 16x16 patches in raster order, as Gato specifies them.

Shape letters: T timesteps, H height, W width, C channels (1 or 3 in, always 3 out),
R patch rows, Q patch columns, S = 16 patch side.

Pixels are scaled to [-1, 1] (uint8: x / 255 * 2 - 1; float images must lie in [0, 1])
then divided by 4 (sqrt of the patch size). Grey images are repeated over 3 channels so
that one patch embedding serves every domain. Sides that are not multiples of 16 are
zero-padded at the bottom and right (black, i.e. -1/4 after scaling); each patch's
normalized interval is measured against the unpadded image, so the last row/column of
patches ends at 1.0.
"""

from __future__ import annotations

import numpy as np

from moe_gato.tokenizer.layout import PATCH_CHANNELS, PATCH_SIZE


def validate_images(images_THWC: np.ndarray, key: str) -> np.ndarray:
    """Checks rank, channels, dtype and range; returns (T, H, W, C) with C in {1, 3}."""
    x = np.asarray(images_THWC)
    if x.ndim == 3:  # (T, H, W) grey
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"observation {key!r}: an image stack must be (T, H, W) or (T, H, W, C), "
                         f"got shape {x.shape}")
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"observation {key!r}: images need 1 or 3 channels (last axis), "
                         f"got {x.shape[-1]}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"observation {key!r}: image sides must be positive, got {x.shape[1:3]}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"observation {key!r}: images must be uint8 or float in [0, 1], "
                         f"got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"observation {key!r}: image holds NaN or inf")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"observation {key!r}: float images must lie in [0, 1], "
                         f"got [{x.min()}, {x.max()}]")
    return x


def images_to_patches(images_THWC: np.ndarray, key: str = "image"):
    """(T, H, W, C) -> patches (T, R*Q, 3, 16, 16) float32 and intervals (R*Q, 4) float32.

    Intervals are (row_lo, row_hi, col_lo, col_hi) normalized by the unpadded size.
    """
    x = validate_images(images_THWC, key)
    T, H, W, C = x.shape
    R, Q = -(-H // PATCH_SIZE), -(-W // PATCH_SIZE)
    if x.dtype == np.uint8:
        scaled = x.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    else:
        scaled = x.astype(np.float32) * np.float32(2.0) - np.float32(1.0)
    scaled *= np.float32(0.25)
    if C == 1:
        scaled = np.repeat(scaled, PATCH_CHANNELS, axis=-1)
    if (R * PATCH_SIZE, Q * PATCH_SIZE) != (H, W):
        padded = np.full((T, R * PATCH_SIZE, Q * PATCH_SIZE, PATCH_CHANNELS), -0.25, np.float32)
        padded[:, :H, :W] = scaled
        scaled = padded
    p = scaled.reshape(T, R, PATCH_SIZE, Q, PATCH_SIZE, PATCH_CHANNELS)
    p = p.transpose(0, 1, 3, 5, 2, 4).reshape(T, R * Q, PATCH_CHANNELS, PATCH_SIZE, PATCH_SIZE)
    rows = np.arange(R, dtype=np.float32)
    cols = np.arange(Q, dtype=np.float32)
    row_lo = rows * PATCH_SIZE / H
    row_hi = np.minimum((rows + 1) * PATCH_SIZE, H) / H
    col_lo = cols * PATCH_SIZE / W
    col_hi = np.minimum((cols + 1) * PATCH_SIZE, W) / W
    rc = np.stack([np.repeat(row_lo, Q), np.repeat(row_hi, Q),
                   np.tile(col_lo, R), np.tile(col_hi, R)], axis=1).astype(np.float32)
    return np.ascontiguousarray(p), rc
