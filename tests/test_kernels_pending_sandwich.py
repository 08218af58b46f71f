"""The q/k/v GEMV + epilogue on a pending PLE sandwich (`kernels.pending_sandwich`, `kernels.head_norm` with PEND)
under TRITON_INTERPRET=1.

Against the unfused composition (the sandwich's reference, then `linear_qkv_heads_ref`): q, the K/V cache and the
h' the epilogue writes; fp32 and fp16; split and unsplit GEMVs; q-only, k = v and v-norm layers; with and without
the layer scalar; (1 + w) norms. Row invariance (a position's results do not depend on M) and the fallback.
"""
from __future__ import annotations

from collections import namedtuple

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.qkv_heads as qh  # noqa: E402
import kernels.pending_sandwich as ps  # noqa: E402
from kernels.rmsnorm import post_norm_residual_pre_norm_ref  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)

EPS = 1e-6
Geometry = namedtuple("Geometry", "heads kv_heads head_dim hidden slots")
TINY = Geometry(4, 2, 16, 64, 10)
E4B = Geometry(8, 2, 256, 2560, 32)  # a sliding layer's heads; a 32-slot cache
# h': the sandwich's formula, its norm's sum in another order; q/k/v: their input rounds at other points
REL_H = {torch.float32: 4e-6, torch.float16: 2 ** -9}
REL_QKV = {torch.float32: 2e-5, torch.float16: 2 ** -6}


def _case(dtype, has_kv, k_eq_v, scalar, plus_one, B=2, T=3, seed=0, geo=TINY, w_scale=0.25):
    H_HEADS, HKV, D, K, S = geo
    g = torch.Generator().manual_seed(seed)
    n = H_HEADS * D + ((1 if k_eq_v else 2) * HKV * D if has_kv else 0)
    y = torch.randn(B, T, K, generator=g).to(dtype)
    res = (3 * torch.randn(B, T, K, generator=g)).to(dtype)
    w_post, w_next = (0.5 * torch.randn(K, generator=g)).to(dtype), (0.5 * torch.randn(K, generator=g)).to(dtype)
    sc = torch.tensor([0.7], dtype=dtype) if scalar else None
    w = (w_scale * torch.randn(n, K, generator=g)).to(dtype)
    qw, kw = (torch.randn(D, generator=g).to(dtype) for _ in range(2))
    pos = torch.arange(8, 8 + B * T).view(B, T)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]
    idx = (torch.arange(B)[:, None].expand(B, T), pos % S, pos.to(torch.int32))
    pending = ps.PendingSandwich(y, res, w_post, w_next, sc, EPS, plus_one, torch.empty_like(res))
    return pending, w, qw, kw if has_kv else None, cos, sin, idx


def _cache(B, dtype, geo):
    k = torch.full((B, geo.kv_heads, geo.slots + 1, geo.head_dim), float("nan"), dtype=dtype)
    return k, k.clone(), torch.full((B, geo.slots + 1), -1, dtype=torch.int32)


def _run(pending, w, qw, kw, cos, sin, idx, v_norm, k_eq_v, split, pend=True, geo=TINY):
    """(q, cache, h') by the pending path (split None: the heuristic's config) or the unfused reference."""
    H_HEADS, HKV, D = geo.heads, geo.kv_heads, geo.head_dim
    B = pending.y.shape[0]
    cache = _cache(B, pending.y.dtype, geo)
    kv = (*cache, *idx) if kw is not None else None
    if pend:
        q = qh.linear_qkv_heads_triton(pending, w, H_HEADS, HKV, D, qw, kw, cos, sin, kv, EPS, pending.plus_one,
                                       v_norm, k_eq_v, split_k=split,
                                       block_k=16 if split is not None else None)
        return q, cache, pending.h_out
    h, x = post_norm_residual_pre_norm_ref(pending.y, pending.residual, pending.w_post, pending.w_next, EPS,
                                           pending.plus_one, pending.scalar)
    q = qh.linear_qkv_heads_ref(x, w, H_HEADS, HKV, D, qw, kw, cos, sin, kv, EPS, pending.plus_one, v_norm, k_eq_v)
    return q, cache, h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("has_kv,k_eq_v,v_norm", [(True, False, True), (True, True, True), (False, False, False)],
                         ids=["kv-vnorm", "k-eq-v", "q-only"])
def test_matches_unfused_composition(dtype, split, has_kv, k_eq_v, v_norm):
    case = _case(dtype, has_kv, k_eq_v, scalar=True, plus_one=False, seed=split)
    q, cache, h = _run(*case, v_norm, k_eq_v, split)
    q_ref, cache_ref, h_ref = _run(*case, v_norm, k_eq_v, split, pend=False)
    _testutil.assert_close_scaled(h, h_ref, REL_H)
    _testutil.assert_close_scaled(q, q_ref, REL_QKV)
    if has_kv:
        real = slice(0, TINY.slots)
        for got, ref in zip(cache[:2], cache_ref[:2]):
            got, ref = got[:, :, real], ref[:, :, real]
            assert torch.equal(torch.isnan(got), torch.isnan(ref))
            _testutil.assert_close_scaled(got[~torch.isnan(ref)], ref[~torch.isnan(ref)], REL_QKV)
        assert torch.equal(cache[2], cache_ref[2])


