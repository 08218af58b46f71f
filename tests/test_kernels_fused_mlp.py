"""The one-stream Gemma MLP (`kernels.fused_mlp`) under TRITON_INTERPRET=1 against its reference.

gate+up GEMV with GeGLU, then the down projection split along the intermediate dimension into fp32
partials, then their fixed-order sum. Tiny shapes with a small launch config (GROUP_I 32 = two
UNIT 16 phase-A tiles per program, BLOCK_H 64 over a ragged H), M = 1 (also the CUDA-core path) and
M > 1; the GeGLU values against the unfused GeGLU GEMV bit for bit; the partial sum; row invariance;
the two down-weight layouts; shape validation.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.fused_mlp as fm  # noqa: E402
import kernels.gemv as gv  # noqa: E402
import kernels.gemv_epilogue as ge  # noqa: E402
import kernels.invariance as invariance  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)

# Relative to the output scale (max |ref|, at least 1).
# fp32: the down products are summed in another order than the reference's matmul (per program, then
#   across the P partials), and the GeGLU values may differ from the reference's by ~1 ulp (gelu via exp,
#   not tanh), carried through the down sum; observed <= 6 fp32 eps of the scale, bound 4e-6 (~33 eps) as
#   the GEMV epilogue tests.
# fp16: both sides round the same fp32 sum (up to the above) to fp16 once, plus GeGLU values 1 fp16 ulp
#   apart carried through down: observed <= 0.9 ulp of the scale, bound two fp16 ulps of the scale (2^-9).
REL = {torch.float32: 4e-6, torch.float16: 2 ** -9}
# tiny tiles so every path runs at tiny shapes: two phase-A units per program, several phase-B tiles
SMALL = dict(GROUP_I=32, UNIT=16, BLOCK_H=64)


def rand(shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def mlp_weights(H, I, dtype, seed=0):
    return rand((2 * I, H), dtype, seed + H + I, 0.1), rand((H, I), dtype, seed + H * I, 0.1)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    _testutil.assert_close_scaled(out, ref, REL)


gemv_mode = _testutil.gemv_mode_fixture()


@pytest.fixture
def row_invariant(monkeypatch):
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    monkeypatch.setattr(gv, "BATCH_INVARIANT", None)


# (H, I): H ragged against BLOCK_H and BLOCK_K (P = 2 partials), and H a whole number of tiles (P = 4)
SHAPES = [(200, 64), (256, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("H,I", SHAPES)
def test_mlp_matches_reference(dtype, M, H, I, gemv_mode):
    x = rand((M, H), dtype, M)
    w_gate_up, w_down = mlp_weights(H, I, dtype)
    out = fm.mlp_triton(x, w_gate_up, w_down, SMALL)
    assert fm.mlp_config(M, H, I)["BLOCK_M"] == (1 if (M == 1 and gemv_mode is False) else 16)
    assert_close(out, fm.mlp_ref(x, w_gate_up, w_down))


def test_default_config_and_module_globals(monkeypatch, row_invariant):
    """No override: the module's own config (GROUP_I = UNIT = 64, BLOCK_H 128 > H); and the globals are
    read at launch (a benchmark sweeps them)."""
    x = rand((2, 96), torch.float32, 1)
    w_gate_up, w_down = mlp_weights(96, 128, torch.float32)
    ref = fm.mlp_ref(x, w_gate_up, w_down)
    assert fm.mlp_partials_triton(x, w_gate_up, w_down)[0].shape == (128 // fm.GROUP_I, 2, 96)
    assert_close(fm.mlp_triton(x, w_gate_up, w_down), ref)
    monkeypatch.setattr(fm, "GROUP_I", 16)
    monkeypatch.setattr(fm, "UNIT", 16)
    part, _ = fm.mlp_partials_triton(x, w_gate_up, w_down)
    assert part.shape == (8, 2, 96)
    assert_close(fm.sum_partials_triton(part)[0], ref)


# ---- phase A is the unfused GeGLU GEMV ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 16])
def test_geglu_values_bitwise_the_unfused_gemv(dtype, M, gemv_mode):
    """With UNIT = 16 a phase-A tile is the unfused GeGLU GEMV's (BLOCK_N = 32 interleaved gate/up rows)
    and the K walk is the same when the GEMV is not split and uses the fused kernel's BLOCK_K (its own
    heuristic splits K at these tiny widths, and picks BLOCK_K 64 for fp32 tiles: then the fp32 sums
    differ in the last bits). Under the interpreter even the tile height matters in fp32 (numpy's
    matmul blocking), so UNIT = 64 is not bitwise the 32-row GEMV there."""
    H, I = 200, 64
    x = rand((M, H), dtype, 3)
    w_gate_up, w_down = mlp_weights(H, I, dtype, 1)
    part, h = fm.mlp_partials_triton(x, w_gate_up, w_down, SMALL)
    assert h.dtype == dtype and h.shape == (M, I) and part.shape == (I // 32, M, H)
    assert torch.equal(h, ge.linear_geglu_triton(x, w_gate_up, split_k=1, block_k=fm.BLOCK_K))


# ---- the partial sum -------------------------------------------------------------------------------
def _check_sum(part: torch.Tensor) -> None:
    got = fm.sum_partials_triton(part)
    assert got.shape == (1, *part.shape[1:]) and got.dtype == torch.float32
    assert torch.equal(got, fm.sum_partials_triton(part))  # fixed order: run to run bitwise
    # fp32 sums of P terms in any order: within P rounding steps of the sum of magnitudes
    bound = part.shape[0] * torch.finfo(torch.float32).eps * part.abs().sum(0)
    assert ((got[0] - part.double().sum(0)).abs() <= bound).all()
    assert ((got[0] - part.sum(0)).abs() <= bound).all()


def test_partials_sum(monkeypatch, row_invariant):
    x = rand((3, 200), torch.float32, 5)
    w_gate_up, w_down = mlp_weights(200, 128, torch.float32, 2)
    part, _ = fm.mlp_partials_triton(x, w_gate_up, w_down, dict(GROUP_I=16, UNIT=16, BLOCK_H=64))
    assert part.shape == (8, 3, 200)
    _check_sum(part)
    # P = 70: one full REDUCE_BLOCK_P (64) load and a ragged one; M * H = 135: a ragged last REDUCE_BLOCK (32)
    assert 70 % fm.REDUCE_BLOCK_P and (3 * 45) % fm.REDUCE_BLOCK
    _check_sum(rand((70, 3, 45), torch.float32, 6))
    # small blocks (read at launch): 3 loads of 8 partials (the last of 5), 9 programs (the last ragged)
    monkeypatch.setattr(fm, "REDUCE_BLOCK_P", 8)
    monkeypatch.setattr(fm, "REDUCE_BLOCK", 16)
    part = rand((21, 2, 70), torch.float32, 7)
    _check_sum(part)
    # a column's sum does not depend on how many rows share the call
    assert torch.equal(fm.sum_partials_triton(part[:, :1].contiguous())[0, 0], fm.sum_partials_triton(part)[0, 0])


# ---- row invariance and layouts ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_bitwise_whatever_m(dtype, row_invariant):
    """Row-invariant mode: row r of an M-row call equals row r of the 16-row call, bit for bit."""
    H, I = 200, 64
    x = rand((16, H), dtype, 8)
    w_gate_up, w_down = mlp_weights(H, I, dtype, 3)
    full = fm.mlp_triton(x, w_gate_up, w_down, SMALL)
    full_sum = fm.mlp_sum_triton(x, w_gate_up, w_down, SMALL)
    for M in (1, 2, 9):
        assert torch.equal(fm.mlp_triton(x[:M], w_gate_up, w_down, SMALL), full[:M]), M
        assert torch.equal(fm.mlp_sum_triton(x[:M], w_gate_up, w_down, SMALL), full_sum[:, :M]), M


@pytest.mark.parametrize("M", [1, 3])
def test_down_layouts_and_strided_x_bitwise(M, gemv_mode):
    """w_down as a transposed view of an [I, H] buffer (each program's slice contiguous) reads the same
    values as the row-major checkpoint layout: bitwise the same output; so does a strided x."""
    H, I = 200, 64
    x = rand((M, H), torch.float32, 9)
    w_gate_up, w_down = mlp_weights(H, I, torch.float32, 4)
    w_down_t = w_down.t().contiguous().t()
    assert w_down_t.stride() == (1, H) and torch.equal(w_down_t, w_down)
    want = fm.mlp_triton(x, w_gate_up, w_down, SMALL)
    assert torch.equal(fm.mlp_triton(x, w_gate_up, w_down_t, SMALL), want)
    x_wide = torch.zeros(M, 2 * H)
    x_wide[:, H:] = x
    assert torch.equal(fm.mlp_triton(x_wide[:, H:], w_gate_up, w_down, SMALL), want)


# ---- validation ---------------------------------------------------------------------------------------
def test_validation_and_fusable_shapes():
    x = rand((3, 128), torch.float32, 10)
    w_gate_up, w_down = mlp_weights(128, 64, torch.float32, 5)
    assert fm.fusable_shapes(3, w_gate_up, w_down)
    assert fm.fusable_shapes(16, w_gate_up, w_down)
    with pytest.raises(ValueError):
        fm.mlp_triton(x, w_gate_up, w_down[:, :32])  # w_down not [H, I]
    with pytest.raises(ValueError):
        fm.mlp_triton(x, w_gate_up, w_down.t().contiguous())  # [I, H]: wrong shape, not a layout
    with pytest.raises(ValueError):
        fm.mlp_triton(x, w_gate_up[:127], w_down)  # odd rows: not a [gate; up] pair
    with pytest.raises(ValueError):
        fm.mlp_triton(x[:, :100], w_gate_up, w_down)  # x's width is not H
    with pytest.raises(ValueError):
        fm.mlp_triton(x, w_gate_up.t().contiguous().t(), w_down)  # w_gate_up must be row-major
    assert not fm.fusable_shapes(3, w_gate_up.t().contiguous().t(), w_down)
    with pytest.raises(ValueError):
        fm.mlp_triton(rand((17, 128), torch.float32, 11), w_gate_up, w_down)  # M > 16
    assert not fm.fusable_shapes(17, w_gate_up, w_down)
    w_gu96, w_d96 = mlp_weights(128, 96, torch.float32, 6)  # I = 96: not a multiple of GROUP_I = 64
    assert 96 % fm.GROUP_I
    with pytest.raises(ValueError):
        fm.mlp_triton(x, w_gu96, w_d96)
    assert not fm.fusable_shapes(3, w_gu96, w_d96)
    with pytest.raises(ValueError):
        fm.mlp_triton(x, w_gate_up, w_down, dict(GROUP_I=32, UNIT=32 + 16))  # GROUP_I not a multiple of UNIT
    with pytest.raises(ValueError):
        fm.mlp_triton(x, w_gate_up, w_down, dict(GROUP_I=48, UNIT=16))  # GROUP_I does not divide I = 64
    assert not fm.fusable_shapes(3, w_gate_up[:64], w_down)  # gate_up does not match down's I
    assert not fm.fusable_shapes(3, w_gate_up, w_down[:, :32])


def test_bf16_smoke(row_invariant):
    # bf16: the interpreter truncates casts (the GPU rounds); the GeGLU values and the output are each
    # cast once: a few bf16 ulps of the output scale (observed <= 2)
    x = rand((3, 200), torch.bfloat16, 12)
    w_gate_up, w_down = mlp_weights(200, 64, torch.bfloat16, 7)
    out, ref = fm.mlp_triton(x, w_gate_up, w_down, SMALL), fm.mlp_ref(x, w_gate_up, w_down)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 200)
    assert (out.float() - ref.float()).abs().max().item() <= 2 ** -5 * max(1.0, ref.float().abs().max().item())
