"""The o projection merging decode attention's KV splits itself: one launch fewer per layer.

When decode attention splits the sequence (`kernels.decode_attention`), stage 2 merges the splits' partial
outputs by log-sum-exp and the o projection's GEMV then reads the merged output. Here stage 2 is not launched:
each GEMV program merges the columns of its own K range (`merge_splits`, the code stage 2 runs, so the bits
are stage 2's), rounds them to the attention's dtype, writes them to one scratch and runs the K walk of
`kernels.gemv` on it. Programs that share a K range write the same bytes; a CTA barrier orders a program's
own writes before its reads. The GEMV's config is the one the unfused o projection gets (`gemv_config` on
[M, Hq*D]), so the result, split-K partials included, is bitwise the two-launch path's, and row invariance
holds (configs independent of M, an elementwise prologue).

The price: every program whose K range covers a head reads that head's partials (num_splits x D fp32 per row)
from L2, N / BLOCK_N times over. At E4B's sliding layers (9 splits of 64 slots since stop 21; 5 before) that is
a few MB of L2 reads a step per layer; at 64 splits (the global layers' 4096-slot linear cache) it would be ~40 MB or more,
so callers defer the merge only up to a few splits (`engine.fused_tail.ATTN_MERGE_MAX_SPLITS`).
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, cdiv, next_pow2, pdl_flags, tl, triton
from .decode_attention import SplitAttention, stage2_block
from .gemv import linear_small_m_ref, resolve_config, weight_stream_flags

MERGE_BLOCK = 1024  # merged input elements per pass of the prologue


def merged_linear_ref(split: SplitAttention, w: torch.Tensor) -> torch.Tensor:
    """merged attention [B*T, Hq*D] @ w.T: stage 2, then the fp32 reference GEMV."""
    B, T, Hq, D = split.shape
    return linear_small_m_ref(split.merged().reshape(B * T, Hq * D), w)


if HAS_TRITON:
    from ._common import pdl_wait
    from .decode_attention import merge_splits
    from .gemv import _store_acc, _w_tile, _walk_after_two

    @triton.jit
    def _gemv_merge_in_kernel(opart_ptr, lse_ptr, x_ptr, w_ptr, y_ptr, part_ptr, M, N, K, HQ, NUM_SPLITS,
                              swn, swk, sym, syn, k_per_split,
                              D: tl.constexpr, BLOCK_S: tl.constexpr, M_BLOCK: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                              EVEN_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                              W_EVICT: tl.constexpr):
        """`kernels.gemv._gemv_kernel` on x = the merged attention [M, K = HQ*D], whose columns
        [k_start, k_end) this program merges into the scratch x_ptr first (weight tiles 1..PREFETCH <= 2
        requested before the PDL wait; then the same loads, dots and K order)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        w_rows = w_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * swn  # clamped rows, dropped at the store
        if USE_DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], tl.float32)
        offs_k = k_start + tl.arange(0, BLOCK_K)
        w = _w_tile(w_rows, offs_k, k_end, swk, EVEN_K, W_EVICT)
        w2 = w  # unused unless PREFETCH == 2
        if PREFETCH >= 2:
            w2 = _w_tile(w_rows, offs_k + BLOCK_K, k_end, swk, False, W_EVICT)
        pdl_wait(PDL)
        # this program's columns of the merged attention, every row, into the scratch [M, K] (row-major)
        width = k_end - k_start
        for e0 in range(0, M * width, M_BLOCK):
            e = e0 + tl.arange(0, M_BLOCK)
            ok = e < M * width
            m = e // width
            k = k_start + e % width
            row = (m * HQ + k // D).to(tl.int64)  # row of the [B*T*Hq, NUM_SPLITS, D] partials
            o = merge_splits(opart_ptr, lse_ptr, row, k % D, ok, NUM_SPLITS, D, BLOCK_S)
            tl.store(x_ptr + m.to(tl.int64) * K + k, o.to(x_ptr.dtype.element_ty), mask=ok)
        tl.debug_barrier()
        acc = _walk_after_two(acc, w, w2, w_rows, x_ptr, offs_m, m_ok, k_start, k_end, K, 1, swk, BLOCK_K,
                              USE_DOT, DOT_FP32, EVEN_K, PREFETCH, W_EVICT)
        _store_acc(acc, y_ptr, part_ptr, pid_k, M, N, offs_m, m_ok, offs_n, n_ok, sym, syn, SPLIT_K, USE_DOT)


def merged_linear_launch(split: SplitAttention, w: torch.Tensor, split_k: int | None = None
                         ) -> tuple[torch.Tensor, dict[str, int]]:
    """The o projection of the unmerged attention `split` (shape (B, T, Hq, D)) with w [N, Hq*D]: returns
    (out, cfg), out = y [M, N] in the attention's dtype when cfg["SPLIT_K"] == 1, else the fp32 partial sums
    [SPLIT_K, M, N] for the caller's reduce (`kernels.splitk_norm.sandwich_from_partials`). M = B*T <= 16.
    `split_k` forces the GEMV's split (tests on small shapes)."""
    B, T, Hq, D = split.shape
    M, K = B * T, Hq * D
    if w.dim() != 2 or w.shape[1] != K:
        raise ValueError(f"need w [N, {K}] for an attention output of shape {split.shape}; got {tuple(w.shape)}")
    x = torch.empty(M, K, dtype=split.dtype, device=split.opart.device)  # the scratch every program writes to
    cfg = resolve_config(x, w, split_k)
    N = w.shape[0]
    if cfg["SPLIT_K"] == 1:
        out = torch.empty(M, N, dtype=split.dtype, device=x.device)
        part = out
    else:
        out = part = torch.empty(cfg["SPLIT_K"], M, N, dtype=torch.float32, device=x.device)
    flags = weight_stream_flags(x, w)
    flags["PREFETCH"] = min(2, flags["PREFETCH"])
    flags.update(USE_DOT=cfg["BLOCK_M"] > 1, EVEN_K=K % cfg["BLOCK_K"] == 0 and cfg["k_per_split"] % cfg["BLOCK_K"] == 0)
    width = min(cfg["k_per_split"], K)
    _gemv_merge_in_kernel[(cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])](
        split.opart, split.lse, x, w, out, part, M, N, K, Hq, split.num_splits,
        w.stride(0), w.stride(1), out.stride(-2), out.stride(-1), cfg["k_per_split"],
        D=D, BLOCK_S=stage2_block(split.num_splits), M_BLOCK=min(MERGE_BLOCK, next_pow2(M * width)),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
        **flags, **pdl_flags(x), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, cfg


def merged_sandwich_triton(split: SplitAttention, w: torch.Tensor, residual: torch.Tensor,
                           w_post: torch.Tensor | None, w_next: torch.Tensor | None, scalar: torch.Tensor | None,
                           eps: float, plus_one: bool, split_k: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.splitk_norm.linear_sandwich_triton(split.merged() rows, w, residual, ...)` without stage 2:
    (new residual h, next normed input y), bitwise the same."""
    from .rmsnorm import _config, post_norm_residual_pre_norm_triton
    from .splitk_norm import sandwich_from_partials

    B, T, _, _ = split.shape
    N = w.shape[0]
    if residual.shape[-1] != N or residual.numel() != B * T * N:
        raise ValueError(f"residual {tuple(residual.shape)} does not hold {B * T} rows of {N}")
    if scalar is not None and scalar.numel() != 1:
        raise ValueError(f"the layer scalar must have one element, got shape {tuple(scalar.shape)}")
    out, cfg = merged_linear_launch(split, w, split_k)
    res = residual.to(torch.promote_types(split.dtype, residual.dtype))  # a no-op in the engine
    if cfg["SPLIT_K"] > 1 and _config(N, 1)[0]:
        return sandwich_from_partials(out, split.dtype, res, w_post, w_next, scalar, eps, plus_one, True)
    if cfg["SPLIT_K"] > 1:  # rows too wide for the one-tile norm kernel: reduce first (`linear_small_m_triton`'s order)
        out = _reduce(out, split.dtype)
    return post_norm_residual_pre_norm_triton(out.view(residual.shape), res, w_post, w_next, eps, plus_one,
                                              scalar=scalar)


def _reduce(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The split-K partials [S, M, N] summed in split order (`kernels.gemv._splitk_reduce_kernel`)."""
    from .gemv import _splitk_reduce_kernel

    S, M, N = part.shape
    y = torch.empty(M, N, dtype=dtype, device=part.device)
    _splitk_reduce_kernel[(cdiv(M * N, 1024),)](part, y, M, N, y.stride(0), y.stride(1), SPLIT_K=S, BLOCK=1024,
                                                num_warps=4, **pdl_flags(part, short=True))
    return y
