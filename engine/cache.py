"""Static, preallocated KV caches, one per layer that owns K/V (KV-shared layers read their source's).

Layout per cache layer: k, v [B, Hkv, S, D] and `slot_pos` [B, S] int32, the absolute position held in
each slot (-1 = empty). Sliding layers keep a ring buffer of S = window + MAX_DRAFT_TOKENS + 1 slots
(slot = pos % S): the spare slots let a verify step write K+1 draft positions without evicting keys a
query of that step still needs, so rejected drafts never force a re-prefill. Full layers keep a linear
cache of S = max_context slots (slot = pos). Because every slot records its position, attention masks
are computed from positions alone, stale entries from rejected drafts (position > query) are invisible,
and all shapes are static, so a decode step can be captured as a CUDA graph. One extra physical slot
(index S, `trash`) takes the writes of padding queries (position -1): its position stays -1, so it is
never visible, and a padded row of a step can never overwrite a real key.
"""
from __future__ import annotations

import torch

from .config import ArchConfig
from .knobs import MAX_DRAFT_TOKENS


class LayerCache:
    def __init__(self, batch: int, kv_heads: int, slots: int, head_dim: int, ring: bool,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.ring = ring
        self.slots = slots  # logical slots; physical slot `slots` is the trash slot
        self.trash = slots
        self.k = torch.zeros(batch, kv_heads, slots + 1, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((batch, slots + 1), -1, device=device, dtype=torch.int32)

    def logical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v, slot_pos) views of the logical slots, the trash slot left out: it is never visible, so
        attention need not read it (left in, it made a 1024-slot linear cache 17 splits of 64 slots)."""
        n = self.slots
        return self.k[:, :, :n], self.v[:, :, :n], self.slot_pos[:, :n]

    def slot_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Physical slot of each position; padding (-1) goes to the trash slot."""
        slot = positions.clamp(min=0) % self.slots if self.ring else positions.clamp(min=0)
        return torch.where(positions >= 0, slot, torch.full_like(slot, self.trash))

    def write(self, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """rows [B'], positions [B', T] (padding -1), k/v [B', T, Hkv, D] -> scatter into the slots.
        Whole prompts at once, with no host read (prefill can be a CUDA graph): a ring keeps each
        stream's newest `slots` positions, so no two kept positions share a slot; padding and evicted
        positions all land in the trash slot (its content is never visible, its position stays -1)."""
        if self.ring:
            newest = positions.amax(dim=1, keepdim=True)
            positions = torch.where(positions > newest - self.slots, positions, -1)
        slots = self.slot_of(positions).long()
        b = rows.long()[:, None].expand_as(slots)
        self.k[b, :, slots] = k
        self.v[b, :, slots] = v
        self.slot_pos[b, slots] = positions.to(torch.int32)

    def reset_rows(self, rows: torch.Tensor) -> None:
        self.slot_pos.index_fill_(0, rows.long(), -1)  # no host-side value tensor: safe in a graph capture

    def prefix(self, rows: int) -> "LayerCache":
        """The first `rows` streams as views (batch is the outermost dim, so views stay contiguous)."""
        view = LayerCache.__new__(LayerCache)
        view.ring, view.slots, view.trash = self.ring, self.slots, self.trash
        view.k, view.v, view.slot_pos = self.k[:rows], self.v[:rows], self.slot_pos[:rows]
        return view

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2 + self.slot_pos.numel() * 4


class KVCache:
    """All cache layers of a model for `batch` streams."""

    def __init__(self, arch: ArchConfig, batch: int, max_context: int, window: int | None,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.batch = batch
        self.max_context = max_context
        self.window = window
        self.layers: dict[int, LayerCache] = {}
        for i in arch.cache_layers:
            ring = arch.is_sliding(i) and window is not None
            slots = min(window + MAX_DRAFT_TOKENS + 1, max_context) if ring else max_context
            self.layers[i] = LayerCache(batch, arch.kv_heads[i], slots, arch.head_dims[i], ring, device, dtype)

    def check_fits(self, length: int) -> None:
        """A prompt of `length` tokens must fit every linear (full-attention) cache."""
        if length > self.max_context:
            raise ValueError(f"prompt of {length} tokens exceeds the cache's max context {self.max_context}")

    def reset_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers.values():
            layer.reset_rows(rows)

    def prefix(self, rows: int) -> "KVCache":
        """A view of the first `rows` cache rows: a step over them costs what `rows` streams cost, so a
        server with one client in a batch-4 recipe does not pay for three idle rows."""
        if rows == self.batch:
            return self
        if not 1 <= rows < self.batch:
            raise ValueError(f"prefix of {rows} rows from a cache of {self.batch}")
        view = KVCache.__new__(KVCache)
        view.batch, view.max_context, view.window = rows, self.max_context, self.window
        view.layers = {i: layer.prefix(rows) for i, layer in self.layers.items()}
        return view

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers.values())
