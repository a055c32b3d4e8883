"""Micro-batches built ahead of the training step by worker processes.

A training micro-batch is the collated sequences ``[start, start + size)`` of a
``SequenceLoader``, a pure function of the indices; on a GPU, building them in the training
process (~500 sequences/s on one core at context 576) leaves the card idle between steps.
``Prefetcher`` hands the same batches out of ``workers`` processes, each holding its own
loader, in the order the trainer will ask for them (``starts``), ``ahead`` batches per
worker in flight. ``take(start)`` checks that the batch is the one asked for, so a
trainer whose order drifted from the plan fails instead of training on other data.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


class MicroBatches(torch.utils.data.Dataset):
    """Item ``start`` = (start, the collated sequences ``[start, start + size)``); the
    loader is opened lazily, once per worker process."""

    def __init__(self, mixture, *, seed: int, data_dir: str | Path, size: int) -> None:
        self.mixture, self.seed, self.data_dir, self.size = mixture, seed, str(data_dir), size
        self.loader = None

    def __getitem__(self, start: int):
        from moe_gato.data.loader import SequenceLoader

        if self.loader is None:
            self.loader = SequenceLoader(self.mixture, split="train", seed=self.seed,
                                         data_dir=self.data_dir)
        return start, self.loader.batch(start, self.size)


class Prefetcher:
    def __init__(self, mixture, *, seed: int, data_dir: str | Path, size: int,
                 starts: Iterable[int], workers: int, ahead: int = 4,
                 pin_memory: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        self._batches = torch.utils.data.DataLoader(
            MicroBatches(mixture, seed=seed, data_dir=data_dir, size=size),
            sampler=list(starts), batch_size=None, num_workers=workers, prefetch_factor=ahead,
            pin_memory=pin_memory)
        self._iter = iter(self._batches)

    def take(self, start: int) -> dict:
        """The next planned micro-batch, which must begin at sequence ``start``."""
        try:
            got, batch = next(self._iter)
        except StopIteration:
            raise RuntimeError(f"the prefetch plan ended before the micro-batch at sequence "
                               f"{start}") from None
        if int(got) != start:
            raise RuntimeError(f"the prefetched micro-batch begins at sequence {int(got)}, the "
                               f"trainer asked for {start}: the plan and the loop disagree")
        return batch

    def close(self) -> None:
        """Stops the workers (also done when the prefetcher is dropped)."""
        self._iter = None
        self._batches = None
