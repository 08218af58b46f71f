"""The o projection merging decode attention's splits itself (`kernels.gemv_merged_input`), TRITON_INTERPRET=1.

Bitwise against the two-launch path it replaces (stage 2, then the o projection + split-K sandwich), close to
the reference, M = 1 and M > 1, K ranges that cut heads, rows and splits that saw no key; row invariance; the
deferred attention itself (stage 1 alone, merged later) bitwise the one-call kernel.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.decode_attention as da  # noqa: E402
import kernels.gemv as gv  # noqa: E402
import kernels.gemv_merged_input as gm  # noqa: E402
import kernels.splitk_norm as sn  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)

REL = {torch.float32: 4e-6, torch.float16: 2 ** -9}
EPS = 1e-6


def rand(shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def attention_case(B, T, Hq, Hkv, D, S, dtype, filled, window=0):
    """q, caches and positions: the last T positions of a stream that has written `filled` slots (the rest
    empty), so with small splits some splits see no key at all."""
    q = rand((B, T, Hq, D), dtype, 1)
    k, v = rand((B, Hkv, S, D), dtype, 2), rand((B, Hkv, S, D), dtype, 3)
    slot_pos = torch.full((B, S), -1, dtype=torch.int32)
    slot_pos[:, :filled] = torch.arange(filled, dtype=torch.int32)
    q_pos = (filled - T + torch.arange(T, dtype=torch.int32))[None].expand(B, T).contiguous()
    return q, k, v, slot_pos, q_pos, window


def deferred(case, splits):
    q, k, v, sp, qp, window = case
    return da.decode_attention_triton(q, k, v, sp, qp, window, 0.125, num_splits=splits, block_n=16,
                                      defer_merge_max_splits=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deferred_attention_is_stage_one_and_merges_bitwise(dtype):
    case = attention_case(2, 3, 4, 2, 32, 96, dtype, filled=40)
    split = deferred(case, 6)
    assert isinstance(split, da.SplitAttention) and split.num_splits == 6
    assert bool(torch.isinf(split.lse).any())  # splits past slot 40 saw no key
    q, k, v, sp, qp, window = case
    want = da.decode_attention_triton(q, k, v, sp, qp, window, 0.125, num_splits=6, block_n=16)
    assert torch.equal(split.merged(), want)
    _testutil.assert_close_scaled(want, da.decode_attention_ref(q, k, v, sp, qp, window, 0.125), REL)
    # past the limit, or with one split, the merged output comes back as before
    assert torch.equal(da.decode_attention_triton(q, k, v, sp, qp, window, 0.125, num_splits=6, block_n=16,
                                                  defer_merge_max_splits=5), want)
    one = da.decode_attention_triton(q, k, v, sp, qp, window, 0.125, num_splits=1, block_n=16,
                                     defer_merge_max_splits=64)
    assert isinstance(one, torch.Tensor)


# (B, T, Hq, D, N, GEMV split): the heuristic's split (few outputs over a long K, as E4B's o_proj); a forced
# split whose K range (3 * 16 = 48 columns) cuts heads of 32 in the middle; no split at all
CASES = [(1, 1, 8, 64, 40, None), (1, 3, 4, 32, 24, 3), (2, 1, 2, 32, 20, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,Hq,D,N,gemv_split", CASES)
def test_sandwich_bitwise_two_launch_path(dtype, B, T, Hq, D, N, gemv_split, monkeypatch):
    if gemv_split == 3:  # K tiles of 16 so that a split's 48 columns end inside a head
        orig = gv.gemv_config
        monkeypatch.setattr(gv, "gemv_config", lambda *a: {**orig(*a), "BLOCK_K": 16})
    case = attention_case(B, T, Hq, 2, D, 64, dtype, filled=37)
    split = deferred(case, 4)
    merged = split.merged().reshape(B * T, Hq * D)
    w = rand((N, Hq * D), dtype, 4, 0.1)
    residual, w_post, w_next = rand((B, T, N), dtype, 5), rand((N,), dtype, 6), rand((N,), dtype, 7)
    scalar = torch.tensor([0.75], dtype=dtype)
    got = gm.merged_sandwich_triton(split, w, residual, w_post, w_next, scalar, EPS, False, split_k=gemv_split)
    want = sn.linear_sandwich_triton(merged, w, residual, w_post, w_next, scalar, EPS, False, split_k=gemv_split)
    if gemv_split != 1:
        assert gv.resolve_config(merged, w, gemv_split)["SPLIT_K"] > 1  # the split-K sandwich really ran
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    out, _ = gm.merged_linear_launch(split, w, split_k=1)
    _testutil.assert_close_scaled(out, gm.merged_linear_ref(split, w), REL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_do_not_depend_on_M(dtype, monkeypatch):
    import kernels.invariance as invariance

    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    monkeypatch.setattr(gv, "BATCH_INVARIANT", None)
    q, k, v, sp, qp, window = attention_case(1, 9, 4, 2, 32, 64, dtype, filled=30)
    w = rand((40, 128), dtype, 4, 0.1)
    residual, w_post, w_next = rand((1, 9, 40), dtype, 5), rand((40,), dtype, 6), rand((40,), dtype, 7)
    qp1 = qp[:, :1].contiguous()
    sp1 = torch.where(sp > qp1, -1, sp)  # the decode step's cache holds no position past its query
    wide = gm.merged_sandwich_triton(deferred((q, k, v, sp, qp, window), 4), w, residual, w_post, w_next, None,
                                     EPS, True)
    one = gm.merged_sandwich_triton(deferred((q[:, :1].contiguous(), k, v, sp1, qp1, window), 4), w,
                                    residual[:, :1].contiguous(), w_post, w_next, None, EPS, True)
    for a, b in zip(one, wide):
        assert torch.equal(a, b[:, :1])


def test_clear_errors():
    split = deferred(attention_case(1, 1, 4, 2, 32, 64, torch.float32, filled=30), 4)
    with pytest.raises(ValueError, match="need w"):
        gm.merged_linear_launch(split, rand((8, 64), torch.float32, 1))
    with pytest.raises(ValueError, match="residual"):
        gm.merged_sandwich_triton(split, rand((8, 128), torch.float32, 1), rand((1, 1, 9), torch.float32, 2),
                                  None, None, None, EPS, False)
