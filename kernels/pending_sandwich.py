"""The q/k/v GEMV on a pending PLE sandwich: the layer-ending norm kernel leaves the decode step's chain.

A Gemma 4 layer with per-layer inputs ends, after the PLE projection y = g @ Wp.T, with the sandwich
    h' = (h + norm(y) * w_post) * scalar       the residual stream (h: the residual after the MLP)
    x  = norm(h') * w_next                     the next layer's input, read by its q/k/v GEMV
The stop-25 path runs PLE projection -> sandwich kernel -> q/k/v GEMV -> q/k/v epilogue: the sandwich moves
~15 KB but is one more dependent launch on the critical path. Both norms are per-row scalars,
inv_y = rsqrt(mean(y^2) + eps) and inv_h = rsqrt(mean(h'^2) + eps), and
    x @ W.T = inv_h * scalar * ((w_next * h) @ W.T + inv_y * ((w_next * w_post * y) @ W.T))
    mean(h'^2) = scalar^2 * (S_hh + 2 inv_y S_hb + inv_y^2 S_bb) / H,   b = w_post * y
so the q/k/v GEMV (`_pending_qkv_gemv_kernel`) reads h and y, dots two rows per stream position with each weight
tile, and sums y^2, h^2, h * b and b^2 over its K slice. The q/k/v epilogue (`kernels.qkv_heads._qkv_heads_kernel`
with PENDING), a launch the path has anyway, adds the slices' sums into the two scalars, combines the two rows'
partials before its head norms, and (extra programs) writes h' for the residual stream with the sandwich's own
formula. One launch fewer per layer.

Rounding: h' is the sandwich kernel's (`kernels.rmsnorm._h_values`): cast_x(y * inv_y * w_post) added to h, rounded,
times the scalar, rounded; inv_y's sum runs in split order rather than one tile's tree order. The q/k/v input rounds
at other points than the unfused path's (w_next * h and w_next * w_post * y are rounded to x's dtype before the dot;
mean(h'^2) comes from the unrounded sums): one rounding of x's dtype per element either way. The head norms after it
are scale-free up to eps, so the q/k/v output is insensitive to the scalars' rounding.

Row invariance: one 16-row tile per operand row set whatever M is, the config is `gemv_config`'s, and the epilogue
is per row: a verify step computes each position as a decode step does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import HAS_TRITON, cdiv, pdl_flags, tl, tl_dtype, triton
from .gemv import MAX_M, weight_stream_flags
from .pending_add_norm import post_factor, two_row_config

N_SUMS = 4  # y^2, h^2, h * w_post * y, (w_post * y)^2


@dataclass(frozen=True)
class PendingSandwich:
    """h' = (residual + norm(y) * w_post) [* scalar] and x = norm(h') * w_next, not yet computed. y [..., H] (x's
    dtype), residual like y. h_out: the tensor (residual's shape) the consumer writes h' into."""
    y: torch.Tensor
    residual: torch.Tensor
    w_post: torch.Tensor | None
    w_next: torch.Tensor | None
    scalar: torch.Tensor | None
    eps: float
    plus_one: bool
    h_out: torch.Tensor


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def supports(p: PendingSandwich, w: torch.Tensor) -> bool:
    """Whether the pending q/k/v GEMV runs these operands: <= 16 rows of H with unit column stride, w [N, H]."""
    y, r = _rows(p.y), _rows(p.residual)
    return (0 < y.shape[0] <= MAX_M and y.shape == r.shape and w.dim() == 2 and w.shape[1] == y.shape[1]
            and y.stride(1) == 1 and r.stride(1) == 1 and p.h_out.shape == p.residual.shape and p.h_out.is_contiguous()
            and y.dtype == r.dtype and (p.scalar is None or p.scalar.numel() == 1))


def materialize_ref(p: PendingSandwich) -> tuple[torch.Tensor, torch.Tensor]:
    """(h', x) by the reference sandwich (where the consumer cannot take it pending): h' also into p.h_out."""
    from .rmsnorm import post_norm_residual_pre_norm

    h, x = post_norm_residual_pre_norm(p.y, p.residual, p.w_post, p.w_next, p.eps, p.plus_one, p.scalar)
    p.h_out.copy_(h)
    return p.h_out, x


def pending_input_ref(p: PendingSandwich) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This path's arithmetic in PyTorch: (h', a, coef) with the q/k/v input x = coef * a (a [M, 2, H] the two rows
    per position, coef [M, 2] their factors, so x @ W.T = sum_j coef[:, j] * (a[:, j] @ W.T))."""
    y, r = _rows(p.y).float(), _rows(p.residual).float()
    dt, H = p.y.dtype, y.shape[-1]
    wp, wn = (post_factor(w, H, p.plus_one, y.device) for w in (p.w_post, p.w_next))
    sc = p.scalar.float().reshape(()) if p.scalar is not None else torch.tensor(1.0)
    inv_y = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + p.eps)
    b = y * wp
    h1 = (r + (y * inv_y * wp).to(dt).float()).to(dt)
    h_new = (h1.float() * sc).to(dt) if p.scalar is not None else h1
    sums = ((r * r).sum(-1, keepdim=True), (r * b).sum(-1, keepdim=True), (b * b).sum(-1, keepdim=True))
    mean_h2 = sc * sc * (sums[0] + 2 * inv_y * sums[1] + inv_y * inv_y * sums[2]) / H
    inv_h = torch.rsqrt(mean_h2 + p.eps)
    a = torch.stack(((wn * r).to(dt).float(), (wn * b).to(dt).float()), dim=1)
    coef = torch.cat((inv_h * sc, inv_h * sc * inv_y), dim=-1)
    return h_new.view(p.residual.shape), a, coef


if HAS_TRITON:
    from ._common import pdl_wait
    from .gemv import _w_tile
    from .pending_add_norm import _store_two_row_sets, _two_row_program
    from .rmsnorm import _h_values, _scale

    @triton.jit
    def _sandwich_tile(acc_a, acc_b, s_yy, s_hh, s_hb, s_bb, w, y_ptr, r_ptr, wpost_ptr, wnext_ptr, offs_m, m_ok,
                       offs_k, H, sym, srm, HAS_WPOST: tl.constexpr, HAS_WNEXT: tl.constexpr, PLUS_ONE: tl.constexpr,
                       X_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
        """One K tile: rows w_next * h and w_next * w_post * y against the weight tile, and the four sums."""
        k_ok = offs_k < H
        mk = m_ok[:, None] & k_ok[None, :]
        h = tl.load(r_ptr + offs_m[:, None] * srm + offs_k[None, :], mask=mk, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs_m[:, None] * sym + offs_k[None, :], mask=mk, other=0.0).to(tl.float32)
        b = y * _scale(wpost_ptr, offs_k, k_ok, HAS_WPOST, PLUS_ONE)
        wn = _scale(wnext_ptr, offs_k, k_ok, HAS_WNEXT, PLUS_ONE)
        s_yy += tl.sum(y * y, axis=1)
        s_hh += tl.sum(h * h, axis=1)
        s_hb += tl.sum(h * b, axis=1)
        s_bb += tl.sum(b * b, axis=1)
        ra = (wn * h).to(X_DTYPE)
        rb = (wn * b).to(X_DTYPE)
        if DOT_FP32:
            wt = tl.trans(w.to(tl.float32))
            acc_a += tl.dot(ra.to(tl.float32), wt, input_precision="ieee")
            acc_b += tl.dot(rb.to(tl.float32), wt, input_precision="ieee")
        else:
            wt = tl.trans(w)
            acc_a += tl.dot(ra, wt)
            acc_b += tl.dot(rb, wt)
        return acc_a, acc_b, s_yy, s_hh, s_hb, s_bb

    @triton.jit
    def _pending_qkv_gemv_kernel(y_ptr, r_ptr, wpost_ptr, wnext_ptr, w_ptr, gpart_ptr, ss_ptr, M, N, H, sym, srm,
                                 swn, swk, k_per_split,
                                 HAS_WPOST: tl.constexpr, HAS_WNEXT: tl.constexpr, PLUS_ONE: tl.constexpr,
                                 X_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                                 PDL: tl.constexpr, PREFETCH: tl.constexpr, W_EVICT: tl.constexpr):
        """Grid (N / BLOCK_N, splits): gpart [splits, 2, M, N] (the w_next * h rows' sums, then the other rows'),
        and from the first column program ss [splits, 4, M]. Weight tiles 1..PREFETCH <= 2 before the PDL wait."""
        pid_n, pid_k, offs_n, n_ok, offs_m, m_ok, w_rows, k_start, k_end = _two_row_program(
            w_ptr, M, N, H, swn, k_per_split, BLOCK_M, BLOCK_N)
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        s_yy = tl.zeros([BLOCK_M], tl.float32)
        s_hh = tl.zeros([BLOCK_M], tl.float32)
        s_hb = tl.zeros([BLOCK_M], tl.float32)
        s_bb = tl.zeros([BLOCK_M], tl.float32)
        offs_k = k_start + tl.arange(0, BLOCK_K)
        w = _w_tile(w_rows, offs_k, k_end, swk, EVEN_K, W_EVICT)
        w2 = w
        if PREFETCH >= 2:
            w2 = _w_tile(w_rows, offs_k + BLOCK_K, k_end, swk, False, W_EVICT)
        pdl_wait(PDL)
        # a tile past k_end (the prefetched second tile of a one-tile split) reads no activations: adds nothing
        acc_a, acc_b, s_yy, s_hh, s_hb, s_bb = _sandwich_tile(
            acc_a, acc_b, s_yy, s_hh, s_hb, s_bb, w, y_ptr, r_ptr, wpost_ptr, wnext_ptr, offs_m, m_ok,
            tl.where(offs_k < k_end, offs_k, H), H, sym, srm, HAS_WPOST, HAS_WNEXT, PLUS_ONE, X_DTYPE, DOT_FP32)
        if PREFETCH >= 2:
            ks = offs_k + BLOCK_K
            acc_a, acc_b, s_yy, s_hh, s_hb, s_bb = _sandwich_tile(
                acc_a, acc_b, s_yy, s_hh, s_hb, s_bb, w2, y_ptr, r_ptr, wpost_ptr, wnext_ptr, offs_m, m_ok,
                tl.where(ks < k_end, ks, H), H, sym, srm, HAS_WPOST, HAS_WNEXT, PLUS_ONE, X_DTYPE, DOT_FP32)
        for k0 in range(k_start + PREFETCH * BLOCK_K, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            wk = _w_tile(w_rows, ks, k_end, swk, EVEN_K, W_EVICT)
            acc_a, acc_b, s_yy, s_hh, s_hb, s_bb = _sandwich_tile(
                acc_a, acc_b, s_yy, s_hh, s_hb, s_bb, wk, y_ptr, r_ptr, wpost_ptr, wnext_ptr, offs_m, m_ok,
                tl.where(ks < k_end, ks, H), H, sym, srm, HAS_WPOST, HAS_WNEXT, PLUS_ONE, X_DTYPE, DOT_FP32)
        _store_two_row_sets(gpart_ptr, acc_a, acc_b, pid_k, M, N, offs_m, m_ok, offs_n, n_ok)
        if pid_n == 0:
            sb = ss_ptr + pid_k * 4 * M + offs_m
            tl.store(sb, s_yy, mask=m_ok)
            tl.store(sb + M, s_hh, mask=m_ok)
            tl.store(sb + 2 * M, s_hb, mask=m_ok)
            tl.store(sb + 3 * M, s_bb, mask=m_ok)

    @triton.jit
    def _sandwich_coefs(ss_ptr, s_ptr, r, M, H, eps, SPLIT: tl.constexpr, HAS_SCALAR: tl.constexpr):
        """(coef_a, inv_y, scalar) of position r from the splits' sums (added in split order): the q/k/v raw output
        is cast_x(coef_a * (A + inv_y * B)), A and B the two rows' sums."""
        t_yy = 0.0
        t_hh = 0.0
        t_hb = 0.0
        t_bb = 0.0
        for s in tl.static_range(SPLIT):
            sb = ss_ptr + s * 4 * M + r
            t_yy += tl.load(sb)
            t_hh += tl.load(sb + M)
            t_hb += tl.load(sb + 2 * M)
            t_bb += tl.load(sb + 3 * M)
        inv_y = tl.rsqrt(t_yy / H + eps)
        if HAS_SCALAR:
            sc = tl.load(s_ptr).to(tl.float32)
        else:
            sc = 1.0
        mean_h2 = sc * sc * (t_hh + 2.0 * inv_y * t_hb + inv_y * inv_y * t_bb) / H
        inv_h = tl.rsqrt(mean_h2 + eps)
        return inv_h * sc, inv_y, sc

    @triton.jit
    def _store_pending_h(y_ptr, r_ptr, wpost_ptr, h_ptr, r, j, H, sym, srm, inv_y, sc, X_DTYPE: tl.constexpr,
                         HAS_WPOST: tl.constexpr, PLUS_ONE: tl.constexpr, HAS_SCALAR: tl.constexpr,
                         BLOCK: tl.constexpr):
        """Columns [j * BLOCK, (j + 1) * BLOCK) of h' for position r: the sandwich kernel's formula
        (`kernels.rmsnorm._h_values`, on a [1, BLOCK] tile)."""
        cols = j * BLOCK + tl.arange(0, BLOCK)
        ok = cols < H
        m = ok[None, :]
        y = tl.load(y_ptr + r * sym + cols[None, :], mask=m, other=0.0).to(tl.float32)
        h = tl.load(r_ptr + r * srm + cols[None, :], mask=m, other=0.0).to(tl.float32)
        inv = tl.zeros([1], tl.float32) + inv_y
        out = _h_values(y, h, inv, _scale(wpost_ptr, cols, ok, HAS_WPOST, PLUS_ONE), sc, X_DTYPE,
                        h_ptr.dtype.element_ty, HAS_SCALAR)
        tl.store(h_ptr + r * H + cols[None, :], out, mask=m)


def gemv_config(p: PendingSandwich, w: torch.Tensor, split_k: int | None = None, block_k: int | None = None
                ) -> dict[str, int]:
    """The q/k/v GEMV's launch config (`kernels.pending_add_norm.two_row_config`)."""
    return two_row_config(_rows(p.y), w, split_k, block_k)


def launch_pending_gemv(p: PendingSandwich, w: torch.Tensor, split_k: int | None = None, block_k: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The q/k/v GEMV on the pending sandwich: (gpart [S, 2, M, N], ss [S, 4, M], S). `split_k` / `block_k`
    override the heuristic (tests)."""
    y, r = _rows(p.y), _rows(p.residual)
    M, H = y.shape
    N = w.shape[0]
    cfg = gemv_config(p, w, split_k, block_k)
    split = cfg["SPLIT_K"]
    gpart = torch.empty(split, 2, M, N, dtype=torch.float32, device=y.device)
    ss = torch.empty(split, N_SUMS, M, dtype=torch.float32, device=y.device)
    flags = weight_stream_flags(y, w)
    flags["PREFETCH"] = min(2, flags["PREFETCH"])
    even_k = H % cfg["BLOCK_K"] == 0 and cfg["k_per_split"] % cfg["BLOCK_K"] == 0
    _pending_qkv_gemv_kernel[(cdiv(N, cfg["BLOCK_N"]), split)](
        y, r, p.w_post.contiguous() if p.w_post is not None else y, p.w_next.contiguous() if p.w_next is not None
        else y, w, gpart, ss, M, N, H, y.stride(0), r.stride(0), w.stride(0), w.stride(1), cfg["k_per_split"],
        HAS_WPOST=p.w_post is not None, HAS_WNEXT=p.w_next is not None, PLUS_ONE=bool(p.plus_one),
        X_DTYPE=tl_dtype(y.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        EVEN_K=even_k, **flags, **pdl_flags(y), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return gpart, ss, split
