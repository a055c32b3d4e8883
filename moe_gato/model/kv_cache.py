"""The KV cache of decoding: preallocated slots with a validity mask, so that a control
loop can pad rows, evict whole timesteps and drop finished environments cheaply.

Shape letters: B rows, H heads, C slots (capacity), S slots in use, L positions of this
call, Dh head width.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_gato.model.positions import Rotary, coordinates, rotate


def hidden_past_actions(is_action_BS: torch.Tensor, step_BS: torch.Tensor,
                        step_BL: torch.Tensor) -> torch.Tensor:
    """(B, L, S): key s holds an action of an earlier step than query l
    (``past_actions="hide"``)."""
    return is_action_BS[:, None, :] & (step_BS[:, None, :] < step_BL[:, :, None])


def attention_mask(valid_BS: torch.Tensor, start: int, L: int,
                   hidden_BLS: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, L, S) boolean mask of L queries at key positions ``start .. start + L - 1``:
    each sees the valid, not hidden keys up to its own position, and always itself."""
    S = valid_BS.shape[1]
    idx_S = torch.arange(S, device=valid_BS.device)
    pos_L = start + torch.arange(L, device=valid_BS.device)
    see_BLS = (idx_S[None, :] <= pos_L[:, None])[None] & valid_BS[:, None, :]
    if hidden_BLS is not None:
        see_BLS = see_BLS & ~hidden_BLS
    return (see_BLS | (idx_S[None, :] == pos_L[:, None])[None])[:, None]


