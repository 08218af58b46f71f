"""GEMV + split-K reduce + residual add + RMSNorm(s) (`kernels.splitk_norm`) under TRITON_INTERPRET=1.

Against the pure-PyTorch reference (fp32 ~1e-6, fp16 ~1 ulp) and against the unfused Triton path
(GEMV with its own reduce kernel, then the sandwich kernel), which it must equal bit for bit here: the
same partial sums in the same order and the same norm code. Both Gemma norm flavours (w and 1 + w),
the layer scalar, the add-only variant, forced and heuristic split-K, the no-split and wide-row
fallbacks, an fp32 residual with fp16 activations, and row invariance (M = 1 vs wider calls).
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.gemv as gv  # noqa: E402
import kernels.invariance as invariance  # noqa: E402
import kernels.rmsnorm as rn  # noqa: E402
import kernels.splitk_norm as sn  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)

EPS = 1e-6
REL = {torch.float32: 4e-6, torch.float16: 2 ** -10}


@pytest.fixture(autouse=True)
def _switch_on(monkeypatch):
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    monkeypatch.setattr(gv, "BATCH_INVARIANT", None)


def rand(shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def operands(M, N, K, dtype, seed, res_dtype=None):
    return (rand((M, K), dtype, seed), rand((N, K), dtype, seed + 1, 0.1),
            rand((M, N), res_dtype or dtype, seed + 2, 10),
            rand((N,), dtype, seed + 3), (1 + rand((N,), torch.float32, seed + 4, 0.1)).to(dtype),
            torch.tensor([0.6]).to(dtype))


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    _testutil.assert_close_scaled(out, ref, REL)


def unfused(x, w, r, w_post, w_next, scalar, plus_one, **kw):
    y0 = gv.linear_small_m_triton(x, w, **kw)
    return (*rn.post_norm_residual_pre_norm_triton(y0, r, w_post, w_next, EPS, plus_one, scalar=scalar),
            rn.residual_rmsnorm_triton(y0, r, w_post, EPS, plus_one))


# (N, K, split_k, block_k): forced split with a ragged last tile; the heuristic's split (N / BLOCK_N
# programs too few, as o_proj / down at E4B); no split (as the PLE projection): the fallback
CASES = [(96, 300, 3, 32), (64, 1024, None, None), (100, 200, None, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("N,K,split_k,block_k", CASES)
@pytest.mark.parametrize("plus_one", [False, True])
def test_matches_reference_and_unfused_bitwise(dtype, M, N, K, split_k, block_k, plus_one):
    x, w, r, w1, w2, scalar = operands(M, N, K, dtype, seed=N + M)
    kw = dict(split_k=split_k, block_k=block_k)
    want_h, want_y, want_a = unfused(x, w, r, w1, w2, scalar, plus_one, **kw)
    h, y = sn.linear_sandwich_triton(x, w, r, w1, w2, scalar, EPS, plus_one, **kw)
    a = sn.linear_add_norm_triton(x, w, r, w1, EPS, plus_one, **kw)
    assert torch.equal(h, want_h) and torch.equal(y, want_y) and torch.equal(a, want_a)
    hr, yr = sn.linear_sandwich_ref(x, w, r, w1, w2, scalar, EPS, plus_one)
    assert_close(h, hr)
    assert_close(y, yr)
    assert_close(a, sn.linear_add_norm_ref(x, w, r, w1, EPS, plus_one))


def test_heuristic_splits_where_the_tests_expect():
    assert gv.gemv_config(1, 64, 1024, 4, 132)["SPLIT_K"] > 1
    assert gv.gemv_config(1, 100, 200, 4, 132)["SPLIT_K"] == 1
    # E4B: o_proj (2560 x 2048/4096) and down (2560 x 10240) split -> fused; PLE proj (K = 256) does not
    for K in (2048, 4096, 10240):
        assert gv.gemv_config(1, 2560, K, 2, 132)["SPLIT_K"] > 1
    assert gv.gemv_config(1, 2560, 256, 2, 132)["SPLIT_K"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_scalar_no_weights_and_residual_dims(dtype):
    """Without the layer scalar, with a scale-free post-norm, and a [B, T, N] residual (the engine's)."""
    x, w, r, w1, w2, _ = operands(6, 96, 300, dtype, seed=3)
    r3 = r.view(2, 3, 96)
    for w_post, w_next in ((w1, w2), (None, w2), (w1, None)):
        h, y = sn.linear_sandwich_triton(x, w, r3, w_post, w_next, None, EPS, False, split_k=3, block_k=32)
        hr, yr = sn.linear_sandwich_ref(x, w, r3, w_post, w_next, None, EPS, False)
        assert h.shape == y.shape == r3.shape
        assert_close(h, hr)
        assert_close(y, yr)


def test_wide_row_fallback(monkeypatch):
    """Rows wider than one register tile go the unfused way (GEMV + reduce, then the chunked norm)."""
    monkeypatch.setattr(rn, "SINGLE_TILE_MAX", 64)
    x, w, r, w1, w2, scalar = operands(3, 96, 300, torch.float32, seed=4)
    h, y = sn.linear_sandwich_triton(x, w, r, w1, w2, scalar, EPS, True, split_k=3, block_k=32)
    want_h, want_y, _ = unfused(x, w, r, w1, w2, scalar, True, split_k=3, block_k=32)
    assert torch.equal(h, want_h) and torch.equal(y, want_y)


def test_fp32_residual_with_fp16_activations():
    """h in the residual's dtype; the GEMV output rounded to fp16 before the norm, as unfused."""
    x, w, r, w1, w2, scalar = operands(4, 96, 300, torch.float16, seed=5, res_dtype=torch.float32)
    h, y = sn.linear_sandwich_triton(x, w, r, w1, w2, scalar, EPS, False, split_k=3, block_k=32)
    hr, yr = sn.linear_sandwich_ref(x, w, r, w1, w2, scalar, EPS, False)
    assert h.dtype == y.dtype == torch.float32
    assert (h - hr).abs().max().item() <= 1e-4 and (y - yr).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,K,split_k,block_k", CASES[:2])
def test_rows_bitwise_whatever_m(dtype, N, K, split_k, block_k):
    x, w, r, w1, w2, scalar = operands(16, N, K, dtype, seed=6)
    kw = dict(split_k=split_k, block_k=block_k)
    full = (*sn.linear_sandwich_triton(x, w, r, w1, w2, scalar, EPS, False, **kw),
            sn.linear_add_norm_triton(x, w, r, w1, EPS, True, **kw))
    for M in (1, 2, 9):
        part = (*sn.linear_sandwich_triton(x[:M], w, r[:M], w1, w2, scalar, EPS, False, **kw),
                sn.linear_add_norm_triton(x[:M], w, r[:M], w1, EPS, True, **kw))
        for a, b in zip(part, full):
            assert torch.equal(a, b[:M]), M


def test_validation():
    x, w, r, w1, w2, _ = operands(2, 64, 128, torch.float32, seed=7)
    with pytest.raises(ValueError):
        sn.linear_sandwich_triton(x, w, r[:, :32], w1, w2, None, EPS, False)
    with pytest.raises(ValueError):
        sn.linear_sandwich_triton(x, w, r, w1, w2, torch.ones(2), EPS, False)