@pytest.mark.parametrize("scalar,plus_one", [(False, False), (True, True)])
def test_norm_forms(scalar, plus_one):
    case = _case(torch.float32, True, False, scalar, plus_one, seed=5)
    q, cache, h = _run(*case, True, False, 2)
    q_ref, cache_ref, h_ref = _run(*case, True, False, 2, pend=False)
    _testutil.assert_close_scaled(h, h_ref, REL_H)
    _testutil.assert_close_scaled(q, q_ref, REL_QKV)


def test_path_reference_is_the_kernels_arithmetic():
    """`pending_input_ref`'s two rows and factors give the q/k/v projection the kernels compute (before rounding)."""
    pending, w, *_ = _case(torch.float32, True, False, True, False, seed=7)
    h_ref, a, coef = ps.pending_input_ref(pending)
    x_ref = post_norm_residual_pre_norm_ref(pending.y, pending.residual, pending.w_post, pending.w_next, EPS, False,
                                            pending.scalar)[1].reshape(-1, TINY.hidden)
    x_path = coef[:, :1] * a[:, 0] + coef[:, 1:] * a[:, 1]
    assert (x_path - x_ref).abs().max().item() <= 1e-5 * x_ref.abs().max().item()
    _testutil.assert_close_scaled(h_ref, post_norm_residual_pre_norm_ref(
        pending.y, pending.residual, pending.w_post, pending.w_next, EPS, False, pending.scalar)[0], REL_H)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_do_not_depend_on_M(dtype):
    pending, w, qw, kw, cos, sin, idx = _case(dtype, True, False, True, False, B=1, T=9, seed=9)
    q9, cache9, h9 = _run(pending, w, qw, kw, cos, sin, idx, True, False, 3)
    one = ps.PendingSandwich(pending.y[:, :1].clone(), pending.residual[:, :1].clone(), pending.w_post, pending.w_next,
                             pending.scalar, EPS, False, torch.empty(1, 1, TINY.hidden, dtype=dtype))
    idx1 = tuple(t[:, :1].contiguous() for t in idx)
    q1, cache1, h1 = _run(one, w, qw, kw, cos[:, :1].contiguous(), sin[:, :1].contiguous(), idx1, True, False, 3)
    assert torch.equal(q1, q9[:, :1]) and torch.equal(h1, h9[:, :1])
    slot = int(idx[1][0, 0])
    assert torch.equal(cache1[0][:, :, slot], cache9[0][:, :, slot])


def test_supports_and_fallback():
    pending, w, *_ = _case(torch.float32, True, False, True, False)
    assert ps.supports(pending, w)
    assert not ps.supports(pending, w[:, :32])
    h, x = ps.materialize_ref(pending)
    h_ref, x_ref = post_norm_residual_pre_norm_ref(pending.y, pending.residual, pending.w_post, pending.w_next, EPS,
                                                   False, pending.scalar)
    assert h is pending.h_out and torch.equal(h, h_ref) and torch.equal(x, x_ref)


def test_e4b_shapes_close_to_unfused_and_row_invariant():
    """E4B's shapes (hidden 2560; 8 q heads and 2 kv heads of 256; the heuristic's 5 splits), fp16: q, the cache and
    h' of a 9-position call match the unfused composition, and its position 0 equals a 1-position call bit for bit."""
    dt = torch.float16
    # weights of 0.02 keep the fp16 projection of 2560 terms well inside range
    pending, w, qw, kw, cos, sin, idx = _case(dt, True, False, True, False, B=1, T=9, seed=21, geo=E4B, w_scale=0.02)
    assert ps.gemv_config(pending, w)["SPLIT_K"] == 5
    q, cache, h = _run(pending, w, qw, kw, cos, sin, idx, True, False, None, geo=E4B)
    q_ref, cache_ref, h_ref = _run(pending, w, qw, kw, cos, sin, idx, True, False, None, pend=False, geo=E4B)
    _testutil.assert_close_scaled(h, h_ref, REL_H)
    _testutil.assert_close_scaled(q, q_ref, REL_QKV)
    one = ps.PendingSandwich(pending.y[:, :1].clone(), pending.residual[:, :1].clone(), pending.w_post,
                             pending.w_next, pending.scalar, EPS, False, torch.empty(1, 1, E4B.hidden, dtype=dt))
    q1, cache1, h1 = _run(one, w, qw, kw, cos[:, :1].contiguous(), sin[:, :1].contiguous(),
                          tuple(t[:, :1].contiguous() for t in idx), True, False, None, geo=E4B)
    assert torch.equal(q1, q[:, :1]) and torch.equal(h1, h[:, :1])
    slot = int(idx[1][0, 0])
    for got1, got, ref in zip(cache1[:2], cache[:2], cache_ref[:2]):  # k and v of position 0
        assert torch.equal(got1[:, :, slot], got[:, :, slot])
        _testutil.assert_close_scaled(got[:, :, slot], ref[:, :, slot], REL_QKV)
