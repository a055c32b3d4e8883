"""Episodes -> one ``TokenSequence``: Gato's ordering, local positions and loss mask.

Shape letters: T timesteps, A action dimensions, N positions, n columns of one key.

A timestep is its observation tokens (nested keys flattened in sorted order at every
level, joined with "/"; each value row-major), the separator '|', then the action tokens.
An episode is its timesteps in time order. Everything is built as (T, columns) matrices
and flattened once, so the cost per value is a few numpy operations, not a Python step.

Observation kinds come from ``spec`` (flat key -> "text" | "image" | "discrete" |
"continuous") or are inferred: str -> text, integer/bool -> discrete, float -> continuous.
Images are never inferred (BabyAI's 7x7x3 grid is uint8 but discrete): declare them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from moe_gato.tokenizer.images import images_to_patches
from moe_gato.tokenizer.layout import (ACTION_LOCAL_POS, LOSS_KINDS, PATCH_CHANNELS,
                                       PATCH_SIZE, Kind, TokenSequence, VocabLayout)
from moe_gato.tokenizer.text import DEFAULT_MODEL, TextTokenizer
from moe_gato.tokenizer.values import (continuous_to_tokens, discrete_to_tokens,
                                       tokens_to_continuous, tokens_to_discrete)

ObsKind = Literal["text", "image", "discrete", "continuous"]
OBS_KINDS = ("text", "image", "discrete", "continuous")
_OBS_KIND = {"text": Kind.TEXT, "image": Kind.IMAGE, "discrete": Kind.DISCRETE_OBS,
             "continuous": Kind.CONTINUOUS_OBS}
ACTION_KIND_NAMES = ("discrete", "continuous")


@dataclasses.dataclass
class _Block:
    """Columns of one key for every timestep."""

    ids_Tn: np.ndarray
    kind: Kind
    valid_Tn: np.ndarray | None = None  # ragged text: which columns hold a token
    rc_n4: np.ndarray | None = None  # image: patch intervals
    patches: np.ndarray | None = None  # image: (T, n, 3, 16, 16)


def flatten_observation(obs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> flat dict whose keys are sorted at every level and joined with '/'."""
    flat: dict[str, Any] = {}
    for key in sorted(obs):
        if not isinstance(key, str):
            raise ValueError(f"observation keys must be str, got {key!r} under {prefix or 'the top'}")
        value = obs[key]
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten_observation(value, name))
        else:
            flat[name] = value
    return flat


