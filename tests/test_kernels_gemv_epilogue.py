"""GEMV + gated-GELU epilogues (`kernels.gemv_epilogue`) under TRITON_INTERPRET=1 against their references.

GeGLU on the fused [gate; up] weight and the PLE gate-mul, with the epilogue in the GEMV (K not split)
and in the split-K reduction (forced on small shapes, and chosen by the heuristic for few outputs over
a long K), M = 1 (also the CUDA-core path) and M > 1, ragged widths, strided operands, and the
row-invariance property: a row's output is bitwise the same whatever M shares the call.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.gemv as gv  # noqa: E402
import kernels.gemv_epilogue as ge  # noqa: E402
import kernels.invariance as invariance  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)

# relative to the output scale: fp32 sums in another order; fp16 one rounding of the output plus
# the projection's rounding carried through gelu (a gate 1 ulp apart moves the product ~1 ulp)
REL = {torch.float32: 4e-6, torch.float16: 2 ** -9}


def rand(shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    _testutil.assert_close_scaled(out, ref, REL)


gemv_mode = _testutil.gemv_mode_fixture()


# (I or N, K, split_k, block_k): no split; forced split with a ragged last tile; the heuristic's own
# split (few outputs over a long K, as the PLE gate at E4B)
CASES = [(40, 200, None, None), (24, 300, 3, 32), (16, 1024, None, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("n,K,split_k,block_k", CASES)
def test_geglu_matches_reference(dtype, M, n, K, split_k, block_k, gemv_mode):
    x, w = rand((M, K), dtype, M), rand((2 * n, K), dtype, n + K, 0.1)
    assert_close(ge.linear_geglu_triton(x, w, split_k=split_k, block_k=block_k), ge.linear_geglu_ref(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("n,K,split_k,block_k", CASES)
def test_gelu_gate_matches_reference(dtype, M, n, K, split_k, block_k, gemv_mode):
    x, w = rand((M, K), dtype, M), rand((n, K), dtype, n + K, 0.1)
    other = rand((M, 3, n), dtype, 7)[:, 1]  # a strided slice, as per_layer[:, :, layer]
    assert_close(ge.linear_gelu_gate_triton(x, w, other, split_k=split_k, block_k=block_k),
                 ge.linear_gelu_gate_ref(x, w, other))


def test_heuristic_splits_where_the_tests_expect():
    assert gv.gemv_config(1, 16, 1024, 4, 132)["SPLIT_K"] > 1
    assert gv.gemv_config(1, 80, 200, 4, 132)["SPLIT_K"] == 1
    # E4B: gate_up (N = 2 x 10240) is not split, so GeGLU runs in the GEMV; the PLE gate is split
    assert gv.gemv_config(1, 20480, 2560, 2, 132)["SPLIT_K"] == 1
    assert gv.gemv_config(1, 256, 2560, 2, 132)["SPLIT_K"] > 1


def test_geglu_epilogue_matches_unfused_ops_in_fp32():
    """Against the engine's own unfused composition (GEMV, then ops.gelu_mul / ops.gelu_gate's
    reference): the fused kernels keep the model's numbers in fp32."""
    import engine.ops as ops

    x, w = rand((5, 256), torch.float32, 1), rand((2 * 48, 256), torch.float32, 2, 0.1)
    for split_k in (None, 4):
        got = ge.linear_geglu_triton(x, w, split_k=split_k, block_k=32 if split_k else None)
        want = ops.gelu_mul.reference(gv.linear_small_m_triton(x, w, split_k=split_k, block_k=32 if split_k else None))
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
        other = rand((5, 96), torch.float32, 3)
        got = ge.linear_gelu_gate_triton(x, w, other, split_k=split_k, block_k=32 if split_k else None)
        want = ops.gelu_gate.reference(gv.linear_small_m_triton(x, w, split_k=split_k,
                                                                block_k=32 if split_k else None), other)
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,K,split_k,block_k", CASES)
def test_rows_bitwise_whatever_m(dtype, n, K, split_k, block_k, monkeypatch):
    """Row-invariant mode: row r of an M-row call equals row r of the 16-row call, bit for bit."""
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    monkeypatch.setattr(gv, "BATCH_INVARIANT", None)
    x, wg, wn = rand((16, K), dtype, 4), rand((2 * n, K), dtype, 5, 0.1), rand((n, K), dtype, 6, 0.1)
    other = rand((16, n), dtype, 8)
    kw = dict(split_k=split_k, block_k=block_k)
    full_g, full_m = ge.linear_geglu_triton(x, wg, **kw), ge.linear_gelu_gate_triton(x, wn, other, **kw)
    for M in (1, 2, 9):
        assert torch.equal(ge.linear_geglu_triton(x[:M], wg, **kw), full_g[:M]), M
        assert torch.equal(ge.linear_gelu_gate_triton(x[:M], wn, other[:M], **kw), full_m[:M]), M


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy says so; the GPU is silent
def test_large_and_negative_gates_stay_finite():
    """gelu via exp: a gate of -1e4 overflows exp to inf and must give -0, not nan."""
    x = torch.tensor([[1.0, -1.0]])
    w = torch.tensor([[1e4, 0.0], [-1e4, 0.0], [1.0, 2.0], [3.0, 0.5]])  # gates +1e4, -1e4; ups -1, 2.5
    out = ge.linear_geglu_triton(x, w)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ge.linear_geglu_ref(x, w))


def test_bf16_smoke_and_validation():
    # bf16: the interpreter truncates casts (the GPU rounds), and gate, up and the product are each
    # cast once: a few bf16 ulps of the output scale
    x, w = rand((3, 128), torch.bfloat16, 9), rand((64, 128), torch.bfloat16, 10, 0.1)
    for out, ref in ((ge.linear_geglu_triton(x, w), ge.linear_geglu_ref(x, w)),
                     (ge.linear_gelu_gate_triton(x, w, rand((3, 64), torch.bfloat16, 11)),
                      ge.linear_gelu_gate_ref(x, w, rand((3, 64), torch.bfloat16, 11)))):
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref.float()).abs().max().item() <= 2 ** -5 * max(1.0, ref.float().abs().max().item())
    with pytest.raises(ValueError):
        ge.linear_geglu_triton(x, w[:63])  # not a [gate; up] pair
    with pytest.raises(ValueError):
        ge.linear_gelu_gate_triton(x, w, rand((3, 32), torch.bfloat16, 12))
    with pytest.raises(ValueError):
        ge.linear_geglu_triton(rand((17, 128), torch.bfloat16, 13), w)  # M > 16 is cuBLAS territory
