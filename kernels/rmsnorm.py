"""Gemma RMSNorm, and the fused "sandwich" step post-norm -> residual add -> next pre-norm.

Gemma 4: y = x * (mean(x^2) + eps)^-0.5 * w;  Gemma 2/3 (`plus_one`): ... * (1 + w);
`weight=None`: scale-free (Gemma 4's v_norm). Everything is computed in fp32 and cast back
to the input dtype, as Hugging Face does.

The fused kernel exists because every Gemma block does, twice per layer,
    h = residual + post_norm(x);  y = pre_norm(h)
and unfused that is 2 norm launches + 1 add with 3 extra round trips through HBM. Its rounding
follows the reference order exactly: post_norm's output is cast to x.dtype *before* the add,
h is rounded to residual.dtype, and the second norm reads that rounded h. Gemma 4's optional layer
scalar multiplies h (rounded again) before the second norm; `write_y=False` stops after h (the
residual add that has no norm after it).

Row invariance (`kernels.invariance.ROW_INVARIANT`, on by default): one row per program and a
launch config from N alone, so a row's reduction order never depends on how many rows the call has.
"""
from __future__ import annotations

import torch

from . import invariance
from ._common import HAS_TRITON, next_pow2, pdl_flags, tl, triton, use_triton

SINGLE_TILE_MAX = 16384  # rows up to this width stay in registers; wider rows loop over chunks
CHUNK = 4096


# --------------------------------------------------------------------------------------------
# Reference (CPU fallback and test oracle)
# --------------------------------------------------------------------------------------------
def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, plus_one: bool) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        w = weight.float()
        y = y * (1.0 + w if plus_one else w)
    return y.to(x.dtype)


