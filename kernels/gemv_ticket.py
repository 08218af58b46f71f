"""GEMV whose last program to finish runs the residual add + RMSNorm(s) itself (a "ticketed" epilogue).

`kernels.splitk_norm` runs o_proj / down / the PLE projection as two launches: the GEMV writes fp32 split-K
partials, then a one-program kernel sums them and does the sandwich norm. With PDL the second launch is
already resident, but it can only start once the whole GEMV grid has completed and its writes are flushed;
that boundary, ~1 us, is paid 126 times a decode step at E4B. Here every GEMV program, after storing its
partial tile, takes a ticket (one gpu-scope acq_rel atomic add per program, after a CTA barrier: the CUTLASS
semaphore pattern); the program that draws the last ticket has every partial visible to it, so it runs the
reduction and the norms in the same launch, then resets the counter for the next call.

Arithmetic is `kernels.splitk_norm`'s point for point: the partials of each row are summed in split order
(s = 0, 1, ...) and rounded to x's dtype, then the shared norm helpers of `kernels.rmsnorm`. A projection
that does not split K (the PLE projection at E4B, K = 256) stores its output as one fp32 partial, which
rounds like the bf16 store the two-launch path reads back. Row invariance: the GEMV config is
`gemv_config`'s for every M <= 16 and the epilogue treats rows one at a time, so a row's bits never depend
on M; the last program walks the M rows in sequence (a verify step pays M row epilogues in one program).

Counters: a pool of int32 zeros per device, allocated on first use outside CUDA-graph capture (the warm-up
of `engine.generate.StepGraph` runs eagerly first); each launch takes the next slot, and the last program
puts it back to zero, so graph replays find every counter at zero.

`TICKETED` (env VKAE_TICKET_EPILOGUE=1) switches `kernels.splitk_norm` onto this path; read at call time.
"""
from __future__ import annotations

import os

import torch

from ._common import HAS_TRITON, cdiv, pdl_flags, tl, tl_dtype, triton
from .gemv import kernel_flags, resolve_config
from .rmsnorm import _config, _rows

TICKETED: bool = os.environ.get("VKAE_TICKET_EPILOGUE", "0") != "0"
COUNTER_POOL = 256  # slots per device; consecutive launches use distinct counters
_counters: dict[torch.device, torch.Tensor] = {}
_next_slot: list[int] = [0]


def counter(device: torch.device) -> torch.Tensor:
    """A one-element view of this device's counter pool (zero between launches)."""
    pool = _counters.get(device)
    if pool is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the ticket counters of kernels.gemv_ticket are allocated on first use, which must "
                               "come before CUDA-graph capture (run the step once eagerly first)")
        pool = _counters[device] = torch.zeros(COUNTER_POOL, dtype=torch.int32, device=device)
    slot = _next_slot[0] % COUNTER_POOL
    _next_slot[0] += 1
    return pool[slot:slot + 1]


