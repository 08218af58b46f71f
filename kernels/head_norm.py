"""Per-head RMSNorm (q/k norm, Gemma 4's scale-free v-norm), optionally fused with RoPE, and the
decode-step K/V write: k-norm + RoPE, v-norm and the scatter into the cache slots in one launch.

Why a kernel of its own: these norms reduce over the head dim, and the engine's row-invariant mode
(`kernels.invariance`) needs every such reduction to run one row per program with a launch config
from the head dim alone. Then q/k/v of a stream position normalise bit for bit alike whether the
launch holds one position (decode) or K+1 (speculative verify). Fusing RoPE and the cache scatter
keeps the launch count of the torch.compile'd path it replaces (one per call site).

Rounding follows `engine.ops` exactly where the reference rounds: the normed head is cast to x's
dtype before RoPE (as `rms_norm(...).type_as(x)` does); RoPE itself is computed in fp32 and
rounded once, as the fused (inductor) path computes it.
Inputs: x [..., H, D] whose leading dims merge into one (the q/k/v slices of the fused QKV output
do), cos/sin [..., 1, D] with the same leading dims (one row per position, shared by its heads).
The fused q/k/v projection's epilogue (`kernels.qkv_heads`) runs these same per-head helpers on split-K partials.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, next_pow2, pdl_flags, tl, triton
from .rmsnorm import rmsnorm_ref


# --------------------------------------------------------------------------------------------
# Reference (test oracle): the shared RMSNorm reference plus rotate-half RoPE
# --------------------------------------------------------------------------------------------
def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def head_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, plus_one: bool,
                  cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    n = rmsnorm_ref(x, weight, eps, plus_one)
    return n if cos is None else _rope_ref(n, cos, sin)


def write_kv_ref(k_raw: torch.Tensor, v_raw: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                 rows: torch.Tensor, slots: torch.Tensor, pos32: torch.Tensor, eps: float, plus_one: bool,
                 v_norm: bool) -> None:
    k_cache[rows, :, slots] = head_norm_ref(k_raw, k_weight, eps, plus_one, cos, sin)
    v_cache[rows, :, slots] = rmsnorm_ref(v_raw, None, eps, False) if v_norm else v_raw
    slot_pos[rows, slots] = pos32


# --------------------------------------------------------------------------------------------
# Triton kernels: grid (position, head), one head row of D per program.
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._common import pdl_wait

    @triton.jit
    def _load_head(src_row, idx, ok, split_stride, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
                   X_DTYPE: tl.constexpr, PEND: tl.constexpr, b_off, ca, cb):
        """fp32 values of one head row at columns `idx`. SPLIT == 0: `src_row` points into the projection's
        output (x's dtype). SPLIT >= 1: into fp32 split-K partials (`split_stride` apart), summed in the
        fixed order of `kernels.gemv._splitk_reduce_kernel` and rounded to x's dtype as that kernel
        stores them, so the fused q/k/v epilogue reads exactly what the unfused path would have.
        PEND (a pending input, `kernels.pending_sandwich`): two row sets of partials, b_off apart, combined as
        ca * (A + cb * B) before the rounding (b_off, ca, cb are unused otherwise)."""
        if SPLIT == 0:
            return tl.load(src_row + idx, mask=ok, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros([BLOCK_D], tl.float32)
            for s in tl.static_range(SPLIT):
                acc += tl.load(src_row + s * split_stride + idx, mask=ok, other=0.0)
            if PEND:
                acc_b = tl.zeros([BLOCK_D], tl.float32)
                for s in tl.static_range(SPLIT):
                    acc_b += tl.load(src_row + b_off + s * split_stride + idx, mask=ok, other=0.0)
                acc = ca * (acc + cb * acc_b)
            return acc.to(X_DTYPE).to(tl.float32)

    @triton.jit
    def _weight_factor(w_ptr, idx, ok, HAS_W: tl.constexpr, PLUS_ONE: tl.constexpr):
        """The norm's fp32 weight factor at columns `idx` (w, or 1 + w; 1 without a weight). A weight: the
        kernels load it before their PDL wait."""
        if HAS_W:
            w = tl.load(w_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            if PLUS_ONE:
                w = 1.0 + w
        else:
            w = tl.full(idx.shape, 1.0, tl.float32)
        return w

    @triton.jit
    def _head_loads(x_row, cs_row, sn_row, cols, rcols, c_ok, split_stride, BLOCK_D: tl.constexpr,
                    SPLIT: tl.constexpr, XD: tl.constexpr, ROPE: tl.constexpr, PEND: tl.constexpr, b_off, ca, cb):
        """Every activation one head needs, issued together (one memory round trip after the PDL wait): the
        row, the RoPE partner columns (re-read, not shuffled across threads: the row is already in L1), and
        the position's cos/sin. Rows read through `_load_head` (split_stride, SPLIT: see there)."""
        x = _load_head(x_row, cols, c_ok, split_stride, BLOCK_D, SPLIT, XD, PEND, b_off, ca, cb)
        if ROPE:
            xr = _load_head(x_row, rcols, c_ok, split_stride, BLOCK_D, SPLIT, XD, PEND, b_off, ca, cb)
            c = tl.load(cs_row + cols, mask=c_ok, other=0.0).to(tl.float32)
            s = tl.load(sn_row + cols, mask=c_ok, other=0.0).to(tl.float32)
        else:
            xr = x
            c = x
            s = x
        return x, xr, c, s

    @triton.jit
    def _normed_head(x, xr, wf, wfr, c, s, cols, eps, D: tl.constexpr, ROPE: tl.constexpr, XD: tl.constexpr):
        """One head from its loaded values: norm (fp32, x times its inverse rms times the weight factor, cast
        to x's dtype XD, as the reference casts the norm's output back), then optionally rotate-half RoPE in
        fp32: out[i] = n[i]*cos[i] - n[i+D/2]*sin[i] (i < D/2), n[i]*cos[i] + n[i-D/2]*sin[i]. Returns fp32."""
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        n = (x * inv * wf).to(XD).to(tl.float32)
        if ROPE:
            nr = (xr * inv * wfr).to(XD).to(tl.float32)
            rot = tl.where(cols < D // 2, -nr, nr)
            n = n * c + rot * s
        return n

    @triton.jit
    def _head_cols(D: tl.constexpr, BLOCK_D: tl.constexpr):
        """(cols, their RoPE partners, in-range mask) of one head row."""
        cols = tl.arange(0, BLOCK_D)
        return cols, tl.where(cols < D // 2, cols + D // 2, cols - D // 2), cols < D

    @triton.jit
    def _head_norm_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, sxr, sxh, scr, ssr, syr, syh, eps,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr,
                          PLUS_ONE: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)  # position (merged leading dims)
        h = tl.program_id(1)
        cols, rcols, c_ok = _head_cols(D, BLOCK_D)
        wf = _weight_factor(w_ptr, cols, c_ok, HAS_W, PLUS_ONE)
        wfr = _weight_factor(w_ptr, rcols, c_ok, HAS_W, PLUS_ONE)
        pdl_wait(PDL)
        x, xr, c, s = _head_loads(x_ptr + r * sxr + h * sxh, cos_ptr + r * scr, sin_ptr + r * ssr, cols, rcols,
                                  c_ok, 0, BLOCK_D, 0, x_ptr.dtype.element_ty, ROPE, False, 0, 1.0, 1.0)
        y = _normed_head(x, xr, wf, wfr, c, s, cols, eps, D, ROPE, x_ptr.dtype.element_ty)
        tl.store(y_ptr + r * syr + h * syh + cols, y.to(y_ptr.dtype.element_ty), mask=c_ok)

    @triton.jit
    def _write_kv_head(k_row, v_row, wf, wfr, cs_row, sn_row, kc_ptr, vc_ptr, sp_ptr, rows_ptr, slots_ptr, pos_ptr,
                       b, t, h, skcb, skch, skcs, svcb, svch, svcs, sspb, ssps, srb, srt, slb, slt, spb, spt, eps,
                       split_stride, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       V_NORM: tl.constexpr, SPLIT: tl.constexpr, XK: tl.constexpr, XV: tl.constexpr,
                       PEND: tl.constexpr, b_off, ca, cb):
        """kv head h of position (b, t), after the PDL wait: k norm (weight factors wf / wfr, loaded before the
        wait) + RoPE, v norm (V_NORM) or copy, both into the cache slot of that position's row, and the slot's
        position (head 0 only). Every load is issued first, together."""
        row = tl.load(rows_ptr + b * srb + t * srt).to(tl.int64)
        slot = tl.load(slots_ptr + b * slb + t * slt).to(tl.int64)
        pos = tl.load(pos_ptr + b * spb + t * spt)
        cols, rcols, c_ok = _head_cols(D, BLOCK_D)
        xk, xkr, c, s = _head_loads(k_row, cs_row, sn_row, cols, rcols, c_ok, split_stride, BLOCK_D, SPLIT, XK, True,
                                    PEND, b_off, ca, cb)
        xv = _load_head(v_row, cols, c_ok, split_stride, BLOCK_D, SPLIT, XV, PEND, b_off, ca, cb)
        k = _normed_head(xk, xkr, wf, wfr, c, s, cols, eps, D, True, XK)
        tl.store(kc_ptr + row * skcb + h * skch + slot * skcs + cols, k.to(kc_ptr.dtype.element_ty), mask=c_ok)
        if V_NORM:  # scale-free: the weight factor is 1
            v = _normed_head(xv, xv, 1.0, 1.0, xv, xv, cols, eps, D, False, XV)
        else:
            v = xv
        tl.store(vc_ptr + row * svcb + h * svch + slot * svcs + cols, v.to(vc_ptr.dtype.element_ty), mask=c_ok)
        if h == 0:  # one writer per position; padding positions all hit the trash slot with -1
            tl.store(sp_ptr + row * sspb + slot * ssps, pos.to(sp_ptr.dtype.element_ty))

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, w_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, sp_ptr,
                         rows_ptr, slots_ptr, pos_ptr, T,
                         skr, skh, svr, svh, scr, ssr, skcb, skch, skcs, svcb, svch, svcs, sspb, ssps,
                         srb, srt, slb, slt, spb, spt, eps,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, PLUS_ONE: tl.constexpr,
                         V_NORM: tl.constexpr, PDL: tl.constexpr):
        r = tl.program_id(0)  # position b * T + t
        h = tl.program_id(1)  # kv head
        r64 = r.to(tl.int64)
        cols, rcols, c_ok = _head_cols(D, BLOCK_D)
        wf = _weight_factor(w_ptr, cols, c_ok, True, PLUS_ONE)
        wfr = _weight_factor(w_ptr, rcols, c_ok, True, PLUS_ONE)
        pdl_wait(PDL)
        _write_kv_head(k_ptr + r64 * skr + h * skh, v_ptr + r64 * svr + h * svh, wf, wfr, cos_ptr + r64 * scr,
                       sin_ptr + r64 * ssr, kc_ptr, vc_ptr, sp_ptr, rows_ptr, slots_ptr, pos_ptr, r // T, r % T, h,
                       skcb, skch, skcs, svcb, svch, svcs, sspb, ssps, srb, srt, slb, slt, spb, spt, eps,
                       0, D, BLOCK_D, V_NORM, 0, k_ptr.dtype.element_ty, v_ptr.dtype.element_ty, False, 0,
                       1.0, 1.0)

def _warps(D: int) -> int:
    """From the head dim alone (row invariance): 1 warp for 256, 2 for 512."""
    return max(1, min(8, next_pow2(D) // 256))


def _heads(x: torch.Tensor) -> torch.Tensor:
    """[..., H, D] -> [R, H, D] with unit stride along D (a view for the fused QKV slices)."""
    x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def _per_position(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """cos/sin [..., 1, D] (broadcastable to x [..., H, D]) -> [R, D], one row per position of x,
    unit stride along D (a view for the engine's lookups; broadcast tables are materialised)."""
    lead = (*x.shape[:-2], 1, x.shape[-1])
    if tuple(t.shape) != lead:
        t = t.expand(lead)
    t2 = t.reshape(-1, x.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def head_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float, plus_one: bool,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of every head row of x [..., H, D] (weight None: scale-free), then RoPE when cos/sin
    [..., 1, D] are given. Output contiguous, in x's dtype."""
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither")
    H, D = x.shape[-2], x.shape[-1]
    if cos is not None and D % 2:
        raise ValueError(f"RoPE needs an even head dim, got {D}")
    x3 = _heads(x)
    R = x3.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if R == 0 or H == 0:
        return y
    y3 = y.view(R, H, D)
    c2 = _per_position(cos, x) if cos is not None else x3
    s2 = _per_position(sin, x) if sin is not None else x3
    w = weight.contiguous() if weight is not None else x3  # dummy pointer when HAS_W is False
    _head_norm_kernel[(R, H)](
        x3, w, c2, s2, y3, x3.stride(0), x3.stride(1), c2.stride(0), s2.stride(0), y3.stride(0), y3.stride(1),
        float(eps), D=D, BLOCK_D=next_pow2(D), HAS_W=weight is not None, PLUS_ONE=bool(plus_one),
        ROPE=cos is not None, num_warps=_warps(D), **pdl_flags(x3, short=True))
    return y


def _check_kv(B: int, T: int, Hkv: int, D: int, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
              slots: torch.Tensor, pos32: torch.Tensor) -> None:
    """rows/slots/pos32 [B, T]; caches [B', Hkv, S, D], unit stride along D, alike."""
    for name, t in (("rows", rows), ("slots", slots), ("pos32", pos32)):
        if tuple(t.shape) != (B, T):
            raise ValueError(f"{name} {tuple(t.shape)} is not [B, T] = [{B}, {T}]")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or k_cache.shape[1:2] != (Hkv,) \
            or k_cache.shape[-1] != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit {Hkv} kv heads of {D}")


def write_kv_triton(k_raw: torch.Tensor, v_raw: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                    rows: torch.Tensor, slots: torch.Tensor, pos32: torch.Tensor, eps: float, plus_one: bool,
                    v_norm: bool) -> None:
    """`engine.ops.write_kv` in one launch: k_raw/v_raw [B, T, Hkv, D], cos/sin [B, T, 1, D],
    caches [B', Hkv, S, D] (unit stride along D), slot_pos [B', S], rows/slots/pos32 [B, T]
    (any strides: rows is usually an expanded arange)."""
    B, T, Hkv, D = k_raw.shape
    if v_raw.shape != k_raw.shape:
        raise ValueError(f"k {tuple(k_raw.shape)} and v {tuple(v_raw.shape)} differ")
    _check_kv(B, T, Hkv, D, k_cache, v_cache, rows, slots, pos32)
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, got {D}")
    R = B * T
    if R == 0 or Hkv == 0:
        return
    k3, v3 = _heads(k_raw), _heads(v_raw)
    c2, s2 = _per_position(cos, k_raw), _per_position(sin, k_raw)
    _write_kv_kernel[(R, Hkv)](
        k3, v3, k_weight.contiguous(), c2, s2, k_cache, v_cache, slot_pos, rows, slots, pos32, T,
        k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1), c2.stride(0), s2.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), slot_pos.stride(0), slot_pos.stride(1),
        rows.stride(0), rows.stride(1), slots.stride(0), slots.stride(1), pos32.stride(0), pos32.stride(1),
        float(eps), D=D, BLOCK_D=next_pow2(D), PLUS_ONE=bool(plus_one), V_NORM=bool(v_norm),
        num_warps=_warps(D), **pdl_flags(k3, short=True))


__all__ = ["head_norm_ref", "head_norm_triton", "write_kv_ref", "write_kv_triton"]
