"""Small-M GEMV whose split-K reduction also does Gemma's residual add and RMSNorm(s).

Three projections per Gemma 4 layer end in a hidden-width (N = H) output that goes straight into
`sandwich` (post-norm + residual add [+ layer scalar] + next pre-norm) or `add_norm` (post-norm +
residual add): o_proj, down and the PLE projection. At decode widths their GEMVs split K (too few
output tiles to fill the GPU), so a second kernel already sums the fp32 partials; here that kernel is
one program per row that sums the row's partials and then runs the norm math of
`kernels.rmsnorm._sandwich_kernel` on the sum: GEMV + reduce + norm = 2 launches instead of 3.

Rounding is the unfused path's, point for point: the partials are summed in the fixed order of
`kernels.gemv._splitk_reduce_kernel` (s = 0, 1, ...) and rounded to x's dtype (the GEMV output),
then h = residual + cast_x(norm(y, w_post)) rounded to the residual's dtype, times the layer scalar
rounded again, and the next norm of that h (`kernels.rmsnorm._h_values`, shared code).

When the config does not split K (PLE projection at E4B: K = 256), or the row is too wide for one
register tile, there is no reduction to fuse into: the GEMV writes y and the Triton sandwich kernel
runs as before (same results, same launch count as unfused).

Row invariance: the GEMV config is `gemv_config`'s and the norm program handles exactly one row with a
config from N alone (`kernels.rmsnorm._config`), so a row's result never depends on M.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, pdl_flags, tl, tl_dtype, triton
from .gemv import launch_gemv, linear_small_m_ref, linear_small_m_triton, resolve_config
from .rmsnorm import (_config, _rows, post_norm_residual_pre_norm_ref, post_norm_residual_pre_norm_triton,
                      residual_rmsnorm_ref, residual_rmsnorm_triton)


# --------------------------------------------------------------------------------------------
# References (test oracles)
# --------------------------------------------------------------------------------------------
def linear_sandwich_ref(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor | None,
                        w_next: torch.Tensor | None, scalar: torch.Tensor | None, eps: float, plus_one: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): y0 = x @ w.T (x's dtype); h = (residual + norm(y0, w_post)) [* scalar]; y = norm(h, w_next)."""
    y0 = linear_small_m_ref(x, w).view(residual.shape)
    return post_norm_residual_pre_norm_ref(y0, residual.to(torch.promote_types(y0.dtype, residual.dtype)),
                                           w_post, w_next, eps, plus_one, scalar)


