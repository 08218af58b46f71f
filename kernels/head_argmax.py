"""Greedy decode's LM head from an int8 screen: exact argmax ids for half the head's bytes.

The tied E4B head is 262,144 rows x 2560 in bf16, 1.34 GB a step: at batch 1 it alone is ~440 us of a ~4.2 ms
decode step on an H100. Greedy decode needs only the argmax of the bf16 logits the GEMV would produce
(`kernels.gemv`, first index on ties), so:

Measured (H100, stop 24): 1.83x faster than the bf16 GEMV + argmax at M = 1, so on by default (`ENABLED`).

1. **screen** (`_digits_kernel`, then `_screen_digits_kernel`): stream an int8 copy of the head (per-row scale,
   0.67 GB). For row r and hidden row x it computes an approximate logit a and a rigorous error bound B, so the
   GEMV's fp32 sum E_r lies in [a - B, a + B]; it stores hi = a + B and, per program, max(a - B). x itself becomes
   two int8 digit rows, x ~ x^ = s_x (d1 + d2 / 254) with s_x = max|x| / 127, so the tensor cores take the int8
   head as it is loaded (int8 x int8 -> exact int32 sums). Stop 22's form converted each int8 tile to bf16 for
   the dot instead, which held it to 0.7-1.1 TB/s (0.603 ms at M = 1, slower than the GEMV; removed at stop 24).
   a = scale_r s_x (q_r . d1 + q_r . d2 / 254), and B = |x| err_r + |x - x^| max_r|scale_r q_r|, where
   |x - x^| <= sqrt(K) s_x DIGIT_RESID (each element is within s_x (0.5 + rounding) / 254 of its digits) and
   err_r covers the quantisation residual (Cauchy-Schwarz: |x . (w_r - scale_r q_r)| <= |x| |w_r - scale_r q_r|)
   and fp32 accumulation with a wide margin.
2. **exact** (`_threshold_kernel`, then `_exact_kernel`): L = max over rows of (a - B) is a lower bound of max E. A
   row with hi < L - U (U: two bf16 half-ulps at the largest magnitude that can tie, see `_threshold_kernel`) rounds strictly
   below the winner, so it cannot be the argmax, not even by a tie. Every other row (a median of 17.5 and at
   most 141 of 262,144 on random E4B weights, H100 stop 22) gets its logit recomputed with the GEMV's own K walk
   (`kernels.gemv._gemv_acc`, the same tile config), so its value is the GEMV's bit for bit; rows not needed point at a needed row's address
   (read once, from L1/L2) and are dropped.
3. **final** (`_final_kernel`): the best (value, first index) over the exact kernel's programs.

The ids are those of `linear_small_m(x, w).argmax(-1)` exactly, for any weights and inputs with finite logits
(the screen only decides which rows are recomputed; a flat logit distribution just recomputes more rows).
The full-logit path (PPL, sampling) still reads the bf16 head. The int8 copy costs 0.67 GB of device memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ._common import HAS_TRITON, INTERPRET, cdiv, next_pow2, pdl_flags, tl, triton

# Engine switch (env VKAE_SCREENED_HEAD=0 turns it off): greedy decode steps use the screen. Read when the
# generator prepares the model and at each greedy call (graphs keep what they captured). ON since stop 24: the digit
# screen streams the int8 copy at ~3.0 TB/s. H100, E4B geometry, random bf16 weights: head alone (graphed) 0.437 ->
# 0.239 ms at M = 1, 0.451 -> 0.316 ms at M = 9; 0 of 3,056 ids differed from the GEMV's argmax; graphed decode step
# 4.184 -> 3.999 ms (`scripts/stage_costs_gpu.py`, 4096-slot cache, context 768). The stop-22 bf16 form was slower
# than the GEMV (0.603 ms at M = 1).
ENABLED: bool = os.environ.get("VKAE_SCREENED_HEAD", "1") != "0"
# The screen's tile: 64 rows x 256 int8 columns, the same 16 KB a program streams per step as the bf16 GEMV's
# 64 x 128 tile. H100 sweep (head alone, graphed, M = 1 / 9 ms; `check_screened_head_gpu.py --sweep`):
# 64 x 256 x 4 stages 0.248 / 0.382; 64 x 128 0.256 / 0.388; 128 x 128 0.251 / 0.386; 64 x 512 x 3 stages
# 0.254 / 0.436; 3 / 6 stages 0.250 / 0.383, 0.278 / 0.414; 8 warps 0.256 / 0.391.
DIGITS_BLOCK_N = 64
DIGITS_BLOCK_K = 256
DIGITS_WARPS = 4
DIGITS_STAGES = 4
# |x/s_x - (d1 + d2/254)| per element: 0.5/254 = 0.001969 plus fp32 rounding of x / s_x (a few ulps of 127, 3e-5)
DIGIT_RESID = 0.0021
# Rows per exact-kernel program: 64 (one GEMV tile, 4,096 programs at E4B) spreads a verify step's survivors (a
# median of ~17 per hidden row, in different tiles) over the SMs, now that `_threshold_kernel` reduces the screen's
# lower bounds once per row. H100, stop 25: head alone (graphed) M = 1 / 9 0.256 / 0.343 ms at 2048 rows, 0.247 /
# 0.288 at 64 (`check_screened_head_gpu.py --sweep-only`, ids exact); graphed E4B step at context 768, 4096 slots
# (`stage_costs_gpu.py`, 2 rounds) decode 4.016 -> 4.007 ms, verify (9) 4.369 -> 4.311 ms, same bits.
EXACT_CHUNK = 64
ROW_CHUNK = 16384     # rows quantised at a time when building the copy (bounds the fp32 temporaries)
# Relative slack on the bound for fp32 rounding: the dots' accumulation error is <= K * 2^-24 * |x| |w|
# (1.5e-4 at K = 2560) and the norms are computed in fp32; 1e-3 covers both several times over.
ACCUM_SLACK = 1e-3
XN_SLACK = 1 + ACCUM_SLACK  # |x| computed in fp32 is scaled by this in every band (kernel and reference)


@dataclass(frozen=True)
class ScreenedHead:
    """An int8 copy of a head w [N, K]: w_r ~ scale[r] * q[r]; err[r] bounds |x . w_r - a_r| / |x|."""
    q: torch.Tensor       # int8 [N, K]
    scale: torch.Tensor   # fp32 [N]
    err: torch.Tensor     # fp32 [N]
    err_max: float        # max(err): bounds every row's error band (the tie margin U uses it)
    wn_max: float         # >= max_r |scale[r] q[r]|: bounds the digit screen's |x - x^| term
    source_ptr: int       # data_ptr of the bf16 head it was built from (a stale copy is refused)

    @property
    def nbytes(self) -> int:
        return screen_nbytes(*self.q.shape)


def screen_nbytes(rows: int, cols: int) -> int:
    """Device bytes of the screen of a [rows, cols] head: int8 q plus fp32 scale and err per row."""
    return rows * cols + 8 * rows


def build_screened_head(w: torch.Tensor) -> ScreenedHead:
    """Quantise w [N, K] row by row to int8 (symmetric, scale = max|w_r| / 127) and bound each row's error."""
    if w.dim() != 2:
        raise ValueError(f"the head must be a matrix [N, K], got shape {tuple(w.shape)}")
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8, device=w.device)
    scale = torch.empty(N, dtype=torch.float32, device=w.device)
    err = torch.empty(N, dtype=torch.float32, device=w.device)
    wn_max = 0.0
    for r0 in range(0, N, ROW_CHUNK):
        wf = w[r0:r0 + ROW_CHUNK].float()
        s = wf.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        qi = torch.round(wf / s[:, None]).clamp_(-127, 127)
        resid = torch.linalg.vector_norm(wf - qi * s[:, None], dim=1)
        wn = torch.linalg.vector_norm(wf, dim=1)
        q[r0:r0 + ROW_CHUNK] = qi.to(torch.int8)
        scale[r0:r0 + ROW_CHUNK] = s
        err[r0:r0 + ROW_CHUNK] = resid * (1 + ACCUM_SLACK) + ACCUM_SLACK * wn
        wn_max = max(wn_max, float(torch.linalg.vector_norm(qi * s[:, None], dim=1).max()) * (1 + ACCUM_SLACK))
    return ScreenedHead(q, scale, err, float(err.max()) if N else 0.0, wn_max, w.data_ptr())


