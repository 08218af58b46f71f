"""Gemma 4's per-layer-input (PLE) injection as two GEMV launches instead of three.

Each layer ends with  g = gelu_tanh(h @ Wg.T) * per_layer_input  (Wg [P, H], P = 256), then  y = g @ Wp.T
(Wp [H, P]). At decode widths the gate GEMV splits K (P / BLOCK_N output tiles cannot fill the GPU), so the
fused-epilogue path (`kernels.gemv_epilogue`) ran gate GEMV -> split-K reduce + GELU x input -> projection GEMV.
Here the projection GEMV computes its own input from the gate's fp32 partials: every program sums the
whole row's partials in split order, rounds, applies GELU x input and rounds again, exactly as the reduce
kernel did, and writes the result to one scratch (all programs write the same bytes; a CTA barrier orders a
program's own writes before its reads), then runs the projection's K walk on that scratch. The partials are
P x SPLIT floats per row (10 KB at E4B), read from L2 by each of the projection's programs, in place of one
dependent launch.

Rounding is that of the three-launch path, point for point (`linear_gelu_gate_ref`, then the projection), and
the K walk is `kernels.gemv`'s (`_acc_tile`) with the projection's own `gemv_config`: the result is bitwise
the three-launch path's. Row invariance follows (configs independent of M, elementwise prologue).
Used only where the projection does not split K (its K = P is short: E4B's 256 is two tiles).
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, cdiv, pdl_flags, tl, tl_dtype, triton
from .gemv import launch_gemv, linear_small_m_ref, resolve_config, weight_stream_flags
from .gemv_epilogue import linear_gelu_gate_ref

GATED_BLOCK = 1024  # elements of the gated input per pass (E4B decode: 256, one pass)


def gelu_gate_linear_ref(x: torch.Tensor, wg: torch.Tensor, other: torch.Tensor, wp: torch.Tensor) -> torch.Tensor:
    """(gelu_tanh(x @ wg.T) * other) @ wp.T with the three-launch path's rounding points."""
    return linear_small_m_ref(linear_gelu_gate_ref(x, wg, other), wp)


def _configs(x: torch.Tensor, wg: torch.Tensor, g: torch.Tensor, wp: torch.Tensor, split_k: int | None = None
             ) -> tuple[dict[str, int], dict[str, int]] | None:
    """(gate config, projection config) for x [M, H] and the gated input g [M, P], or None where the two-launch
    path does not apply: the gate must split K (else there is no reduce to fold) and the projection must not
    (its programs would each need the whole gated row)."""
    g_cfg, p_cfg = resolve_config(x, wg, split_k), resolve_config(g, wp)
    return (g_cfg, p_cfg) if g_cfg["SPLIT_K"] > 1 and p_cfg["SPLIT_K"] == 1 else None


def fusable_shapes(x: torch.Tensor, wg: torch.Tensor, wp: torch.Tensor) -> bool:
    """Whether the two-launch path applies to x [M, H], wg [P, H], wp [N, P] (see `_configs`)."""
    if wp.shape[1] != wg.shape[0] or x.shape[1] != wg.shape[1] or x.shape[0] == 0:
        return False
    return _configs(x, wg, x.new_empty(x.shape[0], wg.shape[0]), wp) is not None