def _stack_steps(steps: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A list of per-timestep nested dicts -> flat dict of stacked values."""
    flats = [flatten_observation(s) for s in steps]
    keys = list(flats[0])
    for t, f in enumerate(flats):
        if list(f) != keys:
            missing = sorted(set(keys) ^ set(f))
            raise ValueError(f"observation at timestep {t} has keys that differ from timestep 0: "
                             f"{missing}")
    out = {}
    for k in keys:
        vals = [f[k] for f in flats]
        out[k] = vals if isinstance(vals[0], str) else np.stack([np.asarray(v) for v in vals])
    return out


class GatoTokenizer:
    """Tokenizes episodes, text documents and captioned images into ``TokenSequence``s.

        tok = GatoTokenizer()
        seq = tok.tokenize_episode({"image": grid_T773, "direction": dir_T, "mission": [...]},
                                   actions_T, action_kind="discrete")
    """

    def __init__(self, layout: VocabLayout | None = None,
                 text_model: str | Path = DEFAULT_MODEL, *, action_mu_law: bool = True):
        self.text = TextTokenizer(text_model)
        self.layout = layout or VocabLayout(text_vocab_size=self.text.vocab_size)
        if self.layout.text_vocab_size != self.text.vocab_size:
            raise ValueError(f"layout.text_vocab_size is {self.layout.text_vocab_size} but the "
                             f"SentencePiece model {self.text.model_path} has "
                             f"{self.text.vocab_size} pieces")
        self.action_mu_law = action_mu_law

    # ----------------------------------------------------------------- episodes
    def tokenize_episode(self, observations, actions, *, action_kind: str,
                         spec: Mapping[str, str] | None = None) -> TokenSequence:
        """observations: nested dict of per-timestep values with leading axis T (text as a
        list of T strings), or a list of T nested dicts; actions: (T,) or (T, A)."""
        if action_kind not in ACTION_KIND_NAMES:
            raise ValueError(f"action_kind must be one of {ACTION_KIND_NAMES}, got {action_kind!r}")
        if isinstance(observations, (list, tuple)):
            if not observations:
                raise ValueError("episode is empty: observations hold no timestep")
            flat = _stack_steps(list(observations))
        elif isinstance(observations, Mapping):
            flat = flatten_observation(observations)
        else:
            raise ValueError(f"observations must be a dict or a list of dicts, "
                             f"got {type(observations).__name__}")
        spec = dict(spec or {})
        for key, kind in spec.items():
            if kind not in OBS_KINDS:
                raise ValueError(f"spec[{key!r}] must be one of {OBS_KINDS}, got {kind!r}")
            if key not in flat:
                raise ValueError(f"spec names {key!r}, which is not an observation key; "
                                 f"keys: {sorted(flat)}")
        action_block = self._action_block(actions, action_kind)
        T = action_block.ids_Tn.shape[0]
        blocks = [self._obs_block(key, flat[key], spec.get(key), T) for key in flat]
        sep = _Block(np.full((T, 1), self.layout.separator_id, np.int64), Kind.SEPARATOR)
        return _assemble(blocks, [sep, action_block], T)

    def _action_block(self, actions, action_kind: str) -> _Block:
        a = np.asarray(actions)
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2:
            raise ValueError(f"actions must be (T,) or (T, A), got shape {a.shape}")
        if a.shape[0] == 0:
            raise ValueError("episode is empty: actions hold no timestep")
        if a.shape[1] == 0:
            raise ValueError("actions must have at least one dimension, got shape (T, 0)")
        if action_kind == "discrete":
            ids = _discrete_ids(a, "action", self.layout)
            return _Block(ids, Kind.DISCRETE_ACTION)
        ids = _continuous_ids(a, "action", self.layout, self.action_mu_law)
        return _Block(ids, Kind.CONTINUOUS_ACTION)

    def _obs_block(self, key: str, value, kind: str | None, T: int) -> _Block:
        if kind is None:
            kind = _infer_kind(key, value)
        if kind == "text":
            return self._text_block(key, value, T)
        arr = np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] != T:
            raise ValueError(f"observation {key!r}: leading axis must be the {T} timesteps of "
                             f"the actions, got shape {arr.shape}")
        if kind == "image":
            patches, rc = images_to_patches(arr, key)
            n = patches.shape[1]
            return _Block(np.zeros((T, n), np.int64), Kind.IMAGE, rc_n4=rc, patches=patches)
        flat = arr.reshape(T, -1)
        if flat.shape[1] == 0:
            raise ValueError(f"observation {key!r} holds no values (shape {arr.shape})")
        if kind == "discrete":
            return _Block(_discrete_ids(flat, f"observation {key!r}", self.layout), Kind.DISCRETE_OBS)
        return _Block(_continuous_ids(flat, f"observation {key!r}", self.layout, True),
                      Kind.CONTINUOUS_OBS)

    def _text_block(self, key: str, value, T: int) -> _Block:
        if isinstance(value, str):
            value = [value] * T
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if not isinstance(value, (list, tuple)) or len(value) != T:
            raise ValueError(f"observation {key!r}: text needs one str per timestep ({T}), "
                             f"got {type(value).__name__} of length "
                             f"{len(value) if hasattr(value, '__len__') else '?'}")
        for t, s in enumerate(value):
            if not isinstance(s, str):
                raise ValueError(f"observation {key!r}: timestep {t} holds {type(s).__name__}, "
                                 f"text observations must be str")
        encoded = {s: self.text.encode(s) for s in set(value)}
        lengths = np.array([len(encoded[s]) for s in value])
        width = int(lengths.max()) if T else 0
        ids = np.zeros((T, width), np.int64)
        if len(encoded) == 1:
            ids[:] = encoded[value[0]]
        else:
            for t, s in enumerate(value):
                ids[t, :lengths[t]] = encoded[s]
        valid = np.arange(width)[None, :] < lengths[:, None]
        return _Block(ids, Kind.TEXT, valid_Tn=None if valid.all() else valid)

    # ------------------------------------------------------- documents, captions
    def tokenize_text(self, text: str) -> TokenSequence:
        """A text document: every token is a target; local positions count up."""
        ids = self.text.encode(text)
        if len(ids) == 0:
            raise ValueError("text document is empty")
        n = len(ids)
        return TokenSequence(tokens=ids.copy(), kinds=np.full(n, Kind.TEXT, np.int8),
                             local_pos=np.arange(n, dtype=np.int32), loss_mask=np.ones(n, bool),
                             timestep=np.zeros(n, np.int32), image_rc=np.zeros((n, 4), np.float32),
                             patches=_no_patches())

    def tokenize_caption(self, image, caption: str) -> TokenSequence:
        """Image patches then the caption's text (the only targets), as one timestep."""
        img = np.asarray(image)
        blocks = [self._obs_block("image", img[None], "image", 1),
                  self._text_block("caption", [caption], 1)]
        return _assemble(blocks, [], 1)

    # ----------------------------------------------------------------- actions
    def detokenize_actions(self, ids, action_kind: str, action_dim: int | None = None):
        """Action token ids (..., A) -> environment values: ints for discrete, floats (bin
        centres through the inverse mu-law) for continuous."""
        ids = np.asarray(ids, dtype=np.int64)
        if action_dim is not None and ids.shape[-1] != action_dim:
            raise ValueError(f"expected {action_dim} action tokens on the last axis, "
                             f"got shape {ids.shape}")
        if action_kind == "discrete":
            return tokens_to_discrete(ids, self.layout)
        if action_kind == "continuous":
            return tokens_to_continuous(ids, self.layout, mu_law=self.action_mu_law)
        raise ValueError(f"action_kind must be one of {ACTION_KIND_NAMES}, got {action_kind!r}")

    def describe(self, seq: TokenSequence, max_steps: int = 1) -> str:
        """Human-readable view of the first ``max_steps`` timesteps (used by the demo)."""
        lines = []
        for t in range(max_steps):
            sel = np.flatnonzero(seq.timestep == t)
            if not len(sel):
                break
            lines.append(f"timestep {t}: {len(sel)} tokens")
            runs = np.split(sel, np.flatnonzero(np.diff(seq.kinds[sel]) != 0) + 1)
            for run in runs:
                kind = Kind(int(seq.kinds[run[0]]))
                toks = seq.tokens[run]
                shown = " ".join(str(x) for x in toks[:12]) + (" ..." if len(toks) > 12 else "")
                extra = ""
                if kind == Kind.TEXT:
                    extra = f"  = {self.text.decode(toks)!r}"
                elif kind == Kind.IMAGE:
                    shown = f"{len(run)} patches"
                lines.append(f"  {kind.name.lower():<17} local {seq.local_pos[run[0]]:>4}.."
                             f"{seq.local_pos[run[-1]]:<4} loss={bool(seq.loss_mask[run[0]])!s:<5} "
                             f"[{shown}]{extra}")
        return "\n".join(lines)


def _no_patches() -> np.ndarray:
    return np.zeros((0, PATCH_CHANNELS, PATCH_SIZE, PATCH_SIZE), np.float32)


def _infer_kind(key: str, value) -> str:
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                  and isinstance(value[0], str)):
        return "text"
    arr = np.asarray(value)
    if arr.dtype.kind in "US":
        return "text"
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return "discrete"
    if np.issubdtype(arr.dtype, np.floating):
        return "continuous"
    raise ValueError(f"observation {key!r}: cannot tokenize dtype {arr.dtype}; allowed: str "
                     f"(text), integer/bool (discrete), float (continuous), or an image declared "
                     f"in spec")


