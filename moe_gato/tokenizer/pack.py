"""Prompt conditioning and packing to the context length.

Gato (Reed et al. 2022, section 3.3): 25% of training sequences are prefixed with a
demonstration of the same task — half the time taken from the end of an episode (which
shows the goal), half the time a window sampled uniformly. The rest of the context is a
window of the episode itself. Prompt and window are made of whole timesteps
(``whole_timesteps``), so every sequence holds targets; the prompt mode is drawn once per
sequence (``draw_prompt_mode``). A short sequence is padded with ``Kind.PAD`` (never a
target).

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


def _document_window(seq: TokenSequence, length: int, rng: np.random.Generator) -> TokenSequence:
    start = int(rng.integers(0, len(seq) - length + 1))
    win = seq.slice(start, start + length)
    win.local_pos = np.arange(length, dtype=np.int32)
    return win


def whole_timesteps(seq: TokenSequence, length: int, rng: np.random.Generator,
                    mode: str = "uniform") -> tuple[int, int]:
    """Positions ``[a, b)`` of the longest run of whole timesteps of ``seq`` that fits
    ``length``: ending at the episode's end ("end") or starting at a uniformly drawn
    timestep ("uniform"; among the starts whose window fills the budget when there are
    any). ``(0, 0)`` when not even one timestep fits."""
    if mode not in ("end", "uniform"):
        raise ValueError(f"mode must be 'end' or 'uniform', got {mode!r}")
    if len(seq) <= length:
        return 0, len(seq)
    starts = timestep_starts(seq)
    bounds = np.append(starts, len(seq))  # timestep i spans [bounds[i], bounds[i + 1])
    if mode == "end":
        fits = starts[starts >= len(seq) - length]
        return (int(fits[0]), len(seq)) if len(fits) else (0, 0)
    # the last boundary at or before start + length, for every start
    stop = bounds[np.searchsorted(bounds, starts + length, side="right") - 1]
    ok = stop > starts
    full = ok & (starts <= len(seq) - length)
    pool = np.flatnonzero(full if full.any() else ok)
    if not len(pool):
        return 0, 0
    i = int(rng.choice(pool))
    return int(starts[i]), int(stop[i])


def draw_prompt_mode(rng: np.random.Generator, prompt_prob: float) -> str | None:
    """Gato's prompt draw, made once per sequence: None (no prompt) with probability
    ``1 - prompt_prob``, else "end" or "uniform" with equal chance."""
    if rng.random() >= prompt_prob:
        return None
    return "end" if rng.random() < 0.5 else "uniform"


def make_training_sequence(episode: TokenSequence, prompt_episodes: list[TokenSequence],
                           rng: np.random.Generator, context_len: int = CONTEXT_LEN,
                           prompt_prob: float = PROMPT_PROB, layout: VocabLayout | None = None,
                           max_prompt_fraction: float = 0.5, prompt_mode: str | None = "draw",
                           info: dict | None = None) -> TokenSequence:
    """One training sequence of exactly ``context_len`` positions, made of whole timesteps.

    A demonstration of at most ``max_prompt_fraction * context_len`` positions is
    prefixed with probability ``prompt_prob`` (when ``prompt_episodes`` is non-empty):
    with equal chance the end of a prompt episode or a uniform window of it. A caller that
    has already drawn the mode (the loader crops long episodes by it) passes
    ``prompt_mode`` ("end", "uniform" or None for no prompt) instead of "draw". A prompt
    with no whole timestep inside its budget is left out, so every sequence has targets.
    The prompt's loss mask is kept (Gato trains on prompt actions too).

    ``info``, when given, receives ``prompt_mode`` (as used), ``prompt_span`` and
    ``episode_span`` (positions ``[a, b)`` taken from the prompt episode and the episode).
    A single timestep longer than ``context_len`` is an error.
    """
    if context_len < 2:
        raise ValueError(f"context_len must be >= 2, got {context_len}")
    if not 0.0 <= prompt_prob <= 1.0:
        raise ValueError(f"prompt_prob must lie in [0, 1], got {prompt_prob}")
    if not 0.0 < max_prompt_fraction < 1.0:
        raise ValueError(f"max_prompt_fraction must lie in (0, 1), got {max_prompt_fraction}")
    if prompt_mode not in ("draw", "end", "uniform", None):
        raise ValueError(f"prompt_mode must be 'draw', 'end', 'uniform' or None, "
                         f"got {prompt_mode!r}")
    if len(episode) == 0:
        raise ValueError("episode is empty")
    layout = layout or VocabLayout()
    info = {} if info is None else info
    if _is_document(episode):
        seq = episode if len(episode) <= context_len else \
            _document_window(episode, context_len, rng)
        info.update(prompt_mode=None, prompt_span=(0, 0), episode_span=None)
        return seq.pad_to(context_len, layout)
    mode = draw_prompt_mode(rng, prompt_prob) if prompt_mode == "draw" else prompt_mode
    parts, prompt_span = [], (0, 0)
    if prompt_episodes and mode is not None:
        demo = prompt_episodes[int(rng.integers(len(prompt_episodes)))]
        prompt_span = whole_timesteps(demo, int(context_len * max_prompt_fraction), rng, mode)
        if prompt_span[1] > prompt_span[0]:
            parts.append(demo.slice(*prompt_span))
        else:
            mode = None  # no whole timestep of the demonstration fits: not prompted
    else:
        mode = None
    used = sum(len(p) for p in parts)
    span = whole_timesteps(episode, context_len - used, rng, "uniform")
    if span[1] == span[0] and parts:  # the prompt left no room for one timestep: drop it
        parts, mode, prompt_span = [], None, (0, 0)
        span = whole_timesteps(episode, context_len, rng, "uniform")
    if span[1] == span[0]:
        longest = int(np.diff(np.append(timestep_starts(episode), len(episode))).max())
        raise ValueError(f"a timestep of {longest} tokens does not fit the context of "
                         f"{context_len}; raise context_len above the longest timestep")
    parts.append(episode.slice(*span))
    info.update(prompt_mode=mode, prompt_span=prompt_span, episode_span=span)
    return TokenSequence.concat(parts).pad_to(context_len, layout)


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
