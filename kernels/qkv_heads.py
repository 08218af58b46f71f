"""The fused q/k/v projection's epilogue: q norm + RoPE, the K/V norms + RoPE + cache write, in one launch.

At decode widths the q/k/v GEMV splits K, and one epilogue program per (position, head) reads that head's split-K
partials directly (`kernels.head_norm._load_head`): 4 launches (GEMV, split-K reduce, q norm + RoPE, K/V write)
become 2 per layer. The per-head norm, RoPE and cache-write code is `kernels.head_norm`'s, so results are bit for
bit those of the unfused kernels. The input may also be a pending PLE sandwich (`kernels.pending_sandwich`): the
GEMV then runs on it, the heads combine its two row sets with the position's scalars, and extra programs write h'.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, cdiv, next_pow2, pdl_flags, tl, tl_dtype, triton
from .head_norm import _check_kv, _per_position, _warps, head_norm_ref, write_kv_ref

if HAS_TRITON:
    from ._common import pdl_wait
    from .head_norm import _head_cols, _head_loads, _normed_head, _weight_factor, _write_kv_head
    from .pending_sandwich import _sandwich_coefs, _store_pending_h

    @triton.jit
    def _qkv_heads_kernel(src_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, sp_ptr,
                          rows_ptr, slots_ptr, pos_ptr, T, HQ, k_col, v_col, s_split, s_row,
                          scr, ssr, sqr, sqh, skcb, skch, skcs, svcb, svch, svcs, sspb, ssps,
                          srb, srt, slb, slt, spb, spt, eps,
                          ss_ptr, sc_ptr, py_ptr, pr_ptr, pw_ptr, ph_ptr, M, HID, sym, srm, n_heads, b_off,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, XD: tl.constexpr,
                          PLUS_ONE: tl.constexpr, V_NORM: tl.constexpr, PDL: tl.constexpr,
                          PEND: tl.constexpr, HAS_WPOST: tl.constexpr, HAS_SCALAR: tl.constexpr):
        """The fused QKV projection's epilogue in one launch: program (position, h) takes q head h (h < HQ:
        norm + RoPE into q) or kv head h - HQ (`_write_kv_head`, as `_write_kv_kernel` does),
        reading the projection's split-K partials directly (`_load_head`) instead of a reduced copy.
        The head's norm weights before the PDL wait; after it, one round of loads.
        PEND: the projection ran on a pending sandwich (`kernels.pending_sandwich`): the heads combine its two row
        sets with the position's scalars, and programs h >= n_heads write columns of h' (ph_ptr) instead."""
        r = tl.program_id(0)  # position b * T + t
        h = tl.program_id(1)
        r64 = r.to(tl.int64)
        src_row = src_ptr + r64 * s_row
        cs_row = cos_ptr + r64 * scr
        sn_row = sin_ptr + r64 * ssr
        cols, rcols, c_ok = _head_cols(D, BLOCK_D)
        if h < HQ:
            wf = _weight_factor(qw_ptr, cols, c_ok, True, PLUS_ONE)
            wfr = _weight_factor(qw_ptr, rcols, c_ok, True, PLUS_ONE)
        else:
            wf = _weight_factor(kw_ptr, cols, c_ok, True, PLUS_ONE)
            wfr = _weight_factor(kw_ptr, rcols, c_ok, True, PLUS_ONE)
        pdl_wait(PDL)
        if PEND:
            ca, cb, sc = _sandwich_coefs(ss_ptr, sc_ptr, r, M, HID, eps, SPLIT, HAS_SCALAR)
        else:
            ca, cb, sc = 1.0, 1.0, 1.0
        if h < HQ:
            x, xr, c, s = _head_loads(src_row + h * D, cs_row, sn_row, cols, rcols, c_ok, s_split, BLOCK_D, SPLIT,
                                      XD, True, PEND, b_off, ca, cb)
            q = _normed_head(x, xr, wf, wfr, c, s, cols, eps, D, True, XD)
            tl.store(q_ptr + r64 * sqr + h * sqh + cols, q.to(q_ptr.dtype.element_ty), mask=c_ok)
        elif h < n_heads:
            _write_kv_head(src_row + k_col + (h - HQ) * D, src_row + v_col + (h - HQ) * D, wf, wfr, cs_row, sn_row,
                           kc_ptr, vc_ptr, sp_ptr, rows_ptr, slots_ptr, pos_ptr, r // T, r % T, h - HQ,
                           skcb, skch, skcs, svcb, svch, svcs, sspb, ssps, srb, srt, slb, slt, spb, spt, eps,
                           s_split, D, BLOCK_D, V_NORM, SPLIT, XD, XD, PEND, b_off, ca, cb)
        else:
            if PEND:
                _store_pending_h(py_ptr, pr_ptr, pw_ptr, ph_ptr, r64, h - n_heads, HID, sym, srm, cb, sc, XD,
                                 HAS_WPOST, PLUS_ONE, HAS_SCALAR, BLOCK_D)


def _qkv_shapes(x: torch.Tensor, w: torch.Tensor, num_heads: int, kv_heads: int, head_dim: int,
                has_kv: bool, k_eq_v: bool) -> tuple[int, int]:
    """Check the fused [q; k; v] weight against the head geometry; (k column, v column) of its output."""
    if x.dim() != 3 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"need x [B, T, K] and w [N, K]; got {tuple(x.shape)} and {tuple(w.shape)}")
    k_col = num_heads * head_dim
    v_col = k_col if k_eq_v else k_col + kv_heads * head_dim
    n = (v_col + kv_heads * head_dim) if has_kv else k_col
    if w.shape[0] != n:
        raise ValueError(f"weight has {w.shape[0]} rows; {num_heads} q heads"
                         + (f" + {kv_heads} kv heads{' (k = v)' if k_eq_v else ''}" if has_kv else "")
                         + f" of {head_dim} need {n}")
    return k_col, v_col


def linear_qkv_heads_ref(x: torch.Tensor, w: torch.Tensor, num_heads: int, kv_heads: int, head_dim: int,
                         q_weight: torch.Tensor, k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                         kv: tuple | None, eps: float, plus_one: bool, v_norm: bool, k_eq_v: bool) -> torch.Tensor:
    """The unfused composition: projection (rounded to x's dtype), q norm + RoPE, and with `k_weight`
    the K/V write of `write_kv_ref`. kv = (k_cache, v_cache, slot_pos, rows, slots, pos32)."""
    from .gemv import linear_small_m_ref

    B, T, _ = x.shape
    k_col, v_col = _qkv_shapes(x, w, num_heads, kv_heads, head_dim, k_weight is not None, k_eq_v)
    y = linear_small_m_ref(x.reshape(B * T, -1), w).view(B, T, -1)
    q = head_norm_ref(y[..., :k_col].view(B, T, num_heads, head_dim), q_weight, eps, plus_one, cos, sin)
    if k_weight is not None:
        k_raw = y[..., k_col:k_col + kv_heads * head_dim].view(B, T, kv_heads, head_dim)
        v_raw = y[..., v_col:v_col + kv_heads * head_dim].view(B, T, kv_heads, head_dim)
        write_kv_ref(k_raw, v_raw, k_weight, cos, sin, *kv, eps, plus_one, v_norm)
    return q


def linear_qkv_heads_triton(x, w: torch.Tensor, num_heads: int, kv_heads: int, head_dim: int,
                            q_weight: torch.Tensor, k_weight: torch.Tensor | None, cos: torch.Tensor,
                            sin: torch.Tensor, kv: tuple | None, eps: float, plus_one: bool, v_norm: bool,
                            k_eq_v: bool, split_k: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """`linear_qkv_heads_ref` for decode widths (B * T <= 16) in two launches instead of four: the q/k/v GEMV,
    then one epilogue over every q and kv head that reads its split-K partials (no reduction kernel) and
    writes q [B, T, H, D] and the cache. `k_weight` None: a layer that reads another layer's cache (q only).
    x may be a `kernels.pending_sandwich.PendingSandwich` (y [B, T, K]): the GEMV then runs on it pending, and the
    epilogue also writes its h' into x.h_out. `split_k` / `block_k` override the GEMV heuristic (tests)."""
    from .gemv import launch_gemv, resolve_config
    from .pending_sandwich import PendingSandwich, launch_pending_gemv

    pend = x if isinstance(x, PendingSandwich) else None
    xt = pend.y if pend is not None else x
    B, T, K = xt.shape
    D, H = head_dim, num_heads
    has_kv = k_weight is not None
    k_col, v_col = _qkv_shapes(xt, w, H, kv_heads, D, has_kv, k_eq_v)
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, got {D}")
    x2 = xt.reshape(B * T, K)
    M, N = x2.shape[0], w.shape[0]
    q = torch.empty(B, T, H, D, dtype=xt.dtype, device=xt.device)
    if M == 0:
        return q
    b_off, n_writers = 0, 0
    if pend is not None:
        src, ss, split = launch_pending_gemv(pend, w, split_k, block_k)
        s_split, b_off, n_writers = 2 * M * N, M * N, cdiv(K, next_pow2(D))
        r2 = pend.residual.reshape(M, K)
        pend_args = (ss, pend.scalar if pend.scalar is not None else ss, x2, r2,
                     pend.w_post.contiguous() if pend.w_post is not None else ss, pend.h_out, M, K, x2.stride(0),
                     r2.stride(0))
    else:
        cfg = resolve_config(x2, w, split_k, block_k)
        split = cfg["SPLIT_K"] if K > 0 else 1
        if split > 1:
            src = torch.empty(split, M, N, dtype=torch.float32, device=xt.device)
            launch_gemv(x2, w, src, src, cfg)
        else:
            src = torch.empty(M, N, dtype=xt.dtype, device=xt.device)
            if K == 0:
                src.zero_()
            else:
                launch_gemv(x2, w, src, src, cfg)
        s_split = M * N if split > 1 else 0
        pend_args = (src, src, src, src, src, src, M, K, 0, 0)  # unused without PEND
    q3 = q.view(M, H, D)
    c2, s2 = _per_position(cos, q), _per_position(sin, q)
    if has_kv:
        k_cache, v_cache, slot_pos, rows, slots, pos32 = kv
        _check_kv(B, T, kv_heads, D, k_cache, v_cache, rows, slots, pos32)
        kw = k_weight.contiguous()
    else:  # dummy pointers: no program takes the kv branch (empty, not zeros: a fill would be one more kernel
        # per KV-shared layer in the step, 18 at E4B, ~1.3 us each on the critical path)
        k_cache = v_cache = slot_pos = q3
        rows = slots = pos32 = torch.empty(1, 1, dtype=torch.int32, device=xt.device)
        kw = q_weight
    n_heads = H + (kv_heads if has_kv else 0)
    _qkv_heads_kernel[(M, n_heads + n_writers)](
        src, q_weight.contiguous(), kw, c2, s2, q3, k_cache, v_cache, slot_pos, rows, slots, pos32, T, H,
        k_col, v_col, s_split, N, c2.stride(0), s2.stride(0), q3.stride(0), q3.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(-2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(-2), slot_pos.stride(0), slot_pos.stride(-1),
        rows.stride(0), rows.stride(1), slots.stride(0), slots.stride(1), pos32.stride(0), pos32.stride(1),
        float(eps), *pend_args, n_heads, b_off,
        D=D, BLOCK_D=next_pow2(D), SPLIT=split if (split > 1 or pend is not None) else 0, XD=tl_dtype(xt.dtype),
        PLUS_ONE=bool(plus_one), V_NORM=bool(v_norm), PEND=pend is not None,
        HAS_WPOST=pend is not None and pend.w_post is not None, HAS_SCALAR=pend is not None and pend.scalar is not None,
        num_warps=_warps(D), **pdl_flags(x2, short=True))
    return q


__all__ = ["linear_qkv_heads_ref", "linear_qkv_heads_triton"]
