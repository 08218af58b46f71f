"""Decode / speculative-verify attention over a slot-addressed KV cache (ring or linear).

Contract (shared with `engine/attention.py`):
    q        [B, T, Hq, D]   T = 1..16 query positions per stream (decode or verify)
    k_cache  [B, Hkv, S, D]  S slots: a sliding layer's ring buffer or a full layer's linear cache
    v_cache  [B, Hkv, S, D]
    slot_pos [B, S]  int     absolute position held by each slot, -1 = empty
    q_pos    [B, T]  int     absolute position of each query, -1 = padding (its output is zeros)
Key j is visible to query t iff 0 <= slot_pos[j] <= q_pos[t] and (window == 0 or
slot_pos[j] > q_pos[t] - window). Because visibility is decided per slot from its stored
position, slot order never matters: a ring needs no unrolling and stale or empty slots are free.

Triton design (SGLang/LightLLM "grouped" flash-decoding, plus windows and ring slots):
  * one program owns a (batch, kv head, row block, KV split); its rows are all T x G queries
    that share the kv head, so each K/V tile is read from HBM once per kv head, not per q head;
  * keys that no row of the tile can see are not loaded at all (masked loads): a huge linear
    cache that is mostly empty, or the out-of-window part of a full cache, costs only its
    slot_pos bytes (4 B per slot against 4*D B of K+V);
  * the sequence is split across programs when batch x kv heads cannot fill the GPU; a second
    kernel merges the splits by log-sum-exp. With one split the first kernel writes the output.
Launches depend only on shapes (no host sync), so they can be captured in CUDA graphs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import invariance, l2_prefetch
from ._common import HAS_TRITON, cdiv, dot_fp32_operands, next_pow2, num_sms, pdl_flags, tl, triton, use_triton

LOG2E = 1.4426950408889634
# The shortest split, in slots. 64, with 64-slot tiles and 8 warps (`_blocks`) and the o projection merging up to
# 16 splits (`engine.fused_tail.ATTN_MERGE_MAX_SPLITS`): H100 graphed E4B step decode 4.235 -> 4.208 ms, 9-row
# verify 4.538 -> 4.416 ms, 3 rounds (`scripts/stage_costs_gpu.py` variant attn_bn64_w8, stop 21; was 128 / 128 /
# 4 / 8, which stop 11 chose before PDL). Env VKAE_ATTN_MIN_SPLIT_SLOTS; read at launch (A/B runs).
MIN_SPLIT_SLOTS = int(os.environ.get("VKAE_ATTN_MIN_SPLIT_SLOTS", "64"))
# cp.async pipeline depth of stage 1 (env VKAE_ATTN_STAGES). At E4B a decode split is one K/V tile, so the
# second stage has nothing to overlap, yet it doubles the shared memory (141 KB at D = 256 with the stop-20 tile of
# 128 slots: one program per SM; `scripts/kernel_resources.py`). Still, one stage was slower: H100 E4B decode step
# +264 us (stop 21, variant attn_st1). Read at launch.
ATTN_STAGES = int(os.environ.get("VKAE_ATTN_STAGES", "2"))
# KV slots per tile (env VKAE_ATTN_BLOCK_N, 0 = the `_blocks` heuristic). A split is whole tiles, so
# MIN_SPLIT_SLOTS below one tile has no effect without a smaller tile. Read at launch.
_BLOCK_N_ENV = os.environ.get("VKAE_ATTN_BLOCK_N", "0")
ATTN_BLOCK_N = int(_BLOCK_N_ENV) if _BLOCK_N_ENV.isdigit() else -1
if ATTN_BLOCK_N != 0 and (ATTN_BLOCK_N < 16 or ATTN_BLOCK_N & (ATTN_BLOCK_N - 1)):  # tl.dot and tl.arange need it
    raise ValueError(f"VKAE_ATTN_BLOCK_N must be 0 (the heuristic) or a power of two >= 16; got {_BLOCK_N_ENV!r}")
# Ask the L2 for each split's K/V (and slot positions) before the PDL wait (env VKAE_ATTN_L2_PREFETCH=1; sm_90
# bulk prefetch, fire and forget). The cache is not read by the kernel before the wait, only named to the L2,
# so the q/k/v epilogue that writes this step's slots meanwhile cannot make anything stale: the L2 holds the
# one copy of a line, and the writes land in it. After the wait the loads find their lines in the L2 instead of
# paying an HBM round trip on the step's critical path. Linear caches are prefetched only up to the newest
# query position (their slots past it are empty). Measured slower, so off: H100, E4B graphed decode 4.533 ->
# 4.590 ms, verify (9) 4.848 -> 4.931 ms, same bits (`scripts/stage_costs_gpu.py` variant attn_l2pf, stop 20).
# Read at launch.
L2_PREFETCH: bool = os.environ.get("VKAE_ATTN_L2_PREFETCH", "0") == "1"
# Warps of stage 1 (env VKAE_ATTN_NUM_WARPS, 0 = the `_blocks` heuristic). Read at launch.
ATTN_NUM_WARPS = int(os.environ.get("VKAE_ATTN_NUM_WARPS", "0"))
if ATTN_NUM_WARPS not in (0, 1, 2, 4, 8, 16):
    raise ValueError(f"VKAE_ATTN_NUM_WARPS must be 0 (the heuristic) or 1, 2, 4, 8 or 16; got {ATTN_NUM_WARPS}")
# Row block of the row-invariant mode: the block a 1-token decode step picks anyway when G <= 16
# (Gemma: G = 2..8), so decode keeps its config and a verify step just runs more row blocks.
INVARIANT_BLOCK_M = 16


# --------------------------------------------------------------------------------------------
# Reference (CPU fallback and test oracle)
# --------------------------------------------------------------------------------------------
def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_pos: torch.Tensor, q_pos: torch.Tensor, window: int, scale: float,
                         softcap: float | None = None) -> torch.Tensor:
    """fp32 reference. Empty slots (slot_pos < 0) are zeroed first so that garbage (even NaN)
    in never-written cache memory cannot leak through 0 * NaN, matching the kernel."""
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    out = torch.empty(B, T, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):  # one stream at a time bounds the fp32 score memory for long caches
        sp = slot_pos[b].long()                                         # [S]
        qp = q_pos[b].long()[:, None]                                   # [T, 1]
        vis = (sp[None, :] >= 0) & (sp[None, :] <= qp)                  # [T, S]
        if window > 0:
            vis &= sp[None, :] > qp - window
        filled = (sp >= 0)[None, :, None]
        k = torch.where(filled, k_cache[b].float(), 0.0)                # [Hkv, S, D]
        v = torch.where(filled, v_cache[b].float(), 0.0)
        qf = q[b].float().reshape(T, Hkv, G, D)
        s = torch.einsum("tkgd,ksd->kgts", qf, k) * scale               # [Hkv, G, T, S]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~vis, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)         # rows with no key
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.einsum("kgts,ksd->tkgd", p / torch.where(denom == 0, 1.0, denom), v)
        out[b] = o.reshape(T, Hq, D)
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._common import pdl_wait
    from .l2_prefetch import _prefetch_span

    @triton.jit
    def _prefetch_split(k_row, v_row, slot_row, qpos_base, spt, start, S, split_len, T, ROW_BYTES: tl.constexpr,
                        FULL_SPLIT: tl.constexpr, BLOCK_T: tl.constexpr):
        """Bulk L2 prefetch of a split's K and V rows and slot positions; k_row / v_row / slot_row point at the
        split's first slot (K/V rows contiguous, ROW_BYTES each). A linear cache (not FULL_SPLIT) stops at the
        newest query position, read from q_pos: a value another kernel is still writing could only misdirect
        a prefetch, never change a result."""
        end = tl.minimum(start + split_len, S)
        if not FULL_SPLIT:
            offs_t = tl.arange(0, BLOCK_T)
            qp = tl.load(qpos_base + offs_t * spt, mask=offs_t < T, other=-1)
            end = tl.minimum(end, tl.max(qp, axis=0) + 1)
        n = tl.maximum(end - start, 0)
        _prefetch_span(k_row.to(tl.int64), n * ROW_BYTES, 0, 1, 4)
        _prefetch_span(v_row.to(tl.int64), n * ROW_BYTES, 0, 1, 4)
        _prefetch_span(slot_row.to(tl.int64), n * 4 // 16 * 16, 0, 1, 1)  # the bulk prefetch takes 16-byte multiples

    @triton.jit
    def _attn_stage1(q_ptr, k_ptr, v_ptr, slot_ptr, qpos_ptr, out_ptr, opart_ptr, lse_ptr,
                     sqb, sqt, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                     ssb, sss, spb, spt, sob, sot, soh, sod,
                     S, T, HQ, HKV, window, split_len, qk_scale, softcap,
                     G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, EAGER_KV: tl.constexpr,
                     L2_PF: tl.constexpr, ROW_BYTES: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr):
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = (pid_bh // HKV).to(tl.int64)  # int64: B*Hkv*S*D exceeds 2^31 at 64 x 131072 x 512
        kvh = pid_bh % HKV
        if L2_PF:  # before the wait: only addresses, nothing read (see L2_PREFETCH)
            first = pid_s * split_len
            _prefetch_split(k_ptr + b * skb + kvh * skh + first * sks, v_ptr + b * svb + kvh * svh + first * svs,
                            slot_ptr + b * ssb + first * sss, qpos_ptr + b * spb, spt, first, S, split_len, T,
                            ROW_BYTES, EAGER_KV, BLOCK_T)
        pdl_wait(PDL)

        # Rows of this program: r = t*G + g for the G query heads of this kv head.
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T * G
        t = rows // G
        h = kvh * G + rows % G
        offs_d = tl.arange(0, D)

        qp = tl.load(qpos_ptr + b * spb + t * spt, mask=row_ok, other=-1)
        # Window as a lower bound: visible iff lo < pos <= qp; window 0 -> lo = -1 (pos >= 0).
        lo = tl.where(window > 0, qp - window, -1)
        lo = tl.maximum(lo, -1)
        q = tl.load(q_ptr + b * sqb + t[:, None] * sqt + h[:, None] * sqh + offs_d[None, :] * sqd,
                    mask=row_ok[:, None], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)

        k_base = k_ptr + b * skb + kvh * skh
        v_base = v_ptr + b * svb + kvh * svh
        start = pid_s * split_len
        end = tl.minimum(start + split_len, S)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            sp = tl.load(slot_ptr + b * ssb + offs_n * sss, mask=offs_n < end, other=-1)
            vis = (sp[None, :] > lo[:, None]) & (sp[None, :] <= qp[:, None])
            # Without EAGER_KV a key no row can see is never fetched (predicated off): empty/out-of-window
            # tiles cost only their slot_pos bytes, and garbage in empty slots stays out.
            if EAGER_KV:
                # Every in-range slot, issued with the slot positions: no load waits for another (the ring
                # of a sliding layer is full once the stream passes its window). The cache must hold
                # finite values everywhere (the engine's caches start zeroed): an invisible key's score is
                # replaced by -inf and its value is multiplied by p = 0.
                need = offs_n < end
            else:
                need = tl.max(vis.to(tl.int32), axis=0) > 0
            k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd,
                        mask=need[:, None], other=0.0)
            # V with K (one round of loads), not after the softmax, whose reductions would order it after
            v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd,
                        mask=need[:, None], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k))
            if HAS_SOFTCAP:
                # softcap * tanh(x / softcap), tanh via exp: no libdevice, works in the interpreter.
                x = s * (qk_scale / softcap)
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * 1.4426950408889634
            else:
                s = s * qk_scale  # qk_scale already carries log2(e): softmax runs in base 2
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        inv_l = tl.where(l_i == 0.0, 0.0, 1.0 / tl.where(l_i == 0.0, 1.0, l_i))
        o = acc * inv_l[:, None]  # rows with no visible key (padding queries) come out as zeros
        if NUM_SPLITS == 1:
            o_ptrs = out_ptr + b * sob + t[:, None] * sot + h[:, None] * soh + offs_d[None, :] * sod
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            grow = ((b * T + t) * HQ + h).to(tl.int64)  # row of the [B*T*Hq, NUM_SPLITS, D] scratch
            # A row that saw no key in this split stores only its lse (-inf): stage 2 gives it weight 0 and
            # never loads its partial, so an empty split (most of a long linear cache) costs no partial traffic.
            tl.store(opart_ptr + (grow[:, None] * NUM_SPLITS + pid_s) * D + offs_d[None, :], o,
                     mask=row_ok[:, None] & (l_i > 0.0)[:, None])
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(lse_ptr + grow * NUM_SPLITS + pid_s, lse, mask=row_ok)

    @triton.jit
    def merge_splits(opart_ptr, lse_ptr, row, offs_d, ok, NUM_SPLITS, D: tl.constexpr, BLOCK_S: tl.constexpr):
        """The log-sum-exp merge of stage 1's KV splits, elementwise: element i of the result (fp32) is output
        column offs_d[i] of scratch row row[i] (int64), for the elements where `ok`. Shared by stage 2 and by
        `kernels.gemv_merged_input` (the o projection merging its own input), so both give the same bits: the
        maximum, then the weights, their sum and the weighted partials, all in split order s = 0, 1, ...
        Unrolled over BLOCK_S (>= NUM_SPLITS): every split's loads issue at once. A split past NUM_SPLITS, or
        one with weight 0 (no visible key: stage 1 stored no partial), is not loaded and adds 0 * 0 = 0."""
        zero = (offs_d * 0).to(tl.float32)
        m = zero + float("-inf")
        for s in tl.static_range(BLOCK_S):
            in_range = ok & ((offs_d * 0 + s) < NUM_SPLITS)
            m = tl.maximum(m, tl.load(lse_ptr + row * NUM_SPLITS + s, mask=in_range, other=float("-inf")))
        m = tl.where(m == float("-inf"), 0.0, m)
        denom = zero
        acc = zero
        for s in tl.static_range(BLOCK_S):
            lse = tl.load(lse_ptr + row * NUM_SPLITS + s, mask=ok & ((offs_d * 0 + s) < NUM_SPLITS),
                          other=float("-inf"))
            w = tl.exp2(lse - m)  # empty split (or past NUM_SPLITS): exp2(-inf) = 0
            denom += w
            acc += w * tl.load(opart_ptr + (row * NUM_SPLITS + s) * D + offs_d, mask=ok & (w > 0.0), other=0.0)
        return acc / tl.where(denom == 0.0, 1.0, denom)

    @triton.jit
    def _attn_stage2(opart_ptr, lse_ptr, out_ptr, NUM_SPLITS,
                     D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, SEQUENTIAL: tl.constexpr,
                     PDL: tl.constexpr):
        # One program per (b, t, q head) row; the output is contiguous [B, T, Hq, D].
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, D)
        if SEQUENTIAL:  # the o projection's merge, bit for bit (`merge_splits`)
            o = merge_splits(opart_ptr, lse_ptr, row + offs_d * 0, offs_d, offs_d < D, NUM_SPLITS, D, BLOCK_S)
        else:
            # Many splits (a long linear cache): unrolled, merge_splits issues a dependent lse -> partial load pair
            # per split, one memory round trip each (H100, 65 splits at D = 512: 131 us a call). Here the lse row
            # is one vector load and the partials come CHUNK_S splits a load; empty splits load nothing.
            offs_s = tl.arange(0, BLOCK_S)
            lse = tl.load(lse_ptr + row * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
            m = tl.max(lse, axis=0)
            m = tl.where(m == float("-inf"), 0.0, m)
            denom = tl.sum(tl.exp2(lse - m), axis=0)
            acc = tl.zeros([CHUNK_S, D], tl.float32)  # elementwise in the loop, reduced after it
            for s0 in range(0, NUM_SPLITS, CHUNK_S):
                offs_c = s0 + tl.arange(0, CHUNK_S)
                w = tl.exp2(tl.load(lse_ptr + row * NUM_SPLITS + offs_c, mask=offs_c < NUM_SPLITS,
                                    other=float("-inf")) - m)
                part = tl.load(opart_ptr + (row * NUM_SPLITS + offs_c[:, None]) * D + offs_d[None, :],
                               mask=(w > 0.0)[:, None], other=0.0)
                acc += w[:, None] * part
            o = tl.sum(acc, axis=0) / tl.where(denom == 0.0, 1.0, denom)
        tl.store(out_ptr + row * D + offs_d, o.to(out_ptr.dtype.element_ty))


def _blocks(D: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). Keeps the fp32 accumulator (BLOCK_M x D) near 16K elements and
    one K or V tile (BLOCK_N x D) at most 64 slots and 32K elements: D=512 -> 32 x 64, D=256 -> 64 x 64 (E4B).
    Decode attention at short contexts is latency-bound. Timed alone before PDL (stop 11), one 128-slot tile a
    split beat two narrow ones (E4B's sliding layer 9.8 -> 7.9 us a call). Inside the graphed PDL step, 64-slot
    tiles with 8 warps at D >= 256 and twice the splits were faster (see MIN_SPLIT_SLOTS)."""
    block_m = min(max(16, next_pow2(rows)), max(16, 16384 // D))
    block_n = ATTN_BLOCK_N or max(16, min(64, 32768 // D))
    num_warps = ATTN_NUM_WARPS or (8 if D >= 256 or block_m * D > 8192 else 4)
    return block_m, block_n, num_warps


def launch_config(D: int, rows: int, B: int, Hkv: int, S: int, sms: int, block_m: int | None = None,
                  block_n: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_splits) for `rows` = T x G query rows per (stream, kv head);
    `block_m` / `block_n` override the tile (tests).

    Row-invariant mode (`kernels.invariance`): tile, warps and KV split points (hence the
    log-sum-exp merge order) depend on D, S, B x Hkv and the SM count only, so a query row gets the
    same arithmetic in a T = 1 decode step as in the first rows of a T = K+1 verify step; a verify
    step just runs more row blocks. Otherwise BLOCK_M grows with the rows (one row block: K/V read
    once per kv head) and the split count counts the row blocks."""
    invariant = invariance.ROW_INVARIANT
    bm, bn, num_warps = _blocks(D, INVARIANT_BLOCK_M if invariant else rows)
    block_m, block_n = block_m or bm, block_n or bn
    programs = B * Hkv if invariant else B * Hkv * cdiv(rows, block_m)
    return block_m, block_n, num_warps, _num_splits(S, programs, block_n, sms)


def _num_splits(S: int, programs: int, block_n: int, sms: int) -> int:
    """Split the sequence only as far as needed to give ~2 programs per SM, and never into
    pieces shorter than MIN_SPLIT_SLOTS (rounded to whole tiles)."""
    want = cdiv(2 * sms, programs)
    return max(1, min(want, cdiv(S, max(MIN_SPLIT_SLOTS, block_n)), 256))


def split_layout(S: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """(split_len, num_splits): whole BLOCK_N tiles per split, and no split starting past the end."""
    split_len = cdiv(cdiv(S, num_splits), block_n) * block_n
    return split_len, cdiv(S, split_len)


def stage2_block(num_splits: int) -> int:
    """BLOCK_S of the merge kernel: the splits rounded up to a power of two (at least 2)."""
    return max(2, next_pow2(num_splits))


# Stage 2 merges up to this many splits with `merge_splits` (sequential in split order, the bits of the o
# projection's own merge, `engine.fused_tail`, which therefore defers at most this many), more with the vector
# merge: another order of the same sums, taken by decode and verify rows alike (row invariance holds).
SEQUENTIAL_MERGE_MAX_SPLITS = 16
STAGE2_CHUNK_S = 8  # splits per partial load of the vector merge: [8, 512] fp32 is 32 registers a thread at 4 warps


@dataclass(frozen=True)
class SplitAttention:
    """Stage 1's output before the merge: opart [B*T*Hq, num_splits, D] fp32 partial outputs and lse
    [B*T*Hq, num_splits] (base 2; -inf where a split saw no key) for an attention output of `shape`
    (B, T, Hq, D) in `dtype`. The consumer merges it (`kernels.gemv_merged_input`: the o projection
    computes its own input) or calls `merged()` (stage 2)."""
    opart: torch.Tensor
    lse: torch.Tensor
    num_splits: int
    shape: tuple[int, int, int, int]
    dtype: torch.dtype

    def merged(self) -> torch.Tensor:
        """Stage 2: the attention output [B, T, Hq, D] in `dtype`."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.opart.device)
        D = self.shape[3]
        _attn_stage2[(self.opart.shape[0],)](self.opart, self.lse, out, self.num_splits, D=D,
                                             BLOCK_S=stage2_block(self.num_splits), CHUNK_S=STAGE2_CHUNK_S,
                                             SEQUENTIAL=self.num_splits <= SEQUENTIAL_MERGE_MAX_SPLITS,
                                             num_warps=4 if D >= 256 else 2, **pdl_flags(self.opart, short=True))
        return out


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_pos: torch.Tensor, q_pos: torch.Tensor, window: int, scale: float,
                            softcap: float | None = None, num_splits: int | None = None,
                            block_n: int | None = None, block_m: int | None = None,
                            finite_cache: bool = False, num_stages: int | None = None,
                            defer_merge_max_splits: int = 0) -> torch.Tensor | SplitAttention:
    """Triton path. `num_splits` / `block_n` / `block_m` override the heuristics (tests use them
    to force the split-KV reduction and several row blocks on tiny shapes). `finite_cache`: the caller
    promises finite values in every slot (written or zero-initialised); the kernel then loads K/V with the
    slot positions instead of after them (one memory round trip fewer per tile). `num_stages` overrides
    ATTN_STAGES (sweeps). With 1 < splits <= `defer_merge_max_splits` stage 2 is not launched: the result is
    the unmerged `SplitAttention`, for a consumer that merges it itself."""
    B, T, Hq, D = q.shape
    Bk, Hkv, S, Dk = k_cache.shape
    if (Bk, Dk) != (B, D) or v_cache.shape != k_cache.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim {D} must be a power of two >= 16")
    if tuple(slot_pos.shape) != (B, S) or tuple(q_pos.shape) != (B, T):
        raise ValueError(f"slot_pos {tuple(slot_pos.shape)} / q_pos {tuple(q_pos.shape)} do not match B={B}, S={S}, T={T}")
    G = Hq // Hkv
    block_m, block_n, num_warps, splits = launch_config(D, T * G, B, Hkv, S, num_sms(q.device), block_m, block_n)
    m_blocks = cdiv(T * G, block_m)
    if num_splits is None:
        num_splits = splits
    split_len, num_splits = split_layout(S, num_splits, block_n)

    # with splits stage 1 stores only partials (the merge allocates the output): q stands in for its unused out_ptr
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device) if num_splits == 1 else q
    if num_splits > 1:
        opart = torch.empty(B * T * Hq, num_splits, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B * T * Hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        opart = lse = out  # unused by the kernel when NUM_SPLITS == 1
    qk_scale = scale if softcap is not None else scale * LOG2E
    # the prefetch names whole rows: only for caches whose slots are contiguous rows of D elements
    l2_pf = (L2_PREFETCH and l2_prefetch.supported(q) and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
             and k_cache.stride(2) == D and v_cache.stride(2) == D and slot_pos.stride(1) == 1)
    _attn_stage1[(B * Hkv, m_blocks, num_splits)](
        q, k_cache, v_cache, slot_pos, q_pos, out, opart, lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *slot_pos.stride(), *q_pos.stride(),
        *out.stride(),
        S, T, Hq, Hkv, int(window), split_len, float(qk_scale), float(softcap or 1.0),
        G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        HAS_SOFTCAP=softcap is not None, DOT_FP32=dot_fp32_operands(q.dtype), EAGER_KV=bool(finite_cache),
        L2_PF=l2_pf, ROW_BYTES=D * k_cache.element_size(), BLOCK_T=max(2, next_pow2(T)),
        num_warps=num_warps, num_stages=num_stages or ATTN_STAGES, **pdl_flags(q, short=True),
    )
    if num_splits == 1:
        return out
    split = SplitAttention(opart, lse, num_splits, (B, T, Hq, D), q.dtype)
    return split if num_splits <= defer_merge_max_splits else split.merged()


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_pos: torch.Tensor, q_pos: torch.Tensor, window: int, scale: float,
                     softcap: float | None = None, finite_cache: bool = False) -> torch.Tensor:
    """Attention of T queries per stream over a slot-addressed cache; see the module docstring.
    Triton on CUDA, the fp32 PyTorch reference elsewhere. Output has q's dtype. `finite_cache`: see
    `decode_attention_triton` (the reference zeroes empty slots either way)."""
    if use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, slot_pos, q_pos, window, scale, softcap,
                                       finite_cache=finite_cache)
    return decode_attention_ref(q, k_cache, v_cache, slot_pos, q_pos, window, scale, softcap)


__all__ = ["SplitAttention", "decode_attention", "decode_attention_ref", "decode_attention_triton"]
