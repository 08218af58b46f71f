"""The PLE gate GEMV on a residual whose add + RMSNorm is still pending: down's norm kernel leaves the chain.

A Gemma 4 layer with per-layer inputs ends its MLP and starts its PLE branch with
    h = r + norm(y0) * w_post           y0 = the down projection (split K: S fp32 partials at decode widths)
    g = gelu_tanh(h @ Wg.T) * ple_in    the PLE gate (also split K: 256 outputs cannot fill the GPU)
The stop-25 path runs down GEMV -> split-K reduce + add_norm -> gate GEMV -> split-K reduce + GELU. The add_norm
kernel moves ~15 KB but sits on the step's critical path as one more dependent launch (1.5-3.6 us each on an
H100, whatever its bytes; docs/PERF.md, stop 25). The norm is a per-row scalar inv = rsqrt(mean(y0^2) + eps), so
    h @ Wg.T = r @ Wg.T + inv * ((w_post * y0) @ Wg.T)
and the gate GEMV can read y0's partials itself (`_pending_gate_kernel`): each program sums the S partials of
its K slice (L2 hits), dots two rows per stream position with each weight tile (r, and w_post * y0), and sums
y0^2 over the slice. The gate's split-K reduction, a launch the path had anyway (`_pending_gate_reduce_kernel`), adds
the slices' squares into inv, forms gelu(A + inv * B) * ple_in, and writes h for the residual stream. The chain
loses one launch per layer; the reads it adds are the down partials once per gate program (4 x 7 x 10 KB at E4B).

Rounding: y0 is rounded to x's dtype as the GEMV output was, inv is that row's rsqrt(mean(y0^2) + eps) (fp32, its
sum in split order rather than one tile's tree order), and h = r + cast_x(y0 * inv * w_post) rounded to r's dtype:
the add_norm kernel's formula. The gate's input differs from the unfused path's by where it rounds: w_post * y0 is
rounded to x's dtype before the dot (the unfused path rounded norm(y0) * w_post and h instead). Both are one
rounding of x's dtype per element; `pending_gate_ref` is this path's arithmetic in PyTorch.

Row invariance: the launch config is `gemv_config`'s (padded to one 16-row tile per operand row set whatever M is)
and the reduce is elementwise per row, so a stream position's h and g do not depend on how many positions share
the call: a 9-position verify step computes each position as a 1-token decode step does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, cdiv, pdl_flags, tl, tl_dtype, triton
from .gemv import MAX_M, resolve_config, weight_stream_flags

REDUCE_BLOCK = 1024  # outputs per reduce program (gate outputs, or h columns)


@dataclass(frozen=True)
class PendingAddNorm:
    """h = residual + norm(sum_s part[s]) * w_post, not yet computed: a projection's fp32 split-K partials
    part [S, M, N] (summed in s order, rounded to x_dtype), the residual [..., N] with M rows and the post-norm
    weight. h takes the residual's shape."""
    part: torch.Tensor
    x_dtype: torch.dtype
    residual: torch.Tensor
    w_post: torch.Tensor | None
    eps: float
    plus_one: bool


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def post_factor(w_post: torch.Tensor | None, n: int, plus_one: bool, device: torch.device) -> torch.Tensor:
    """A norm's fp32 weight factor over n columns: w, 1 + w (plus_one), or ones without a weight."""
    if w_post is None:
        return torch.ones(n, device=device)
    return 1.0 + w_post.float() if plus_one else w_post.float()


