"""The KV cache of decoding: preallocated slots with a validity mask, so that a control
loop can pad rows, evict whole timesteps and drop finished environments cheaply.

Shape letters: B rows, H heads, C slots (capacity), S slots in use, L positions of this
call, Dh head width.
"""

from __future__ import annotations

import torch


def step_ids(timestep_BL: torch.Tensor, first_B: torch.Tensor | None = None,
             last_ts_B: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) monotone step numbers: +1 wherever the timestep label changes along a row
    (a prompt's timesteps, then the episode's, then padding each count as new steps).
    ``first_B`` / ``last_ts_B`` continue a row whose earlier positions ended at step
    ``first_B`` with label ``last_ts_B`` (the KV cache's calls)."""
    prev_BL = torch.cat([timestep_BL[:, :1] if last_ts_B is None else last_ts_B[:, None],
                         timestep_BL[:, :-1]], dim=1)
    steps_BL = (timestep_BL != prev_BL).long().cumsum(1)
    return steps_BL if first_B is None else steps_BL + first_B[:, None]


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
    slots are invalid. Gato has no global positions (only local positions within a
    timestep), so attention does not care where a key sits: eviction just invalidates
    slots, and when the buffer is full the live slots are compacted to the front in order.
    ``slot_tag_C`` holds a caller's label per slot (the policy stores timestep numbers there
    to evict whole timesteps).
    """

    def __init__(self, num_layers: int, *, capacity: int = 0):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = capacity
        self.length = 0               # slots written, before this call's
        self.valid_BC: torch.Tensor | None = None
        self.slot_tag_C: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._pending = 0             # positions of the call in progress
        # past_actions="hide": per slot its step number and whether it holds an action;
        # per row the step and timestep label of its last written position
        self.slot_step_BC: torch.Tensor | None = None
        self.slot_action_BC: torch.Tensor | None = None
        self.step_B: torch.Tensor | None = None
        self.last_ts_B: torch.Tensor | None = None

    # --- the model calls these ----------------------------------------------------
    def begin(self, valid_BL: torch.Tensor | None, B: int, L: int, device, *,
              timestep_BL: torch.Tensor | None = None,
              is_action_BL: torch.Tensor | None = None) -> None:
        """Reserves slots ``[length, length + L)`` for a forward call of L positions. With
        ``timestep_BL`` and ``is_action_BL`` (a model with ``past_actions="hide"``), action
        slots of earlier steps are hidden from this call's queries."""
        if self.valid_BC is None:
            cap = max(self.capacity, L)
            self.valid_BC = torch.zeros(B, cap, dtype=torch.bool, device=device)
            self.slot_tag_C = torch.full((cap,), -1, dtype=torch.long, device=device)
            if timestep_BL is not None:
                self.slot_step_BC = torch.zeros(B, cap, dtype=torch.long, device=device)
                self.slot_action_BC = torch.zeros(B, cap, dtype=torch.bool, device=device)
        if self.valid_BC.shape[0] != B:
            raise ValueError(f"the cache holds {self.valid_BC.shape[0]} rows, this call has {B}")
        if self.length + L > self.valid_BC.shape[1]:
            self._compact(L)
        n = self.length
        self.valid_BC[:, n:n + L] = True if valid_BL is None else valid_BL
        self.slot_tag_C[n:n + L] = -1
        self._pending = L
        S = n + L
        hidden_BLS = None
        if timestep_BL is not None:
            step_BL = step_ids(timestep_BL, self.step_B, self.last_ts_B)
            self.slot_step_BC[:, n:S] = step_BL
            self.slot_action_BC[:, n:S] = is_action_BL
            self.step_B, self.last_ts_B = step_BL[:, -1], timestep_BL[:, -1]
            hidden_BLS = hidden_past_actions(self.slot_action_BC[:, :S],
                                             self.slot_step_BC[:, :S], step_BL)
            if not bool(hidden_BLS.any()):
                hidden_BLS = None
        # a mask is needed once any written slot is invalid for some row or hidden
        if hidden_BLS is None and bool(self.valid_BC[:, :S].all()):
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

    def tag(self, start: int, stop: int, value: int) -> None:
        self.slot_tag_C[start:stop] = value

    def evict(self, slots_C: torch.Tensor) -> None:
        """Invalidates the written slots where ``slots_C`` (bool, over ``length``) is True."""
        self.valid_BC[:, :self.length] &= ~slots_C

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps only batch rows ``rows`` (environments whose episode goes on)."""
        self.valid_BC = self.valid_BC.index_select(0, rows)
        if self.slot_step_BC is not None:
            self.slot_step_BC = self.slot_step_BC.index_select(0, rows)
            self.slot_action_BC = self.slot_action_BC.index_select(0, rows)
            self.step_B = self.step_B.index_select(0, rows)
            self.last_ts_B = self.last_ts_B.index_select(0, rows)
        for i, k in enumerate(self.k):
            if k is not None:
                self.k[i] = k.index_select(0, rows)
                self.v[i] = self.v[i].index_select(0, rows)

    def _compact(self, incoming: int) -> None:
        """Moves live slots to the front in order; grows the buffer when still too small."""
        keep_S = self.valid_BC[:, :self.length].any(0).nonzero().squeeze(1)
        n = keep_S.numel()
        cap = self.valid_BC.shape[1]
        if n + incoming > cap:
            cap = max(2 * cap, n + incoming)
        valid = torch.zeros(self.valid_BC.shape[0], cap, dtype=torch.bool,
                            device=self.valid_BC.device)
        valid[:, :n] = self.valid_BC.index_select(1, keep_S)
        tag = torch.full((cap,), -1, dtype=torch.long, device=self.valid_BC.device)
        tag[:n] = self.slot_tag_C.index_select(0, keep_S)
        if self.slot_step_BC is not None:
            step = self.slot_step_BC.new_zeros(self.slot_step_BC.shape[0], cap)
            step[:, :n] = self.slot_step_BC.index_select(1, keep_S)
            action = self.slot_action_BC.new_zeros(self.slot_action_BC.shape[0], cap)
            action[:, :n] = self.slot_action_BC.index_select(1, keep_S)
            self.slot_step_BC, self.slot_action_BC = step, action
        for i, k in enumerate(self.k):
            if k is None:
                continue
            for buf in (self.k, self.v):
                new = buf[i].new_zeros(*buf[i].shape[:2], cap, buf[i].shape[3])
                new[:, :, :n] = buf[i].index_select(2, keep_S)
                buf[i] = new
        self.valid_BC, self.slot_tag_C, self.length = valid, tag, n