class KVCache:
    """Keys and values of every position seen so far, in preallocated slots.

    Per layer ``(B, H, C, Dh)`` buffers of capacity C (grown when needed); slots
    ``[0, length)`` have been written. ``valid_BC`` says which written slots each row's
    queries may attend to: padding a row did not use (``batch["valid"]``) and evicted
    slots are invalid. When the buffer is full the live slots are compacted to the front in
    order. ``slot_tag_C`` holds a caller's label per slot (the policy stores timestep numbers
    there to evict whole timesteps).

    Coordinates (``moe_gato.model.positions``): every slot keeps its position and timestep
    number (``slot_pos_BC``, ``slot_step_BC``), counted over the row's valid slots. An
    eviction renumbers the live slots as the recomputed window numbers them (a prompt kept
    in front of evicted timesteps moves up to the oldest kept one), anchored at each row's
    newest slot, so that the distances attention sees are those of training; with rotary
    positions (``rotary``) the keys of renumbered slots are rotated by their shift.
    """

    def __init__(self, num_layers: int, *, capacity: int = 0, hide_past_actions: bool = False,
                 always_mask: bool = False, rotary: Rotary | None = None):
        """``hide_past_actions``: action slots of earlier timesteps are hidden from later
        queries (``past_actions="hide"``); ``always_mask``: every call gets a mask (the
        timestep bias is added to it); ``rotary``: the keys are stored rotated by it."""
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = capacity
        self.hide_past_actions = hide_past_actions
        self.always_mask = always_mask
        self.rotary = rotary
        self.length = 0               # slots written, before this call's
        self.valid_BC: torch.Tensor | None = None
        self.slot_tag_C: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._pending = 0             # positions of the call in progress
        # per slot: coordinates, whether it opens a timestep, whether it holds an action;
        # per row: the coordinates of its last written position
        self.slot_pos_BC: torch.Tensor | None = None
        self.slot_step_BC: torch.Tensor | None = None
        self.slot_start_BC: torch.Tensor | None = None
        self.slot_action_BC: torch.Tensor | None = None
        self.pos_B: torch.Tensor | None = None
        self.step_B: torch.Tensor | None = None
        #: coordinates of the call in progress (B, L), and the keys' steps (B, S)
        self.call_pos_BL: torch.Tensor | None = None
        self.call_step_BL: torch.Tensor | None = None
        self.key_step_BS: torch.Tensor | None = None

    # --- the model calls these ----------------------------------------------------
    def begin(self, valid_BL: torch.Tensor | None, B: int, L: int, device, *,
              starts_BL: torch.Tensor, is_action_BL: torch.Tensor) -> None:
        """Reserves slots ``[length, length + L)`` for a forward call of L positions
        (``starts_BL``: positions that open a timestep; ``is_action_BL``: action tokens),
        numbers them after each row's last position and builds the call's mask."""
        if self.valid_BC is None:
            cap = max(self.capacity, L)
            self.valid_BC = torch.zeros(B, cap, dtype=torch.bool, device=device)
            self.slot_tag_C = torch.full((cap,), -1, dtype=torch.long, device=device)
            self.slot_pos_BC = torch.zeros(B, cap, dtype=torch.long, device=device)
            self.slot_step_BC = torch.zeros(B, cap, dtype=torch.long, device=device)
            self.slot_start_BC = torch.zeros(B, cap, dtype=torch.bool, device=device)
            self.slot_action_BC = torch.zeros(B, cap, dtype=torch.bool, device=device)
            self.pos_B = torch.full((B,), -1, dtype=torch.long, device=device)
            self.step_B = torch.full((B,), -1, dtype=torch.long, device=device)
        if self.valid_BC.shape[0] != B:
            raise ValueError(f"the cache holds {self.valid_BC.shape[0]} rows, this call has {B}")
        if self.length + L > self.valid_BC.shape[1]:
            self._compact(L)
        n = self.length
        S = n + L
        self.valid_BC[:, n:S] = True if valid_BL is None else valid_BL
        self.slot_tag_C[n:S] = -1
        self._pending = L
        pos_BL, step_BL = coordinates(starts_BL, valid_BL, self.pos_B, self.step_B)
        self.slot_pos_BC[:, n:S], self.slot_step_BC[:, n:S] = pos_BL, step_BL
        self.slot_start_BC[:, n:S], self.slot_action_BC[:, n:S] = starts_BL, is_action_BL
        self.pos_B, self.step_B = pos_BL[:, -1], step_BL[:, -1]
        self.call_pos_BL, self.call_step_BL = pos_BL, step_BL
        self.key_step_BS = self.slot_step_BC[:, :S]
        hidden_BLS = None
        if self.hide_past_actions:
            hidden_BLS = hidden_past_actions(self.slot_action_BC[:, :S], self.key_step_BS, step_BL)
            if not bool(hidden_BLS.any()):
                hidden_BLS = None
        # a mask is needed once any written slot is invalid for some row or hidden
        if not self.always_mask and hidden_BLS is None and bool(self.valid_BC[:, :S].all()):
            self._mask = None
        else:
            self._mask = attention_mask(self.valid_BC[:, :S], n, L, hidden_BLS)

    def append(self, layer: int, k_BHLd: torch.Tensor, v_BHLd: torch.Tensor):
        B, H, L, Dh = k_BHLd.shape
        cap = self.valid_BC.shape[1]
        if self.k[layer] is None or self.k[layer].shape[2] != cap:
            old_k, old_v = self.k[layer], self.v[layer]
            self.k[layer] = k_BHLd.new_zeros(B, H, cap, Dh)
            self.v[layer] = v_BHLd.new_zeros(B, H, cap, Dh)
            if old_k is not None:
                self.k[layer][:, :, :old_k.shape[2]] = old_k
                self.v[layer][:, :, :old_v.shape[2]] = old_v
        n = self.length
        self.k[layer][:, :, n:n + L] = k_BHLd
        self.v[layer][:, :, n:n + L] = v_BHLd
        return self.k[layer][:, :, :n + L], self.v[layer][:, :, :n + L]  # (B, H, S, Dh)

    def end(self) -> None:
        self.length += self._pending
        self._pending = 0

    def reserve(self, n: int) -> None:
        """Makes room for ``n`` more slots now (compacting or growing), so that slots written
        by the next calls stay where they are until then."""
        if self.valid_BC is not None and self.length + n > self.valid_BC.shape[1]:
            self._compact(n)

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """(B, 1, L, S) boolean mask of the call in progress, or None when plain causal."""
        return self._mask

    # --- callers manage the slots with these ----------------------------------------
    def live(self) -> int:
        """Slots some row may still attend to (written and not evicted)."""
        if self.valid_BC is None:
            return 0
        return int(self.valid_BC[:, :self.length].any(0).sum())

    def live_tags(self) -> tuple[np.ndarray, np.ndarray]:
        """(live_S, tags_S) on the host over the written slots: live for some row (written
        and not evicted), and each slot's tag (one read of the device)."""
        S = self.length
        if self.valid_BC is None:
            return np.zeros(0, bool), np.zeros(0, np.int64)
        return (self.valid_BC[:, :S].any(0).cpu().numpy(),
                self.slot_tag_C[:S].cpu().numpy())

    def tag(self, start: int, stop: int, value: int) -> None:
        self.slot_tag_C[start:stop] = value

    def evict(self, slots_C) -> None:
        """Invalidates the written slots where ``slots_C`` (bool over ``length``, a tensor
        or a numpy array) is True, then renumbers the live ones."""
        slots_C = torch.as_tensor(slots_C, device=self.valid_BC.device)
        self.valid_BC[:, :self.length] &= ~slots_C
        self._renumber()

    def live_coordinates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(valid_BS, pos_BS, step_BS) of the written slots: what attention sees."""
        S = self.length
        return self.valid_BC[:, :S], self.slot_pos_BC[:, :S], self.slot_step_BC[:, :S]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps only batch rows ``rows`` (environments whose episode goes on)."""
        for name in ("valid_BC", "slot_pos_BC", "slot_step_BC", "slot_start_BC",
                     "slot_action_BC", "pos_B", "step_B"):
            setattr(self, name, getattr(self, name).index_select(0, rows))
        for i, k in enumerate(self.k):
            if k is not None:
                self.k[i] = k.index_select(0, rows)
                self.v[i] = self.v[i].index_select(0, rows)

    def _renumber(self) -> None:
        """Live slots get the coordinates of their order among the row's live slots, plus a
        per-row constant that keeps the row's newest live slot where it is; rotary keys of
        the slots that moved are rotated by their shift."""
        S = self.length
        if S == 0 or not bool(self.valid_BC[:, :S].any()):
            return
        shift_BS = self._renumber_coordinates()
        if self.rotary is None:
            return
        moved_n = shift_BS.any(0).nonzero().squeeze(1)
        if moved_n.numel() == 0:
            return
        cos_B1nd, sin_B1nd = self.rotary.cos_sin(shift_BS[:, moved_n])
        for k in self.k:
            if k is not None:
                k[:, :, moved_n] = rotate(k[:, :, moved_n], cos_B1nd, sin_B1nd)

    def _renumber_coordinates(self) -> torch.Tensor:
        """``_renumber``'s coordinates, in place and without a host read; returns each
        written slot's position shift (B, S), 0 where a slot is not live or did not move (a
        row with no live slot keeps its numbers)."""
        S = self.length
        valid_BS = self.valid_BC[:, :S]
        live_pos_BS = valid_BS.long().cumsum(1)
        live_step_BS = (self.slot_start_BC[:, :S] & valid_BS).long().cumsum(1)
        newest_B = S - 1 - valid_BS.flip(1).long().argmax(1)
        rows_B = torch.arange(valid_BS.shape[0], device=valid_BS.device)
        pos_BS, step_BS = self.slot_pos_BC[:, :S], self.slot_step_BC[:, :S]
        new_pos_BS = live_pos_BS + (pos_BS[rows_B, newest_B] - live_pos_BS[rows_B, newest_B])[:, None]
        new_step_BS = live_step_BS + (step_BS[rows_B, newest_B]
                                      - live_step_BS[rows_B, newest_B])[:, None]
        shift_BS = torch.where(valid_BS, new_pos_BS - pos_BS, 0)
        pos_BS.copy_(torch.where(valid_BS, new_pos_BS, pos_BS))
        step_BS.copy_(torch.where(valid_BS, new_step_BS, step_BS))
        return shift_BS

    def _compact(self, incoming: int) -> None:
        """Moves live slots to the front in order; grows the buffer when still too small."""
        keep_S = self.valid_BC[:, :self.length].any(0).nonzero().squeeze(1)
        n = keep_S.numel()
        cap = self.valid_BC.shape[1]
        if n + incoming > cap:
            cap = max(2 * cap, n + incoming)

        def moved(buf: torch.Tensor, dim: int, fill=0) -> torch.Tensor:
            shape = list(buf.shape)
            shape[dim] = cap
            new = torch.full(shape, fill, dtype=buf.dtype, device=buf.device)
            new.narrow(dim, 0, n).copy_(buf.index_select(dim, keep_S))
            return new

        self.slot_tag_C = moved(self.slot_tag_C, 0, -1)
        for name in ("valid_BC", "slot_pos_BC", "slot_step_BC", "slot_start_BC", "slot_action_BC"):
            setattr(self, name, moved(getattr(self, name), 1))
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                if t is not None:
                    buf[i] = moved(t, 2)
        self.length = n