def post_norm_residual_pre_norm_ref(x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor | None,
                                    w_pre: torch.Tensor | None, eps: float, plus_one: bool,
                                    scalar: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = residual + rmsnorm_ref(x, w_post, eps, plus_one)  # torch promotion: h in residual's dtype
    h = h.to(residual.dtype)
    if scalar is not None:
        h = (h * scalar).to(residual.dtype)
    return h, rmsnorm_ref(h, w_pre, eps, plus_one)


def residual_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                         plus_one: bool) -> torch.Tensor:
    """residual + rmsnorm(x, weight), in residual's dtype."""
    return (residual + rmsnorm_ref(x, weight, eps, plus_one)).to(residual.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels: a program owns BLOCK_R rows (one in row-invariant mode; otherwise several when
# N is small, e.g. per-head norms over 256) and either the whole row in registers (SINGLE) or chunks.
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._common import pdl_wait

    @triton.jit
    def _scale(w_ptr, cols, c_ok, HAS_W: tl.constexpr, PLUS_ONE: tl.constexpr):
        """Row-broadcast weight factor in fp32 (w or 1 + w); 1 when the norm has no weight."""
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
            if PLUS_ONE:
                w = 1.0 + w
        else:
            w = tl.full(cols.shape, 1.0, tl.float32)
        return w[None, :]

    @triton.jit
    def _rms_inv(x, N, eps):
        """1 / rms of each row of the fp32 tile x [rows, BLOCK_N] (the whole row: BLOCK_N >= N, padding 0)."""
        return tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)

    @triton.jit
    def _layer_scalar(s_ptr, HAS_SCALAR: tl.constexpr):
        """Gemma 4's layer scalar (a one-element weight) in fp32; 1 without one."""
        if HAS_SCALAR:
            return tl.load(s_ptr).to(tl.float32)
        else:
            return 1.0

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, R, N, sxr, syr, eps,
                        HAS_W: tl.constexpr, PLUS_ONE: tl.constexpr, SINGLE: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rows[:, None] < R
        xrow = x_ptr + rows.to(tl.int64)[:, None] * sxr
        yrow = y_ptr + rows.to(tl.int64)[:, None] * syr
        if SINGLE:
            cols = tl.arange(0, BLOCK_N)
            c_ok = cols < N
            m = r_ok & c_ok[None, :]
            # the norm weight is a weight: read before the PDL wait (it streams while the previous kernel
            # finishes), not after the row reduction, whose barrier would serialise a second memory round trip
            w = _scale(w_ptr, cols, c_ok, HAS_W, PLUS_ONE)
            pdl_wait(PDL)
            x = tl.load(xrow + cols[None, :], mask=m, other=0.0).to(tl.float32)
            inv = _rms_inv(x, N, eps)
            y = x * inv[:, None] * w
            tl.store(yrow + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
        else:
            pdl_wait(PDL)
            ss = tl.zeros([BLOCK_R], tl.float32)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                x = tl.load(xrow + cols[None, :], mask=r_ok & (cols[None, :] < N), other=0.0).to(tl.float32)
                ss += tl.sum(x * x, axis=1)
            inv = tl.rsqrt(ss / N + eps)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                c_ok = cols < N
                m = r_ok & c_ok[None, :]
                x = tl.load(xrow + cols[None, :], mask=m, other=0.0).to(tl.float32)
                y = x * inv[:, None] * _scale(w_ptr, cols, c_ok, HAS_W, PLUS_ONE)
                tl.store(yrow + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _h_values(x, r, inv, wpost, scalar, X_DTYPE: tl.constexpr, H_DTYPE: tl.constexpr,
                  HAS_SCALAR: tl.constexpr):
        """h = residual + cast_x(norm(x)), rounded to h's dtype, then times the layer scalar (fp32, from
        `_layer_scalar`) rounded again: the reference's rounding order. x and r in fp32 (x holds
        values of X_DTYPE); shared with the split-K reduce + norm kernel of `kernels.splitk_norm`."""
        n = (x * inv[:, None] * wpost).to(X_DTYPE).to(tl.float32)
        h = (r + n).to(H_DTYPE)
        if HAS_SCALAR:
            h = (h.to(tl.float32) * scalar).to(H_DTYPE)
        return h

    @triton.jit
    def _store_h_y(h, h_ptrs, y_ptrs, m, wpre, N, eps, WRITE_Y: tl.constexpr):
        """Single-tile epilogue: store h, then (WRITE_Y) the next layer's input y = norm(h) * wpre, wpre the
        `_scale` row of the next norm (loaded by the caller before its PDL wait). Shared with the split-K
        reduce + norm kernel of `kernels.splitk_norm`."""
        tl.store(h_ptrs, h, mask=m)
        if WRITE_Y:
            hf = h.to(tl.float32)
            inv2 = _rms_inv(hf, N, eps)
            y = hf * inv2[:, None] * wpre
            tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=m)

    @triton.jit
    def _h_tile(x_ptrs, r_ptrs, m, inv, wpost, scalar, X_DTYPE: tl.constexpr, H_DTYPE: tl.constexpr,
                HAS_SCALAR: tl.constexpr):
        """`_h_values` of the x and residual tiles at these pointers."""
        x = tl.load(x_ptrs, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptrs, mask=m, other=0.0).to(tl.float32)
        return _h_values(x, r, inv, wpost, scalar, X_DTYPE, H_DTYPE, HAS_SCALAR)

    @triton.jit
    def _sandwich_kernel(x_ptr, r_ptr, wpost_ptr, wpre_ptr, s_ptr, h_ptr, y_ptr, R, N,
                         sxr, srr, shr, syr, eps,
                         HAS_WPOST: tl.constexpr, HAS_WPRE: tl.constexpr, PLUS_ONE: tl.constexpr,
                         HAS_SCALAR: tl.constexpr, WRITE_Y: tl.constexpr,
                         SINGLE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                         PDL: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows64 = rows.to(tl.int64)[:, None]
        r_ok = rows[:, None] < R
        X_DTYPE = x_ptr.dtype.element_ty
        H_DTYPE = h_ptr.dtype.element_ty
        scalar = _layer_scalar(s_ptr, HAS_SCALAR)  # a weight: before the PDL wait
        if SINGLE:
            cols = tl.arange(0, BLOCK_N)
            c_ok = cols < N
            m = r_ok & c_ok[None, :]
            # Weights (both norms' rows) before the PDL wait, then every activation load at once (x and the
            # residual): one memory round trip after the wait instead of three (each load issued after a
            # row reduction waits behind its barrier).
            wpost = _scale(wpost_ptr, cols, c_ok, HAS_WPOST, PLUS_ONE)
            wpre = _scale(wpre_ptr, cols, c_ok, HAS_WPRE, PLUS_ONE)
            pdl_wait(PDL)
            x = tl.load(x_ptr + rows64 * sxr + cols[None, :], mask=m, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + rows64 * srr + cols[None, :], mask=m, other=0.0).to(tl.float32)
            inv = _rms_inv(x, N, eps)
            h = _h_values(x, r, inv, wpost, scalar, X_DTYPE, H_DTYPE, HAS_SCALAR)
            _store_h_y(h, h_ptr + rows64 * shr + cols[None, :], y_ptr + rows64 * syr + cols[None, :], m, wpre,
                       N, eps, WRITE_Y)
        else:
            pdl_wait(PDL)
            # Wide rows: pass 1 sums x^2, pass 2 writes h and sums h^2, pass 3 recomputes h from
            # x and residual (instead of re-reading the h just stored: no cross-thread hazard).
            ss = tl.zeros([BLOCK_R], tl.float32)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                x = tl.load(x_ptr + rows64 * sxr + cols[None, :], mask=r_ok & (cols[None, :] < N),
                            other=0.0).to(tl.float32)
                ss += tl.sum(x * x, axis=1)
            inv = tl.rsqrt(ss / N + eps)
            ss2 = tl.zeros([BLOCK_R], tl.float32)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                c_ok = cols < N
                m = r_ok & c_ok[None, :]
                h = _h_tile(x_ptr + rows64 * sxr + cols[None, :], r_ptr + rows64 * srr + cols[None, :], m,
                            inv, _scale(wpost_ptr, cols, c_ok, HAS_WPOST, PLUS_ONE), scalar, X_DTYPE, H_DTYPE,
                            HAS_SCALAR)
                tl.store(h_ptr + rows64 * shr + cols[None, :], h, mask=m)
                hf = h.to(tl.float32)
                ss2 += tl.sum(hf * hf, axis=1)
            if WRITE_Y:
                inv2 = tl.rsqrt(ss2 / N + eps)
                for c0 in range(0, N, BLOCK_N):
                    cols = c0 + tl.arange(0, BLOCK_N)
                    c_ok = cols < N
                    m = r_ok & c_ok[None, :]
                    h = _h_tile(x_ptr + rows64 * sxr + cols[None, :], r_ptr + rows64 * srr + cols[None, :],
                                m, inv, _scale(wpost_ptr, cols, c_ok, HAS_WPOST, PLUS_ONE), scalar, X_DTYPE,
                                H_DTYPE, HAS_SCALAR)
                    y = h.to(tl.float32) * inv2[:, None] * _scale(wpre_ptr, cols, c_ok, HAS_WPRE, PLUS_ONE)
                    tl.store(y_ptr + rows64 * syr + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


def _config(N: int, R: int, block_n: int | None = None) -> tuple[bool, int, int, int]:
    """(SINGLE, BLOCK_R, BLOCK_N, num_warps). Row-invariant mode: one row per program and a config
    from N alone, so a row reduces in the same order whatever R is (a 1-token decode step and a
    K+1 verify step normalise their shared rows bit for bit alike). Otherwise several rows per
    program for narrow rows, so that per-head norms (N = 256/512) do not launch one tiny program
    per head."""
    bn = block_n or next_pow2(N)
    single = bn >= N and bn <= SINGLE_TILE_MAX
    if not single:
        bn = block_n or CHUNK
    block_r = 1 if invariance.ROW_INVARIANT else max(1, min(16, 2048 // bn, next_pow2(R)))
    num_warps = max(1, min(8, block_r * bn // 512))
    return single, block_r, bn, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [R, N] view with unit column stride (copies only if the layout forbids it)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float, plus_one: bool,
                   block_n: int | None = None) -> torch.Tensor:
    """Triton path; `block_n` (tests) forces the chunked wide-row variant."""
    N = x.shape[-1]
    x2 = _rows(x)
    R = x2.shape[0]
    y = torch.empty(R, N, dtype=x.dtype, device=x.device)
    if R == 0:
        return y.view(x.shape)
    w = weight.contiguous() if weight is not None else x2  # dummy pointer when HAS_W is False
    single, block_r, bn, warps = _config(N, R, block_n)
    _rmsnorm_kernel[(triton.cdiv(R, block_r),)](
        x2, w, y, R, N, x2.stride(0), y.stride(0), float(eps),
        HAS_W=weight is not None, PLUS_ONE=bool(plus_one), SINGLE=single,
        BLOCK_R=block_r, BLOCK_N=bn, num_warps=warps, **pdl_flags(x2, short=True))
    return y.view(x.shape)


def _sandwich_launch(x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor | None,
                     w_pre: torch.Tensor | None, scalar: torch.Tensor | None, eps: float, plus_one: bool,
                     write_y: bool, block_n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    if scalar is not None and scalar.numel() != 1:
        raise ValueError(f"the layer scalar must have one element, got shape {tuple(scalar.shape)}")
    N = x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    R = x2.shape[0]
    h = torch.empty(R, N, dtype=residual.dtype, device=x.device)
    y = torch.empty(R, N, dtype=residual.dtype, device=x.device) if write_y else h
    if R > 0:
        single, block_r, bn, warps = _config(N, R, block_n)
        _sandwich_kernel[(triton.cdiv(R, block_r),)](
            x2, r2, w_post.contiguous() if w_post is not None else x2,
            w_pre.contiguous() if w_pre is not None else x2, scalar if scalar is not None else x2,
            h, y, R, N, x2.stride(0), r2.stride(0), h.stride(0), y.stride(0), float(eps),
            HAS_WPOST=w_post is not None, HAS_WPRE=w_pre is not None, PLUS_ONE=bool(plus_one),
            HAS_SCALAR=scalar is not None, WRITE_Y=write_y,
            SINGLE=single, BLOCK_R=block_r, BLOCK_N=bn, num_warps=warps, **pdl_flags(x2, short=True))
    return h.view(residual.shape), y.view(residual.shape)


def post_norm_residual_pre_norm_triton(x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor | None,
                                       w_pre: torch.Tensor | None, eps: float, plus_one: bool,
                                       block_n: int | None = None, scalar: torch.Tensor | None = None
                                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = residual + rmsnorm(x, w_post) [* scalar], y = rmsnorm(h, w_pre); one pass."""
    return _sandwich_launch(x, residual, w_post, w_pre, scalar, eps, plus_one, True, block_n)


def residual_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                            plus_one: bool, block_n: int | None = None) -> torch.Tensor:
    """residual + rmsnorm(x, weight) in residual's dtype (the sandwich kernel without its second norm)."""
    return _sandwich_launch(x, residual, weight, None, None, eps, plus_one, False, block_n)[0]


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, plus_one: bool) -> torch.Tensor:
    """Gemma RMSNorm over the last dim, fp32 inside, output in x's dtype."""
    if use_triton(x):
        return rmsnorm_triton(x, weight, eps, plus_one)
    return rmsnorm_ref(x, weight, eps, plus_one)


def post_norm_residual_pre_norm(x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor | None,
                                w_pre: torch.Tensor | None, eps: float, plus_one: bool,
                                scalar: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y) with h = residual + rmsnorm(x, w_post) (residual's dtype), times the optional layer
    scalar, and y = rmsnorm(h, w_pre)."""
    if use_triton(x):
        return post_norm_residual_pre_norm_triton(x, residual, w_post, w_pre, eps, plus_one, scalar=scalar)
    return post_norm_residual_pre_norm_ref(x, residual, w_post, w_pre, eps, plus_one, scalar)