def greedy_ids_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the screen must reproduce: argmax of the Triton GEMV's logits (first index on ties) -> int64 [M]
    (`engine.linear.matmul` runs that GEMV for the head at decode widths on CUDA)."""
    from .gemv import linear_small_m_triton

    return linear_small_m_triton(x, w).argmax(dim=-1)


def x_digits_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] as the digit screen sees it: (d1, d2) int8 [M, K] and s_x fp32 [M], x ~ s_x (d1 + d2 / 254)."""
    xf = x.float()
    sx = xf.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    t = xf / sx[:, None]
    d1 = torch.floor(t + 0.5)
    d2 = torch.floor((t - d1) * 254.0 + 0.5)
    return d1.to(torch.int8), d2.to(torch.int8), sx


def screen_bounds_ref(x: torch.Tensor, head: ScreenedHead) -> tuple[torch.Tensor, torch.Tensor]:
    """(a - B, a + B) [M, N] in fp32 from the int8 copy: the band every GEMV logit lies in (tests)."""
    d1, d2, sx = x_digits_ref(x)
    qf = head.q.float()
    a = (d1.float() @ qf.T + (d2.float() @ qf.T) / 254.0) * sx[:, None] * head.scale[None, :]
    b = torch.linalg.vector_norm(x.float(), dim=1)[:, None] * XN_SLACK * head.err[None, :]
    b = b + (sx * (x.shape[1] ** 0.5 * DIGIT_RESID * head.wn_max))[:, None]
    return a - b, a + b


