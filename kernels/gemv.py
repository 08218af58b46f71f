"""Skinny matmul y = x @ w.T for decode/verify widths (M <= 16), memory-bound by design.

At M <= 16 every weight byte is used for at most 16 multiply-adds, so the kernel's only job is
to stream W [N, K] (row-major, as checkpoints store it) from HBM exactly once at full bandwidth:
  * one program owns a BLOCK_N slice of outputs and walks K for all M rows at once, so each
    weight tile is loaded once however many rows there are (x is tiny and stays in L1/L2);
  * M == 1 uses a CUDA-core multiply + row reduction; M >= 2 pads the rows to 16 and uses
    `tl.dot` (tensor cores), which costs nothing extra in a memory-bound loop;
  * when N / BLOCK_N programs cannot fill the GPU (down 2560x10240, PLE 256x2560), K is split
    across programs; partial sums go to an fp32 scratch and a second tiny kernel adds them in a
    fixed order: deterministic and atomic-free.
Accumulation is fp32; the output has x's dtype. Wider M (prefill) goes to cuBLAS.
Under programmatic dependent launch (`kernels._common.PDL`) a program reads its first W tiles before it
waits for the previous kernel: W must be a weight, never a tensor a preceding kernel writes.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import invariance, l2_prefetch
from ._common import HAS_TRITON, INTERPRET, cdiv, next_pow2, num_sms, pdl_flags, tl, triton, use_triton

MAX_M = 16
# Split K when fewer than SPLIT_BELOW_WAVES x (SM count) programs would run (module global so a
# benchmark can A/B it; the split's reduction kernel costs ~1.3 us on an H100).
SPLIT_BELOW_WAVES = 2.0
# A split GEMV aims at SPLIT_TARGET_WAVES x (SM count) programs: fewer splits mean fewer fp32 partials for the
# single-program reduction that follows (down at E4B: 7 splits at 2.0, 4 at 1.0). Module global (A/B runs).
SPLIT_TARGET_WAVES = 2.0
# Keys of `gemv_config`'s result to force (BLOCK_N, num_stages, num_warps), applied before split-K is chosen;
# empty = the heuristic. Module global so `scripts/stage_costs_gpu.py` can A/B tiles inside one process.
TILE_OVERRIDES: dict[str, int] = {}
# Batch invariance: every M <= 16 runs the same tensor-core tile (rows padded to 16) with the same split,
# so a row's result does not depend on how many rows share the call. A speculative verify of K+1
# positions then computes each position bit-for-bit like a 1-token decode step (lossless greedy on GPU).
# None follows the row-invariance switch (`kernels.invariance.ROW_INVARIANT`, on by default: the
# attention and norm kernels must be invariant too for that to hold); True / False force it (A/B runs).
BATCH_INVARIANT: bool | None = None
# Weight tiles each GEMV program requests before its PDL wait (`_gemv_acc`; env VKAE_GEMV_PREFETCH_TILES); read
# at launch (A/B runs).
# H100, E4B decode step with PDL: 1 tile 4.788 ms, 2 tiles 4.756 ms (bitwise equal results).
PREFETCH_TILES = int(os.environ.get("VKAE_GEMV_PREFETCH_TILES", "2"))
# L2 eviction priority of the weight loads ("" = the default, "evict_first": a weight line is dead once
# read, so it goes before the lines `kernels.l2_prefetch` brought in for the next GEMVs). Read at launch.
WEIGHT_EVICTION = os.environ.get("VKAE_WEIGHT_EVICTION", "")
if WEIGHT_EVICTION not in ("", "evict_first", "evict_last"):
    raise ValueError(f"VKAE_WEIGHT_EVICTION must be empty, evict_first or evict_last; got {WEIGHT_EVICTION!r}")


def batch_invariant() -> bool:
    """Whether gemv_config pads every M to the same 16-row tile (see BATCH_INVARIANT)."""
    return invariance.ROW_INVARIANT if BATCH_INVARIANT is None else bool(BATCH_INVARIANT)


# --------------------------------------------------------------------------------------------
# Reference (CPU fallback and test oracle): fp32 accumulation, output in x's dtype.
# --------------------------------------------------------------------------------------------
def linear_small_m_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().T).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._common import pdl_wait
    from .l2_prefetch import prefetch_segments

    @triton.jit
    def _w_tile(w_rows, offs_k, k_end, swk, EVEN_K: tl.constexpr, W_EVICT: tl.constexpr):
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :] * swk, eviction_policy=W_EVICT)
        else:
            w = tl.load(w_rows + offs_k[None, :] * swk, mask=offs_k[None, :] < k_end, other=0.0,
                        eviction_policy=W_EVICT)
        return w

    @triton.jit
    def _acc_tile(acc, w, x_ptr, offs_m, m_ok, offs_k, k_end, sxm, sxk,
                  USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
        if USE_DOT:
            x = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk,
                        mask=m_ok[:, None] & (offs_k[None, :] < k_end), other=0.0)
            if DOT_FP32:  # fp32 / mixed dtypes / bf16 under the interpreter: exact fp32 dot
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        else:
            x = tl.load(x_ptr + offs_k * sxk, mask=offs_k < k_end, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        return acc

    @triton.jit
    def _gemv_acc(x_ptr, w_rows, M, k_start, k_end, sxm, sxk, swk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
                  PREFETCH: tl.constexpr, W_EVICT: tl.constexpr):
        """fp32 partial sums of x[:, k_start:k_end] @ w_rows[:, k_start:k_end].T: [BLOCK_M, BLOCK_N]
        with USE_DOT, else [BLOCK_N] (M == 1). `w_rows` [BLOCK_N, 1] pointers to the weight rows this
        program owns (shared by `_gemv_kernel` and the fused-epilogue kernels of `kernels.gemv_epilogue`,
        so every variant streams the weights the same way). The first PREFETCH (1 to 4) weight tiles are
        requested before `pdl_wait`: under PDL they stream while the previous kernel finishes; x is read
        only after. Tiles are summed in K order either way (same arithmetic with PDL on or off; a prefetched
        tile past the split's end is masked to zeros)."""
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        if USE_DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], tl.float32)
        offs_k = k_start + tl.arange(0, BLOCK_K)
        w = _w_tile(w_rows, offs_k, k_end, swk, EVEN_K, W_EVICT)
        # tiles 2..PREFETCH, masked (EVEN_K=False): past the split's end they are zeros, adding 0 changes no sum
        if PREFETCH >= 2:
            w2 = _w_tile(w_rows, offs_k + BLOCK_K, k_end, swk, False, W_EVICT)
        if PREFETCH >= 3:
            w3 = _w_tile(w_rows, offs_k + 2 * BLOCK_K, k_end, swk, False, W_EVICT)
        if PREFETCH >= 4:
            w4 = _w_tile(w_rows, offs_k + 3 * BLOCK_K, k_end, swk, False, W_EVICT)
        pdl_wait(PDL)
        acc = _acc_tile(acc, w, x_ptr, offs_m, m_ok, offs_k, k_end, sxm, sxk, USE_DOT, DOT_FP32)
        if PREFETCH >= 2:
            acc = _acc_tile(acc, w2, x_ptr, offs_m, m_ok, offs_k + BLOCK_K, k_end, sxm, sxk, USE_DOT, DOT_FP32)
        if PREFETCH >= 3:
            acc = _acc_tile(acc, w3, x_ptr, offs_m, m_ok, offs_k + 2 * BLOCK_K, k_end, sxm, sxk, USE_DOT, DOT_FP32)
        if PREFETCH >= 4:
            acc = _acc_tile(acc, w4, x_ptr, offs_m, m_ok, offs_k + 3 * BLOCK_K, k_end, sxm, sxk, USE_DOT, DOT_FP32)
        start = k_start + PREFETCH * BLOCK_K
        for k0 in range(start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = _w_tile(w_rows, offs_k, k_end, swk, EVEN_K, W_EVICT)
            acc = _acc_tile(acc, w, x_ptr, offs_m, m_ok, offs_k, k_end, sxm, sxk, USE_DOT, DOT_FP32)
        return acc

    @triton.jit
    def _walk_after_two(acc, w, w2, w_rows, x_ptr, offs_m, m_ok, k_start, k_end, sxm, sxk, swk,
                        BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                        PREFETCH: tl.constexpr, W_EVICT: tl.constexpr):
        """The rest of `_gemv_acc`'s K walk for kernels that compute x themselves after the PDL wait
        (`kernels.gemv_gated_input`, `kernels.gemv_merged_input`): the PREFETCH (1 or 2) tiles w, w2 requested
        before it, then every later tile, summed in K order (w2 is ignored when PREFETCH == 1)."""
        offs_k = k_start + tl.arange(0, BLOCK_K)
        acc = _acc_tile(acc, w, x_ptr, offs_m, m_ok, offs_k, k_end, sxm, sxk, USE_DOT, DOT_FP32)
        if PREFETCH >= 2:
            acc = _acc_tile(acc, w2, x_ptr, offs_m, m_ok, offs_k + BLOCK_K, k_end, sxm, sxk, USE_DOT, DOT_FP32)
        for k0 in range(k_start + PREFETCH * BLOCK_K, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            wk = _w_tile(w_rows, ks, k_end, swk, EVEN_K, W_EVICT)
            acc = _acc_tile(acc, wk, x_ptr, offs_m, m_ok, ks, k_end, sxm, sxk, USE_DOT, DOT_FP32)
        return acc

    @triton.jit
    def _store_acc(acc, y_ptr, part_ptr, pid_k, M, N, offs_m, m_ok, offs_n, n_ok, sym, syn,
                   SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr):
        """A program's sums, [BLOCK_M, BLOCK_N] (USE_DOT) or [BLOCK_N] (M == 1): y in its dtype when K is not
        split, else fp32 partials into the scratch [SPLIT_K, M, N] at split pid_k."""
        if USE_DOT:
            out = acc
            rows = offs_m[:, None]
            mask = m_ok[:, None] & n_ok[None, :]
        else:
            out = acc[None, :]
            rows = tl.zeros([1, 1], tl.int32)
            mask = n_ok[None, :]
        cols = offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptr + rows * sym + cols * syn, out.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(part_ptr + (pid_k * M + rows).to(tl.int64) * N + cols, out, mask=mask)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, part_ptr, M, N, K, sxm, sxk, swn, swk, sym, syn, k_per_split,
                     pf_a0, pf_n0, pf_a1, pf_n1, pf_a2, pf_n2, pf_a3, pf_n3,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                     EVEN_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, W_EVICT: tl.constexpr,
                     PF_SEGS: tl.constexpr, PF_AT_END: tl.constexpr):
        if not PF_AT_END:  # the next weights of the stream (`kernels.l2_prefetch`), before the PDL wait
            prefetch_segments(pf_a0, pf_n0, pf_a1, pf_n1, pf_a2, pf_n2, pf_a3, pf_n3, PF_SEGS)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        # Clamp out-of-range rows to row 0 instead of masking: keeps the weight loads unmasked
        # along K (vectorised 16-byte loads); their results are dropped at the store.
        w_rows = w_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * swn
        acc = _gemv_acc(x_ptr, w_rows, M, k_start, k_end, sxm, sxk, swk,
                        BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, DOT_FP32, EVEN_K, PDL, PREFETCH, W_EVICT)
        if PF_AT_END:
            prefetch_segments(pf_a0, pf_n0, pf_a1, pf_n1, pf_a2, pf_n2, pf_a3, pf_n3, PF_SEGS)
        _store_acc(acc, y_ptr, part_ptr, pid_k, M, N, offs_m, m_ok, offs_n, n_ok, sym, syn, SPLIT_K, USE_DOT)

    @triton.jit
    def _splitk_reduce_kernel(part_ptr, y_ptr, M, N, sym, syn,
                              SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M * N
        acc = tl.zeros([BLOCK], tl.float32)
        for s in tl.static_range(SPLIT_K):  # fixed order: bitwise-reproducible run to run
            acc += tl.load(part_ptr + s * M * N + offs, mask=ok, other=0.0)
        m = offs // N
        n = offs % N
        tl.store(y_ptr + m * sym + n * syn, acc.to(y_ptr.dtype.element_ty), mask=ok)


def gemv_config(M: int, N: int, K: int, elem_bytes: int, sms: int) -> dict[str, int]:
    """Block sizes and split-K for one call (a heuristic, not autotuning: autotune cannot run
    under the interpreter and would make CUDA-graph capture depend on a first timed call).
    Timed alone (`scripts/bench_kernels.py --sweep`, bf16, CUDA-graphed, cold L2) narrow tiles of 32
    rows won; inside the graphed PDL step 64 rows are faster (see the comment below), so the step's
    timing decides."""
    invariant = batch_invariant()
    if M == 1 and not invariant:
        block_m, block_n, block_k = 1, 16, 256 if elem_bytes <= 2 else 128
    else:
        # BLOCK_N 64, not the 32 that won the standalone sweep: inside the graphed step (PDL) it was faster,
        # H100 E4B decode 4.533 -> 4.385 ms, verify (9) 4.848 -> 4.651 ms (`scripts/stage_costs_gpu.py`, stop 20;
        # 128 was slower, 4.823 ms). Fewer programs also change the split-K choice (down: 4 -> 7 splits).
        block_m, block_n, block_k = (16 if invariant else max(16, next_pow2(M))), 64, \
            128 if elem_bytes <= 2 else 64
    tiles = dict(BLOCK_N=block_n, num_warps=4, num_stages=4)
    unknown = set(TILE_OVERRIDES) - set(tiles)
    if unknown:
        raise ValueError(f"kernels.gemv.TILE_OVERRIDES: unknown keys {sorted(unknown)}; allowed {sorted(tiles)}")
    tiles.update(TILE_OVERRIDES)
    block_n = tiles["BLOCK_N"]
    n_progs = cdiv(N, block_n)
    split_k = 1
    if n_progs < SPLIT_BELOW_WAVES * sms:  # too few programs to keep every SM streaming: split K
        max_split = max(1, K // (2 * block_k))  # every split walks >= 2 tiles
        split_k = max(1, min(cdiv(int(SPLIT_TARGET_WAVES * sms), n_progs), max_split, 64))
    k_per_split = cdiv(cdiv(K, split_k), block_k) * block_k
    split_k = cdiv(K, k_per_split)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                k_per_split=k_per_split, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])


def resolve_config(x: torch.Tensor, w: torch.Tensor, split_k: int | None = None, block_k: int | None = None,
                   config: dict[str, int] | None = None) -> dict[str, int]:
    """The launch config of x [M, K] @ w [N, K].T: `gemv_config` plus the overrides of
    `linear_small_m_triton`, with whole BLOCK_K tiles per split and no split starting past K."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"need x [M, K] and w [N, K]; got {tuple(x.shape)} and {tuple(w.shape)}")
    M, K = x.shape
    N = w.shape[0]
    if M > MAX_M:
        raise ValueError(f"M={M} > {MAX_M}: use cuBLAS (linear_small_m does this for you)")
    cfg = gemv_config(M, N, K, w.element_size(), num_sms(x.device))
    cfg.update(config or {})
    if block_k is not None:
        cfg["BLOCK_K"] = block_k
    if split_k is not None:
        cfg["SPLIT_K"] = split_k
    if split_k is not None or block_k is not None or config:
        # whole tiles per split; drop splits that would start past K
        cfg["k_per_split"] = cdiv(cdiv(K, cfg["SPLIT_K"]), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        cfg["SPLIT_K"] = cdiv(K, cfg["k_per_split"])
    return cfg


def weight_stream_flags(x: torch.Tensor, w: torch.Tensor) -> dict[str, bool | int | str]:
    """The constexprs of `_gemv_acc`'s K walk that follow from the operands' dtypes and this module's
    switches (read at launch): exact fp32 dot, tiles requested before the PDL wait, weight-load eviction.
    Shared by every kernel that streams weights through `_gemv_acc` (`kernels.fused_mlp` too)."""
    dot_fp32 = (x.dtype != w.dtype or w.dtype == torch.float32
                or (INTERPRET and w.dtype == torch.bfloat16))
    return dict(DOT_FP32=dot_fp32, PREFETCH=PREFETCH_TILES, W_EVICT="" if INTERPRET else WEIGHT_EVICTION)


def kernel_flags(x: torch.Tensor, w: torch.Tensor, cfg: dict[str, int]) -> dict[str, bool | int]:
    """The dtype/shape constexprs of the K loop (`_gemv_acc`) for this call."""
    even_k = x.shape[1] % cfg["BLOCK_K"] == 0 and cfg["k_per_split"] % cfg["BLOCK_K"] == 0
    return dict(USE_DOT=cfg["BLOCK_M"] > 1, EVEN_K=even_k, **weight_stream_flags(x, w),
                **l2_prefetch.launch_args(w))


def launch_gemv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, part: torch.Tensor, cfg: dict[str, int]) -> None:
    """First pass: y = x @ w.T when cfg["SPLIT_K"] == 1, else fp32 partial sums into part [SPLIT_K, M, N]
    (the caller reduces them: `_splitk_reduce_kernel`, or a fused epilogue of `kernels.gemv_epilogue`)."""
    M, K = x.shape
    N = w.shape[0]
    _gemv_kernel[(cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])](
        x, w, y, part, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        y.stride(0), y.stride(1), cfg["k_per_split"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
        **kernel_flags(x, w, cfg), **pdl_flags(x), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def linear_small_m_triton(x: torch.Tensor, w: torch.Tensor, split_k: int | None = None,
                          block_k: int | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """Triton path for x [M, K] (M <= 16), w [N, K]. `split_k` / `block_k` override the
    heuristic (tests use them to force the two-pass reduction on small shapes); `config`
    overrides any key of `gemv_config` (used by benchmark sweeps)."""
    cfg = resolve_config(x, w, split_k, block_k, config)
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    split = cfg["SPLIT_K"]
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    launch_gemv(x, w, y, part, cfg)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(cdiv(M * N, block),)](part, y, M, N, y.stride(0), y.stride(1),
                                                     SPLIT_K=split, BLOCK=block, num_warps=4,
                                                     **pdl_flags(x, short=True))
    return y


def linear_small_m(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w.T with fp32 accumulation, output in x's dtype. Triton for M <= 16 on CUDA,
    cuBLAS for wider M on CUDA, the fp32 reference on CPU."""
    if use_triton(x) and x.shape[0] <= MAX_M:
        return linear_small_m_triton(x, w)
    if x.is_cuda and x.dtype == w.dtype:
        return F.linear(x, w)
    return linear_small_m_ref(x, w)
