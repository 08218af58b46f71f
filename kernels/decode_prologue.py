"""The decode / verify step's prologue (everything before layer 0) in two short kernels around the PLE GEMV.

Unfused, a batch-1 decode step starts with ~25 small kernels, most of them PyTorch-native (no PDL, 1.3-4 us
each on the critical path): the RoPE lookups (clamp + two gathers per table), the embedding gather and
scale, the PLE token gather, the PLE combine (scale, norm, mix), `arange` for the cache rows, the int32
positions, each cache geometry's slot formula (clamp, %, compare, fill, where) and layer 0's input norm.
Here:
  1. `decode_prologue_triton`, one program per stream position, reads only the token ids, the positions
     and weights/tables: h = embed[token] * embed_scale, x = rmsnorm(h) with layer 0's input norm, the
     int32 position, the cache row, the cos/sin rows of every RoPE table (positions clamped at 0) and the
     physical slot of every cache geometry (ring: clamp(p, 0) % slots, linear: clamp(p, 0), padding p < 0:
     the trash slot `slots`);
  2. (the PLE model projection GEMV, unchanged: the caller runs it on h);
  3. `ple_combine_gather_triton`, one program per (stream position, layer): the PLE token row gathered by
     token id from the PLE embedding and the combine (norm(ctx * ctx_scale) + tok * tok_scale) * 2^-0.5.

Rounding follows the unfused GPU path (row-invariant mode): h is embed * scale in fp32 rounded once (PyTorch's
bf16 tensor * python float); x is `kernels.rmsnorm`'s kernel (same tile, same `_rms_inv`/`_scale`, same warps,
so the same bits); the combine rounds ctx * ctx_scale to ctx's dtype (`ops._scaled`), the norm's output to
that dtype (`rmsnorm_triton`), then computes (n + tok * tok_scale) * 2^-0.5 in fp32 and rounds once, as the
torch.compile'd `ops._ple_mix` does. (The eager `ops.ple_combine.reference` also rounds tok * tok_scale and
the sum: bf16 noise.) Gathers and slots are exact.

Row invariance: one row (position) per program and a launch config from the widths alone, so a position's
bits never depend on how many positions share the call (verify of T positions == T decode steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ._common import HAS_TRITON, next_pow2, pdl_flags, tl, triton, use_triton
from .rmsnorm import SINGLE_TILE_MAX, rmsnorm_ref

MAX_TABLES = 2  # RoPE tables (sliding, full)
MAX_GEOMETRIES = 4  # distinct cache geometries (ring or linear, slot count); the engine has at most 2


@dataclass
class DecodePrologue:
    """The prologue's outputs for tokens/positions [B, T]: h, x [B, T, H] (model dtype); pos32 [B, T] int32;
    rows [B, T] int64 (the cache row of each position: b); rope[i] = (cos, sin) [B, T, 1, D_i] of table i;
    slots[g] [B, T] (positions' dtype), the physical slot of each position in geometry g."""
    h: torch.Tensor
    x: torch.Tensor
    pos32: torch.Tensor
    rows: torch.Tensor
    rope: list[tuple[torch.Tensor, torch.Tensor]]
    slots: list[torch.Tensor]


def supports(hidden: int, tables: int, geometries: int) -> bool:
    """Whether `decode_prologue_triton` takes these widths (the hidden row in one register tile)."""
    return hidden <= SINGLE_TILE_MAX and 1 <= tables <= MAX_TABLES and geometries <= MAX_GEOMETRIES


# --------------------------------------------------------------------------------------------
# References (CPU fallback and test oracle)
# --------------------------------------------------------------------------------------------
def slot_of_ref(positions: torch.Tensor, ring: bool, slots: int) -> torch.Tensor:
    """`engine.cache.LayerCache.slot_of` for a cache of `slots` logical slots (trash slot = slots)."""
    slot = positions.clamp(min=0) % slots if ring else positions.clamp(min=0)
    return torch.where(positions >= 0, slot, torch.full_like(slot, slots))


def decode_prologue_ref(tokens: torch.Tensor, positions: torch.Tensor, embed: torch.Tensor, embed_scale: float,
                        norm_weight: torch.Tensor, eps: float, plus_one: bool,
                        tables: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        geometries: Sequence[tuple[bool, int]]) -> DecodePrologue:
    """tokens/positions [B, T]; embed [V, H]; tables: (cos, sin) [max_pos, D] per RoPE table; geometries:
    (ring, slots) per cache geometry."""
    B, T = tokens.shape
    h = torch.nn.functional.embedding(tokens, embed) * embed_scale
    p = positions.clamp(min=0)
    return DecodePrologue(
        h=h, x=rmsnorm_ref(h, norm_weight, eps, plus_one), pos32=positions.to(torch.int32),
        rows=torch.arange(B, device=tokens.device)[:, None].expand(B, T),
        rope=[(cos[p].unsqueeze(2), sin[p].unsqueeze(2)) for cos, sin in tables],
        slots=[slot_of_ref(positions, ring, n) for ring, n in geometries])


def ple_combine_gather_ref(ctx: torch.Tensor, tokens: torch.Tensor, ple_embed: torch.Tensor, weight: torch.Tensor,
                           ctx_scale: float, tok_scale: float, eps: float) -> torch.Tensor:
    """ctx [B, T, L * P] (the PLE model projection), tokens [B, T], ple_embed [V, L * P], weight [P] ->
    [B, T, L, P] in the kernel's rounding order (module docstring)."""
    P = weight.shape[0]
    shape = (*tokens.shape, ctx.shape[-1] // P, P)
    tok = torch.nn.functional.embedding(tokens, ple_embed).reshape(shape)
    s = (ctx.reshape(shape) * ctx_scale).to(ctx.dtype)
    n = rmsnorm_ref(s, weight, eps, False)
    out_dtype = torch.promote_types(ctx.dtype, ple_embed.dtype)
    return ((n.float() + tok.float() * tok_scale) * (2.0 ** -0.5)).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._common import pdl_wait
    from .rmsnorm import _rms_inv, _scale

    @triton.jit
    def _copy_table_row(tab_ptr, out_ptr, p, r64, s_tab, D: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[r] = tab[p]: one cos or sin row of D values."""
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        tl.store(out_ptr + r64 * D + d, tl.load(tab_ptr + p * s_tab + d, mask=ok), mask=ok)

    @triton.jit
    def _store_slot(slots_ptr, g, R, r64, pos, n_slots, RING: tl.constexpr):
        """slots[g, r] = the physical slot of position `pos` (int64) in a cache of n_slots logical slots."""
        c = tl.maximum(pos, 0)
        if RING:
            c = c % n_slots
        slot = tl.where(pos >= 0, c, n_slots)
        tl.store(slots_ptr + g * R + r64, slot.to(slots_ptr.dtype.element_ty))

    @triton.jit
    def _prologue_kernel(tok_ptr, pos_ptr, emb_ptr, nw_ptr, h_ptr, x_ptr, pos32_ptr, rows_ptr,
                         cos0_ptr, sin0_ptr, ctab0_ptr, stab0_ptr, cos1_ptr, sin1_ptr, ctab1_ptr, stab1_ptr,
                         slots_ptr, R, T, N, stb, stt, spb, spt, s_emb, s_tab0, s_tab1,
                         n_slots0, n_slots1, n_slots2, n_slots3, embed_scale, eps,
                         PLUS_ONE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_TABLES: tl.constexpr,
                         D0: tl.constexpr, BLOCK_D0: tl.constexpr, D1: tl.constexpr, BLOCK_D1: tl.constexpr,
                         NUM_GEOM: tl.constexpr, RING0: tl.constexpr, RING1: tl.constexpr, RING2: tl.constexpr,
                         RING3: tl.constexpr, PDL: tl.constexpr):
        """Program r: stream position r = b * T + t. Outputs are contiguous rows; slots [NUM_GEOM, R]."""
        r = tl.program_id(0)
        r64 = r.to(tl.int64)
        b = r // T
        t = r % T
        cols = tl.arange(0, BLOCK_N)
        c_ok = cols < N
        w = _scale(nw_ptr, cols, c_ok, True, PLUS_ONE)  # a weight: before the wait
        # tokens/positions come from a host copy (or a kernel before the step): read after the wait
        pdl_wait(PDL)
        tok = tl.load(tok_ptr + b * stb + t * stt).to(tl.int64)
        pos = tl.load(pos_ptr + b * spb + t * spt).to(tl.int64)
        p = tl.maximum(pos, 0)
        e = tl.load(emb_ptr + tok * s_emb + cols[None, :], mask=c_ok[None, :], other=0.0).to(tl.float32)
        h = (e * embed_scale).to(h_ptr.dtype.element_ty)  # one rounding, as bf16 tensor * python float
        tl.store(h_ptr + r64 * N + cols[None, :], h, mask=c_ok[None, :])
        hf = h.to(tl.float32)
        inv = _rms_inv(hf, N, eps)  # `kernels.rmsnorm._rmsnorm_kernel`'s single-tile arithmetic
        x = hf * inv[:, None] * w
        tl.store(x_ptr + r64 * N + cols[None, :], x.to(x_ptr.dtype.element_ty), mask=c_ok[None, :])
        tl.store(pos32_ptr + r64, pos.to(tl.int32))
        tl.store(rows_ptr + r64, b.to(tl.int64))
        _copy_table_row(ctab0_ptr, cos0_ptr, p, r64, s_tab0, D0, BLOCK_D0)
        _copy_table_row(stab0_ptr, sin0_ptr, p, r64, s_tab0, D0, BLOCK_D0)
        if NUM_TABLES > 1:
            _copy_table_row(ctab1_ptr, cos1_ptr, p, r64, s_tab1, D1, BLOCK_D1)
            _copy_table_row(stab1_ptr, sin1_ptr, p, r64, s_tab1, D1, BLOCK_D1)
        if NUM_GEOM > 0:
            _store_slot(slots_ptr, 0, R, r64, pos, n_slots0, RING0)
        if NUM_GEOM > 1:
            _store_slot(slots_ptr, 1, R, r64, pos, n_slots1, RING1)
        if NUM_GEOM > 2:
            _store_slot(slots_ptr, 2, R, r64, pos, n_slots2, RING2)
        if NUM_GEOM > 3:
            _store_slot(slots_ptr, 3, R, r64, pos, n_slots3, RING3)

    @triton.jit
    def _ple_combine_kernel(ctx_ptr, tok_ptr, ple_ptr, w_ptr, out_ptr, T, P, s_ctx, stb, stt, s_ple, s_out,
                            ctx_scale, tok_scale, eps, BLOCK_P: tl.constexpr, EARLY_TOKENS: tl.constexpr,
                            PDL: tl.constexpr):
        """Program (r, l): stream position r = b * T + t, layer l; out rows [R, L * P] s_out apart.
        EARLY_TOKENS: the token id and the PLE token row are read before the PDL wait. Only for callers whose
        token ids were already read by a kernel that waited before the one this kernel waits on (the step:
        the prologue kernel, then the PLE GEMV, which triggers its dependents only after its own wait, so
        whatever wrote the tokens has completed and flushed before this kernel can launch)."""
        r = tl.program_id(0)
        l = tl.program_id(1)
        r64 = r.to(tl.int64)
        cols = tl.arange(0, BLOCK_P)
        c_ok = cols < P
        w = _scale(w_ptr, cols, c_ok, True, False)
        tok_off = tok_ptr + (r // T) * stb + (r % T) * stt
        if EARLY_TOKENS:
            tok = tl.load(tok_off).to(tl.int64)
            tk = tl.load(ple_ptr + tok * s_ple + l * P + cols[None, :], mask=c_ok[None, :], other=0.0)
            pdl_wait(PDL)
        else:
            pdl_wait(PDL)
            tok = tl.load(tok_off).to(tl.int64)
            tk = tl.load(ple_ptr + tok * s_ple + l * P + cols[None, :], mask=c_ok[None, :], other=0.0)
        ctx = tl.load(ctx_ptr + r64 * s_ctx + l * P + cols[None, :], mask=c_ok[None, :], other=0.0)
        s = (ctx.to(tl.float32) * ctx_scale).to(ctx_ptr.dtype.element_ty).to(tl.float32)  # ops._scaled
        inv = _rms_inv(s, P, eps)
        n = (s * inv[:, None] * w).to(ctx_ptr.dtype.element_ty).to(tl.float32)  # the norm's output rounding
        out = (n + tk.to(tl.float32) * tok_scale) * 0.7071067811865476  # ops._ple_mix: fp32, one rounding
        tl.store(out_ptr + r64 * s_out + l * P + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=c_ok[None, :])


def _warps(width: int) -> int:
    """`kernels.rmsnorm._config`'s num_warps for one row of `width` (row-invariant mode)."""
    return max(1, min(8, next_pow2(width) // 512))


def decode_prologue_triton(tokens: torch.Tensor, positions: torch.Tensor, embed: torch.Tensor, embed_scale: float,
                           norm_weight: torch.Tensor, eps: float, plus_one: bool,
                           tables: Sequence[tuple[torch.Tensor, torch.Tensor]],
                           geometries: Sequence[tuple[bool, int]]) -> DecodePrologue:
    """`decode_prologue_ref` in one launch of B * T programs. tables' cos and sin [max_pos, D] share a shape
    and have unit stride along D; callers keep positions below max_pos (`engine.rope.RopeTable.ensure`)."""
    if tokens.shape != positions.shape or tokens.dim() != 2:
        raise ValueError(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must be [B, T]")
    B, T = tokens.shape
    R, N = B * T, embed.shape[1]
    if not supports(N, len(tables), len(geometries)):
        raise ValueError(f"hidden {N}, {len(tables)} RoPE tables, {len(geometries)} cache geometries: "
                         f"at most {SINGLE_TILE_MAX}, {MAX_TABLES}, {MAX_GEOMETRIES}")
    for cos, sin in tables:
        if cos.shape != sin.shape or cos.stride() != sin.stride() or cos.stride(-1) != 1:
            raise ValueError("each table's cos and sin must share a shape and strides, unit stride along D")
    dev, dt = tokens.device, embed.dtype
    h = torch.empty(B, T, N, dtype=dt, device=dev)
    x = torch.empty(B, T, N, dtype=dt, device=dev)
    pos32 = torch.empty(B, T, dtype=torch.int32, device=dev)
    rows = torch.empty(B, T, dtype=torch.int64, device=dev)
    rope = [(torch.empty(B, T, 1, c.shape[1], dtype=c.dtype, device=dev),
             torch.empty(B, T, 1, s.shape[1], dtype=s.dtype, device=dev)) for c, s in tables]
    slots = torch.empty(max(1, len(geometries)), B, T, dtype=positions.dtype, device=dev)
    out = DecodePrologue(h, x, pos32, rows, rope, [slots[g] for g in range(len(geometries))])
    if R == 0:
        return out
    t1 = tables[1] if len(tables) > 1 else tables[0]
    r1 = rope[1] if len(rope) > 1 else rope[0]
    geo = list(geometries) + [(False, 0)] * (MAX_GEOMETRIES - len(geometries))
    D0, D1 = tables[0][0].shape[1], t1[0].shape[1]
    _prologue_kernel[(R,)](
        tokens, positions, embed, norm_weight.contiguous(), h, x, pos32, rows,
        rope[0][0], rope[0][1], tables[0][0], tables[0][1], r1[0], r1[1], t1[0], t1[1],
        slots, R, T, N, tokens.stride(0), tokens.stride(1), positions.stride(0), positions.stride(1),
        embed.stride(0), tables[0][0].stride(0), t1[0].stride(0), *(int(n) for _, n in geo),
        float(embed_scale), float(eps),
        PLUS_ONE=bool(plus_one), BLOCK_N=next_pow2(N), NUM_TABLES=len(tables), D0=D0, BLOCK_D0=next_pow2(D0),
        D1=D1, BLOCK_D1=next_pow2(D1), NUM_GEOM=len(geometries), RING0=bool(geo[0][0]), RING1=bool(geo[1][0]),
        RING2=bool(geo[2][0]), RING3=bool(geo[3][0]), num_warps=_warps(N), **pdl_flags(tokens, short=True))
    return out


def ple_combine_gather_triton(ctx: torch.Tensor, tokens: torch.Tensor, ple_embed: torch.Tensor, weight: torch.Tensor,
                              ctx_scale: float, tok_scale: float, eps: float, tokens_settled: bool = False
                              ) -> torch.Tensor:
    """`ple_combine_gather_ref` in one launch of (B * T, L) programs. `tokens_settled`: the token ids were
    read by an earlier kernel of the PDL chain that waited (see `_ple_combine_kernel`'s EARLY_TOKENS)."""
    B, T = tokens.shape
    P = weight.shape[0]
    LP = ctx.shape[-1]
    if LP % P or ple_embed.shape[-1] != LP or ple_embed.stride(-1) != 1:
        raise ValueError(f"ctx [..., {LP}] and ple_embed {tuple(ple_embed.shape)} must be [.., L * {P}]")
    ctx2 = ctx.reshape(B * T, LP)
    if ctx2.stride(-1) != 1:
        ctx2 = ctx2.contiguous()
    out = torch.empty(B, T, LP // P, P, dtype=torch.promote_types(ctx.dtype, ple_embed.dtype), device=ctx.device)
    if B * T == 0 or LP == 0:
        return out
    _ple_combine_kernel[(B * T, LP // P)](
        ctx2, tokens, ple_embed, weight.contiguous(), out, T, P, ctx2.stride(0), tokens.stride(0), tokens.stride(1),
        ple_embed.stride(0), LP, float(ctx_scale), float(tok_scale), float(eps), BLOCK_P=next_pow2(P),
        EARLY_TOKENS=bool(tokens_settled), num_warps=_warps(P), **pdl_flags(ctx2, short=True))
    return out


def decode_prologue(tokens: torch.Tensor, positions: torch.Tensor, embed: torch.Tensor, embed_scale: float,
                    norm_weight: torch.Tensor, eps: float, plus_one: bool,
                    tables: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    geometries: Sequence[tuple[bool, int]]) -> DecodePrologue:
    """Triton on CUDA tensors (widths permitting), the reference elsewhere."""
    if use_triton(tokens) and supports(embed.shape[1], len(tables), len(geometries)):
        return decode_prologue_triton(tokens, positions, embed, embed_scale, norm_weight, eps, plus_one, tables,
                                      geometries)
    return decode_prologue_ref(tokens, positions, embed, embed_scale, norm_weight, eps, plus_one, tables, geometries)


def ple_combine_gather(ctx: torch.Tensor, tokens: torch.Tensor, ple_embed: torch.Tensor, weight: torch.Tensor,
                       ctx_scale: float, tok_scale: float, eps: float) -> torch.Tensor:
    """Triton on CUDA tensors, the reference elsewhere."""
    if use_triton(ctx):
        return ple_combine_gather_triton(ctx, tokens, ple_embed, weight, ctx_scale, tok_scale, eps)
    return ple_combine_gather_ref(ctx, tokens, ple_embed, weight, ctx_scale, tok_scale, eps)