# --------------------------------------------------------------------------------------------
# Reference (test oracle): this path's rounding points in PyTorch.
# --------------------------------------------------------------------------------------------
def pending_gate_ref(pending: PendingAddNorm, w_gate: torch.Tensor, other: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, g): h = residual + cast_x(y0 * inv * w_post), g = gelu_tanh(cast_x(r @ Wg.T + inv * (cast_x(w_post * y0)
    @ Wg.T))) * other, y0 = cast_x(sum_s part[s]), inv = rsqrt(mean(y0^2) + eps). h in residual's dtype, g in
    promote(x_dtype, other)."""
    p = pending
    acc = p.part[0].clone()
    for s in range(1, p.part.shape[0]):
        acc += p.part[s]
    y0 = acc.to(p.x_dtype).float()
    wp = post_factor(p.w_post, y0.shape[-1], p.plus_one, y0.device)
    inv = torch.rsqrt(y0.pow(2).mean(-1, keepdim=True) + p.eps)
    r = _rows(p.residual).float()
    h = (r + (y0 * inv * wp).to(p.x_dtype).float()).to(p.residual.dtype).view(p.residual.shape)
    b = (y0 * wp).to(p.x_dtype).float()
    wg = w_gate.float()
    gate = (r.to(p.x_dtype).float() @ wg.T + inv * (b @ wg.T)).to(p.x_dtype).float()
    g = (F.gelu(gate, approximate="tanh") * other.float()).to(torch.promote_types(p.x_dtype, other.dtype))
    return h, g


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._common import pdl_wait
    from .gemv import _w_tile
    from .gemv_epilogue import _gelu_tanh
    from .rmsnorm import _scale

    @triton.jit
    def _two_row_program(w_ptr, M, N, K, swn, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Where this program sits in a GEMV of two row sets per position (grid (N / BLOCK_N, splits); also
        `kernels.pending_sandwich`): (pid_n, pid_k, its columns and their mask, the tile rows and their mask, its
        weight-row pointers [BLOCK_N, 1], its K slice [k_start, k_end)). Out-of-range weight rows clamp to row 0
        (unmasked vector loads along K) and are dropped at the store."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        w_rows = w_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * swn
        k_start = pid_k * k_per_split
        return pid_n, pid_k, offs_n, n_ok, offs_m, offs_m < M, w_rows, k_start, tl.minimum(k_start + k_per_split, K)

    @triton.jit
    def _store_two_row_sets(gpart_ptr, acc_a, acc_b, pid_k, M, N, offs_m, m_ok, offs_n, n_ok):
        """The two row sets' fp32 sums into gpart [splits, 2, M, N] at split pid_k."""
        mask = m_ok[:, None] & n_ok[None, :]
        base = (pid_k * 2 * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(gpart_ptr + base, acc_a, mask=mask)
        tl.store(gpart_ptr + base + M * N, acc_b, mask=mask)

    @triton.jit
    def _pending_tile(acc_a, acc_b, ss, w, part_ptr, r_ptr, wpost_ptr, offs_m, m_ok, offs_k, H, M, srm,
                      S_IN: tl.constexpr, X_DTYPE: tl.constexpr, HAS_WPOST: tl.constexpr, PLUS_ONE: tl.constexpr,
                      DOT_FP32: tl.constexpr):
        """One K tile: the residual rows and w_post * y0 (y0 = the partials summed in split order, rounded to
        X_DTYPE) against the weight tile w [BLOCK_N, BLOCK_K]; ss += y0^2 summed over the tile."""
        k_ok = offs_k < H
        mk = m_ok[:, None] & k_ok[None, :]
        r = tl.load(r_ptr + offs_m[:, None] * srm + offs_k[None, :], mask=mk, other=0.0)
        y = tl.zeros(r.shape, tl.float32)
        for s in tl.static_range(S_IN):  # the reduce kernel's order: s = 0, 1, ...
            y += tl.load(part_ptr + (s * M + offs_m[:, None]).to(tl.int64) * H + offs_k[None, :], mask=mk, other=0.0)
        y = y.to(X_DTYPE).to(tl.float32)
        ss += tl.sum(y * y, axis=1)
        b = y * _scale(wpost_ptr, offs_k, k_ok, HAS_WPOST, PLUS_ONE)
        if DOT_FP32:
            wt = tl.trans(w.to(tl.float32))
            acc_a += tl.dot(r.to(X_DTYPE).to(tl.float32), wt, input_precision="ieee")
            acc_b += tl.dot(b.to(X_DTYPE).to(tl.float32), wt, input_precision="ieee")
        else:
            wt = tl.trans(w)
            acc_a += tl.dot(r.to(X_DTYPE), wt)
            acc_b += tl.dot(b.to(X_DTYPE), wt)
        return acc_a, acc_b, ss

    @triton.jit
    def _pending_gate_kernel(part_ptr, r_ptr, wpost_ptr, w_ptr, gpart_ptr, ss_ptr, M, N, H, srm, swn, swk,
                              k_per_split,
                              S_IN: tl.constexpr, X_DTYPE: tl.constexpr, HAS_WPOST: tl.constexpr,
                              PLUS_ONE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                              PDL: tl.constexpr, PREFETCH: tl.constexpr, W_EVICT: tl.constexpr):
        """Grid (N / BLOCK_N, splits). Writes gpart [splits, 2, M, N] (the r rows' sums, then the w_post * y0 rows')
        and, from the first column program, ss [splits, M] (y0^2 over the split's K slice). The first PREFETCH
        (1 or 2) weight tiles are requested before the PDL wait, as `kernels.gemv._gemv_acc` does."""
        pid_n, pid_k, offs_n, n_ok, offs_m, m_ok, w_rows, k_start, k_end = _two_row_program(
            w_ptr, M, N, H, swn, k_per_split, BLOCK_M, BLOCK_N)
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        ss = tl.zeros([BLOCK_M], tl.float32)
        offs_k = k_start + tl.arange(0, BLOCK_K)
        w = _w_tile(w_rows, offs_k, k_end, swk, EVEN_K, W_EVICT)
        w2 = w
        if PREFETCH >= 2:  # masked: past the split's end it is zeros, and its activations are masked too
            w2 = _w_tile(w_rows, offs_k + BLOCK_K, k_end, swk, False, W_EVICT)
        pdl_wait(PDL)
        # a tile past k_end (the prefetched second one of a one-tile split) loads zero activations: adds nothing
        acc_a, acc_b, ss = _pending_tile(acc_a, acc_b, ss, w, part_ptr, r_ptr, wpost_ptr, offs_m, m_ok,
                                         tl.where(offs_k < k_end, offs_k, H), H, M, srm, S_IN, X_DTYPE, HAS_WPOST,
                                         PLUS_ONE, DOT_FP32)
        if PREFETCH >= 2:
            ks = offs_k + BLOCK_K
            acc_a, acc_b, ss = _pending_tile(acc_a, acc_b, ss, w2, part_ptr, r_ptr, wpost_ptr, offs_m, m_ok,
                                             tl.where(ks < k_end, ks, H), H, M, srm, S_IN, X_DTYPE, HAS_WPOST,
                                             PLUS_ONE, DOT_FP32)
        for k0 in range(k_start + PREFETCH * BLOCK_K, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            wk = _w_tile(w_rows, ks, k_end, swk, EVEN_K, W_EVICT)
            acc_a, acc_b, ss = _pending_tile(acc_a, acc_b, ss, wk, part_ptr, r_ptr, wpost_ptr, offs_m, m_ok,
                                             tl.where(ks < k_end, ks, H), H, M, srm, S_IN, X_DTYPE, HAS_WPOST,
                                             PLUS_ONE, DOT_FP32)
        _store_two_row_sets(gpart_ptr, acc_a, acc_b, pid_k, M, N, offs_m, m_ok, offs_n, n_ok)
        if pid_n == 0:
            tl.store(ss_ptr + pid_k * M + offs_m, ss, mask=m_ok)

    @triton.jit
    def _row_inv(ss_ptr, m, M, ok, H, eps, SPLIT: tl.constexpr):
        """rsqrt(mean(y0^2) + eps) of row(s) m from the splits' sums of squares, added in split order."""
        t = tl.zeros(m.shape, tl.float32)
        for s in tl.static_range(SPLIT):
            t += tl.load(ss_ptr + s * M + m, mask=ok, other=0.0)
        return tl.rsqrt(t / H + eps)

    @triton.jit
    def _pending_gate_reduce_kernel(gpart_ptr, ss_ptr, o_ptr, g_ptr, part_ptr, r_ptr, wpost_ptr, h_ptr, M, N, H,
                                som, son, sgm, srm, shm, eps, n_gate_programs,
                                SPLIT: tl.constexpr, S_IN: tl.constexpr, X_DTYPE: tl.constexpr,
                                HAS_WPOST: tl.constexpr, PLUS_ONE: tl.constexpr, BLOCK: tl.constexpr,
                                PDL: tl.constexpr):
        """Programs [0, n_gate_programs): g = gelu_tanh(cast_x(A + inv * B)) * other over M * N outputs, A and B
        the gate's partials summed in split order. The rest: h = r + cast_x(y0 * inv * w_post) over M * H."""
        pid = tl.program_id(0)
        pdl_wait(PDL)
        if pid < n_gate_programs:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            ok = offs < M * N
            m = offs // N
            n = offs % N
            other = tl.load(o_ptr + m * som + n * son, mask=ok, other=0.0).to(tl.float32)
            inv = _row_inv(ss_ptr, m, M, ok, H, eps, SPLIT)
            a = tl.zeros([BLOCK], tl.float32)
            b = tl.zeros([BLOCK], tl.float32)
            for s in tl.static_range(SPLIT):
                a += tl.load(gpart_ptr + (s * 2 * M + m).to(tl.int64) * N + n, mask=ok, other=0.0)
                b += tl.load(gpart_ptr + ((s * 2 + 1) * M + m).to(tl.int64) * N + n, mask=ok, other=0.0)
            gate = (a + inv * b).to(X_DTYPE).to(tl.float32)
            tl.store(g_ptr + m * sgm + n, (_gelu_tanh(gate) * other).to(g_ptr.dtype.element_ty), mask=ok)
        else:
            offs = (pid - n_gate_programs) * BLOCK + tl.arange(0, BLOCK)
            ok = offs < M * H
            m = offs // H
            c = offs % H
            r = tl.load(r_ptr + m * srm + c, mask=ok, other=0.0).to(tl.float32)
            inv = _row_inv(ss_ptr, m, M, ok, H, eps, SPLIT)
            y = tl.zeros([BLOCK], tl.float32)
            for s in tl.static_range(S_IN):
                y += tl.load(part_ptr + (s * M + m).to(tl.int64) * H + c, mask=ok, other=0.0)
            y = y.to(X_DTYPE).to(tl.float32)
            if HAS_WPOST:
                wp = tl.load(wpost_ptr + c, mask=ok, other=0.0).to(tl.float32)
                if PLUS_ONE:
                    wp = 1.0 + wp
                y = y * wp * inv
            else:
                y = y * inv
            tl.store(h_ptr + m * shm + c, (r + y.to(X_DTYPE).to(tl.float32)).to(h_ptr.dtype.element_ty), mask=ok)


def two_row_config(x: torch.Tensor, w: torch.Tensor, split_k: int | None = None, block_k: int | None = None
                   ) -> dict[str, int]:
    """A two-row-set GEMV's launch config for input rows x [M, K] (also `kernels.pending_sandwich`): `gemv_config`'s
    tiles and split, one 16-row tile per row set whatever M is (the row-invariant tile: a position's sums do not
    depend on M)."""
    cfg = resolve_config(x, w, split_k, block_k)
    cfg["BLOCK_M"] = MAX_M
    return cfg


def gate_config(pending: PendingAddNorm, w_gate: torch.Tensor, split_k: int | None = None) -> dict[str, int]:
    """The gate GEMV's launch config (`two_row_config`)."""
    return two_row_config(_rows(pending.residual), w_gate, split_k)


def supports(pending: PendingAddNorm, w_gate: torch.Tensor) -> bool:
    """Whether `pending_gate_triton` runs these operands: <= 16 residual rows of H (unit column stride),
    contiguous fp32 partials [S, M, H], w_gate [N, H]."""
    p = pending
    r = _rows(p.residual)
    M, H = r.shape
    return (0 < M <= MAX_M and w_gate.dim() == 2 and w_gate.shape[1] == H and p.part.dim() == 3
            and tuple(p.part.shape[1:]) == (M, H) and p.part.is_contiguous() and r.stride(1) == 1
            and p.part.dtype == torch.float32)


def pending_gate_triton(pending: PendingAddNorm, w_gate: torch.Tensor, other: torch.Tensor,
                         split_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, g) of `pending_gate_ref` in two launches: the gate GEMV on the pending residual, then the reduce that
    also writes h (residual's shape). other [M, N]: the per-layer input rows (any strides). `split_k` forces the
    gate's split (tests; the heuristic splits E4B's 256 x 2560 gate)."""
    p = pending
    if not supports(p, w_gate):
        raise ValueError(f"the pending gate needs residual [M <= {MAX_M}, H], partials [S, M, H] fp32 contiguous and "
                         f"w_gate [N, H]; got {tuple(p.residual.shape)}, {tuple(p.part.shape)} {p.part.dtype}, "
                         f"{tuple(w_gate.shape)}")
    r = _rows(p.residual)
    M, H = r.shape
    N = w_gate.shape[0]
    if other.shape != (M, N):
        raise ValueError(f"other must be [M, N] = {(M, N)}; got {tuple(other.shape)}")
    cfg = gate_config(p, w_gate, split_k)
    split = cfg["SPLIT_K"]
    dev = r.device
    gpart = torch.empty(split, 2, M, N, dtype=torch.float32, device=dev)
    ss = torch.empty(split, M, dtype=torch.float32, device=dev)
    wpost = p.w_post.contiguous() if p.w_post is not None else ss
    probe = r.new_empty(0, dtype=p.x_dtype)  # x's dtype for the weight-stream flags
    flags = weight_stream_flags(probe, w_gate)
    flags["PREFETCH"] = min(2, flags["PREFETCH"])
    even_k = H % cfg["BLOCK_K"] == 0 and cfg["k_per_split"] % cfg["BLOCK_K"] == 0
    _pending_gate_kernel[(cdiv(N, cfg["BLOCK_N"]), split)](
        p.part, r, wpost, w_gate, gpart, ss, M, N, H, r.stride(0), w_gate.stride(0),
        w_gate.stride(1), cfg["k_per_split"],
        S_IN=p.part.shape[0], X_DTYPE=tl_dtype(p.x_dtype), HAS_WPOST=p.w_post is not None,
        PLUS_ONE=bool(p.plus_one), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        EVEN_K=even_k, **flags, **pdl_flags(r), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    h = torch.empty(M, H, dtype=p.residual.dtype, device=dev)
    g = torch.empty(M, N, dtype=torch.promote_types(p.x_dtype, other.dtype), device=dev)
    n_gate = cdiv(M * N, REDUCE_BLOCK)
    _pending_gate_reduce_kernel[(n_gate + cdiv(M * H, REDUCE_BLOCK),)](
        gpart, ss, other, g, p.part, r, wpost, h, M, N, H, other.stride(0), other.stride(1), g.stride(0),
        r.stride(0), h.stride(0), float(p.eps), n_gate,
        SPLIT=split, S_IN=p.part.shape[0], X_DTYPE=tl_dtype(p.x_dtype), HAS_WPOST=p.w_post is not None,
        PLUS_ONE=bool(p.plus_one), BLOCK=REDUCE_BLOCK, num_warps=4, **pdl_flags(r, short=True))
    return h.view(p.residual.shape), g
