"""Small-M GEMV with a gated-GELU epilogue: the projection and its activation in one launch.

Two decoder ops follow a projection with an elementwise gate, and unfused each is one more kernel
per layer (~2-4 us of mostly fixed latency in a batch-1 decode step):
  * GeGLU: y = gelu_tanh(x @ Wg.T) * (x @ Wu.T) from the fused [gate; up] weight [2I, K] -> [M, I];
  * gate-mul (Gemma 4's PLE gate): y = gelu_tanh(x @ W.T) * other, other [M, N].
Here a GEMV program owns whole (gate, up) column pairs: its BLOCK_N weight rows interleave gate row j
and up row I + j, so one tile, one dot and one accumulator serve both halves, and the epilogue splits
the accumulator into the pair. The program count, the tile shape and the K walk are those of the
unfused gate_up GEMV (`kernels.gemv`), so it streams the weights as fast.
When `gemv_config` splits K (the PLE gate, 256 x 2560), the GEMV writes fp32 partials as usual and the
split-K reduction kernel applies the epilogue instead: still one launch fewer.

Rounding follows the unfused GPU path: the projection's fp32 sums are rounded to x's dtype (the GEMV
output), then gelu(gate) * up is computed in fp32 and rounded once, as torch.compile's fused
elementwise kernel does (the eager CPU reference rounds gelu's output once more; bf16 noise).
gelu_tanh(g) = 0.5 g (1 + tanh(u)) is evaluated as g / (1 + exp(-2u)), the same function without a
tanh (libdevice tanh does not run under the interpreter), equal to the tanh form to ~1 fp32 ulp.

Row invariance: the launch config is `gemv_config`'s (independent of M with the switch on) and the
epilogue is elementwise, so a row's result does not depend on how many rows share the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, cdiv, pdl_flags, tl, tl_dtype, triton
from .gemv import kernel_flags, linear_small_m_ref, resolve_config

REDUCE_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# References (test oracles): the kernels' rounding points, in PyTorch.
# --------------------------------------------------------------------------------------------
def linear_geglu_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ Wg.T) * (x @ Wu.T) for w = [Wg; Wu] [2I, K]; projection rounded to x's dtype,
    gate product in fp32, one rounding to x's dtype."""
    gate, up = linear_small_m_ref(x, w).float().chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") * up).to(x.dtype)