if HAS_TRITON:
    from ._common import pdl_wait
    from .gemv import _gemv_acc

    @triton.jit
    def _digits_kernel(x_ptr, d_ptr, sx_ptr, xn_ptr, K, sxm, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                       PDL: tl.constexpr):
        """Row m of x as two int8 digit rows, d1 in D[0, m] and d2 in D[1, m] (D [2, ROWS, K]), x ~ s_x (d1 + d2 / 254)
        with s_x = max|x_m| / 127; s_x and |x_m| in fp32. Two passes over the row (5 KB at E4B, from L1/L2)."""
        m = tl.program_id(0)
        pdl_wait(PDL)
        offs = tl.arange(0, BLOCK_K)
        row = x_ptr + m * sxm
        amax2 = tl.zeros([BLOCK_K], tl.float32)  # elementwise across the loop, reduced after it (triton 3.6)
        sq2 = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax2 = tl.maximum(amax2, tl.abs(v))
            sq2 += v * v
        sx = tl.maximum(tl.max(amax2, axis=0), 1e-30) / 127.0
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs
            t = tl.load(row + ks, mask=ks < K, other=0.0).to(tl.float32) / sx
            d1 = tl.floor(t + 0.5)  # |t| <= 127 (+ rounding), so |d1| <= 127 and |t - d1| <= 0.5
            d2 = tl.floor((t - d1) * 254.0 + 0.5)
            tl.store(d_ptr + m * K + ks, d1.to(tl.int8), mask=ks < K)
            tl.store(d_ptr + (ROWS + m) * K + ks, d2.to(tl.int8), mask=ks < K)
        tl.store(sx_ptr + m, sx)
        tl.store(xn_ptr + m, tl.sqrt(tl.sum(sq2, axis=0)))

    @triton.jit
    def _digit_dots(acc1, acc2, d_ptr, offs_d, d_ok, ks, K, qt, ROWS: tl.constexpr, DOT_FP32: tl.constexpr,
                    EVEN_K: tl.constexpr):
        """acc += the two digit planes' [ROWS, BLOCK_K] tiles at columns ks dotted with the int8 tile qt [BLOCK_N,
        BLOCK_K]: exact int32 sums (the interpreter's fp32 dot is exact too: |tile sum| <= BLOCK_K 127^2 < 2^24)."""
        if EVEN_K:
            k_ok = d_ok[:, None]
        else:
            k_ok = d_ok[:, None] & (ks[None, :] < K)
        d1 = tl.load(d_ptr + offs_d[:, None] * K + ks[None, :], mask=k_ok, other=0)
        d2 = tl.load(d_ptr + (ROWS + offs_d)[:, None] * K + ks[None, :], mask=k_ok, other=0)
        if DOT_FP32:
            qf = tl.trans(qt.to(tl.float32))
            acc1 += tl.dot(d1.to(tl.float32), qf, input_precision="ieee").to(tl.int32)
            acc2 += tl.dot(d2.to(tl.float32), qf, input_precision="ieee").to(tl.int32)
        else:
            acc1 += tl.dot(d1, tl.trans(qt), out_dtype=tl.int32)
            acc2 += tl.dot(d2, tl.trans(qt), out_dtype=tl.int32)
        return acc1, acc2

    @triton.jit
    def _q_tile(q_rows, ks, K, EVEN_K: tl.constexpr):
        if EVEN_K:
            return tl.load(q_rows + ks[None, :])
        return tl.load(q_rows + ks[None, :], mask=ks[None, :] < K, other=0)

    @triton.jit
    def _screen_digits_kernel(d_ptr, q_ptr, scale_ptr, err_ptr, sx_ptr, xn_ptr, hi_ptr, lo_part_ptr, blk_ptr,
                              M, N, K, sqn, P, NG, xn_slack, ex_coef, ROWS: tl.constexpr, G: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                              EVEN_K: tl.constexpr, PDL: tl.constexpr):
        """hi[m, n] = a + B for this program's BLOCK_N rows; lo_part[m, pid] = max over them of a - B; blk[m, g] =
        max of hi over each group g of G rows (the exact kernel's tile). a = scale s_x (q . d1 + q . d2 / 254) from
        int8 x int8 tensor-core dots; B = |x| xn_slack err + s_x ex_coef (ex_coef = sqrt(K) DIGIT_RESID wn_max). The
        first two int8 tiles are requested before the PDL wait (weights only); the digits are read after it."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_d = tl.arange(0, ROWS)
        d_ok = offs_d < M
        q_rows = q_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * sqn  # clamped rows, dropped below
        offs_k = tl.arange(0, BLOCK_K)
        qt = _q_tile(q_rows, offs_k, K, EVEN_K)
        qt2 = _q_tile(q_rows, offs_k + BLOCK_K, K, False)  # masked: past K it is zeros
        pdl_wait(PDL)
        acc1 = tl.zeros([ROWS, BLOCK_N], tl.int32)
        acc2 = tl.zeros([ROWS, BLOCK_N], tl.int32)
        acc1, acc2 = _digit_dots(acc1, acc2, d_ptr, offs_d, d_ok, offs_k, K, qt, ROWS, DOT_FP32, EVEN_K)
        acc1, acc2 = _digit_dots(acc1, acc2, d_ptr, offs_d, d_ok, offs_k + BLOCK_K, K, qt2, ROWS, DOT_FP32, False)
        for k0 in range(2 * BLOCK_K, K, BLOCK_K):
            ks = k0 + offs_k
            acc1, acc2 = _digit_dots(acc1, acc2, d_ptr, offs_d, d_ok, ks, K, _q_tile(q_rows, ks, K, EVEN_K),
                                     ROWS, DOT_FP32, EVEN_K)
        sx = tl.load(sx_ptr + offs_d, mask=d_ok, other=0.0)
        xn = tl.load(xn_ptr + offs_d, mask=d_ok, other=0.0)
        scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
        err = tl.load(err_ptr + offs_n, mask=n_ok, other=0.0)
        a = (acc1.to(tl.float32) * sx[:, None] + acc2.to(tl.float32) * (sx * (1.0 / 254.0))[:, None]) * scale[None, :]
        band = (xn * xn_slack)[:, None] * err[None, :] + (sx * ex_coef)[:, None]
        ok = d_ok[:, None] & n_ok[None, :]
        hi = a + band
        tl.store(hi_ptr + offs_d[:, None].to(tl.int64) * N + offs_n[None, :], hi, mask=ok)
        lo = tl.where(ok, a - band, float("-inf"))
        tl.store(lo_part_ptr + offs_d * P + pid, tl.max(lo, axis=1), mask=d_ok)
        groups = tl.max(tl.reshape(tl.where(ok, hi, float("-inf")), [ROWS, BLOCK_N // G, G]), axis=2)
        offs_g = pid * (BLOCK_N // G) + tl.arange(0, BLOCK_N // G)
        tl.store(blk_ptr + offs_d[:, None] * NG + offs_g[None, :], groups, mask=d_ok[:, None] & (offs_g[None, :] < NG))

    @triton.jit
    def _threshold_kernel(lo_part_ptr, xn_ptr, sx_ptr, thresh_ptr, P, err_max, ex_coef, P_BLOCK: tl.constexpr,
                          PDL: tl.constexpr):
        """thresh[m] = L_m - U_m: L_m = max over the screen's programs of their largest lower bound (a lower bound
        of row m's winning logit), U_m the tie margin. Once per row, so the exact programs load one number."""
        m = tl.program_id(0)
        pdl_wait(PDL)
        # (elementwise across the loop, reduced after it: a reduction carried through the loop trips an
        # assertion in triton 3.6's thread-locality pass when its result has two uses)
        low2 = tl.full([P_BLOCK], float("-inf"), tl.float32)
        for p0 in range(0, P, P_BLOCK):
            ps = p0 + tl.arange(0, P_BLOCK)
            low2 = tl.maximum(low2, tl.load(lo_part_ptr + m * P + ps, mask=ps < P, other=float("-inf")))
        low = tl.max(low2, axis=0)
        # the tie margin: a row can tie the winner only if it lies within one bf16 ulp of it, and
        # ulp(v) <= 2^-7 |v|; every candidate value is at most |L| + 2 * (largest band) in magnitude
        # (the band's digit term s_x ex_coef included)
        xn = tl.load(xn_ptr + m)
        sx = tl.load(sx_ptr + m)
        tl.store(thresh_ptr + m, low - (0.015625 * (tl.abs(low) + 2.01 * (xn * err_max + sx * ex_coef)) + 1e-30))

    @triton.jit
    def _exact_kernel(x_ptr, w_ptr, hi_ptr, thresh_ptr, blk_ptr, best_ptr, best_idx_ptr, M, N, K,
                      sxm, sxk, swn, swk, NG, P2, CHUNK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
                      PREFETCH: tl.constexpr, W_EVICT: tl.constexpr, OUT_DTYPE: tl.constexpr):
        """The GEMV's exact logits for the rows of this program's CHUNK that can win; its best (value, index)."""
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        pdl_wait(PDL)
        thresh = tl.load(thresh_ptr + offs_m, mask=m_ok, other=float("inf"))  # padded rows select nothing
        # which of this chunk's tiles hold a row that can win, from the screen's per-tile maxima (one load)
        NB: tl.constexpr = CHUNK // BLOCK_N
        offs_b = tl.arange(0, NB)
        gb = pid * NB + offs_b
        blk = tl.load(blk_ptr + offs_m[:, None] * NG + gb[None, :], mask=m_ok[:, None] & (gb[None, :] < NG),
                      other=float("-inf"))
        tile_needed = tl.max((blk >= thresh[:, None]).to(tl.int32), axis=0)  # [NB]
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_M], tl.int32)
        for j in range(0, NB):
            if tl.sum(tl.where(offs_b == j, tile_needed, 0), axis=0) > 0:
                offs_n = pid * CHUNK + j * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = offs_n < N
                hi = tl.load(hi_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :],
                             mask=m_ok[:, None] & n_ok[None, :], other=float("-inf"))
                need = tl.max((hi >= thresh[:, None]).to(tl.int32), axis=0) > 0  # [BLOCK_N]: some row may win here
                first = tl.min(tl.where(need, offs_n, N), axis=0)
                rows = tl.where(need, offs_n, first)  # rows not needed read a needed row's bytes (cached)
                w_rows = w_ptr + rows.to(tl.int64)[:, None] * swn
                acc = _gemv_acc(x_ptr, w_rows, M, 0, K, sxm, sxk, swk, BLOCK_M, BLOCK_N, BLOCK_K,
                                USE_DOT, DOT_FP32, EVEN_K, 0, PREFETCH, W_EVICT)
                if USE_DOT:
                    val = acc.to(OUT_DTYPE).to(tl.float32)
                else:
                    val = acc.to(OUT_DTYPE).to(tl.float32)[None, :]
                val = tl.where(need[None, :] & m_ok[:, None], val, float("-inf"))
                vmax = tl.max(val, axis=1)
                vidx = tl.min(tl.where(val == vmax[:, None], offs_n[None, :], N), axis=1)
                better = vmax > best  # strictly: tiles run in index order, so ties keep the first index
                best_idx = tl.where(better, vidx, best_idx)
                best = tl.where(better, vmax, best)
        tl.store(best_ptr + offs_m * P2 + pid, best, mask=m_ok)
        tl.store(best_idx_ptr + offs_m * P2 + pid, best_idx, mask=m_ok)

    @triton.jit
    def _final_kernel(best_ptr, best_idx_ptr, out_ptr, P2, BLOCK: tl.constexpr, PDL: tl.constexpr):
        m = tl.program_id(0)
        pdl_wait(PDL)
        offs = tl.arange(0, BLOCK)
        ok = offs < P2
        v = tl.load(best_ptr + m * P2 + offs, mask=ok, other=float("-inf"))
        i = tl.load(best_idx_ptr + m * P2 + offs, mask=ok, other=2**31 - 1)
        vmax = tl.max(v, axis=0)
        tl.store(out_ptr + m, tl.min(tl.where(v == vmax, i, 2**31 - 1), axis=0).to(tl.int64))


