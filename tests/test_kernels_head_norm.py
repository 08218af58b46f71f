"""Per-head RMSNorm (+ RoPE) and the fused K/V cache write, under TRITON_INTERPRET=1.

The references are `engine.ops`' own functions (norm_rope, scale_free_norm, write_kv). fp32 must
match to ~1e-6. In fp16 the reference rounds after every RoPE multiply and add while the kernel
rounds once (as the torch.compile'd path does), so fp16 is held to a few ulps.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import engine.ops as ops  # noqa: E402
import kernels.head_norm as hn  # noqa: E402
import kernels.qkv_heads as qh  # noqa: E402


_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)


EPS = 1e-6


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    _testutil.assert_close_scaled(out, ref, {torch.float32: 4e-6, torch.float16: 2 ** -8})


def qkv_slices(B, T, H, Hkv, D, dtype, seed):
    """q, k, v as the engine gets them: strided views into one fused QKV output."""
    g = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(B, T, (H + 2 * Hkv) * D, generator=g)).to(dtype)
    q = qkv[..., :H * D].view(B, T, H, D)
    k = qkv[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D)
    v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
    return q, k, v


def rope_tables(B, T, D, dtype, seed, start=0):
    pos = torch.arange(start, start + B * T, dtype=torch.float32).view(B, T)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    ang = pos[..., None] * inv
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [16, 32, 48])
@pytest.mark.parametrize("plus_one", [False, True])
def test_norm_rope_matches_engine_reference(dtype, D, plus_one):
    q, _, _ = qkv_slices(2, 3, 4, 2, D, dtype, seed=D)
    w = torch.randn(D, generator=torch.Generator().manual_seed(1)).to(dtype)
    cos, sin = rope_tables(2, 3, D, dtype, seed=2, start=5)
    assert_close(hn.head_norm_triton(q, w, EPS, plus_one, cos, sin),
                 ops.norm_rope.reference(q, w, cos, sin, EPS, plus_one))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_norm_without_rope_and_scale_free(dtype):
    _, k, v = qkv_slices(2, 4, 4, 2, 32, dtype, seed=3)
    w = torch.randn(32, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert_close(hn.head_norm_triton(k, w, EPS, True), hn.head_norm_ref(k, w, EPS, True))
    assert_close(hn.head_norm_triton(v, None, EPS, False), ops.scale_free_norm.reference(v, EPS))


def test_broadcast_cos_sin_and_errors():
    q, _, _ = qkv_slices(2, 3, 4, 2, 16, torch.float32, seed=5)
    w = torch.randn(16, generator=torch.Generator().manual_seed(6))
    cos, sin = rope_tables(1, 3, 16, torch.float32, seed=7)  # one stream's table for both streams
    assert_close(hn.head_norm_triton(q, w, EPS, False, cos, sin), hn.head_norm_ref(q, w, EPS, False, cos, sin))
    with pytest.raises(ValueError):
        hn.head_norm_triton(q, w, EPS, False, cos, None)


def make_cache(B, Hkv, S, D, dtype):
    k = torch.full((B, Hkv, S + 1, D), float("nan"), dtype=dtype)  # never-written memory
    return k, k.clone(), torch.full((B, S + 1), -1, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v_norm", [True, False])
@pytest.mark.parametrize("plus_one", [False, True])
def test_write_kv_matches_engine_reference(dtype, v_norm, plus_one):
    # ring of 10 slots (positions wrap), a padding position going to the trash slot (index S)
    B, T, Hkv, D, S = 2, 3, 2, 32, 10
    _, k, v = qkv_slices(B, T, 4, Hkv, D, dtype, seed=8)
    w = torch.randn(D, generator=torch.Generator().manual_seed(9)).to(dtype)
    cos, sin = rope_tables(B, T, D, dtype, seed=10, start=8)
    positions = torch.tensor([[8, 9, 10], [11, 12, -1]])
    slots = torch.where(positions >= 0, positions.clamp(min=0) % S, S)
    rows = torch.arange(B)[:, None].expand(B, T)  # stride 0 along T, as the engine passes it
    pos32 = positions.to(torch.int32)
    want, got = make_cache(B, Hkv, S, D, dtype), make_cache(B, Hkv, S, D, dtype)
    ops.write_kv.reference(k, v, w, cos, sin, *want, rows, slots, pos32, EPS, plus_one, v_norm)
    hn.write_kv_triton(k, v, w, cos, sin, *got, rows, slots, pos32, EPS, plus_one, v_norm)
    assert torch.equal(got[2], want[2])
    real = slice(0, S)  # the trash slot takes two padding writes in the same launch: any one wins
    for g, r in zip(got[:2], want[:2]):
        assert torch.equal(torch.isnan(g[:, :, real]), torch.isnan(r[:, :, real]))  # same slots written
        written = ~torch.isnan(r[:, :, real])
        assert_close(g[:, :, real][written], r[:, :, real][written])


def test_write_kv_k_eq_v_and_row_mapping():
    # K = V (the same raw tensor, 26B/31B global layers), and streams written to other cache rows
    B, T, Hkv, D, S = 2, 2, 1, 16, 6
    _, k, _ = qkv_slices(B, T, 2, Hkv, D, torch.float32, seed=11)
    w = torch.randn(D, generator=torch.Generator().manual_seed(12))
    cos, sin = rope_tables(B, T, D, torch.float32, seed=13)
    rows = torch.tensor([[2, 2], [0, 0]])
    positions = torch.tensor([[3, 4], [0, 1]])
    want, got = make_cache(3, Hkv, S, D, torch.float32), make_cache(3, Hkv, S, D, torch.float32)
    pos32 = positions.to(torch.int32)  # linear cache: slot = position
    ops.write_kv.reference(k, k, w, cos, sin, *want, rows, positions, pos32, EPS, False, True)
    hn.write_kv_triton(k, k, w, cos, sin, *got, rows, positions, pos32, EPS, False, True)
    assert torch.equal(got[2], want[2])
    for g, r in zip(got[:2], want[:2]):
        written = ~torch.isnan(r)
        assert torch.equal(written, ~torch.isnan(g))
        assert_close(g[written], r[written])


# ---- the fused q/k/v epilogue: projection partials -> q heads and the cache, one launch ----------------------
def _qkv_case(dtype, has_kv, k_eq_v, seed, B=2, T=3, H=4, Hkv=2, D=16, K=64, S=10):
    g = torch.Generator().manual_seed(seed)
    n = H * D + ((1 if k_eq_v else 2) * Hkv * D if has_kv else 0)
    x = torch.randn(B, T, K, generator=g).to(dtype)
    w = (torch.randn(n, K, generator=g) / 4).to(dtype)
    qw, kw = (torch.randn(D, generator=g).to(dtype) for _ in range(2))
    cos, sin = rope_tables(B, T, D, dtype, seed=seed, start=8)
    positions = torch.tensor([[8, 9, 10], [11, 12, -1]])[:B, :T]
    slots = torch.where(positions >= 0, positions.clamp(min=0) % S, S)  # a ring, padding to the trash slot
    rows = torch.arange(B)[:, None].expand(B, T)
    return x, w, qw, kw if has_kv else None, cos, sin, (rows, slots, positions.to(torch.int32)), (B, Hkv, S, D)


def _kv(cache, idx):
    return (*cache, *idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("has_kv,k_eq_v,v_norm", [(True, False, True), (True, False, False), (True, True, True),
                                                  (False, False, False)],
                         ids=["kv-vnorm", "kv", "k-eq-v", "q-only"])
def test_fused_qkv_heads_matches_reference_and_unfused_kernels(dtype, split, has_kv, k_eq_v, v_norm):
    x, w, qw, kw, cos, sin, idx, (B, Hkv, S, D) = _qkv_case(dtype, has_kv, k_eq_v, seed=20 + split)
    H = 4
    caches = {name: make_cache(B, Hkv, S, D, dtype) for name in ("ref", "fused", "unfused")}
    q_ref = qh.linear_qkv_heads_ref(x, w, H, Hkv, D, qw, kw, cos, sin, _kv(caches["ref"], idx), EPS, False, v_norm,
                                    k_eq_v)
    q = qh.linear_qkv_heads_triton(x, w, H, Hkv, D, qw, kw, cos, sin, _kv(caches["fused"], idx), EPS, False, v_norm,
                                   k_eq_v, split_k=split, block_k=16)
    # the unfused kernel path the engine ran before: GEMV (+ split-K reduction), q norm + RoPE, K/V write
    from kernels.gemv import linear_small_m_triton

    y = linear_small_m_triton(x.reshape(B * 3, -1), w, split_k=split, block_k=16).view(B, 3, -1)
    q_unf = hn.head_norm_triton(y[..., :H * D].view(B, 3, H, D), qw, EPS, False, cos, sin)
    if has_kv:
        v0 = H * D if k_eq_v else (H + Hkv) * D
        hn.write_kv_triton(y[..., H * D:(H + Hkv) * D].view(B, 3, Hkv, D), y[..., v0:v0 + Hkv * D].view(B, 3, Hkv, D),
                           kw, cos, sin, *caches["unfused"], *idx, EPS, False, v_norm)
    assert torch.equal(q, q_unf)  # same sums in the same order, same roundings: bit for bit
    assert_close(q, q_ref)
    if not has_kv:  # a layer reading another layer's cache writes none
        assert all(torch.isnan(c).all() for c in caches["fused"][:2]) and (caches["fused"][2] == -1).all()
        return
    real = slice(0, S)  # the trash slot takes two padding writes in one launch: any one wins
    for got, unf, ref in zip(caches["fused"], caches["unfused"], caches["ref"]):
        if got.dim() == 4:
            got, unf, ref = got[:, :, real], unf[:, :, real], ref[:, :, real]
            assert torch.equal(torch.isnan(got), torch.isnan(ref))
            written = ~torch.isnan(ref)
            assert torch.equal(got[written], unf[written])
            assert_close(got[written], ref[written])
        else:
            assert torch.equal(got, ref)


def test_fused_qkv_heads_rejects_a_mismatched_weight():
    x, w, qw, kw, cos, sin, idx, (B, Hkv, S, D) = _qkv_case(torch.float32, True, False, seed=3)
    with pytest.raises(ValueError, match="weight has"):
        qh.linear_qkv_heads_triton(x, w[:-1], 4, Hkv, D, qw, kw, cos, sin, _kv(make_cache(B, Hkv, S, D,
                                   torch.float32), idx), EPS, False, True, False)
