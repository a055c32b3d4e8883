"""Token kinds, the vocabulary layout, and the tokenized-sequence structure.

Shape letters: N positions of a sequence, P image patches, C=3 patch channels,
S=16 patch side.

Vocabulary (Gato layout, the default, ``discrete_offset="shared"``; ``text_vocab`` is the
SentencePiece model's size — 8192 for the shipped model, 32000 in Gato)::

    [0, text_vocab)                       SentencePiece text ids
    [0, 1024)                             discrete values (share ids with text, as in Gato)
    [text_vocab, text_vocab + 1024)       continuous values, mu-law bins
    text_vocab + 1024                     separator '|'
    text_vocab + 1025                     padding (never a target)

With ``discrete_offset="separate"`` discrete values get their own range after the text
ids, and everything after moves up by 1024::

    [0, text_vocab)                       text
    [text_vocab, text_vocab + 1024)       discrete values
    [text_vocab + 1024, text_vocab + 2048) continuous values
    text_vocab + 2048, + 2049             separator, padding
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal

import numpy as np

NUM_BINS = 1024
PATCH_SIZE = 16
PATCH_CHANNELS = 3


class Kind(enum.IntEnum):
    """Modality of one position. Stored as int8 in ``TokenSequence.kinds``."""

    TEXT = 0
    IMAGE = 1
    DISCRETE_OBS = 2
    CONTINUOUS_OBS = 3
    DISCRETE_ACTION = 4
    CONTINUOUS_ACTION = 5
    SEPARATOR = 6
    PAD = 7


KIND_NAMES = {k: k.name.lower() for k in Kind}
#: positions whose next-token loss counts (Gato: text and actions only)
LOSS_KINDS = (Kind.TEXT, Kind.DISCRETE_ACTION, Kind.CONTINUOUS_ACTION)
ACTION_KINDS = (Kind.DISCRETE_ACTION, Kind.CONTINUOUS_ACTION)
#: local position index given to the separator and every action token of a timestep
#: (Gato: "action tokens all share one position"); the model keeps a separate embedding
ACTION_LOCAL_POS = -1


@dataclasses.dataclass(frozen=True, kw_only=True)
class VocabLayout:
    """Where each kind of value lives in the shared token-id space."""

    text_vocab_size: int = 8192  # the shipped SentencePiece model; Gato used 32000
    num_bins: int = NUM_BINS
    discrete_offset: Literal["shared", "separate"] = "shared"

    def __post_init__(self) -> None:
        if self.text_vocab_size < 1:
            raise ValueError(f"text_vocab_size must be >= 1, got {self.text_vocab_size}")
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {self.num_bins}")
        if self.discrete_offset not in ("shared", "separate"):
            raise ValueError(f"discrete_offset must be 'shared' or 'separate', "
                             f"got {self.discrete_offset!r}")
        if self.discrete_offset == "shared" and self.text_vocab_size < self.num_bins:
            raise ValueError(f"discrete_offset='shared' needs text_vocab_size >= num_bins "
                             f"({self.num_bins}), got {self.text_vocab_size}; use 'separate'")

    @property
    def discrete_start(self) -> int:
        return 0 if self.discrete_offset == "shared" else self.text_vocab_size

    @property
    def continuous_start(self) -> int:
        if self.discrete_offset == "shared":
            return self.text_vocab_size
        return self.text_vocab_size + self.num_bins

    @property
    def separator_id(self) -> int:
        return self.continuous_start + self.num_bins

    @property
    def pad_id(self) -> int:
        return self.separator_id + 1

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding table."""
        return self.pad_id + 1

    def id_range(self, kind: Kind) -> tuple[int, int]:
        """Half-open id range ``[lo, hi)`` a position of ``kind`` may hold."""
        kind = Kind(kind)
        if kind == Kind.TEXT:
            return 0, self.text_vocab_size
        if kind in (Kind.DISCRETE_OBS, Kind.DISCRETE_ACTION):
            return self.discrete_start, self.discrete_start + self.num_bins
        if kind in (Kind.CONTINUOUS_OBS, Kind.CONTINUOUS_ACTION):
            return self.continuous_start, self.continuous_start + self.num_bins
        if kind == Kind.SEPARATOR:
            return self.separator_id, self.separator_id + 1
        if kind == Kind.PAD:
            return self.pad_id, self.pad_id + 1
        return 0, 1  # IMAGE positions hold a placeholder id 0; the patch is the input


_FIELDS = ("tokens", "kinds", "local_pos", "loss_mask", "timestep", "image_rc")


