"""The PLE gate GEMV on a pending add + norm (`kernels.pending_add_norm`) under TRITON_INTERPRET=1.

Against this path's own PyTorch arithmetic (`pending_gate_ref`) and against the unfused path it replaces (the
split-K add + norm kernel, then the gate GEMV + GELU): fp32 and fp16, M = 1 .. 16, ragged K tiles, several input
partials and gate splits, with and without a post-norm weight, (1 + w) norms; row invariance (a row's h and g do
not depend on M); clear errors.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.pending_add_norm as dn  # noqa: E402
import kernels.gemv_epilogue as ge  # noqa: E402
import kernels.invariance as invariance  # noqa: E402
import kernels.splitk_norm as sn  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)

EPS = 1e-6
# against the reference of this path: reduction order only
REL = {torch.float32: 4e-6, torch.float16: 2 ** -9}
# against the unfused path: the gate's input rounds at other points (one rounding of x's dtype per element each)
REL_UNFUSED = {torch.float32: 1e-5, torch.float16: 2 ** -6}


def rand(shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def operands(M, H, N, s_in, dtype, w_post=True, plus_one=False):
    part = rand((s_in, M, H), torch.float32, 1, 0.7)
    residual = rand((M, H), dtype, 2)
    wp = rand((H,), dtype, 3, 0.5) if w_post else None
    w_gate = rand((N, H), dtype, 4, 0.1)
    other = rand((M, 3, N), dtype, 5)[:, 1]  # a strided slice, as per_layer[:, :, layer]
    return dn.PendingAddNorm(part, dtype, residual, wp, EPS, plus_one), w_gate, other


def unfused(pending, w_gate, other):
    """The stop-25 path: split-K reduce + add_norm kernel, then the gate GEMV + GELU x input."""
    p = pending
    h = sn.sandwich_from_partials(p.part, p.x_dtype, p.residual, p.w_post, None, None, p.eps, p.plus_one, False)[0]
    return h, ge.linear_gelu_gate_triton(h, w_gate, other)


# (H, N, input partials, gate split): ragged K (H not a multiple of the 128-wide tile), a forced split with one tile
# per split, one input partial (the fused MLP's), the heuristic's own split
CASES = [(320, 24, 3, 2), (256, 40, 1, None), (200, 16, 5, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("H,N,s_in,split", CASES)
def test_close_to_reference_and_unfused_path(dtype, M, H, N, s_in, split):
    pending, w_gate, other = operands(M, H, N, s_in, dtype)
    h, g = dn.pending_gate_triton(pending, w_gate, other, split_k=split)
    h_ref, g_ref = dn.pending_gate_ref(pending, w_gate, other)
    _testutil.assert_close_scaled(h, h_ref, REL)
    _testutil.assert_close_scaled(g, g_ref, REL)
    h_old, g_old = unfused(pending, w_gate, other)
    _testutil.assert_close_scaled(h, h_old, REL)  # h: the add_norm kernel's formula
    _testutil.assert_close_scaled(g, g_old, REL_UNFUSED)


@pytest.mark.parametrize("w_post,plus_one", [(False, False), (True, True)])
def test_norm_weight_forms(w_post, plus_one):
    pending, w_gate, other = operands(4, 320, 24, 3, torch.float32, w_post, plus_one)
    h, g = dn.pending_gate_triton(pending, w_gate, other, split_k=3)
    h_ref, g_ref = dn.pending_gate_ref(pending, w_gate, other)
    _testutil.assert_close_scaled(h, h_ref, REL)
    _testutil.assert_close_scaled(g, g_ref, REL)
    h_old, g_old = unfused(pending, w_gate, other)
    _testutil.assert_close_scaled(g, g_old, REL_UNFUSED)


def test_residual_keeps_its_shape():
    pending, w_gate, other = operands(6, 256, 16, 2, torch.float32)
    p3 = dn.PendingAddNorm(pending.part, pending.x_dtype, pending.residual.view(2, 3, 256), pending.w_post, EPS,
                           False)
    h3, g3 = dn.pending_gate_triton(p3, w_gate, other)
    h, g = dn.pending_gate_triton(pending, w_gate, other)
    assert h3.shape == (2, 3, 256) and torch.equal(h3.view(6, 256), h) and torch.equal(g3, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_do_not_depend_on_M(dtype, monkeypatch):
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    pending, w_gate, other = operands(9, 320, 24, 3, dtype)
    h9, g9 = dn.pending_gate_triton(pending, w_gate, other)
    one = dn.PendingAddNorm(pending.part[:, :1].contiguous(), dtype, pending.residual[:1].clone(), pending.w_post,
                            EPS, False)
    h1, g1 = dn.pending_gate_triton(one, w_gate, other[:1].clone())
    assert torch.equal(h1, h9[:1]) and torch.equal(g1, g9[:1])


def test_clear_errors():
    pending, w_gate, other = operands(2, 256, 16, 2, torch.float32)
    with pytest.raises(ValueError, match="other"):
        dn.pending_gate_triton(pending, w_gate, other[:, :8])
    with pytest.raises(ValueError, match="w_gate"):
        dn.pending_gate_triton(pending, w_gate[:, :128], other)
    wide = dn.PendingAddNorm(torch.zeros(2, 17, 256), torch.float32, torch.zeros(17, 256), None, EPS, False)
    assert not dn.supports(wide, w_gate)
    half = dn.PendingAddNorm(pending.part.half(), torch.float32, pending.residual, None, EPS, False)
    assert not dn.supports(half, w_gate)


def test_e4b_shapes_close_to_unfused_and_row_invariant(monkeypatch):
    """E4B's shapes (down's 7 partials of 2560, the 256 x 2560 gate at its heuristic 10 splits), fp16: h and g of a
    9-row call match the unfused path, and its row 0 equals a 1-row call bit for bit."""
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    dt, H, N = torch.float16, 2560, 256
    pending = dn.PendingAddNorm(rand((7, 9, H), torch.float32, 11, 0.5), dt, rand((9, H), dt, 12),
                                rand((H,), dt, 13, 0.3), EPS, False)
    w_gate, other = rand((N, H), dt, 14, 0.02), rand((9, N), dt, 15)
    assert dn.gate_config(pending, w_gate)["SPLIT_K"] == 10
    h, g = dn.pending_gate_triton(pending, w_gate, other)
    h_old, g_old = unfused(pending, w_gate, other)
    _testutil.assert_close_scaled(h, h_old, REL)
    _testutil.assert_close_scaled(g, g_old, REL_UNFUSED)
    one = dn.PendingAddNorm(pending.part[:, :1].contiguous(), dt, pending.residual[:1].clone(), pending.w_post, EPS,
                            False)
    h1, g1 = dn.pending_gate_triton(one, w_gate, other[:1].clone())
    assert torch.equal(h1, h[:1]) and torch.equal(g1, g[:1])
