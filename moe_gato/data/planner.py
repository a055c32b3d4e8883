"""Training batches gathered by index from a split flattened once, on any device.

``SequenceLoader.sequence`` builds each sequence in Python: it tokenizes (or takes from its
cache) the drawn episode, slices, concatenates and pads numpy arrays, ~500 sequences/s per
core. A GPU step of tiny-moe eats ~3,500 a second. Here every row of the split is tokenized
once into flat arrays (``FlatSplit``: ids, kinds, local positions, loss mask, timesteps,
image intervals, and the patches as integer codes into a table of their values), and a
``SequencePlanner`` draws exactly what ``SequenceLoader.sequence`` draws (task, row, prompt
row and mode, crop, windows: the same generator calls in the same order) from the rows'
timestep boundaries alone. A plan is a few ``(start, stop)`` runs of flat positions per
sequence; the batch is then one gather per field, on the device the flat arrays live on,
with no Python per position. The batch equals ``SequenceLoader.batch`` bitwise
(tests/test_planner.py).

Memory: ~34 bytes per token plus 1,536 bytes per image position (int16 codes of a 3 x 16 x
16 patch). The default suite (12.6M tokens, most of its image positions Atari frames) needs
a few GiB: meant for a GPU's memory, or a host with room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moe_gato.data.loader import CROP_CONTEXTS, SequenceLoader, tokenize_episode

#: the fields gathered position by position, as collate() returns them
_FIELDS = ("tokens", "kinds", "local_pos", "loss_mask", "timestep", "image_rc")


class _Steps:
    """What ``whole_timesteps`` reads of a sequence: its length and its timestep ids."""

    def __init__(self, timestep: np.ndarray) -> None:
        self.timestep = timestep

    def __len__(self) -> int:
        return len(self.timestep)


@dataclass
class Run:
    """Flat positions ``[start, stop)`` placed in a sequence, their timesteps plus
    ``step_add``; ``count_up``: local positions replaced by 0, 1, ... (a text window)."""

    start: int
    stop: int
    step_add: int = 0
    count_up: bool = False


@dataclass
class Plan:
    """One sequence: its runs in order (padding follows), and whether it is a control
    episode (``mission_targets`` applies to those only)."""

    task: str
    runs: list[Run]
    control: bool


def _uint8_table() -> np.ndarray:
    """Patch values of the 256 pixel values of a uint8 image (tokenizer/images.py)."""
    x = np.arange(256, dtype=np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    return x * np.float32(0.25)


class FlatSplit:
    """Every row of a loader's split tokenized once, in flat host arrays with one pad
    position at the end (what padding gathers), and the patches as int16 codes into
    ``table`` (``to(device)`` moves those two)."""

    def __init__(self, loader: SequenceLoader) -> None:
        tok = loader.tok
        parts, starts, bounds = [], {}, {}
        table, extra = _uint8_table(), {}
        codes, size = [], 0
        for name in loader.names:
            data = loader.data[name]
            for row in loader.rows[name]:
                if data.kind == "control":
                    seq = tokenize_episode(tok, data, data.episode(row))
                elif data.kind == "text":
                    seq = tok.tokenize_text(data.text(row))
                else:
                    seq = tok.tokenize_caption(*data.caption(row))
                    if (seq.timestep != 0).any():
                        raise ValueError(f"{name} row {row}: a caption is one timestep (0)")
                starts[name, row] = size
                if data.kind == "control":  # where each stored timestep begins
                    bounds[name, row] = np.append(
                        np.flatnonzero(np.diff(seq.timestep, prepend=-1) != 0), len(seq))
                parts.append(seq)
                codes.append(self._codes(seq.patches, table, extra))
                size += len(seq)
        pad = loader.tok.layout.pad_id
        self.host = {f: np.concatenate([getattr(s, f) for s in parts] + [self._pad(f, pad)])
                     for f in _FIELDS}
        self.starts, self.bounds, self.size = starts, bounds, size
        is_image = self.host["kinds"] == _image_kind()
        #: image positions before each flat position: a run's patches are [first[a], first[b])
        self.first_patch = np.concatenate([[0], np.cumsum(is_image)]).astype(np.int64)
        self.codes = torch.from_numpy(np.concatenate(codes) if codes else
                                      np.zeros((0, 3, 16, 16), np.int16))
        self.table = torch.from_numpy(np.concatenate([table, np.array(list(extra), np.float32)]))

    @staticmethod
    def _pad(field: str, pad_id: int) -> np.ndarray:
        from moe_gato.tokenizer import Kind

        return {"tokens": np.array([pad_id], np.int64), "kinds": np.array([Kind.PAD], np.int8),
                "local_pos": np.zeros(1, np.int32), "loss_mask": np.zeros(1, bool),
                "timestep": np.full(1, -1, np.int32),
                "image_rc": np.zeros((1, 4), np.float32)}[field]

    @staticmethod
    def _codes(patches: np.ndarray, table: np.ndarray, extra: dict) -> np.ndarray:
        """int16 codes of ``patches`` into ``table`` (then ``extra``'s values, in order):
        the uint8 pixel values when they round-trip bitwise, else each distinct value."""
        if not len(patches):
            return np.zeros((0, *patches.shape[1:]), np.int16)
        guess = np.clip(np.rint((patches / np.float32(0.25) + 1) * np.float32(255 / 2)), 0, 255)
        guess = guess.astype(np.int16)
        if np.array_equal(table[guess], patches):
            return guess
        values, inverse = np.unique(patches, return_inverse=True)
        for v in values.tolist():
            extra.setdefault(v, 256 + len(extra))
        if 256 + len(extra) > np.iinfo(np.int16).max:
            raise ValueError("patches hold more than 32,511 distinct non-uint8 values")
        index = np.array([extra[v] for v in values.tolist()], np.int16)
        return index[inverse.reshape(patches.shape)]

    def to(self, device: torch.device | str) -> "FlatSplit":
        """The patch codes and their table moved to ``device`` (the rest stays on the host)."""
        self.codes, self.table = self.codes.to(device), self.table.to(device)
        return self


def _image_kind() -> int:
    from moe_gato.tokenizer import Kind

    return int(Kind.IMAGE)


class SequencePlanner:
    """``SequenceLoader``'s sequences as plans over a ``FlatSplit``, and their batches
    gathered on ``device``: ``batch(start, size)`` equals ``loader.batch(start, size)``."""

    def __init__(self, loader: SequenceLoader, device: torch.device | str = "cpu",
                 flat: FlatSplit | None = None) -> None:
        self.loader = loader
        self.flat = (flat or FlatSplit(loader)).to(device)
        self.device = torch.device(device)

    # --------------------------------------------------------------- planning
    def plan(self, index: int) -> Plan:
        """The draws of ``SequenceLoader.sequence(index)``, made in the same order."""
        from moe_gato.tokenizer import draw_prompt_mode
        from moe_gato.tokenizer.pack import whole_timesteps

        ld, L = self.loader, self.loader.cfg.context_len
        rng = np.random.default_rng([ld.seed, int(index)])
        name = ld.names[int(rng.choice(len(ld.names), p=ld.probs))]
        data, rows = ld.data[name], ld.rows[name]
        if data.kind == "caption":
            return Plan(name, self._captions(name, rows, rng), control=False)
        row = rows[int(rng.integers(len(rows)))]
        start, stop = self._extent(name, row)
        if data.kind == "text":
            if stop - start <= L:
                return Plan(name, [Run(start, stop)], control=False)
            a = start + int(rng.integers(0, stop - start - L + 1))
            return Plan(name, [Run(a, a + L, count_up=True)], control=False)
        other = rows[int(rng.integers(len(rows)))] if len(rows) > 1 else row
        mode = draw_prompt_mode(rng, ld.cfg.prompt_prob)
        episode = self._episode(name, row, rng, "uniform")
        runs, used = [], 0
        if mode is not None:
            prompt = self._episode(name, other, rng, mode)
            rng.integers(1)  # make_training_sequence draws which prompt episode (one)
            a, b = whole_timesteps(self._steps(prompt), int(L * ld.cfg.prompt_share), rng, mode)
            if b > a:
                runs, used = [Run(prompt.start + a, prompt.start + b, prompt.step_add)], b - a
        a, b = whole_timesteps(self._steps(episode), L - used, rng, "uniform")
        if a == b and runs:  # the prompt left no room for one timestep: dropped
            runs = []
            a, b = whole_timesteps(self._steps(episode), L, rng, "uniform")
        if a == b:
            raise ValueError(f"a timestep of {name} does not fit the context of {L}")
        runs.append(Run(episode.start + a, episode.start + b, episode.step_add))
        return Plan(name, runs, control=True)

    def _extent(self, name: str, row: int) -> tuple[int, int]:
        start = self.flat.starts[name, row]
        bounds = self.flat.bounds.get((name, row))
        if bounds is not None:
            return start, start + int(bounds[-1])
        nxt = self._next_start(name, row)
        return start, nxt

    def _next_start(self, name: str, row: int) -> int:
        """End of a row without timestep bounds (text, captions)."""
        cache = getattr(self, "_ends", None)
        if cache is None:
            keys = sorted(self.flat.starts.items(), key=lambda kv: kv[1])
            ends = [s for _, s in keys[1:]] + [self.flat.size]
            self._ends = cache = {k: e for (k, _), e in zip(keys, ends)}
        return cache[name, row]

    def _episode(self, name: str, row: int, rng, mode: str) -> Run:
        """``SequenceLoader._episode``: the whole row, or a crop of it (its timesteps
        renumbered from the crop's first)."""
        ld = self.loader
        data, bounds = ld.data[name], self.flat.bounds[name, row]
        start = self.flat.starts[name, row]
        length = int(ld.lengths[name][row])
        per_step = max(1.0, data.meta["tokens"] / max(1, data.meta["steps"]))
        if length * per_step <= CROP_CONTEXTS * ld.cfg.context_len:
            return Run(start, start + int(bounds[-1]))
        span = min(length, int(math.ceil(2 * ld.cfg.context_len / per_step)) + 1)
        first = length - span if mode == "end" else int(rng.integers(0, length - span + 1))
        return Run(start + int(bounds[first]), start + int(bounds[first + span]), -first)

    def _steps(self, run: Run) -> _Steps:
        return _Steps(self.flat.host["timestep"][run.start:run.stop])

    def _captions(self, name: str, rows, rng) -> list[Run]:
        """``SequenceLoader._captions``: whole captions while they fit, each its own
        timestep; the first L positions of the last drawn one when none fits."""
        L = self.loader.cfg.context_len
        runs, size = [], 0
        while True:
            row = rows[int(rng.integers(len(rows)))]
            a, b = self._extent(name, row)
            if size + b - a > L:
                break
            runs.append(Run(a, b, step_add=len(runs)))
            size += b - a
        return runs or [Run(a, a + L)]

    # --------------------------------------------------------------- gathering
    def batch(self, start: int, size: int) -> dict:
        """Sequences ``[start, start + size)`` as ``SequenceLoader.batch`` returns them, on
        this planner's device."""
        return self.gather([self.plan(i) for i in range(start, start + size)])

    def gather(self, plans: list[Plan]) -> dict:
        """The batch of ``plans``: the per-position fields (a few bytes each) gathered on
        the host by one fancy index, the patches (1.5 KiB each) on the device from their
        codes. ``target_weight_host`` is the batch's summed target weight, known without a
        read from the device."""
        from moe_gato.model.model import target_weights
        from moe_gato.tokenizer import Kind

        L, B, host = self.loader.cfg.context_len, len(plans), self.flat.host
        idx = np.full((B, L), self.flat.size, np.int64)  # the pad position
        add = np.zeros((B, L), np.int32)
        count_up, control = np.zeros(B, bool), np.zeros(B, bool)
        patch_runs = []
        for b, plan in enumerate(plans):
            at = 0
            for run in plan.runs:
                n = run.stop - run.start
                idx[b, at:at + n] = np.arange(run.start, run.stop)
                add[b, at:at + n] = run.step_add
                count_up[b] |= run.count_up
                patch_runs.append((self.flat.first_patch[run.start],
                                   self.flat.first_patch[run.stop]))
                at += n
            control[b] = plan.control
        out = {name: torch.from_numpy(host[name][idx]) for name in _FIELDS}
        step = out["timestep"]
        out["timestep"] = step + torch.from_numpy(add) * (step >= 0)
        out["local_pos"] = torch.where(torch.from_numpy(count_up)[:, None],
                                       torch.arange(L, dtype=torch.int32), out["local_pos"])
        for name in ("kinds", "local_pos", "timestep"):
            out[name] = out[name].long()
        cfg = self.loader.cfg
        if cfg.mission_targets != "all":  # as SequenceLoader._kept_text_targets
            keep = out["kinds"] != int(Kind.TEXT)
            if cfg.mission_targets == "first":
                keep = keep | (out["timestep"] == 0)
            out["loss_mask"] = out["loss_mask"] & (keep | ~torch.from_numpy(control)[:, None])
        if cfg.loss_weighting == "sequence":  # as SequenceLoader.batch
            targets_B1 = out["loss_mask"][:, 1:].sum(1, keepdim=True).clamp(min=1)
            out["loss_weight"] = out["loss_mask"].float() / targets_B1
        weight = target_weights(out).sum()  # as Trainer._host_targets sums it
        dev = self.device
        pin = dev.type == "cuda"
        out = {k: (v.pin_memory() if pin else v).to(dev, non_blocking=True) for k, v in out.items()}
        patch_idx = np.concatenate([np.arange(a, b) for a, b in patch_runs] or [np.zeros(0)])
        patch_idx = torch.from_numpy(patch_idx.astype(np.int64))
        codes = self.flat.codes[(patch_idx.pin_memory() if pin else patch_idx).to(dev, non_blocking=True)]
        out["patches"] = self.flat.table[codes.long()]
        out["target_weight_host"] = weight
        return out
