"""A KV cache whose every tensor keeps its shape and its memory, for CUDA-graphed decoding.

``KVCache`` slices its buffers to the slots written so far, grows them when full and asks the
device which slots are live: each call then has its own shapes and host reads, which a CUDA
graph cannot replay. ``StaticKVCache`` holds the same state in buffers of a fixed capacity C,
allocated once and never moved:

- attention always sees all C slots, through a mask (slots not written yet are invalid);
- the slots a call writes start at a device scalar (``start_1``), so that one captured graph
  serves every call of its shape wherever the cache stands;
- the host keeps its own copy of what it decides on (which slots are live, each slot's tag),
  so that evicting whole timesteps and compacting the buffer read nothing back.

A call is prepared on the host (``prepare``: room, write position) and then run on the
device (``begin``, ``append``, by the model's forward, or by the replay of a graph that
captured them); ``end`` books it. The coordinates, the mask and the renumbering after an
eviction are those of ``KVCache`` (a test checks that the two caches agree).

Shape letters: B rows, H heads, C slots (capacity), L positions of this call, Dh head width.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from moe_gato.model.kv_cache import KVCache, attention_mask, hidden_past_actions
from moe_gato.model.positions import Rotary, coordinates, rotate


class StaticKVCache(KVCache):
    """``KVCache``'s interface over fixed buffers of ``rows`` x ``capacity`` slots on
    ``device`` (see the module docstring). A call may not need more slots than the capacity
    holds after compacting the live ones: that is an error, not a reallocation."""

    def __init__(self, num_layers: int, *, rows: int, capacity: int, device,
                 hide_past_actions: bool = False, rotary: Rotary | None = None):
        if rows < 1 or capacity < 1:
            raise ValueError(f"rows and capacity must be >= 1, got {rows} and {capacity}")
        super().__init__(num_layers, capacity=capacity, hide_past_actions=hide_past_actions,
                         always_mask=True, rotary=rotary)
        device = torch.device(device)
        B, C = rows, capacity

        def zeros(dtype, *shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.valid_BC = zeros(torch.bool, B, C)
        self.slot_pos_BC, self.slot_step_BC = zeros(torch.long, B, C), zeros(torch.long, B, C)
        self.slot_start_BC = zeros(torch.bool, B, C)
        self.slot_action_BC = zeros(torch.bool, B, C)
        self.slot_tag_C = torch.full((C,), -1, dtype=torch.long, device=device)
        self.pos_B = torch.full((B,), -1, dtype=torch.long, device=device)
        self.step_B = torch.full((B,), -1, dtype=torch.long, device=device)
        self.start_1 = zeros(torch.long, ())          # first slot of the call (device)
        self.slots_C = torch.arange(C, device=device)
        # the host's copy: written and not evicted, and each slot's tag
        self.live_C = np.zeros(C, bool)
        self.tag_C = np.full(C, -1, np.int64)
        self._prepared = False
        self._idx_L: torch.Tensor | None = None
        #: counts the times the buffers were replaced (``select_rows``): graphs captured
        #: before hold the old ones
        self.generation = 0

    # --- host side: what a graph replay needs done around it --------------------------
    def prepare(self, L: int) -> None:
        """Makes room for a call of ``L`` positions (compacting) and sets its write
        position; the call's slots count as live with no tag."""
        self.reserve(L)
        n = self.length
        self.start_1.fill_(n)
        self.live_C[n:n + L] = True
        self.tag_C[n:n + L] = -1
        self.slot_tag_C[n:n + L] = -1
        self._pending, self._prepared = L, True

    def end(self) -> None:
        super().end()
        self._prepared = False

    @contextlib.contextmanager
    def rehearsal(self):
        """Calls inside (a graph's warm-up and capture) leave the cache as it was: the host
        bookkeeping and each row's last coordinates are restored; the slots they wrote are
        the ones the real call writes next."""
        saved = (self.length, self._pending, self._prepared)
        pos_B, step_B = self.pos_B.clone(), self.step_B.clone()
        try:
            yield
        finally:
            self.length, self._pending, self._prepared = saved
            self.pos_B.copy_(pos_B)
            self.step_B.copy_(step_B)

    def clear(self) -> None:
        """Empties the cache for a new episode; the buffers stay (and the graphs that read
        them stay valid)."""
        self.length, self._pending, self._prepared = 0, 0, False
        self.valid_BC.zero_()
        self.slot_tag_C.fill_(-1)
        self.pos_B.fill_(-1)
        self.step_B.fill_(-1)
        self.live_C[:] = False
        self.tag_C[:] = -1

    # --- device side: the model calls these (inside a captured graph too) -------------
    def begin(self, valid_BL: torch.Tensor | None, B: int, L: int, device, *,
              starts_BL: torch.Tensor, is_action_BL: torch.Tensor) -> None:
        if B != self.valid_BC.shape[0]:
            raise ValueError(f"the cache holds {self.valid_BC.shape[0]} rows, this call has {B}")
        if not self._prepared:  # a forward called directly, not by a graph runner
            self.prepare(L)
        elif L != self._pending:
            raise ValueError(f"the cache was prepared for {self._pending} positions, "
                             f"this call has {L}")
        idx_L = self.start_1 + self.slots_C[:L]
        self._idx_L = idx_L
        valid = torch.ones_like(starts_BL) if valid_BL is None else valid_BL
        pos_BL, step_BL = coordinates(starts_BL, valid_BL, self.pos_B, self.step_B)
        for buf, new in ((self.valid_BC, valid), (self.slot_pos_BC, pos_BL),
                         (self.slot_step_BC, step_BL), (self.slot_start_BC, starts_BL),
                         (self.slot_action_BC, is_action_BL)):
            buf.index_copy_(1, idx_L, new)
        self.pos_B.copy_(pos_BL[:, -1])
        self.step_B.copy_(step_BL[:, -1])
        self.call_pos_BL, self.call_step_BL = pos_BL, step_BL
        self.key_step_BS = self.slot_step_BC
        hidden_BLC = None
        if self.hide_past_actions:
            hidden_BLC = hidden_past_actions(self.slot_action_BC, self.slot_step_BC, step_BL)
        self._mask = attention_mask(self.valid_BC, self.start_1, L, hidden_BLC)

    def append(self, layer: int, k_BHLd: torch.Tensor, v_BHLd: torch.Tensor):
        if self.k[layer] is None:  # first call (eager, before any capture): allocate once
            B, H, _, Dh = k_BHLd.shape
            C = self.valid_BC.shape[1]
            self.k[layer] = k_BHLd.new_zeros(B, H, C, Dh)
            self.v[layer] = v_BHLd.new_zeros(B, H, C, Dh)
        self.k[layer].index_copy_(2, self._idx_L, k_BHLd.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self._idx_L, v_BHLd.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]  # (B, H, C, Dh): every slot, masked

    # --- callers manage the slots with these (host decisions, no reads) ---------------
    def live(self) -> int:
        return int(self.live_C[:self.length].sum())

    def live_tags(self) -> tuple[np.ndarray, np.ndarray]:
        return self.live_C[:self.length].copy(), self.tag_C[:self.length].copy()

    def tag(self, start: int, stop: int, value: int) -> None:
        self.tag_C[start:stop] = value
        self.slot_tag_C[start:stop] = value

    def evict(self, slots_C) -> None:
        """Invalidates the written slots where ``slots_C`` (bool over ``length``, numpy or
        tensor) is True and renumbers the live ones, as ``KVCache.evict``."""
        S = self.length
        evict_S = np.asarray(slots_C.cpu() if isinstance(slots_C, torch.Tensor) else slots_C,
                             bool)[:S]
        if not evict_S.any():
            return
        # only live slots before an evicted one can move (the renumbering is anchored at
        # each row's newest slot): none, no rotation of keys
        last = np.flatnonzero(evict_S)[-1]
        moved = bool((self.live_C[:last] & ~evict_S[:last]).any())
        self.live_C[:S] &= ~evict_S
        evict_t = torch.from_numpy(evict_S).to(self.valid_BC.device, non_blocking=True)
        self.valid_BC[:, :S] &= ~evict_t
        self._renumber_static(moved)

    def select_rows(self, rows: torch.Tensor) -> None:
        """``KVCache.select_rows``, into new buffers (``generation`` counts it); slots that
        only dropped rows used are no longer live (one read of the device, once per drop)."""
        super().select_rows(rows)
        self.generation += 1
        S = self.length
        self.live_C[:S] &= self.valid_BC[:, :S].any(0).cpu().numpy()

    def _renumber_static(self, moved: bool) -> None:
        """``KVCache._renumber`` without its host reads: the keys are rotated only when the
        host knows slots may have moved (``moved``), and then all of them (by zero where
        nothing moved, which leaves a key exact)."""
        shift_BS = self._renumber_coordinates()
        if self.rotary is None or not moved:
            return
        S = self.length
        cos_B1Sd, sin_B1Sd = self.rotary.cos_sin(shift_BS)
        for k in self.k:
            if k is not None:
                k[:, :, :S] = rotate(k[:, :, :S], cos_B1Sd, sin_B1Sd)

    def _compact(self, incoming: int) -> None:
        """Moves the live slots to the front in order, in place (the buffers keep their
        memory); the slots after them are reset."""
        keep = np.flatnonzero(self.live_C[:self.length])
        n, C = len(keep), self.valid_BC.shape[1]
        if n + incoming > C:
            raise ValueError(f"a static cache of {C} slots cannot hold {n} live slots and a "
                             f"call of {incoming} (evict first, or give it a larger capacity)")
        keep_t = torch.from_numpy(keep).to(self.valid_BC.device)
        for buf, dim in ((self.slot_tag_C, 0), (self.valid_BC, 1), (self.slot_pos_BC, 1),
                         (self.slot_step_BC, 1), (self.slot_start_BC, 1),
                         (self.slot_action_BC, 1), *((t, 2) for t in self.k if t is not None),
                         *((t, 2) for t in self.v if t is not None)):
            buf.narrow(dim, 0, n).copy_(buf.index_select(dim, keep_t))
        self.valid_BC[:, n:] = False
        self.slot_tag_C[n:] = -1
        self.live_C[:n], self.live_C[n:] = self.live_C[keep], False
        self.tag_C[:n], self.tag_C[n:] = self.tag_C[keep], -1
        self.length = n
