"""The PLE gate + projection in two launches (`kernels.gemv_gated_input`) under TRITON_INTERPRET=1.

Bitwise against the three-launch path it replaces (gate GEMV, split-K reduce + GELU x input, projection
GEMV), close to the PyTorch reference, M = 1 (also the CUDA-core path) and M > 1, a ragged K tile, a
strided per-layer input, and row invariance (a row's output does not depend on M).
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.gemv as gv  # noqa: E402
import kernels.gemv_epilogue as ge  # noqa: E402
import kernels.gemv_gated_input as gi  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)

REL = {torch.float32: 4e-6, torch.float16: 2 ** -9}
gemv_mode = _testutil.gemv_mode_fixture()


def rand(shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def operands(M, H, P, N, dtype):
    x = rand((M, H), dtype, M)
    wg, wp = rand((P, H), dtype, 3, 0.1), rand((N, P), dtype, 4, 0.1)
    other = rand((M, 3, P), dtype, 7)[:, 1]  # a strided slice, as per_layer[:, :, layer]
    return x, wg, other, wp


# (H, P, N, gate split): the heuristic's own split (few gate outputs over a long K, the E4B PLE shape scaled
# down); a forced split with a P that is not a whole number of K tiles
CASES = [(1024, 16, 40, None), (384, 48, 24, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("H,P,N,split", CASES)
def test_bitwise_three_launch_path_and_close_to_reference(dtype, M, H, P, N, split, gemv_mode):
    x, wg, other, wp = operands(M, H, P, N, dtype)
    got = gi.gelu_gate_linear_triton(x, wg, other, wp, split_k=split)
    g = ge.linear_gelu_gate_triton(x, wg, other, split_k=split)
    assert ge.resolve_config(x, wg, split)["SPLIT_K"] > 1  # the reduce kernel really ran in the old path
    want = gv.linear_small_m_triton(g, wp)
    assert torch.equal(got, want)
    _testutil.assert_close_scaled(got, gi.gelu_gate_linear_ref(x, wg, other, wp), REL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_do_not_depend_on_M(dtype, monkeypatch):
    monkeypatch.setattr(gv, "BATCH_INVARIANT", None)
    import kernels.invariance as invariance

    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    x, wg, other, wp = operands(9, 1024, 16, 40, dtype)
    wide = gi.gelu_gate_linear_triton(x, wg, other, wp)
    one = gi.gelu_gate_linear_triton(x[:1].clone(), wg, other[:1].clone(), wp)
    assert torch.equal(one, wide[:1])


def test_fusable_shapes_and_clear_errors():
    x, wg, other, wp = operands(1, 1024, 16, 40, torch.float32)
    assert gi.fusable_shapes(x, wg, wp)
    assert not gi.fusable_shapes(x, rand((16, 64), torch.float32, 1), rand((40, 16), torch.float32, 2))  # no split
    with pytest.raises(ValueError, match="other"):
        gi.gelu_gate_linear_triton(x, wg, other[:, :8], wp)
    with pytest.raises(ValueError, match="split"):
        gi.gelu_gate_linear_triton(x, wg, other, wp, split_k=1)
