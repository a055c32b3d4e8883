"""Packed training sequences from a collected suite, deterministic and resumable.

    loader = SequenceLoader(load_mixture("configs/data/default.yaml"), split="train", seed=0)
    batch = loader.next_batch(8)          # collate(): tokens (B, L), kinds, loss_mask, ...
    state = loader.state_dict()           # {"seed", "split", "position", "tasks"}
    loader.load_state_dict(state)         # continues with exactly the same sequences

Sequence ``i`` depends only on ``(seed, i)`` and the data: its task is drawn by the
mixture weights, then a row of that task's split. A control episode becomes a Gato
training sequence (``make_training_sequence``: with ``prompt_prob`` a demonstration of the
same task first, then a window of the episode, padded); captioned images are packed
several to a sequence; a text document gives a window. The state is the position, so
resuming costs nothing. Tokenized rows are kept in an LRU cache of ``cache_mb``.

Episodes longer than ``CROP_CONTEXTS`` contexts (Atari games run ~20k steps) are cut in
timesteps before tokenizing: a random span of about two contexts of the episode, and for
the prompt either the other episode's end or a random span of it, by the prompt mode drawn
once for the sequence. ``sequence(i, info)`` reports which rows and timesteps it used.
"""

from __future__ import annotations

import collections
import functools
import math
from pathlib import Path

import numpy as np

from moe_gato.data import storage
from moe_gato.envs.episode import Episode
from moe_gato.data.mixture import MixtureConfig

CROP_CONTEXTS = 8
COUNT_CHUNK_STEPS = 1024


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    from moe_gato.tokenizer import GatoTokenizer

    return GatoTokenizer()


def slice_episode(ep: Episode, start: int, stop: int) -> Episode:
    obs = {k: v[start:stop] for k, v in ep.observations.items()}
    return Episode(observations=obs, actions=ep.actions[start:stop],
                   rewards=ep.rewards[start:stop], success=ep.success, seed=ep.seed)


def tokenize_episode(tok, data: storage.TaskData, ep: Episode):
    spec = {k: v.modality for k, v in data.obs_spec.items()}
    return tok.tokenize_episode(ep.observations, ep.actions, action_kind=data.meta["action_kind"],
                                spec=spec)


def count_tokens(data: storage.TaskData, tok=None) -> int:
    """Tokens of every row of a stored task, as the tokenizer makes them."""
    tok = tok or default_tokenizer()
    total = 0
    for i in range(len(data)):
        if data.kind == "control":
            ep = data.episode(i)
            for a in range(0, len(ep), COUNT_CHUNK_STEPS):
                total += len(tokenize_episode(tok, data, slice_episode(ep, a, a + COUNT_CHUNK_STEPS)))
        elif data.kind == "caption":
            total += len(tok.tokenize_caption(*data.caption(i)))
        else:
            total += len(tok.tokenize_text(data.text(i)))
    return total


