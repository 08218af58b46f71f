"""GEMV whose last program runs the residual add + norms (`kernels.gemv_ticket`) under TRITON_INTERPRET=1.

The interpreter runs programs one after another, so the ticket logic (the last of n programs draws n - 1)
and the counter reset are exercised, and the arithmetic must equal the two-launch path of
`kernels.splitk_norm` bit for bit (same partials, same split order, same norm helpers; on the GPU the
norm's reduction tree follows the warp count, so there the two paths agree to bf16 noise only). Also: the
reference within fp32 / fp16 tolerance, rows independent of M, counters back at zero, and the switch
routing `kernels.splitk_norm` onto this path.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.gemv as gv  # noqa: E402
import kernels.gemv_ticket as gt  # noqa: E402
import kernels.invariance as invariance  # noqa: E402
import kernels.splitk_norm as sn  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)

EPS = 1e-6
REL = {torch.float32: 4e-6, torch.float16: 2 ** -10}
# (N, K, split_k, block_k): forced split with a ragged last tile; the heuristic's split; no split (as the
# PLE projection at E4B, K = 256: the output goes through one fp32 partial)
CASES = [(96, 300, 3, 32), (64, 1024, None, None), (100, 200, None, None)]


@pytest.fixture(autouse=True)
def _switch(monkeypatch):
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    monkeypatch.setattr(gv, "BATCH_INVARIANT", None)
    monkeypatch.setattr(gt, "TICKETED", False)


def rand(shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def operands(M, N, K, dtype, seed):
    return (rand((M, K), dtype, seed), rand((N, K), dtype, seed + 1, 0.1), rand((M, N), dtype, seed + 2, 10),
            rand((N,), dtype, seed + 3), (1 + rand((N,), torch.float32, seed + 4, 0.1)).to(dtype),
            torch.tensor([0.6]).to(dtype))


def counters_at_zero() -> bool:
    return all(int(pool.abs().sum()) == 0 for pool in gt._counters.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("N,K,split_k,block_k", CASES)
def test_equals_two_launch_path_and_reference(dtype, M, N, K, split_k, block_k):
    x, w, r, w1, w2, scalar = operands(M, N, K, dtype, seed=N + M)
    kw = dict(split_k=split_k, block_k=block_k)
    for w_next, s, write_y in ((w2, scalar, True), (w2, None, True), (None, None, False)):
        want = sn._launch(x, w, r, w1, w_next, s, EPS, False, write_y, **kw)
        got = gt.linear_sandwich_ticketed(x, w, r, w1, w_next, s, EPS, False, write_y, **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert counters_at_zero()
    h, y = gt.linear_sandwich_ticketed(x, w, r, w1, w2, scalar, EPS, True, True, **kw)
    hr, yr = sn.linear_sandwich_ref(x, w, r, w1, w2, scalar, EPS, True)
    _testutil.assert_close_scaled(h, hr, REL)
    _testutil.assert_close_scaled(y, yr, REL)


def test_rows_do_not_depend_on_m():
    x, w, r, w1, w2, scalar = operands(9, 96, 300, torch.float32, seed=11)
    full = gt.linear_sandwich_ticketed(x, w, r, w1, w2, scalar, EPS, False, True, split_k=3, block_k=32)
    for M in (1, 2):
        part = gt.linear_sandwich_ticketed(x[:M], w, r[:M], w1, w2, scalar, EPS, False, True, split_k=3, block_k=32)
        assert torch.equal(part[0], full[0][:M]) and torch.equal(part[1], full[1][:M])


def test_switch_routes_splitk_norm(monkeypatch):
    """With TICKETED on, `linear_sandwich_triton` takes one launch; results unchanged here."""
    x, w, r, w1, w2, scalar = operands(3, 64, 1024, torch.float16, seed=12)
    want = sn.linear_sandwich_triton(x, w, r.view(1, 3, 64), w1, w2, scalar, EPS, False)
    calls = []
    real = gt.linear_sandwich_ticketed
    monkeypatch.setattr(gt, "TICKETED", True)
    monkeypatch.setattr(gt, "linear_sandwich_ticketed", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = sn.linear_sandwich_triton(x, w, r.view(1, 3, 64), w1, w2, scalar, EPS, False)
    assert calls == [1]
    assert got[0].shape == (1, 3, 64)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_validation():
    x, w, r, w1, w2, _ = operands(2, 64, 128, torch.float32, seed=7)
    with pytest.raises(ValueError, match="does not hold"):
        gt.linear_sandwich_ticketed(x, w, r[:, :32], w1, w2, None, EPS, False, True)
    with pytest.raises(ValueError, match="one element"):
        gt.linear_sandwich_ticketed(x, w, r, w1, w2, torch.ones(2), EPS, False, True)