if HAS_TRITON:
    from ._common import pdl_wait
    from .gemv import _store_acc, _w_tile, _walk_after_two
    from .gemv_epilogue import _gelu_tanh

    @triton.jit
    def _gated_rows(part_ptr, o_ptr, g_ptr, M, P, som, son,
                    SPLIT: tl.constexpr, X_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        """g[M, P] (contiguous scratch) = gelu(sum_s part[s]) * other, the reduce kernel's arithmetic: partials
        summed in split order, rounded to X_DTYPE (the gate GEMV's output), gelu(.) * other in fp32, rounded to
        g's dtype. A flat layout over M * P (BLOCK elements a pass) keeps it at a few registers per element; in
        the dot's operand layout the same math took 255 registers a thread (`scripts/kernel_resources.py`)."""
        for start in range(0, M * P, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < M * P
            m = offs // P
            k = offs % P
            # the per-layer input with the partials: one round of loads
            other = tl.load(o_ptr + m * som + k * son, mask=ok, other=0.0).to(tl.float32)
            g = tl.zeros([BLOCK], tl.float32)
            for s in tl.static_range(SPLIT):  # the reduce kernel's order: s = 0, 1, ...
                g += tl.load(part_ptr + (s * M + m).to(tl.int64) * P + k, mask=ok, other=0.0)
            g = g.to(X_DTYPE).to(tl.float32)
            tl.store(g_ptr + offs, (_gelu_tanh(g) * other).to(g_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gemv_gated_in_kernel(part_ptr, o_ptr, g_ptr, w_ptr, y_ptr, M, N, P, som, son, swn, swk, sym, syn,
                              SPLIT: tl.constexpr, X_DTYPE: tl.constexpr, G_BLOCK: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                              PDL: tl.constexpr, PREFETCH: tl.constexpr, W_EVICT: tl.constexpr):
        """y[:, BLOCK_N slice] = g @ w.T over the whole K = P (no split). Every program first writes the whole
        gated input g (`_gated_rows`) to one scratch: the programs write identical bytes, and a CTA barrier makes
        a program's own writes visible to its threads. Then the K walk of `kernels.gemv._gemv_acc` on g (weight
        tiles 1..PREFETCH <= 2 requested before the PDL wait, tiles summed in K order, the same loads and dots)."""
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        w_rows = w_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * swn  # clamped rows, dropped at the store
        if USE_DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        w = _w_tile(w_rows, offs_k, P, swk, EVEN_K, W_EVICT)
        w2 = w  # unused unless PREFETCH == 2
        if PREFETCH >= 2:
            w2 = _w_tile(w_rows, offs_k + BLOCK_K, P, swk, False, W_EVICT)
        pdl_wait(PDL)
        _gated_rows(part_ptr, o_ptr, g_ptr, M, P, som, son, SPLIT, X_DTYPE, G_BLOCK)
        tl.debug_barrier()
        acc = _walk_after_two(acc, w, w2, w_rows, g_ptr, offs_m, m_ok, 0, P, P, 1, swk, BLOCK_K, USE_DOT, DOT_FP32,
                              EVEN_K, PREFETCH, W_EVICT)
        _store_acc(acc, y_ptr, y_ptr, 0, M, N, offs_m, m_ok, offs_n, n_ok, sym, syn, 1, USE_DOT)


def gelu_gate_linear_triton(x: torch.Tensor, wg: torch.Tensor, other: torch.Tensor, wp: torch.Tensor,
                            split_k: int | None = None) -> torch.Tensor:
    """(gelu_tanh(x @ wg.T) * other) @ wp.T for x [M <= 16, H], wg [P, H], other [M, P], wp [N, P] -> [M, N] in
    x's dtype: the gate GEMV's partials, then the projection with the gated input computed in its programs.
    Needs `fusable_shapes` (`split_k` forces the gate's split on small test shapes)."""
    M, H = x.shape
    P, N = wg.shape[0], wp.shape[0]
    if other.shape != (M, P) or wp.shape[1] != P or wg.shape[1] != H:
        raise ValueError(f"need x [M, H], wg [P, H], other [M, P], wp [N, P]; got {tuple(x.shape)}, "
                         f"{tuple(wg.shape)}, {tuple(other.shape)}, {tuple(wp.shape)}")
    g_dtype = torch.promote_types(x.dtype, other.dtype)
    g = torch.empty(M, P, dtype=g_dtype, device=x.device)  # the scratch every projection program writes g to
    cfgs = _configs(x, wg, g, wp, split_k)
    if cfgs is None:
        raise ValueError(f"the two-launch path needs a split gate and an unsplit projection; got splits "
                         f"{resolve_config(x, wg, split_k)['SPLIT_K']} / {resolve_config(g, wp)['SPLIT_K']}")
    g_cfg, p_cfg = cfgs
    part = torch.empty(g_cfg["SPLIT_K"], M, P, dtype=torch.float32, device=x.device)
    launch_gemv(x, wg, part, part, g_cfg)  # fp32 partials (y_ptr unused when split)
    y = torch.empty(M, N, dtype=g_dtype, device=x.device)
    flags = weight_stream_flags(g, wp)  # the L2 stream prefetch (`kernels.l2_prefetch`, off) is not wired in
    flags["PREFETCH"] = min(2, flags["PREFETCH"])
    flags.update(USE_DOT=p_cfg["BLOCK_M"] > 1, EVEN_K=P % p_cfg["BLOCK_K"] == 0)
    _gemv_gated_in_kernel[(cdiv(N, p_cfg["BLOCK_N"]),)](
        part, other, g, wp, y, M, N, P, other.stride(0), other.stride(1), wp.stride(0), wp.stride(1),
        y.stride(0), y.stride(1),
        SPLIT=g_cfg["SPLIT_K"], X_DTYPE=tl_dtype(x.dtype), G_BLOCK=GATED_BLOCK,
        BLOCK_M=p_cfg["BLOCK_M"], BLOCK_N=p_cfg["BLOCK_N"], BLOCK_K=p_cfg["BLOCK_K"], **flags, **pdl_flags(x),
        num_warps=p_cfg["num_warps"], num_stages=p_cfg["num_stages"])
    return y