def split_rows(n: int, fraction: float, split: str) -> range:
    """Rows of ``split``: validation is the last ``fraction`` of the rows (at least one when
    ``fraction`` > 0 and there are two rows or more)."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    n_val = 0 if fraction == 0 or n < 2 else max(1, int(round(fraction * n)))
    return range(0, n - n_val) if split == "train" else range(n - n_val, n)


def _steps(seq, span: tuple[int, int], first: int) -> tuple[int, int]:
    """Stored-episode timesteps ``[a, b)`` held by positions ``span`` of ``seq`` (a
    tokenized episode, or a crop of one that starts at stored timestep ``first``)."""
    a, b = span
    return first + int(seq.timestep[a]), first + int(seq.timestep[b - 1]) + 1


class SequenceLoader:
    """Yields ``TokenSequence``s of exactly ``cfg.context_len`` positions."""

    def __init__(self, cfg: MixtureConfig, *, split: str = "train", seed: int = 0,
                 tokenizer=None, data_dir: str | Path | None = None,
                 allow_held_out: bool = False) -> None:
        self.cfg = cfg
        self.split = split
        self.seed = int(seed)
        self.position = 0
        self.tok = tokenizer or default_tokenizer()
        root = Path(data_dir or cfg.data_dir)
        manifest = storage.read_manifest(root)
        known = manifest.get("tasks", {})
        missing = [t for t in cfg.tasks if t not in known]
        if missing:
            raise storage.DataError(f"task(s) {missing} are not in {root}/manifest.json; "
                                    f"collected: {sorted(known)}")
        held = [t for t in cfg.tasks if known[t].get("held_out")]
        if held and not (allow_held_out or cfg.allow_held_out):
            raise ValueError(f"tasks: {held} are held out (never trained on); remove them from "
                             f"the mixture, or set data.allow_held_out=true to train on them")
        self.names = list(cfg.tasks)
        self.data = {t: storage.TaskData(storage.task_dir(root, t)) for t in self.names}
        self.rows = {t: split_rows(len(d), cfg.validation_fraction, split)
                     for t, d in self.data.items()}
        if split == "train":
            for t, n in cfg.train_episodes.items():
                if n > len(self.rows[t]):
                    raise ValueError(f"train_episodes.{t}: {n} episodes asked for, the training "
                                     f"split of {root}/{t} holds {len(self.rows[t])} (of "
                                     f"{len(self.data[t])} rows; the last "
                                     f"{len(self.data[t]) - len(self.rows[t])} validate)")
                self.rows[t] = self.rows[t][:n]
        empty = [t for t, r in self.rows.items() if len(r) == 0]
        if empty:
            raise ValueError(f"tasks {empty} have no rows in split {split!r}")
        self.lengths = {t: np.asarray(d.ds.with_format("numpy")["length"])
                        for t, d in self.data.items() if d.kind == "control"}
        w = np.array([cfg.tasks[t] for t in self.names], np.float64)
        self.probs = w / w.sum()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_bytes = 0

    def max_timestep_tokens(self) -> dict[str, int]:
        """Tokens of the longest timestep (observation, separator, action) of each control
        task. Per-timestep counts are fixed per task except for text observations (BabyAI's
        mission, fixed within an episode): those tasks take the first timestep of every
        row, the others that of their first row."""
        out = {}
        for name, data in self.data.items():
            if data.kind != "control":
                continue
            has_text = any(s.modality == "text" for s in data.obs_spec.values())
            rows = self.rows[name] if has_text else self.rows[name][:1]
            out[name] = max((len(tokenize_episode(self.tok, data,
                                                  slice_episode(data.episode(r), 0, 1)))
                             for r in rows if self.lengths[name][r] > 0), default=0)
        return out

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"seed": self.seed, "split": self.split, "position": self.position,
                "tasks": list(self.names)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "split", "tasks"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"loader state has {key}={state.get(key)!r}, this loader has "
                                 f"{self.state_dict()[key]!r}")
        self.position = int(state["position"])

    # --------------------------------------------------------------- sampling
    def __iter__(self):
        return self

    def __next__(self):
        seq = self.sequence(self.position)
        self.position += 1
        return seq

    def next_batch(self, batch_size: int) -> dict:
        batch = self.batch(self.position, batch_size)
        self.position += batch_size
        return batch

    def batch(self, start: int, size: int) -> dict:
        """Sequences ``[start, start + size)``, collated (the position is left alone)."""
        from moe_gato.tokenizer import collate

        batch = collate([self.sequence(i) for i in range(start, start + size)])
        if self.cfg.loss_weighting == "sequence":  # each sequence's targets sum to one
            targets_B1 = batch["loss_mask"][:, 1:].sum(1, keepdim=True).clamp(min=1)
            batch["loss_weight"] = batch["loss_mask"].float() / targets_B1
        return batch

    def sequence(self, index: int, info: dict | None = None):
        """Training sequence number ``index`` (a pure function of seed, index and data).

        ``info``, when given, receives what the sequence was made of: ``task``, ``row``
        and for control tasks ``prompt_row``, ``prompt_mode`` (None, "end" or "uniform";
        drawn once, and used both to crop a long prompt episode and to window it) and
        ``prompt_steps`` / ``episode_steps``: the timesteps ``[a, b)`` of the stored
        episodes that the prompt and the episode window hold."""
        from moe_gato.tokenizer import draw_prompt_mode, make_training_sequence

        info = {} if info is None else info
        rng = np.random.default_rng([self.seed, int(index)])
        name = self.names[int(rng.choice(len(self.names), p=self.probs))]
        data, rows = self.data[name], self.rows[name]
        L = self.cfg.context_len
        info.update(task=name)
        if data.kind == "caption":
            return self._captions(name, data, rows, rng)
        row = rows[int(rng.integers(len(rows)))]
        info.update(row=row)
        if data.kind == "text":
            doc = self._cached((name, row), lambda: self.tok.tokenize_text(data.text(row)))
            return make_training_sequence(doc, [], rng, context_len=L, prompt_prob=0.0,
                                          layout=self.tok.layout)
        other = rows[int(rng.integers(len(rows)))] if len(rows) > 1 else row
        mode = draw_prompt_mode(rng, self.cfg.prompt_prob)
        episode, first = self._episode(name, data, row, rng, "uniform")
        prompts, p_first = [], 0
        if mode is not None:
            prompt, p_first = self._episode(name, data, other, rng, mode)
            prompts = [prompt]
        spans: dict = {}
        seq = make_training_sequence(episode, prompts, rng, context_len=L,
                                     layout=self.tok.layout, prompt_mode=mode,
                                     max_prompt_fraction=self.cfg.prompt_share, info=spans)
        if self.cfg.mission_targets != "all":
            seq.loss_mask = seq.loss_mask & self._kept_text_targets(seq)
        info.update(prompt_row=other if spans["prompt_mode"] else None,
                    prompt_mode=spans["prompt_mode"],
                    prompt_steps=_steps(prompts[0], spans["prompt_span"], p_first)
                    if spans["prompt_mode"] else None,
                    episode_steps=_steps(episode, spans["episode_span"], first))
        return seq

    def _kept_text_targets(self, seq) -> np.ndarray:
        """(N,) False at the text observations that ``mission_targets`` takes out of the
        loss: all of them ("none"), or those after the episode's first timestep ("first")."""
        from moe_gato.tokenizer import Kind

        is_text = seq.kinds == Kind.TEXT
        if self.cfg.mission_targets == "none":
            return ~is_text
        return ~is_text | (seq.timestep == 0)

    def _episode(self, name: str, data: storage.TaskData, row: int, rng, mode: str):
        """Row ``row`` tokenized, and the index of its first stored timestep: the whole
        episode, or for one longer than ``CROP_CONTEXTS`` contexts a span of about two
        contexts (its end for ``mode`` "end", else uniform)."""
        length = int(self.lengths[name][row])
        per_step = max(1.0, data.meta["tokens"] / max(1, data.meta["steps"]))
        if length * per_step <= CROP_CONTEXTS * self.cfg.context_len:
            return self._cached((name, row), lambda: tokenize_episode(
                self.tok, data, data.episode(row))), 0
        span = min(length, int(math.ceil(2 * self.cfg.context_len / per_step)) + 1)
        start = length - span if mode == "end" else int(rng.integers(0, length - span + 1))
        ep = slice_episode(data.episode(row), start, start + span)
        return tokenize_episode(self.tok, data, ep), start

    def _captions(self, name: str, data: storage.TaskData, rows: range, rng):
        from moe_gato.tokenizer import TokenSequence

        L = self.cfg.context_len
        parts, size = [], 0
        while True:
            row = rows[int(rng.integers(len(rows)))]
            seq = self._cached((name, row), lambda: self.tok.tokenize_caption(*data.caption(row)))
            if size + len(seq) > L:
                break
            # each caption is its own timestep of the packed sequence
            seq = TokenSequence(**{f: getattr(seq, f) for f in
                                   ("tokens", "kinds", "local_pos", "loss_mask", "image_rc",
                                    "patches")},
                                timestep=np.full(len(seq), len(parts), np.int32))
            parts.append(seq)
            size += len(seq)
        if not parts:  # one caption longer than the context
            parts.append(seq.slice(0, L))
        return TokenSequence.concat(parts).pad_to(L, self.tok.layout)

    def _cached(self, key, make):
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        seq = make()
        size = sum(getattr(seq, f).nbytes for f in ("tokens", "kinds", "local_pos", "loss_mask",
                                                    "timestep", "image_rc", "patches"))
        limit = self.cfg.cache_mb * 2**20
        if size <= limit:
            self._cache[key] = seq
            self._cache_bytes += size
            while self._cache_bytes > limit:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= sum(getattr(old, f).nbytes for f in
                                         ("tokens", "kinds", "local_pos", "loss_mask",
                                          "timestep", "image_rc", "patches"))
        return seq