def supports(x: torch.Tensor, w: torch.Tensor, head: ScreenedHead | None) -> bool:
    """Whether `greedy_ids` can replace `greedy_ids_ref(x, w)`: the Triton GEMV path (M <= 16, K not split),
    and a screen built from this very head."""
    from .gemv import MAX_M, resolve_config

    if head is None or not HAS_TRITON or not (x.is_cuda or INTERPRET) or x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M \
            or w.dim() != 2 or w.shape[0] == 0:
        return False
    if head.source_ptr != w.data_ptr() or w.shape != head.q.shape or x.shape[1] != w.shape[1]:
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.dtype != x.dtype:
        return False
    return resolve_config(x, w)["SPLIT_K"] == 1


@dataclass(frozen=True)
class Screen:
    """One screen's outputs for x [M, K]: hi [M, N] = a + B, lo_part [M, P] = max(a - B) over each program's rows,
    blk [M, NG] = max(hi) over each group of G rows, |x| and s_x [M], and the band's digit coefficient."""
    hi: torch.Tensor
    lo_part: torch.Tensor
    blk: torch.Tensor
    xn: torch.Tensor
    sx: torch.Tensor
    ex_coef: float
    block_n: int


def screen(x: torch.Tensor, head: ScreenedHead, G: int) -> Screen:
    """Launch the screen of x [M, K] (unit column stride) against the int8 head, its per-group maxima over groups
    of G rows (the exact kernel's GEMV tile)."""
    M, K = x.shape
    N = head.q.shape[0]
    dev = x.device
    block_n = DIGITS_BLOCK_N
    if block_n % G:
        raise ValueError(f"the screen's tile of {block_n} rows must be a multiple of the GEMV's tile of {G} rows")
    P, NG = cdiv(N, block_n), cdiv(N, G)
    hi = torch.empty(M, N, dtype=torch.float32, device=dev)
    lo_part = torch.empty(M, P, dtype=torch.float32, device=dev)
    blk = torch.empty(M, NG, dtype=torch.float32, device=dev)
    xn = torch.empty(M, dtype=torch.float32, device=dev)
    from .gemv import MAX_M  # the digit rows pad to the GEMV's 16-row tensor-core tile (`supports` caps M there)

    digits = torch.empty(2, MAX_M, K, dtype=torch.int8, device=dev)  # rows past M are never read (masked)
    sx = torch.empty(M, dtype=torch.float32, device=dev)
    ex_coef = K ** 0.5 * DIGIT_RESID * head.wn_max
    _digits_kernel[(M,)](x, digits, sx, xn, K, x.stride(0), ROWS=MAX_M, BLOCK_K=1024, **pdl_flags(x, short=True),
                         num_warps=4)
    # int8 x int8 on the tensor cores; exact fp32 dots under the interpreter (its integer dot is not trusted)
    _screen_digits_kernel[(P,)](digits, head.q, head.scale, head.err, sx, xn, hi, lo_part, blk, M, N, K,
                                head.q.stride(0), P, NG, XN_SLACK, ex_coef, ROWS=MAX_M, G=G, BLOCK_N=block_n,
                                BLOCK_K=DIGITS_BLOCK_K, DOT_FP32=INTERPRET, EVEN_K=K % DIGITS_BLOCK_K == 0,
                                **pdl_flags(x), num_warps=DIGITS_WARPS, num_stages=DIGITS_STAGES)
    return Screen(hi, lo_part, blk, xn, sx, ex_coef, block_n)


