"""Small-M GEMV (x @ w.T, M <= 16) under TRITON_INTERPRET=1 against the fp32 reference.

Covers the CUDA-core path (M = 1) and the tl.dot path (M >= 2), ragged N and K, the split-K
two-pass reduction forced on small shapes, and strided operands. Errors are measured relative
to the output scale: fp32 to 1e-6, fp16 to one fp16 rounding of the output.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels._common as common  # noqa: E402
import kernels.gemv as gv  # noqa: E402


_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)


REL = {torch.float32: 2e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def check(x: torch.Tensor, w: torch.Tensor, **kw) -> None:
    out = gv.linear_small_m_triton(x, w, **kw)
    ref = gv.linear_small_m_ref(x, w)
    exact = x.float() @ w.float().T
    assert out.dtype == x.dtype and out.shape == ref.shape
    scale = exact.abs().max().item()
    err = (out.float() - exact).abs().max().item()
    assert err <= REL[x.dtype] * scale, f"max abs err {err:.3e} > {REL[x.dtype] * scale:.3e} ({x.dtype})"


def rand(shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(params=[None, False], ids=["follow-switch", "forced-off"])
def gemv_mode(request, monkeypatch):
    """BATCH_INVARIANT None follows the row-invariance switch (on by default: every M on the 16-row
    tensor-core tile); False forces the M-dependent configs, including the M == 1 CUDA-core path."""
    monkeypatch.setattr(gv, "BATCH_INVARIANT", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 5, 16])
@pytest.mark.parametrize("N,K", [(64, 256), (70, 200), (33, 512)])
def test_heuristic_config(dtype, M, N, K, gemv_mode):
    check(rand((M, K), dtype, M), rand((N, K), dtype, N + K))


def test_batch_invariant_follows_switch(monkeypatch):
    import kernels.invariance as invariance

    monkeypatch.setattr(gv, "BATCH_INVARIANT", None)
    for switch in (True, False):
        monkeypatch.setattr(invariance, "ROW_INVARIANT", switch)
        assert gv.batch_invariant() is switch
        assert (gv.gemv_config(1, 2560, 2560, 2, 132)["BLOCK_M"] == 16) is switch
    monkeypatch.setattr(gv, "BATCH_INVARIANT", False)  # forced off whatever the switch says
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    assert not gv.batch_invariant()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("split_k,block_k,K", [(3, 32, 300), (4, None, 1024), (7, 32, 96)])
def test_forced_split_k(dtype, M, split_k, block_k, K):
    # ragged K (300 = 9 full tiles + 12), a split count that rounds down (7 -> 3 splits of 32)
    check(rand((M, K), dtype, 1), rand((40, K), dtype, 2), split_k=split_k, block_k=block_k)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("split_k,block_k,K", [(3, 32, 300), (1, 32, 32), (1, 32, 40), (7, 32, 96), (1, 32, 200)])
def test_prefetched_tiles_same_bits(monkeypatch, M, split_k, block_k, K):
    # PREFETCH_TILES=n peels n tiles ahead of the PDL wait: same sum order, so the same bits as one tile, also
    # where a split holds one tile (K=32), a ragged one (K=40: the second tile is partly masked) or fewer
    # tiles than are prefetched (3 splits of 96 of K=300 have 3 tiles, 200 = 6 tiles + 8)
    x, w = rand((M, K), torch.float32, 5), rand((24, K), torch.float32, 6)
    monkeypatch.setattr(gv, "PREFETCH_TILES", 1)
    want = gv.linear_small_m_triton(x, w, split_k=split_k, block_k=block_k)
    for tiles in (2, 3, 4):
        monkeypatch.setattr(gv, "PREFETCH_TILES", tiles)
        got = gv.linear_small_m_triton(x, w, split_k=split_k, block_k=block_k)
        assert torch.equal(got, want), tiles
    check(x, w, split_k=split_k, block_k=block_k)


def test_tile_overrides_same_bits(monkeypatch):
    # BLOCK_N and pipeline depth change who loads which rows, not any row's K order: same bits, same split
    x, w = rand((3, 512), torch.float32, 7), rand((200, 512), torch.float32, 8)
    want = gv.linear_small_m_triton(x, w)
    base = gv.gemv_config(3, 200, 512, 4, 132)
    for over in ({"BLOCK_N": 64}, {"num_stages": 3}, {"num_warps": 8, "num_stages": 2}):
        monkeypatch.setattr(gv, "TILE_OVERRIDES", over)
        cfg = gv.gemv_config(3, 200, 512, 4, 132)
        assert all(cfg[k] == v for k, v in over.items()) and cfg["BLOCK_K"] == base["BLOCK_K"]
        assert torch.equal(gv.linear_small_m_triton(x, w), want), over
    monkeypatch.setattr(gv, "TILE_OVERRIDES", {"BLOCK_K": 64})
    with pytest.raises(ValueError, match="unknown keys"):
        gv.gemv_config(3, 200, 512, 4, 132)


def test_default_split_k_small_n_large_k():
    # the heuristic itself must choose split-K for few outputs over a long K (PLE-like)
    x, w = rand((2, 2048), torch.float32, 3), rand((32, 2048), torch.float32, 4)
    cfg = gv.gemv_config(2, 32, 2048, 4, 132)
    assert cfg["SPLIT_K"] > 1
    check(x, w)


def test_strided_operands_and_bf16_smoke():
    x = rand((4, 96), torch.float32, 5)[:, :64]                 # row stride 96
    w = rand((64, 48), torch.float32, 6).T                      # [48, 64] with column stride 48
    check(x, w)
    check(x, w, split_k=2, block_k=16)
    # bf16: operands are cast to fp32 inside under the interpreter; output cast truncates there
    check(rand((3, 128), torch.bfloat16, 7), rand((48, 128), torch.bfloat16, 8))
    check(rand((1, 128), torch.bfloat16, 7), rand((48, 128), torch.bfloat16, 8))


def test_gemma_config_choices():
    sms = 132
    assert gv.gemv_config(1, 262144, 2560, 2, sms)["SPLIT_K"] == 1      # lm head: plenty of programs
    assert gv.gemv_config(8, 2560, 10240, 2, sms)["SPLIT_K"] > 1        # down projection
    assert gv.gemv_config(1, 256, 2560, 2, sms)["SPLIT_K"] > 1          # PLE gate


def test_dispatch():
    x, w = rand((3, 64), torch.float32, 9), rand((16, 64), torch.float32, 10)
    if not common.FORCE_TRITON_ON_CPU:
        assert torch.equal(gv.linear_small_m(x, w), gv.linear_small_m_ref(x, w))
    xw = rand((40, 64), torch.float32, 11)                      # M > 16 never reaches the kernel
    assert torch.allclose(gv.linear_small_m(xw, w), xw @ w.T, atol=1e-5)
    with pytest.raises(ValueError):
        gv.linear_small_m_triton(xw, w)


def test_pdl_only_for_cuda_tensors_on_hopper():
    # programmatic dependent launch needs a CUDA device of compute capability >= 9.0; the interpreter and
    # CPU tensors launch plainly (the kernels then compile without griddepcontrol)
    assert common.pdl_flags(torch.zeros(1)) == {"PDL": False, "launch_pdl": False}


def test_pdl_early_trigger_only_for_short_kernels(monkeypatch):
    # the early trigger (PDL == 2) goes only to kernels launched as short ones, and only with the switch on;
    # a Hopper CUDA operand is described, not allocated (this machine has no GPU)
    from types import SimpleNamespace

    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "_TRITON_HAS_PDL", True)
    monkeypatch.setattr(common, "_cuda_props", lambda device: SimpleNamespace(major=9, minor=0))
    hopper = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    for early in (False, True):
        monkeypatch.setattr(common, "PDL_EARLY_SHORT", early)
        assert common.pdl_flags(hopper) == {"PDL": True, "launch_pdl": True}
        assert common.pdl_flags(hopper, short=True) == {"PDL": 2 if early else True, "launch_pdl": True}
    monkeypatch.setattr(common, "PDL", False)
    assert common.pdl_flags(hopper, short=True) == {"PDL": False, "launch_pdl": False}
