"""Gemma RMSNorm and the fused post-norm + residual + pre-norm kernel, under TRITON_INTERPRET=1.

fp32 must match the reference to ~1e-6. fp16 outputs may differ by one rounding step where the
fp32 sums are accumulated in a different order, so fp16 is held to ~1 ulp of the largest value.
bf16 is only a smoke test: the interpreter *truncates* fp32 -> bf16 casts (the GPU rounds to
nearest even), so there kernel and reference legitimately differ by up to 1 bf16 ulp per cast.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels._common as common  # noqa: E402
import kernels.invariance as invariance  # noqa: E402
import kernels.rmsnorm as rn  # noqa: E402


_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)


EPS = 1e-6


def tol(ref: torch.Tensor) -> float:
    """fp32: 4e-6 relative; fp16: one ulp (2^-10 relative) of the largest |value|, plus slack."""
    scale = ref.float().abs().max().item()
    return {torch.float32: 4e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -6}[ref.dtype] * max(scale, 1.0)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol(ref), f"max abs err {err:.3e} > {tol(ref):.3e} ({ref.dtype})"


def inputs(shape, dtype, seed, res_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, generator=g)).to(dtype)
    r = (10 * torch.randn(*shape, generator=g)).to(res_dtype or dtype)
    w1 = torch.randn(shape[-1], generator=g).to(dtype)
    w2 = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    return x, r, w1, w2


# N=256: one tile, several rows per program (row-invariant mode off); N=100: ragged tile;
# N=300 with block_n=64: chunked.
SHAPES = [((3, 5, 256), None), ((7, 100), None), ((4, 300), 64)]


@pytest.fixture(params=[True, False], ids=["row-invariant", "rows-per-program"])
def row_mode(request, monkeypatch):
    """Both launch configs: one row per program (the default) and several rows per program."""
    monkeypatch.setattr(invariance, "ROW_INVARIANT", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,block_n", SHAPES)
@pytest.mark.parametrize("plus_one", [False, True])
def test_rmsnorm(dtype, shape, block_n, plus_one, row_mode):
    x, _, w, _ = inputs(shape, dtype, seed=len(shape) + shape[-1])
    for weight in (w, None):
        assert_close(rn.rmsnorm_triton(x, weight, EPS, plus_one, block_n=block_n),
                     rn.rmsnorm_ref(x, weight, EPS, plus_one))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,block_n", SHAPES)
@pytest.mark.parametrize("plus_one", [False, True])
def test_sandwich(dtype, shape, block_n, plus_one, row_mode):
    x, r, w1, w2 = inputs(shape, dtype, seed=shape[-1] + 1)
    for wpost, wpre in ((w1, w2), (None, w2), (w1, None)):
        h, y = rn.post_norm_residual_pre_norm_triton(x, r, wpost, wpre, EPS, plus_one, block_n=block_n)
        hr, yr = rn.post_norm_residual_pre_norm_ref(x, r, wpost, wpre, EPS, plus_one)
        assert_close(h, hr)
        assert_close(y, yr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,block_n", SHAPES)
def test_sandwich_layer_scalar_and_residual_only(dtype, shape, block_n, row_mode):
    # Gemma 4's layer scalar scales h (rounded again) before the next norm; the residual-only
    # variant (engine add_norm) stops after h.
    x, r, w1, w2 = inputs(shape, dtype, seed=shape[-1] + 2)
    scalar = torch.tensor([0.37]).to(dtype)
    h, y = rn.post_norm_residual_pre_norm_triton(x, r, w1, w2, EPS, False, block_n=block_n, scalar=scalar)
    hr, yr = rn.post_norm_residual_pre_norm_ref(x, r, w1, w2, EPS, False, scalar)
    assert_close(h, hr)
    assert_close(y, yr)
    assert_close(rn.residual_rmsnorm_triton(x, r, w1, EPS, True, block_n=block_n),
                 rn.residual_rmsnorm_ref(x, r, w1, EPS, True))


def test_layer_scalar_must_be_one_element():
    x, r, w1, w2 = inputs((2, 64), torch.float32, seed=16)
    with pytest.raises(ValueError):
        rn.post_norm_residual_pre_norm_triton(x, r, w1, w2, EPS, False, scalar=torch.ones(2))


def test_config_row_invariant_depends_only_on_n(monkeypatch):
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    for N in (64, 256, 512, 2560, 40000):
        configs = {rn._config(N, R) for R in range(1, 17 * 42)}
        assert len(configs) == 1 and next(iter(configs))[1] == 1, (N, configs)  # BLOCK_R = 1
    monkeypatch.setattr(invariance, "ROW_INVARIANT", False)
    assert rn._config(256, 1) != rn._config(256, 9)  # the heuristic the mode replaces


def test_sandwich_rounding_order_fp16_residual_fp32():
    # x in fp16, residual stream in fp32: the post-norm output is rounded to fp16 *before* the
    # add (as transformers does), h stays fp32. An fp32-throughout kernel would differ by ~1e-3.
    x, r, w1, w2 = inputs((6, 256), torch.float16, seed=12, res_dtype=torch.float32)
    h, y = rn.post_norm_residual_pre_norm_triton(x, r, w1, w2, EPS, False)
    hr, yr = rn.post_norm_residual_pre_norm_ref(x, r, w1, w2, EPS, False)
    assert h.dtype == torch.float32 and y.dtype == torch.float32
    assert (h - hr).abs().max().item() <= 1e-5
    assert (y - yr).abs().max().item() <= 1e-5
    unrounded = r + rn.rmsnorm_ref(x.float(), w1.float(), EPS, False)
    assert (unrounded - hr).abs().max().item() > 1e-4  # the rounding step is observable


def test_strided_rows_and_bf16_smoke():
    # rows with a stride (a slice of a wider buffer) are read in place
    g = torch.Generator().manual_seed(13)
    buf = torch.randn(5, 384, generator=g)
    x = buf[:, :256]
    w = torch.randn(256, generator=g)
    assert_close(rn.rmsnorm_triton(x, w, EPS, True), rn.rmsnorm_ref(x, w, EPS, True))
    xb, rb, w1, w2 = inputs((4, 256), torch.bfloat16, seed=14)
    assert_close(rn.rmsnorm_triton(xb, w1, EPS, False), rn.rmsnorm_ref(xb, w1, EPS, False))
    h, y = rn.post_norm_residual_pre_norm_triton(xb, rb, w1, w2, EPS, False)
    hr, yr = rn.post_norm_residual_pre_norm_ref(xb, rb, w1, w2, EPS, False)
    assert (h.float() - hr.float()).abs().max().item() <= 2 ** -5 * hr.float().abs().max().item()
    assert (y.float() - yr.float()).abs().max().item() <= 2 ** -5 * yr.float().abs().max().item()


def test_dispatch_uses_reference_on_cpu():
    x, r, w1, w2 = inputs((2, 64), torch.float32, seed=15)
    if not common.FORCE_TRITON_ON_CPU:
        assert torch.equal(rn.rmsnorm(x, w1, EPS, False), rn.rmsnorm_ref(x, w1, EPS, False))
        h, y = rn.post_norm_residual_pre_norm(x, r, w1, w2, EPS, True)
        hr, yr = rn.post_norm_residual_pre_norm_ref(x, r, w1, w2, EPS, True)
        assert torch.equal(h, hr) and torch.equal(y, yr)
