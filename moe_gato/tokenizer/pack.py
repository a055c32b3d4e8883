"""Prompt conditioning and packing to the context length.

Gato (Reed et al. 2022, section 3.3): 25% of training sequences are prefixed with a
demonstration of the same task — half the time taken from the end of an episode (which
shows the goal), half the time a window sampled uniformly. The rest of the context is a
window of the episode itself. Windows start at a timestep boundary so that a sequence
never begins inside an observation; the end is truncated where the context is full, and a
short sequence is padded with ``Kind.PAD`` (never a target).

A text document has no timesteps: its window starts anywhere and its local positions are
renumbered from 0.
"""

from __future__ import annotations

import numpy as np

from moe_gato.tokenizer.layout import Kind, TokenSequence, VocabLayout

PROMPT_PROB = 0.25
CONTEXT_LEN = 1024


def timestep_starts(seq: TokenSequence) -> np.ndarray:
    """Positions where a new timestep begins (always includes 0 for a non-empty sequence)."""
    if len(seq) == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([[0], np.flatnonzero(np.diff(seq.timestep) != 0) + 1])


def _is_document(seq: TokenSequence) -> bool:
    return bool(len(seq)) and bool((seq.kinds == Kind.TEXT).all()) and bool((seq.timestep == 0).all())


def _window(seq: TokenSequence, length: int, rng: np.random.Generator,
            mode: str = "uniform") -> TokenSequence:
    """At most ``length`` positions of ``seq``: from its end ("end") or a uniform start."""
    if len(seq) <= length:
        return seq
    if _is_document(seq):
        start = len(seq) - length if mode == "end" else int(rng.integers(0, len(seq) - length + 1))
        win = seq.slice(start, start + length)
        win.local_pos = np.arange(length, dtype=np.int32)
        return win
    starts = timestep_starts(seq)
    if mode == "end":
        fits = starts[starts >= len(seq) - length]
        start = int(fits[0]) if len(fits) else int(starts[-1])
    else:
        full = starts[starts <= len(seq) - length]  # windows that fill the budget
        start = int(rng.choice(full)) if len(full) else 0
    return seq.slice(start, min(start + length, len(seq)))


def make_training_sequence(episode: TokenSequence, prompt_episodes: list[TokenSequence],
                           rng: np.random.Generator, context_len: int = CONTEXT_LEN,
                           prompt_prob: float = PROMPT_PROB, layout: VocabLayout | None = None,
                           max_prompt_fraction: float = 0.5) -> TokenSequence:
    """One training sequence of exactly ``context_len`` positions.

    With probability ``prompt_prob`` (and a non-empty ``prompt_episodes``) a demonstration
    of at most ``max_prompt_fraction * context_len`` positions is prefixed: with equal
    chance the end of a prompt episode or a uniform window of it. The prompt's loss mask is
    kept (Gato trains on prompt actions too).
    """
    if context_len < 2:
        raise ValueError(f"context_len must be >= 2, got {context_len}")
    if not 0.0 <= prompt_prob <= 1.0:
        raise ValueError(f"prompt_prob must lie in [0, 1], got {prompt_prob}")
    if not 0.0 < max_prompt_fraction < 1.0:
        raise ValueError(f"max_prompt_fraction must lie in (0, 1), got {max_prompt_fraction}")
    if len(episode) == 0:
        raise ValueError("episode is empty")
    layout = layout or VocabLayout()
    parts = []
    if prompt_episodes and rng.random() < prompt_prob:
        demo = prompt_episodes[int(rng.integers(len(prompt_episodes)))]
        mode = "end" if rng.random() < 0.5 else "uniform"
        budget = int(context_len * max_prompt_fraction)
        parts.append(_window(demo, budget, rng, mode))
    used = sum(len(p) for p in parts)
    parts.append(_window(episode, context_len - used, rng, "uniform"))
    seq = TokenSequence.concat(parts)
    if len(seq) > context_len:  # a single timestep longer than the budget
        seq = seq.slice(0, context_len)
    return seq.pad_to(context_len, layout)


def pack_sequences(seqs: list[TokenSequence], context_len: int = CONTEXT_LEN,
                   layout: VocabLayout | None = None) -> list[TokenSequence]:
    """Greedily concatenates whole sequences into contexts of ``context_len`` (padding the
    rest); a sequence longer than the context is cut into consecutive windows."""
    layout = layout or VocabLayout()
    out, current, size = [], [], 0
    pieces = []
    for s in seqs:
        pieces += [s.slice(i, min(i + context_len, len(s))) for i in range(0, len(s), context_len)]
    for p in pieces:
        if size + len(p) > context_len:
            out.append(TokenSequence.concat(current).pad_to(context_len, layout))
            current, size = [], 0
        current.append(p)
        size += len(p)
    if current:
        out.append(TokenSequence.concat(current).pad_to(context_len, layout))
    return out
