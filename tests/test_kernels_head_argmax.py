"""The int8-screened greedy head (`kernels.head_argmax`) under TRITON_INTERPRET=1.

Its ids must be those of the Triton GEMV's logits (first index on ties) for every M and dtype, on random heads,
on heads with tied winning rows, and with a flat logit distribution where many rows survive the screen; the
screen's band must contain every GEMV logit; on random weights only a few rows are recomputed.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.head_argmax as ha  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)
gemv_mode = _testutil.gemv_mode_fixture()


def rand(shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # several screen and exact programs at test sizes (the exact kernel's chunk rounds to whole GEMV tiles)
    monkeypatch.setattr(ha, "EXACT_CHUNK", 128)


@pytest.mark.parametrize("screen", [{}, {"DIGITS_BLOCK_K": 64}, {"DIGITS_BLOCK_N": 128, "DIGITS_BLOCK_K": 128},
                                    {"EXACT_CHUNK": 64}],
                         ids=["default", "bk64", "tile-128x128", "exact-chunk-64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_ids_equal_the_gemv_argmax(dtype, M, gemv_mode, screen, monkeypatch):
    for k, v in screen.items():  # screen tile variants (`scripts/check_screened_head_gpu.py --sweep`)
        monkeypatch.setattr(ha, k, v)
    N, K = 700, 96  # ragged against every tile (64 rows, 256 / 128 columns)
    w = rand((N, K), dtype, 1, 0.05)
    x = rand((M, K), dtype, 2)
    head = ha.build_screened_head(w)
    assert ha.supports(x, w, head)
    got = ha.greedy_ids(x, w, head)
    assert got.dtype == torch.int64 and got.shape == (M,)
    assert torch.equal(got, ha.greedy_ids_ref(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_pick_the_first_index(dtype, gemv_mode):
    N, K = 400, 64
    w = rand((N, K), dtype, 3, 0.05)
    x = rand((2, K), dtype, 4)
    for row, i in ((0, 37), (1, 5)):  # the winner of each row appears three times, first at index i
        best = (x[row].float() / x[row].float().norm()).to(dtype)
        for j in (i, 200 + i, N - 1):
            w[j] = best
    head = ha.build_screened_head(w)
    ref = ha.greedy_ids_ref(x, w)
    got = ha.greedy_ids(x, w, head)
    assert torch.equal(got, ref)
    assert got.tolist() == [37, 5]  # |x| against logits of about 0.05 |x| elsewhere: the copies win, the first


def test_flat_logits_recompute_many_rows_and_stay_exact(gemv_mode):
    # rows that differ only past the int8 resolution: almost every row survives the screen
    N, K = 300, 64
    base = rand((1, K), torch.float32, 5)
    w = base.expand(N, K) + rand((N, K), torch.float32, 6, 1e-4)
    x = rand((4, K), torch.float32, 7)
    head = ha.build_screened_head(w)
    lo, hi = ha.screen_bounds_ref(x, head)
    assert int((hi >= lo.max(dim=1, keepdim=True).values).sum()) > N  # most rows of every M are candidates
    assert torch.equal(ha.greedy_ids(x, w, head), ha.greedy_ids_ref(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_band_holds_every_logit_and_few_rows_survive(dtype):
    N, K = 4096, 256
    w = rand((N, K), dtype, 8, 0.02)
    x = rand((3, K), dtype, 9)
    x[1, 7] = 40.0  # an outlier channel: a coarse digit step for the rest of that row
    head = ha.build_screened_head(w)
    exact = x.float() @ w.float().T
    lo, hi = ha.screen_bounds_ref(x, head)
    assert bool((lo <= exact).all()) and bool((exact <= hi).all())
    survivors = (hi >= lo.max(dim=1, keepdim=True).values).sum(dim=1)
    assert int(survivors.max()) <= N // 50, survivors.tolist()  # random weights: a handful of rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_band_holds_the_gemv_logits(dtype):
    N, K = 520, 320  # ragged against the 64-row tile and the 256-column digit tile
    w = rand((N, K), dtype, 15, 0.05)
    x = rand((5, K), dtype, 16)
    x[2, 3] = 60.0  # an outlier channel
    x[4] = 0.0
    head = ha.build_screened_head(w)
    sc = ha.screen(x, head, G=64)
    logits = (x.double() @ w.double().T).float()  # the GEMV's fp32 sum is within the slack of this
    assert bool((sc.hi >= logits).all())
    per_program = torch.nn.functional.pad(logits, (0, sc.lo_part.shape[1] * sc.block_n - N), value=float("-inf"))
    assert bool((sc.lo_part <= per_program.view(5, -1, sc.block_n).amax(dim=2)).all())
    assert torch.allclose(sc.xn, x.float().norm(dim=1), rtol=1e-5)


def test_digits_reconstruct_x_within_the_stated_residual():
    x = rand((4, 300), torch.float32, 14)
    x[2] = 0.0  # an all-zero row: digits 0, no division by zero
    x[3, 5] = 1e4  # an outlier
    d1, d2, sx = ha.x_digits_ref(x)
    assert d1.abs().max() <= 127 and d2.abs().max() <= 127
    approx = sx[:, None] * (d1.float() + d2.float() / 254.0)
    assert bool(((x - approx).abs() <= sx[:, None] * ha.DIGIT_RESID).all())
    # the kernel's digits give the same screen: its bound holds on the kernel's own output too (tested via ids)


def test_supports_refuses_a_stale_or_mismatched_screen():
    w = rand((128, 64), torch.float32, 10)
    head = ha.build_screened_head(w)
    x = rand((2, 64), torch.float32, 11)
    assert ha.supports(x, w, head)
    assert not ha.supports(x, w.clone(), head)  # built from another tensor
    assert not ha.supports(rand((17, 64), torch.float32, 12), w, head)  # wider than the GEMV's 16 rows
    assert not ha.supports(x, w, None)
    with pytest.raises(ValueError, match="unsupported"):
        ha.greedy_ids(x, w.clone(), head)


def test_build_quantises_within_half_a_step():
    w = rand((50, 40), torch.float32, 13)
    head = ha.build_screened_head(w)
    deq = head.q.float() * head.scale[:, None]
    assert head.q.dtype == torch.int8 and int(head.q.abs().max()) == 127
    assert bool(((w - deq).abs() <= head.scale[:, None] * 0.5 + 1e-7).all())
    assert head.nbytes == 50 * 40 + 8 * 50
    assert head.wn_max >= float(torch.linalg.vector_norm(deq, dim=1).max())
