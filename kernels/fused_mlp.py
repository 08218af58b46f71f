"""The whole Gemma MLP of a decode/verify step in one weight stream: gate+up, GeGLU and down.

Unfused, a layer's MLP is two GEMVs with a grid-wide dependency between them: gate_up must finish
(every program, all of the intermediate vector) before down may start, so each GEMV pays its own
ramp-up and drain (~5-8 us at E4B geometry, against 35 + 17 us of streaming at the HBM rate).
But the dependency is only global because down is split along its output. Split it along the
intermediate dimension instead and each program owns a slice of intermediate rows end to end:
    phase A: h[:, slice] = gelu_tanh(x @ Wg[slice].T) * (x @ Wu[slice].T)   (rounded to x's dtype)
    phase B: part[p] = h[:, slice] @ Wd[:, slice].T                         (fp32, all H outputs)
No program waits for another, so the gate, up and down weights (157 MB a layer at E4B) are one
continuous stream. The price is an fp32 partial per program ([P, M, H], 1.6 MB at P = 160, M = 1,
L2-resident), summed by a small second kernel in a fixed order (deterministic, atomic-free), which
the residual add + norms then read as a one-split partial (`kernels.splitk_norm`).

Rounding: phase A is the unfused GeGLU GEMV's, unit for unit (same tile rows, K walk and epilogue as
`kernels.gemv_epilogue` with BLOCK_N = 2 * UNIT); phase B sums the down products in another order than
the unfused split-K GEMV (bf16 noise apart, not bitwise).
Row invariance: the config depends on the weight shapes only and every M runs the 16-row tile when
`kernels.gemv.batch_invariant()`, so a verify row is bitwise a decode row.
Measured (`scripts/bench_fused_mlp_gpu.py`, docs/PERF.md "Stop 13"): per E4B MLP block 0.979x the two GEMVs
on an H100 and 1.035x on an H200; in the whole step H100 decode 0.993x / verify 0.978x, H200 decode 1.024x /
verify 0.988x. Under PDL the boundary between the two GEMVs was already cheap, so the engine keeps it off
(`engine.fused_tail.FUSED_MLP`, env VKAE_FUSED_MLP=1 turns it on).
Layouts: Wd may be [H, I] row-major (checkpoint layout: phase B reads 2 * GROUP_I-byte runs of each row)
or a transposed view of an [I, H] buffer (a program's slice is one contiguous block); strides decide.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, cdiv, pdl_flags, tl, triton
from .gemv import MAX_M, batch_invariant, linear_small_m_ref, weight_stream_flags
from .gemv_epilogue import linear_geglu_ref

# Module globals so a benchmark can sweep them (read at launch). GROUP_I: intermediate rows a program owns
# (P = I / GROUP_I programs, so P partial rows to sum); UNIT: rows per phase-A tile pair (2 * UNIT weight
# rows per tile, the unfused GeGLU GEMV's BLOCK_N when UNIT = 16); BLOCK_H: down outputs per phase-B tile.
GROUP_I = 64
UNIT = 64
BLOCK_H = 128
BLOCK_K = 128
NUM_WARPS = 4
NUM_STAGES = 3
REDUCE_BLOCK = 32  # outputs per program of the partial-sum kernel
REDUCE_BLOCK_P = 64  # partials per load of the partial-sum kernel


# --------------------------------------------------------------------------------------------
# Reference (CPU fallback and test oracle)
# --------------------------------------------------------------------------------------------
def mlp_ref(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(gelu_tanh(gate(x)) * up(x)) with the GEMVs' rounding points: GeGLU output in x's dtype,
    the down projection summed in fp32 and rounded to x's dtype. w_gate_up [2I, H], w_down [H, I]."""
    return linear_small_m_ref(linear_geglu_ref(x, w_gate_up), w_down)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._common import pdl_wait
    from .gemv import _gemv_acc
    from .gemv_epilogue import _gated

    @triton.jit
    def _geglu_unit(x_ptr, wgu_ptr, h_ptr, M, H, I, sxm, sxk, sgn, sgk, shm, first_row,
                    BLOCK_M: tl.constexpr, UNIT: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                    DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                    W_EVICT: tl.constexpr):
        """h[:, first_row : first_row + UNIT] of GeGLU: tile row 2j is gate row first_row + j, row 2j + 1
        is up row I + first_row + j (the interleave of `kernels.gemv_epilogue._gemv_act_kernel`)."""
        r = tl.arange(0, 2 * UNIT)
        w_rows = wgu_ptr + (first_row + r // 2 + (r % 2) * I).to(tl.int64)[:, None] * sgn
        acc = _gemv_acc(x_ptr, w_rows, M, 0, H, sxm, sxk, sgk, BLOCK_M, 2 * UNIT, BLOCK_K, USE_DOT, DOT_FP32,
                        EVEN_K, PDL, PREFETCH, W_EVICT)
        if USE_DOT:
            rows = tl.arange(0, BLOCK_M)[:, None]
        else:
            acc = acc[None, :]
            rows = tl.zeros([1, 1], tl.int32)
        a = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # the GEMV output's rounding
        out = _gated(a, a, True, BLOCK_M, 2 * UNIT)
        cols = first_row + tl.arange(0, UNIT)
        tl.store(h_ptr + rows * shm + cols[None, :], out.to(h_ptr.dtype.element_ty), mask=rows < M)

    @triton.jit
    def _down_tile(wd_ptr, n0, offs_i, H, sdn, sdi, BLOCK_H: tl.constexpr, W_EVICT: tl.constexpr):
        """Wd[n0 : n0 + BLOCK_H, slice] as a [BLOCK_H, GROUP_I] tile; rows past H clamp to row 0 (unmasked
        loads), their products are dropped at the store."""
        offs_n = n0 + tl.arange(0, BLOCK_H)
        return tl.load(wd_ptr + tl.where(offs_n < H, offs_n, 0).to(tl.int64)[:, None] * sdn + offs_i[None, :] * sdi,
                       eviction_policy=W_EVICT)

    @triton.jit
    def _down_store(w, hv, part_ptr, pid, rows, m_ok, M, n0, H, BLOCK_H: tl.constexpr, USE_DOT: tl.constexpr,
                    DOT_FP32: tl.constexpr):
        """part[pid, :, n0 : n0 + BLOCK_H] = h[:, slice] @ w.T (fp32)."""
        offs_n = n0 + tl.arange(0, BLOCK_H)
        if USE_DOT:
            if DOT_FP32:
                out = tl.dot(hv.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                out = tl.dot(hv, tl.trans(w))
        else:
            out = tl.sum(w.to(tl.float32) * hv[None, :], axis=1)[None, :]
        tl.store(part_ptr + (pid * M + rows).to(tl.int64) * H + offs_n[None, :], out, mask=m_ok & (offs_n < H)[None, :])

    @triton.jit
    def _mlp_kernel(x_ptr, wgu_ptr, wd_ptr, h_ptr, part_ptr, M, H, I, sxm, sxk, sgn, sgk, sdn, sdi, shm,
                    BLOCK_M: tl.constexpr, GROUP_I: tl.constexpr, UNIT: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_H: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                    PDL: tl.constexpr, PREFETCH: tl.constexpr, W_EVICT: tl.constexpr):
        """Program p: intermediate rows [p * GROUP_I, (p + 1) * GROUP_I). Phase A writes their GeGLU values
        to h [M, I]; phase B reads them back (this program's own writes, after a CTA barrier) and writes
        part[p] = h[:, slice] @ Wd[:, slice].T for every output, fp32, part [P, M, H]. (Requesting the first
        down tiles before the switch from phase A to B, at the start or after phase A, measured slower on an
        H100: the switch is not where the time goes.)"""
        pid = tl.program_id(0)
        first = pid * GROUP_I
        offs_i = first + tl.arange(0, GROUP_I)
        # phase A; only the first unit waits on the previous kernel (and prefetches before the wait)
        _geglu_unit(x_ptr, wgu_ptr, h_ptr, M, H, I, sxm, sxk, sgn, sgk, shm, first, BLOCK_M, UNIT, BLOCK_K,
                    USE_DOT, DOT_FP32, EVEN_K, PDL, PREFETCH, W_EVICT)
        for u in tl.static_range(1, GROUP_I // UNIT):
            _geglu_unit(x_ptr, wgu_ptr, h_ptr, M, H, I, sxm, sxk, sgn, sgk, shm, first + u * UNIT, BLOCK_M, UNIT,
                        BLOCK_K, USE_DOT, DOT_FP32, EVEN_K, False, PREFETCH, W_EVICT)
        tl.debug_barrier()  # phase A's stores of h are visible to every thread of this program
        if USE_DOT:
            offs_m = tl.arange(0, BLOCK_M)
            hv = tl.load(h_ptr + offs_m[:, None] * shm + offs_i[None, :], mask=offs_m[:, None] < M, other=0.0)
            rows = offs_m[:, None]
        else:
            hv = tl.load(h_ptr + offs_i).to(tl.float32)
            rows = tl.zeros([1, 1], tl.int32)
        m_ok = rows < M
        for n0 in range(0, H, BLOCK_H):
            w = _down_tile(wd_ptr, n0, offs_i, H, sdn, sdi, BLOCK_H, W_EVICT)
            _down_store(w, hv, part_ptr, pid, rows, m_ok, M, n0, H, BLOCK_H, USE_DOT, DOT_FP32)

    @triton.jit
    def _partials_sum_kernel(part_ptr, out_ptr, P, MN, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                             PDL: tl.constexpr):
        """out[j] = sum over p of part[p, j], fp32: BLOCK_P partials per load (a [BLOCK_P, BLOCK] tile summed
        along p), tiles added in p order. The order is fixed by the constexprs alone (bitwise-reproducible,
        and a column's sum does not depend on M)."""
        pdl_wait(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        offs_p = tl.arange(0, BLOCK_P)
        acc = tl.zeros([BLOCK], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + offs_p
            t = tl.load(part_ptr + p.to(tl.int64)[:, None] * MN + offs[None, :], mask=(p < P)[:, None] & ok[None, :],
                        other=0.0)
            acc += tl.sum(t, axis=0)
        tl.store(out_ptr + offs, acc, mask=ok)


def mlp_config(M: int, H: int, I: int, config: dict[str, int] | None = None) -> dict[str, int] | None:
    """The launch config for x [M, H] (the module globals, then `config`'s overrides), or None when this
    shape cannot run the fused kernel (the caller keeps the two-GEMV path): M <= 16, and I a whole number of
    GROUP_I slices, each a whole number of UNIT tiles. The split follows I alone (not the SM count), so a
    row's result does not depend on the card or on M."""
    block_m = 16 if (batch_invariant() or M > 1) else 1
    cfg = dict(BLOCK_M=block_m, GROUP_I=GROUP_I, UNIT=UNIT, BLOCK_K=BLOCK_K, BLOCK_H=BLOCK_H,
               num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    cfg.update(config or {})
    if M > MAX_M or H < 1 or cfg["GROUP_I"] % cfg["UNIT"] or I % cfg["GROUP_I"]:
        return None
    cfg["P"] = I // cfg["GROUP_I"]
    return cfg


def _check(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 2 or w_gate_up.dim() != 2 or w_down.dim() != 2:
        raise ValueError("need x [M, H], w_gate_up [2I, H] and w_down [H, I]")
    M, H = x.shape
    two_i = w_gate_up.shape[0]
    if two_i % 2 or w_gate_up.shape[1] != H or tuple(w_down.shape) != (H, two_i // 2):
        raise ValueError(f"shapes do not make an MLP: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)} "
                         f"(want [2I, {H}]), w_down {tuple(w_down.shape)} (want [{H}, I])")
    if w_gate_up.stride(1) != 1:
        raise ValueError("w_gate_up must be row-major (stride 1 along H)")
    return M, H, two_i // 2


def mlp_partials_triton(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                        config: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(part [P, M, H] fp32, h [M, I] the GeGLU values in x's dtype). `config` overrides `mlp_config`."""
    M, H, I = _check(x, w_gate_up, w_down)
    cfg = mlp_config(M, H, I, config)
    if cfg is None:
        group, unit = (config or {}).get("GROUP_I", GROUP_I), (config or {}).get("UNIT", UNIT)
        raise ValueError(f"the fused MLP needs M <= {MAX_M} (got {M}) and I ({I}) a multiple of GROUP_I ({group}), "
                         f"itself a multiple of UNIT ({unit})")
    h = torch.empty(M, I, dtype=x.dtype, device=x.device)
    part = torch.empty(cfg["P"], M, H, dtype=torch.float32, device=x.device)
    _mlp_kernel[(cfg["P"],)](
        x, w_gate_up, w_down, h, part, M, H, I, x.stride(0), x.stride(1), w_gate_up.stride(0), w_gate_up.stride(1),
        w_down.stride(0), w_down.stride(1), h.stride(0),
        BLOCK_M=cfg["BLOCK_M"], GROUP_I=cfg["GROUP_I"], UNIT=cfg["UNIT"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_H=cfg["BLOCK_H"], USE_DOT=cfg["BLOCK_M"] > 1, EVEN_K=H % cfg["BLOCK_K"] == 0,
        **weight_stream_flags(x, w_gate_up), **pdl_flags(x), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return part, h


def sum_partials_triton(part: torch.Tensor) -> torch.Tensor:
    """part [P, M, H] fp32 -> [1, M, H] fp32, summed over P in index order."""
    P, M, H = part.shape
    out = torch.empty(1, M, H, dtype=torch.float32, device=part.device)
    _partials_sum_kernel[(cdiv(M * H, REDUCE_BLOCK),)](part, out, P, M * H, BLOCK=REDUCE_BLOCK,
                                                      BLOCK_P=REDUCE_BLOCK_P, num_warps=4,
                                                      **pdl_flags(part, short=True))
    return out


def mlp_sum_triton(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                   config: dict[str, int] | None = None) -> torch.Tensor:
    """The down projection's fp32 sums [1, M, H]: a one-split partial for `kernels.splitk_norm`."""
    return sum_partials_triton(mlp_partials_triton(x, w_gate_up, w_down, config)[0])


def mlp_triton(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
               config: dict[str, int] | None = None) -> torch.Tensor:
    """`mlp_ref` on the Triton path: [M, H] in x's dtype."""
    return mlp_sum_triton(x, w_gate_up, w_down, config)[0].to(x.dtype)


def fusable_shapes(M: int, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    """Whether `mlp_config` accepts this MLP (the engine keeps the two-GEMV path otherwise)."""
    H, I = w_down.shape
    return w_gate_up.shape == (2 * I, H) and w_gate_up.stride(1) == 1 and mlp_config(M, H, I) is not None