@dataclasses.dataclass(kw_only=True)
class TokenSequence:
    """A tokenized episode (or a packed training sequence), one entry per position.

    tokens     (N,) int64   token id; 0 at image positions (the patch is the input there)
    kinds      (N,) int8    ``Kind`` of the position
    local_pos  (N,) int32   index within the timestep's observation; ``ACTION_LOCAL_POS``
                            (-1) for the separator and actions; text documents count up
    loss_mask  (N,) bool    True only for text and action tokens
    timestep   (N,) int32   timestep index within its episode (-1 for padding)
    image_rc   (N, 4) float32  normalized patch interval (row_lo, row_hi, col_lo, col_hi)
                            in [0, 1]; zeros where the position is no image patch
    patches    (P, 3, 16, 16) float32  pixels of the image positions, in position order,
                            scaled to [-1, 1] then divided by 4
    """

    tokens: np.ndarray
    kinds: np.ndarray
    local_pos: np.ndarray
    loss_mask: np.ndarray
    timestep: np.ndarray
    image_rc: np.ndarray
    patches: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.tokens)
        for name in _FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"TokenSequence.{name} has {len(getattr(self, name))} "
                                 f"positions, tokens has {n}")
        num_images = int(np.count_nonzero(self.kinds == Kind.IMAGE))
        if self.patches.shape[0] != num_images:
            raise ValueError(f"TokenSequence.patches has {self.patches.shape[0]} patches but "
                             f"{num_images} positions are images")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def empty(cls) -> "TokenSequence":
        return cls(tokens=np.zeros(0, np.int64), kinds=np.zeros(0, np.int8),
                   local_pos=np.zeros(0, np.int32), loss_mask=np.zeros(0, bool),
                   timestep=np.zeros(0, np.int32), image_rc=np.zeros((0, 4), np.float32),
                   patches=np.zeros((0, PATCH_CHANNELS, PATCH_SIZE, PATCH_SIZE), np.float32))

    @classmethod
    def concat(cls, parts: list["TokenSequence"]) -> "TokenSequence":
        if not parts:
            return cls.empty()
        kw = {name: np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS}
        kw["patches"] = np.concatenate([p.patches for p in parts])
        return cls(**kw)

    def slice(self, start: int, stop: int) -> "TokenSequence":
        """Positions ``[start, stop)``, with the patches that belong to them."""
        is_img = self.kinds == Kind.IMAGE
        p0 = int(np.count_nonzero(is_img[:start]))
        p1 = p0 + int(np.count_nonzero(is_img[start:stop]))
        kw = {name: getattr(self, name)[start:stop] for name in _FIELDS}
        return TokenSequence(**kw, patches=self.patches[p0:p1])

    def pad_to(self, length: int, layout: VocabLayout) -> "TokenSequence":
        """Right-pads with ``Kind.PAD`` positions (loss mask False) up to ``length``."""
        n = len(self)
        if n > length:
            raise ValueError(f"sequence of {n} positions is longer than {length}")
        k = length - n
        pad = TokenSequence(
            tokens=np.full(k, layout.pad_id, np.int64), kinds=np.full(k, Kind.PAD, np.int8),
            local_pos=np.zeros(k, np.int32), loss_mask=np.zeros(k, bool),
            timestep=np.full(k, -1, np.int32), image_rc=np.zeros((k, 4), np.float32),
            patches=np.zeros((0, PATCH_CHANNELS, PATCH_SIZE, PATCH_SIZE), np.float32))
        return TokenSequence.concat([self, pad])


def collate(seqs: list[TokenSequence]) -> dict:
    """Stacks equal-length sequences into the model's batch (torch tensors).

    tokens (B, L) int64, kinds (B, L) int64, local_pos (B, L) int64, loss_mask (B, L) bool,
    timestep (B, L) int64, image_rc (B, L, 4) float32, and patches (P, 3, 16, 16) float32 —
    the patches of every image position in row-major (b, l) order.
    """
    import torch

    if not seqs:
        raise ValueError("collate needs at least one sequence")
    lengths = {len(s) for s in seqs}
    if len(lengths) != 1:
        raise ValueError(f"collate needs sequences of one length (pad them), got {sorted(lengths)}")
    batch = {name: torch.from_numpy(np.stack([getattr(s, name) for s in seqs])) for name in _FIELDS}
    for name in ("kinds", "local_pos", "timestep"):
        batch[name] = batch[name].long()
    batch["patches"] = torch.from_numpy(np.concatenate([s.patches for s in seqs]))
    return batch