if HAS_TRITON:
    from ._common import pdl_wait  # noqa: F401  (used through _gemv_acc)
    from .gemv import _gemv_acc
    from .rmsnorm import _h_values, _layer_scalar, _rms_inv, _scale, _store_h_y

    @triton.jit
    def _last_ticket(cnt_ptr, n_programs):
        """True in the one program that finishes last. The barrier orders every thread's partial stores
        before thread 0's gpu-scope release; its acquire (then the broadcast barrier Triton emits) orders
        the last program's loads after every other program's stores."""
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        return ticket == n_programs - 1

    @triton.jit
    def _gemv_sandwich_kernel(x_ptr, w_ptr, part_ptr, cnt_ptr, r_ptr, wpost_ptr, wpre_ptr, s_ptr, h_ptr, y_ptr,
                              M, N, K, sxm, sxk, swn, swk, srr, shr, syr, k_per_split, n_programs, eps,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                              EVEN_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                              W_EVICT: tl.constexpr,
                              X_DTYPE: tl.constexpr, HAS_WPOST: tl.constexpr, HAS_WPRE: tl.constexpr,
                              PLUS_ONE: tl.constexpr, HAS_SCALAR: tl.constexpr, WRITE_Y: tl.constexpr,
                              NORM_BLOCK: tl.constexpr):
        """Grid (cdiv(N, BLOCK_N), SPLIT_K). part [SPLIT_K, M, N] fp32; the K walk is `_gemv_acc`'s."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        w_rows = w_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * swn
        acc = _gemv_acc(x_ptr, w_rows, M, k_start, k_end, sxm, sxk, swk,
                        BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, DOT_FP32, EVEN_K, PDL, PREFETCH, W_EVICT)
        if USE_DOT:
            offs_m = tl.arange(0, BLOCK_M)
            tl.store(part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :], acc,
                     mask=(offs_m[:, None] < M) & n_ok[None, :])
        else:
            tl.store(part_ptr + pid_k.to(tl.int64) * M * N + offs_n, acc, mask=n_ok)
        if _last_ticket(cnt_ptr, n_programs):
            cols = tl.arange(0, NORM_BLOCK)
            c_ok = cols < N
            m = c_ok[None, :]
            wpost = _scale(wpost_ptr, cols, c_ok, HAS_WPOST, PLUS_ONE)
            wpre = _scale(wpre_ptr, cols, c_ok, HAS_WPRE, PLUS_ONE)
            scalar = _layer_scalar(s_ptr, HAS_SCALAR)
            for row in range(M):  # int32 offsets: M * N * SPLIT_K stays far below 2**31 at decode widths
                x = tl.zeros([1, NORM_BLOCK], tl.float32)
                for s in tl.static_range(SPLIT_K):  # split order, as kernels.splitk_norm sums them
                    # .cg: the partials were written by other SMs; read them from L2, never a stale L1 line
                    x += tl.load(part_ptr + (s * M + row) * N + cols[None, :], mask=m, other=0.0,
                                 cache_modifier=".cg")
                r = tl.load(r_ptr + row * srr + cols[None, :], mask=m, other=0.0).to(tl.float32)
                x = x.to(X_DTYPE).to(tl.float32)  # the GEMV output's rounding
                inv = _rms_inv(x, N, eps)
                h = _h_values(x, r, inv, wpost, scalar, X_DTYPE, h_ptr.dtype.element_ty, HAS_SCALAR)
                _store_h_y(h, h_ptr + row * shr + cols[None, :], y_ptr + row * syr + cols[None, :], m, wpre,
                           N, eps, WRITE_Y)
            tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next launch / replay


def fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this projection's row fits the one-tile epilogue (N up to `rmsnorm.SINGLE_TILE_MAX`)."""
    return x.shape[0] >= 1 and x.shape[1] >= 1 and _config(w.shape[0], 1)[0]


def linear_sandwich_ticketed(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor | None,
                             w_next: torch.Tensor | None, scalar: torch.Tensor | None, eps: float, plus_one: bool,
                             write_y: bool, split_k: int | None = None, block_k: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y) of `kernels.splitk_norm.linear_sandwich_ref` (y is h when not write_y) in one launch.
    x [M <= 16, K], w [N, K], residual [..., N] with M rows, in promote(x, residual)'s dtype."""
    M, K = x.shape
    N = w.shape[0]
    if residual.shape[-1] != N or residual.numel() != M * N:
        raise ValueError(f"residual {tuple(residual.shape)} does not hold {M} rows of {N}")
    if scalar is not None and scalar.numel() != 1:
        raise ValueError(f"the layer scalar must have one element, got shape {tuple(scalar.shape)}")
    if not fits(x, w):
        raise ValueError(f"x {tuple(x.shape)} @ w {tuple(w.shape)}.T does not fit the one-tile epilogue")
    cfg = resolve_config(x, w, split_k, block_k)
    res = _rows(residual.to(torch.promote_types(x.dtype, residual.dtype)))
    part = torch.empty(cfg["SPLIT_K"], M, N, dtype=torch.float32, device=x.device)
    h = torch.empty(M, N, dtype=res.dtype, device=x.device)
    y = torch.empty(M, N, dtype=res.dtype, device=x.device) if write_y else h
    grid = (cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    # the K walk's constexprs, without the L2 prefetch of kernels.l2_prefetch (off by default, measured slower)
    flags = {k: v for k, v in kernel_flags(x, w, cfg).items() if not k.lower().startswith("pf_")}
    _gemv_sandwich_kernel[grid](
        x, w, part, counter(x.device), res, w_post.contiguous() if w_post is not None else part,
        w_next.contiguous() if w_next is not None else part, scalar if scalar is not None else part, h, y,
        M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), res.stride(0), h.stride(0), y.stride(0),
        cfg["k_per_split"], grid[0] * grid[1], float(eps),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
        X_DTYPE=tl_dtype(x.dtype), HAS_WPOST=w_post is not None, HAS_WPRE=w_next is not None,
        PLUS_ONE=bool(plus_one), HAS_SCALAR=scalar is not None, WRITE_Y=write_y,
        NORM_BLOCK=_config(N, 1)[2], **flags, **pdl_flags(x), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return h.view(residual.shape), y.view(residual.shape)