def linear_gelu_gate_ref(x: torch.Tensor, w: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ w.T) * other; projection rounded to x's dtype, output in the promoted dtype."""
    gate = linear_small_m_ref(x, w).float()
    return (F.gelu(gate, approximate="tanh") * other.float()).to(torch.promote_types(x.dtype, other.dtype))


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._common import pdl_wait
    from .gemv import _gemv_acc
    from .l2_prefetch import prefetch_segments

    @triton.jit
    def _gelu_tanh(g):
        """0.5 g (1 + tanh(u)) == g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3); fp32 in and out.
        exp overflowing to inf for very negative g gives -0, as the tanh form does."""
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g / (1.0 + tl.exp(-2.0 * u))

    @triton.jit
    def _gated(a, o, GEGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The epilogue on fp32 values already rounded to the projection's dtype. GEGLU: `a`
        [BLOCK_M, BLOCK_N] holds (gate, up) column pairs side by side -> [BLOCK_M, BLOCK_N // 2];
        else (gate-mul): gelu(a) * o, o in fp32. (Kernel flags are constexpr parameters: Triton
        refuses plain module globals inside compiled code, the interpreter does not.)"""
        if GEGLU:
            gate, up = tl.split(tl.reshape(a, [BLOCK_M, BLOCK_N // 2, 2]))
            return _gelu_tanh(gate) * up
        else:
            return _gelu_tanh(a) * o

    @triton.jit
    def _gemv_act_kernel(x_ptr, w_ptr, o_ptr, y_ptr, part_ptr, M, NY, K, sxm, sxk, swn, swk, som, son,
                         sym, syn, k_per_split, pf_a0, pf_n0, pf_a1, pf_n1, pf_a2, pf_n2, pf_a3, pf_n3,
                         GEGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
                         DOT_FP32: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
                         PREFETCH: tl.constexpr, W_EVICT: tl.constexpr, PF_SEGS: tl.constexpr,
                         PF_AT_END: tl.constexpr):
        """NY output columns. GEGLU: program p owns columns p*BLOCK_N/2 .. +BLOCK_N/2; tile row 2i is
        gate row c_i, row 2i+1 is up row NY + c_i. Gate-mul: BLOCK_N columns, one weight row each.
        SPLIT_K > 1: fp32 partials into part [SPLIT_K, M, weight rows] (column = weight row).
        PF_*: the L2 prefetch of the next weights (`kernels.l2_prefetch`), as in `kernels.gemv._gemv_kernel`."""
        if not PF_AT_END:
            prefetch_segments(pf_a0, pf_n0, pf_a1, pf_n1, pf_a2, pf_n2, pf_a3, pf_n3, PF_SEGS)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        r = tl.arange(0, BLOCK_N)
        if GEGLU:
            col = pid_n * (BLOCK_N // 2) + r // 2
            w_row = col + (r % 2) * NY
        else:
            col = pid_n * BLOCK_N + r
            w_row = col
        ok = col < NY
        # out-of-range rows clamp to row 0 (unmasked vector loads along K), dropped at the store
        w_rows = w_ptr + tl.where(ok, w_row, 0).to(tl.int64)[:, None] * swn
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        acc = _gemv_acc(x_ptr, w_rows, M, k_start, k_end, sxm, sxk, swk,
                        BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, DOT_FP32, EVEN_K, PDL, PREFETCH, W_EVICT)
        if PF_AT_END:
            prefetch_segments(pf_a0, pf_n0, pf_a1, pf_n1, pf_a2, pf_n2, pf_a3, pf_n3, PF_SEGS)
        if USE_DOT:
            rows = tl.arange(0, BLOCK_M)[:, None]
        else:  # M == 1, CUDA-core path (BLOCK_M == 1)
            acc = acc[None, :]
            rows = tl.zeros([1, 1], tl.int32)
        m_ok = rows < M
        if SPLIT_K > 1:
            NP = 2 * NY if GEGLU else NY
            tl.store(part_ptr + (pid_k * M + rows).to(tl.int64) * NP + w_row[None, :], acc,
                     mask=m_ok & ok[None, :])
        else:
            a = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # the unfused GEMV's output rounding
            if GEGLU:
                cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
                o = a  # unused
            else:
                cols = col
                o = tl.load(o_ptr + rows * som + cols[None, :] * son, mask=m_ok & (cols[None, :] < NY),
                            other=0.0).to(tl.float32)
            out = _gated(a, o, GEGLU, BLOCK_M, BLOCK_N)
            tl.store(y_ptr + rows * sym + cols[None, :] * syn, out.to(y_ptr.dtype.element_ty),
                     mask=m_ok & (cols[None, :] < NY))

    @triton.jit
    def _splitk_act_kernel(part_ptr, o_ptr, y_ptr, M, NY, som, son, sym, syn,
                           GEGLU: tl.constexpr, X_DTYPE: tl.constexpr, SPLIT_K: tl.constexpr,
                           BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Sum the partials in the fixed order of `kernels.gemv._splitk_reduce_kernel` (s = 0, 1, ...),
        round to the projection's dtype, apply the epilogue. Elementwise over M * NY outputs."""
        pdl_wait(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M * NY
        m = offs // NY
        n = offs % NY
        NP = 2 * NY if GEGLU else NY
        if not GEGLU:  # the per-layer input, requested with the partials (one round of loads, not two)
            other = tl.load(o_ptr + m * som + n * son, mask=ok, other=0.0).to(tl.float32)
        g = tl.zeros([BLOCK], tl.float32)
        for s in tl.static_range(SPLIT_K):
            g += tl.load(part_ptr + (s * M + m).to(tl.int64) * NP + n, mask=ok, other=0.0)
        g = g.to(X_DTYPE).to(tl.float32)
        if GEGLU:
            up = tl.zeros([BLOCK], tl.float32)
            for s in tl.static_range(SPLIT_K):
                up += tl.load(part_ptr + (s * M + m).to(tl.int64) * NP + NY + n, mask=ok, other=0.0)
            out = _gelu_tanh(g) * up.to(X_DTYPE).to(tl.float32)
        else:
            out = _gelu_tanh(g) * other
        tl.store(y_ptr + m * sym + n * syn, out.to(y_ptr.dtype.element_ty), mask=ok)


def _launch(geglu: bool, x: torch.Tensor, w: torch.Tensor, other: torch.Tensor | None, out_dtype: torch.dtype,
            split_k: int | None, block_k: int | None, config: dict[str, int] | None) -> torch.Tensor:
    cfg = resolve_config(x, w, split_k, block_k, config)
    M, K = x.shape
    NY = w.shape[0] // 2 if geglu else w.shape[0]
    y = torch.empty(M, NY, dtype=out_dtype, device=x.device)
    if M == 0 or NY == 0:
        return y
    o = other if other is not None else y  # dummy pointer for GEGLU
    if K == 0:  # an empty sum: gate = 0, gelu(0) = 0
        return y.zero_()
    split = cfg["SPLIT_K"]
    part = torch.empty(split, M, w.shape[0], dtype=torch.float32, device=x.device) if split > 1 else y
    cols_per_program = cfg["BLOCK_N"] // 2 if geglu else cfg["BLOCK_N"]
    _gemv_act_kernel[(cdiv(NY, cols_per_program), split)](
        x, w, o, y, part, M, NY, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        o.stride(0), o.stride(1), y.stride(0), y.stride(1), cfg["k_per_split"],
        GEGLU=geglu, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split,
        **kernel_flags(x, w, cfg), **pdl_flags(x), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        _splitk_act_kernel[(cdiv(M * NY, REDUCE_BLOCK),)](
            part, o, y, M, NY, o.stride(0), o.stride(1), y.stride(0), y.stride(1),
            GEGLU=geglu, X_DTYPE=tl_dtype(x.dtype), SPLIT_K=split, BLOCK=REDUCE_BLOCK, num_warps=4,
            **pdl_flags(x, short=True))
    return y


def linear_geglu_triton(x: torch.Tensor, w: torch.Tensor, split_k: int | None = None, block_k: int | None = None,
                        config: dict[str, int] | None = None) -> torch.Tensor:
    """gelu_tanh(x @ Wg.T) * (x @ Wu.T) -> [M, I] in x's dtype, for x [M <= 16, K] and the fused
    [gate; up] weight w [2I, K]. `split_k` / `block_k` / `config` as in `linear_small_m_triton`."""
    if w.dim() != 2 or w.shape[0] % 2:
        raise ValueError(f"need the fused [gate; up] weight [2I, K]; got {tuple(w.shape)}")
    return _launch(True, x, w, None, x.dtype, split_k, block_k, config)


def linear_gelu_gate_triton(x: torch.Tensor, w: torch.Tensor, other: torch.Tensor, split_k: int | None = None,
                            block_k: int | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """gelu_tanh(x @ w.T) * other -> [M, N] in promote(x, other)'s dtype, for x [M <= 16, K], w [N, K],
    other [M, N] (any strides)."""
    if other.shape != (x.shape[0], w.shape[0]):
        raise ValueError(f"other must be [M, N] = {(x.shape[0], w.shape[0])}; got {tuple(other.shape)}")
    return _launch(False, x, w, other, torch.promote_types(x.dtype, other.dtype), split_k, block_k, config)