def linear_add_norm_ref(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor | None,
                        eps: float, plus_one: bool) -> torch.Tensor:
    """residual + norm(x @ w.T, w_post)."""
    y0 = linear_small_m_ref(x, w).view(residual.shape)
    return residual_rmsnorm_ref(y0, residual.to(torch.promote_types(y0.dtype, residual.dtype)), w_post, eps,
                                plus_one)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._common import pdl_wait
    from .rmsnorm import _h_values, _layer_scalar, _rms_inv, _scale, _store_h_y

    @triton.jit
    def _splitk_sandwich_kernel(part_ptr, r_ptr, wpost_ptr, wpre_ptr, s_ptr, h_ptr, y_ptr, M, N,
                                srr, shr, syr, eps,
                                X_DTYPE: tl.constexpr, SPLIT_K: tl.constexpr, HAS_WPOST: tl.constexpr,
                                HAS_WPRE: tl.constexpr, PLUS_ONE: tl.constexpr, HAS_SCALAR: tl.constexpr,
                                WRITE_Y: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """One program per row; part [SPLIT_K, M, N] fp32. Tiles are [1, BLOCK_N], as the sandwich
        kernel's single-tile path with one row per program."""
        row = tl.program_id(0)
        row64 = row.to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        c_ok = cols < N
        m = c_ok[None, :]
        # Weights (both norm rows, the layer scalar) before the PDL wait; after it, the partials and the
        # residual in one round of loads (the residual was issued after the row reduction's barrier).
        wpost = _scale(wpost_ptr, cols, c_ok, HAS_WPOST, PLUS_ONE)
        wpre = _scale(wpre_ptr, cols, c_ok, HAS_WPRE, PLUS_ONE)
        scalar = _layer_scalar(s_ptr, HAS_SCALAR)
        pdl_wait(PDL)
        x = tl.zeros([1, BLOCK_N], tl.float32)
        for s in tl.static_range(SPLIT_K):  # the split-K reduction, in the reduce kernel's order
            x += tl.load(part_ptr + (s * M + row64) * N + cols[None, :], mask=m, other=0.0)
        r = tl.load(r_ptr + row64 * srr + cols[None, :], mask=m, other=0.0).to(tl.float32)
        x = x.to(X_DTYPE).to(tl.float32)  # the GEMV output's rounding
        inv = _rms_inv(x, N, eps)
        h = _h_values(x, r, inv, wpost, scalar, X_DTYPE, h_ptr.dtype.element_ty, HAS_SCALAR)
        _store_h_y(h, h_ptr + row64 * shr + cols[None, :], y_ptr + row64 * syr + cols[None, :], m, wpre, N, eps,
                   WRITE_Y)


def _launch(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor | None,
            w_next: torch.Tensor | None, scalar: torch.Tensor | None, eps: float, plus_one: bool, write_y: bool,
            split_k: int | None, block_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (M <= 16), w [N, K], residual [..., N] with M rows -> (h, y) shaped like residual."""
    N = w.shape[0]
    if residual.shape[-1] != N or residual.numel() != x.shape[0] * N:
        raise ValueError(f"residual {tuple(residual.shape)} does not hold {x.shape[0]} rows of {N}")
    if scalar is not None and scalar.numel() != 1:
        raise ValueError(f"the layer scalar must have one element, got shape {tuple(scalar.shape)}")
    cfg = resolve_config(x, w, split_k, block_k)
    single = _config(N, 1)[0]  # one row per program: config from N alone
    M, K = x.shape
    res = residual.to(torch.promote_types(x.dtype, residual.dtype))  # a no-op in the engine
    if cfg["SPLIT_K"] == 1 or not single or M == 0 or K == 0:
        # nothing to fuse into: the plain GEMV, then the Triton norm kernel
        y0 = linear_small_m_triton(x, w, split_k, block_k).view(residual.shape)
        if write_y:
            return post_norm_residual_pre_norm_triton(y0, res, w_post, w_next, eps, plus_one, scalar=scalar)
        h = residual_rmsnorm_triton(y0, res, w_post, eps, plus_one)
        return h, h
    part = torch.empty(cfg["SPLIT_K"], M, N, dtype=torch.float32, device=x.device)
    launch_gemv(x, w, part, part, cfg)  # SPLIT_K > 1: y_ptr unused
    return sandwich_from_partials(part, x.dtype, res, w_post, w_next, scalar, eps, plus_one, write_y)


def sandwich_from_partials(part: torch.Tensor, x_dtype: torch.dtype, residual: torch.Tensor,
                           w_post: torch.Tensor | None, w_next: torch.Tensor | None, scalar: torch.Tensor | None,
                           eps: float, plus_one: bool, write_y: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm half of `linear_sandwich_triton` on a projection's fp32 partial sums part [S, M, N] (summed
    in s order, rounded to x_dtype): (h, y) shaped like residual, in promote(x_dtype, residual)'s dtype (y is
    h when not write_y). Also the tail of `kernels.fused_mlp`, whose down sums arrive as one partial."""
    S, M, N = part.shape
    single, _, block_n, warps = _config(N, 1)
    if not single:
        raise ValueError(f"rows of {N} are too wide for the one-tile norm kernel")
    res = residual.to(torch.promote_types(x_dtype, residual.dtype))  # a no-op in the engine
    r2 = _rows(res)
    h = torch.empty(M, N, dtype=res.dtype, device=part.device)
    y = torch.empty(M, N, dtype=res.dtype, device=part.device) if write_y else h
    _splitk_sandwich_kernel[(M,)](
        part, r2, w_post.contiguous() if w_post is not None else part,
        w_next.contiguous() if w_next is not None else part, scalar if scalar is not None else part,
        h, y, M, N, r2.stride(0), h.stride(0), y.stride(0), float(eps),
        X_DTYPE=tl_dtype(x_dtype), SPLIT_K=S, HAS_WPOST=w_post is not None,
        HAS_WPRE=w_next is not None, PLUS_ONE=bool(plus_one), HAS_SCALAR=scalar is not None,
        WRITE_Y=write_y, BLOCK_N=block_n, num_warps=warps, **pdl_flags(part, short=True))
    return h.view(residual.shape), y.view(residual.shape)


def linear_sandwich_triton(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor | None,
                           w_next: torch.Tensor | None, scalar: torch.Tensor | None, eps: float, plus_one: bool,
                           split_k: int | None = None, block_k: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y) of `linear_sandwich_ref` for x [M <= 16, K]: the GEMV and, when it splits K, one
    reduce + residual + norms kernel. `split_k` / `block_k` override the GEMV heuristic (tests)."""
    return _launch(x, w, residual, w_post, w_next, scalar, eps, plus_one, True, split_k, block_k)


def linear_add_norm_triton(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor | None,
                           eps: float, plus_one: bool, split_k: int | None = None, block_k: int | None = None
                           ) -> torch.Tensor:
    """residual + norm(x @ w.T, w_post) (`linear_add_norm_ref`), the sandwich without its next norm."""
    return _launch(x, w, residual, w_post, None, None, eps, plus_one, False, split_k, block_k)[0]