def _discrete_ids(a: np.ndarray, what: str, layout: VocabLayout) -> np.ndarray:
    if a.dtype == bool:
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and (a == np.round(a)).all():
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{what}: discrete values must be integers in [0, {layout.num_bins}), "
                             f"got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= layout.num_bins):
        raise ValueError(f"{what}: discrete values must lie in [0, {layout.num_bins}), "
                         f"got min {a.min()} max {a.max()}")
    return discrete_to_tokens(a, layout)


def _continuous_ids(a: np.ndarray, what: str, layout: VocabLayout, mu_law: bool) -> np.ndarray:
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{what}: continuous values must be real numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{what}: continuous values must be finite, found "
                         f"{a[tuple(bad)]} at index {tuple(int(i) for i in bad)}")
    return continuous_to_tokens(a, layout, mu_law=mu_law)


def _assemble(obs_blocks: list[_Block], act_blocks: list[_Block], T: int) -> TokenSequence:
    """Lays out (T, columns) blocks row by row and flattens them into one sequence."""
    blocks = obs_blocks + act_blocks
    widths = [b.ids_Tn.shape[1] for b in blocks]
    n_obs = sum(widths[:len(obs_blocks)])
    ids_TC = np.concatenate([b.ids_Tn for b in blocks], axis=1)  # (T, C)
    kinds_C = np.concatenate([np.full(w, b.kind, np.int8) for b, w in zip(blocks, widths)])
    ragged = any(b.valid_Tn is not None for b in blocks)
    valid_TC = None
    if ragged:
        valid_TC = np.concatenate([b.valid_Tn if b.valid_Tn is not None
                                   else np.ones((T, w), bool) for b, w in zip(blocks, widths)], axis=1)
        local_TC = np.cumsum(valid_TC[:, :n_obs], axis=1, dtype=np.int32) - 1
    else:
        local_TC = np.broadcast_to(np.arange(n_obs, dtype=np.int32), (T, n_obs))
    local_TC = np.concatenate([local_TC, np.full((T, ids_TC.shape[1] - n_obs), ACTION_LOCAL_POS,
                                                 np.int32)], axis=1)
    kinds_TC = np.broadcast_to(kinds_C, ids_TC.shape)
    step_TC = np.broadcast_to(np.arange(T, dtype=np.int32)[:, None], ids_TC.shape)
    image_blocks = [b for b in blocks if b.kind == Kind.IMAGE]
    if image_blocks:
        rc_C4 = np.concatenate([b.rc_n4 if b.rc_n4 is not None else np.zeros((w, 4), np.float32)
                                for b, w in zip(blocks, widths)])
        rc = np.broadcast_to(rc_C4, (T, *rc_C4.shape))
        patches = np.concatenate([b.patches for b in image_blocks], axis=1)
        patches = patches.reshape(-1, PATCH_CHANNELS, PATCH_SIZE, PATCH_SIZE)
    else:
        rc = None
        patches = _no_patches()

    def flat(a):
        return a[valid_TC] if ragged else a.reshape(-1, *a.shape[2:])

    kinds = np.ascontiguousarray(flat(kinds_TC))
    n = len(kinds)
    return TokenSequence(
        tokens=np.ascontiguousarray(flat(ids_TC)), kinds=kinds,
        local_pos=np.ascontiguousarray(flat(local_TC)),
        loss_mask=np.isin(kinds, np.array(LOSS_KINDS, np.int8)),
        timestep=np.ascontiguousarray(flat(step_TC)),
        image_rc=np.ascontiguousarray(flat(rc)) if rc is not None else np.zeros((n, 4), np.float32),
        patches=patches)
