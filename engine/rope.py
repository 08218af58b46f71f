"""Rotary position embeddings for both layer types, as tables indexed by absolute position.

Gemma 4 global layers use *proportional* RoPE: only the first `rotary_pairs` frequencies are
non-zero (exponent denominator = the full head_dim), the rest are zero so cos=1/sin=0 and those
dims are position-free. Building the table that way lets one `ops.apply_rope` serve every layer.
"""
from __future__ import annotations

import torch

from .config import RopeSpec


def inv_freq(spec: RopeSpec) -> torch.Tensor:
    idx = torch.arange(0, 2 * spec.rotary_pairs, 2, dtype=torch.int64).float()
    freq = 1.0 / (spec.theta ** (idx / spec.head_dim))
    freq = freq / spec.linear_factor
    nope = spec.head_dim // 2 - spec.rotary_pairs
    if nope > 0:
        freq = torch.cat([freq, torch.zeros(nope)])
    return freq


class RopeTable:
    """cos/sin tables [max_pos, head_dim] in the model dtype, computed in fp32 like the reference."""

    def __init__(self, spec: RopeSpec, max_positions: int, device: torch.device | str, dtype: torch.dtype) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self._build(max_positions)

    def _build(self, n: int) -> None:
        pos = torch.arange(n, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq(self.spec)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=self.device, dtype=self.dtype)
        self.sin = emb.sin().to(device=self.device, dtype=self.dtype)

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def ensure(self, n: int) -> None:
        """Grow the table (outside any CUDA graph) when a longer sequence arrives."""
        if n > self.max_positions:
            self._build(max(n, 2 * self.max_positions))

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (negative = padding, clamped) -> cos, sin [B, T, 1, D] for [B, T, H, D] inputs."""
        p = positions.clamp(min=0)
        return self.cos[p].unsqueeze(2), self.sin[p].unsqueeze(2)

