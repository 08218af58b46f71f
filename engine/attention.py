"""Attention over fresh keys (prefill/scoring) or over a cache (decode/verify), masked by positions.

Visibility is one rule everywhere: key position kp is visible to query position qp iff
0 <= kp <= qp and (no window, or kp > qp - window). The PyTorch path below is the reference and
the CPU path; on CUDA the decode path goes to the Triton kernel in `kernels/decode_attention.py`.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# VKAE_TRITON_ATTENTION=0 forces the PyTorch path on GPU too (for A/B runs and debugging).
_TRITON_ATTENTION = os.environ.get("VKAE_TRITON_ATTENTION", "1") != "0"


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [B, T], k_pos [B, S] -> bool [B, 1, T, S]. Padding queries (q_pos < 0) see every key
    so their softmax stays finite; their outputs are never used."""
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok &= kp > qp - window
    ok |= qp < 0
    return ok[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: float | None) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], mask [B, 1, T, S] bool -> [B, Hq, T, D]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def attend_cache(q: torch.Tensor, cache, positions: torch.Tensor, window: int | None, scale: float,
                 softcap: float | None, defer_merge_max_splits: int = 0):
    """Decode/verify attention of q [B, T, Hq, D] over one layer cache -> [B, T, Hq, D].
    CUDA: the split-KV Triton kernel (no mask tensor is materialised); CPU: SDPA with a position mask.
    `defer_merge_max_splits` > 0 (CUDA only): where the kernel splits the keys into at most that many
    pieces, the unmerged `kernels.decode_attention.SplitAttention` comes back instead, for the o projection
    to merge (`engine.fused_tail.proj_sandwich`)."""
    k, v, slot_pos = cache.logical()  # the trash slot is never visible
    if q.is_cuda and _TRITON_ATTENTION:
        from kernels.decode_attention import decode_attention, decode_attention_triton

        if defer_merge_max_splits:
            return decode_attention_triton(q, k, v, slot_pos, positions, window or 0, scale,
                                           softcap, finite_cache=cache.ring,
                                           defer_merge_max_splits=defer_merge_max_splits)

        # A ring (sliding layer) is full once a stream passes its window, so its K/V are loaded without
        # waiting for the slot positions; caches start zeroed (engine.cache), so every slot is finite.
        # Linear caches are mostly empty at short contexts: there the visibility mask saves the loads.
        return decode_attention(q, k, v, slot_pos, positions, window or 0, scale, softcap,
                                finite_cache=cache.ring)
    if not cache.ring and not q.is_cuda:
        # A linear cache holds position p in slot p, so slots past the newest query are never visible:
        # attend over the live prefix only. CPU only: a data-dependent length needs a host read, which a
        # CUDA graph capture (the SDPA A/B path on GPU) cannot do.
        live = min(k.shape[2], int(positions.max()) + 1)
        k, v, slot_pos = k[:, :, :live], v[:, :, :live], slot_pos[:, :live]  # views: SDPA takes strides
    mask = visibility(positions, slot_pos, window)
    return attend(q.transpose(1, 2), k, v, mask, scale, softcap).transpose(1, 2)
