"""Launcher helpers shared by the dispatch kernels: device checks, index width, block sizes.

Shape letters: T tokens, K top-k slots per token, D width, F output width, E experts,
R rows of the expert-contiguous (permuted) buffer.
"""

from __future__ import annotations

import os

import torch

INT32_MAX = 2**31 - 1
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def interpreting() -> bool:
    """True when Triton runs as its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(name: str, t: torch.Tensor) -> None:
    """Compiled Triton needs CUDA tensors; the interpreter needs CPU tensors."""
    if interpreting():
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; with TRITON_INTERPRET=1 the Triton "
                             "kernels run as the interpreter and need CPU tensors")
    elif t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}; impl='triton' needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 for CPU tensors)")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must share one device, got {devices}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: {', '.join(map(str, allowed))}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, letters: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D ({letters}), got shape {tuple(t.shape)}")


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether some element offset (sum of index * stride) may exceed int32."""
    for t in tensors:
        if t.numel() == 0:
            continue
        last = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
        if last >= INT32_MAX or t.numel() >= INT32_MAX:
            return True
    return False


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]."""
    p = 1 << max(0, (max(int(n), 1) - 1).bit_length())
    p = max(p, lo)
    return min(p, hi) if hi is not None else p