def greedy_ids(x: torch.Tensor, w: torch.Tensor, head: ScreenedHead, checked: bool = False) -> torch.Tensor:
    """argmax_n of (x @ w.T as `kernels.gemv.linear_small_m` computes it) for x [M, K] -> int64 [M], reading
    the int8 screen and the bf16 rows of the few candidates. Requires `supports(x, w, head)`; `checked`: the
    caller has just asked it (the check resolves the GEMV config, host work the decode path need not repeat)."""
    from ._common import tl_dtype
    from .gemv import kernel_flags, resolve_config

    if not checked and not supports(x, w, head):
        raise ValueError("greedy_ids: unsupported operands (see kernels.head_argmax.supports)")
    M, K = x.shape
    N = w.shape[0]
    cfg = resolve_config(x, w)  # the GEMV's own tile: the recomputed logits are its bits
    G = cfg["BLOCK_N"]
    sc = screen(x if x.stride(1) == 1 else x.contiguous(), head, G)
    P, NG = sc.lo_part.shape[1], sc.blk.shape[1]
    chunk = max(EXACT_CHUNK // sc.block_n, 1) * sc.block_n
    P2 = cdiv(N, chunk)
    best = torch.empty(M, P2, dtype=torch.float32, device=x.device)
    best_idx = torch.empty(M, P2, dtype=torch.int32, device=x.device)
    out = torch.empty(M, dtype=torch.int64, device=x.device)
    thresh = torch.empty(M, dtype=torch.float32, device=x.device)
    _threshold_kernel[(M,)](sc.lo_part, sc.xn, sc.sx, thresh, P, head.err_max, sc.ex_coef,
                            P_BLOCK=min(1024, next_pow2(P)), **pdl_flags(x, short=True), num_warps=4)
    flags = kernel_flags(x, w, cfg)
    exact_flags = {k: flags[k] for k in ("USE_DOT", "DOT_FP32", "EVEN_K", "PREFETCH", "W_EVICT")}
    _exact_kernel[(P2,)](x, w, sc.hi, thresh, sc.blk, best, best_idx, M, N, K, x.stride(0), x.stride(1),
                         w.stride(0), w.stride(1), NG, P2, CHUNK=chunk,
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=G, BLOCK_K=cfg["BLOCK_K"],
                         OUT_DTYPE=tl_dtype(x.dtype), **exact_flags, **pdl_flags(x),
                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _final_kernel[(M,)](best, best_idx, out, P2, BLOCK=next_pow2(P2), **pdl_flags(x, short=True), num_warps=4)
    return out
