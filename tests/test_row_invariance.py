"""Row-invariant mode (`kernels.invariance.ROW_INVARIANT`, the default): a stream position's result
must not depend on how many positions share the launch, so a speculative verify step (T = K+1)
computes its first position bit for bit like a decode step (T = 1) on the same cache.

Two kinds of checks, under TRITON_INTERPRET=1 on CPU:
  * launch configs (what decides the GPU's reduction order) are the same for every T / M / R;
  * outputs: the first rows of a T = 1 launch equal (torch.equal) the same rows of wider launches,
    kernel by kernel, op by op (`engine.ops`), and for a whole tiny Gemma 4 decode step.
The interpreter cannot reproduce a GPU's reduction layouts, so the config checks are what guard
the GPU; the output checks guard the wiring (masks, strides, row mapping) and the numerics.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import engine.ops as ops  # noqa: E402
import kernels.decode_attention as da  # noqa: E402
import kernels.gemv as gv  # noqa: E402
import kernels.head_norm as hn  # noqa: E402
import kernels.invariance as invariance  # noqa: E402
import kernels.rmsnorm as rn  # noqa: E402


_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)


EPS = 1e-6
WIDTHS = (2, 9, 16)  # verify widths compared against T = 1


@pytest.fixture(autouse=True)
def _switch_on(monkeypatch):
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    monkeypatch.setattr(gv, "BATCH_INVARIANT", None)  # follow the switch


def rand(shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


# ---- launch configs ----------------------------------------------------------------------------
def test_attention_config_independent_of_T():
    for D in (16, 256, 512):
        for G in (1, 2, 4, 8):
            for B, Hkv, S in ((1, 2, 1024), (4, 2, 532), (32, 1, 4096)):
                configs = {da.launch_config(D, T * G, B, Hkv, S, 132)[:4] for T in range(1, 17)}
                assert len(configs) == 1, (D, G, B, S, configs)
    # the decode step (T = 1) keeps the config the non-invariant heuristic gives it
    assert da.launch_config(256, 4, 1, 2, 1024, 132) == (16, 64, 8, 16)


def test_attention_config_heuristic_depends_on_T(monkeypatch):
    monkeypatch.setattr(invariance, "ROW_INVARIANT", False)
    assert da.launch_config(256, 4, 1, 2, 1024, 132) != da.launch_config(256, 36, 1, 2, 1024, 132)


def test_gemv_config_independent_of_M():
    for N, K in ((2560, 2560), (256, 2560), (2560, 10240), (262144, 2560), (10240, 2560)):
        for elem in (2, 4):
            configs = {tuple(sorted(gv.gemv_config(M, N, K, elem, 132).items())) for M in range(1, 17)}
            assert len(configs) == 1, (N, K, elem)


# ---- kernels: T = 1 rows equal the same rows of wider launches -------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("G", [1, 4])
def test_attention_first_rows_bitwise(dtype, G):
    # linear cache of 512 slots holding 0..300 (default heuristics split it in 4), stale drafts
    # beyond, and a ring with a window; queries at p..p+T-1 whose K/V are already written.
    B, Hkv, D, S = 2, 2, 32, 512
    p = 292
    k, v = rand((B, Hkv, S, D), dtype, 1), rand((B, Hkv, S, D), dtype, 2)
    j = torch.arange(S, dtype=torch.int32)
    slot_pos = torch.where(j < p + 16, j, -1)[None].repeat(B, 1)
    q_all = rand((B, 16, G * Hkv, D), dtype, 3)
    pos_all = (p + torch.arange(16, dtype=torch.int32))[None].repeat(B, 1)
    assert da.launch_config(D, G, B, Hkv, S, 132)[3] > 1  # the split-KV merge is exercised
    for window in (0, 100):
        one = da.decode_attention_triton(q_all[:, :1], k, v, slot_pos, pos_all[:, :1], window, 0.2)
        ref = da.decode_attention_ref(q_all[:, :1], k, v, slot_pos, pos_all[:, :1], window, 0.2)
        assert (one.float() - ref.float()).abs().max().item() <= {torch.float32: 2e-5, torch.float16: 4e-3}[dtype]
        for T in WIDTHS:
            wide = da.decode_attention_triton(q_all[:, :T], k, v, slot_pos, pos_all[:, :T], window, 0.2)
            assert torch.equal(wide[:, :1], one), (window, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,K", [(96, 256), (40, 1024)])  # (40, 1024): split-K by the heuristic
def test_gemv_rows_bitwise(dtype, N, K):
    x, w = rand((16, K), dtype, 4), rand((N, K), dtype, 5)
    full = gv.linear_small_m_triton(x, w)
    for M in (1, 2, 5, 9):
        assert torch.equal(gv.linear_small_m_triton(x[:M], w), full[:M]), M
    exact = x.float() @ w.float().T
    assert (full.float() - exact).abs().max().item() <= {torch.float32: 2e-6, torch.float16: 2 ** -10}[dtype] \
        * exact.abs().max().item()


def stream_rows(B, T, N, dtype, seed, scale=1.0):
    """[B, 16, N] activations; [:, :T] is the launch of width T (a strided view, as in a step)."""
    return rand((B, 16, N), dtype, seed, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,block_n", [(64, None), (300, None), (300, 64)])
def test_hidden_norms_bitwise(dtype, N, block_n):
    x, r = stream_rows(2, 16, N, dtype, 6, 3.0), stream_rows(2, 16, N, dtype, 7, 10.0)
    w1, w2 = rand((N,), dtype, 8), (1 + rand((N,), torch.float32, 9, 0.1)).to(dtype)
    scalar = torch.tensor([0.6]).to(dtype)

    def outs(T):
        xs, rs = x[:, :T], r[:, :T]
        h, y = rn.post_norm_residual_pre_norm_triton(xs, rs, w1, w2, EPS, False, block_n=block_n, scalar=scalar)
        return (rn.rmsnorm_triton(xs, w1, EPS, True, block_n=block_n), h, y,
                rn.residual_rmsnorm_triton(xs, rs, w1, EPS, False, block_n=block_n))

    one = outs(1)
    for T in WIDTHS:
        for a, b in zip(one, outs(T)):
            assert torch.equal(b[:, :1], a), T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_norms_and_kv_write_bitwise(dtype):
    B, H, Hkv, D, S = 2, 4, 2, 32, 40
    q, k, v = rand((B, 16, H, D), dtype, 10, 2.0), rand((B, 16, Hkv, D), dtype, 11, 2.0), \
        rand((B, 16, Hkv, D), dtype, 12)
    w = rand((D,), dtype, 13)
    cos, sin = rand((B, 16, 1, D), dtype, 14), rand((B, 16, 1, D), dtype, 15)
    positions = (30 + torch.arange(16))[None].repeat(B, 1)
    rows = torch.arange(B)[:, None].expand(B, 16)
    slots = positions % S

    def outs(T):
        kc, vc = torch.zeros(B, Hkv, S + 1, D, dtype=dtype), torch.zeros(B, Hkv, S + 1, D, dtype=dtype)
        sp = torch.full((B, S + 1), -1, dtype=torch.int32)
        hn.write_kv_triton(k[:, :T], v[:, :T], w, cos[:, :T], sin[:, :T], kc, vc, sp, rows[:, :T], slots[:, :T],
                           positions[:, :T].to(torch.int32), EPS, False, True)
        first = slots[0, 0]
        return (hn.head_norm_triton(q[:, :T], w, EPS, False, cos[:, :T], sin[:, :T])[:, :1],
                hn.head_norm_triton(v[:, :T], None, EPS, False)[:, :1], kc[:, :, first], vc[:, :, first])

    one = outs(1)
    for T in WIDTHS:
        for a, b in zip(one, outs(T)):
            assert torch.equal(a, b), T


# ---- engine.ops: every norm op's row-invariant path ------------------------------------------
NORM_OPS = _testutil.ROW_INVARIANT_OPS


def test_every_norm_op_has_a_row_invariant_path_and_cpu_stays_reference():
    x, w = rand((2, 3, 64), torch.float32, 16), rand((64,), torch.float32, 17)
    for name in NORM_OPS:
        assert callable(getattr(ops, name).row_invariant), name
    # CPU tensors never take the kernel path, switch on or off: CPU results are the reference's
    assert torch.equal(ops.norm(x, w, EPS, False), ops.norm.reference(x, w, EPS, False))


def test_dispatch_follows_switch(monkeypatch):
    class FakeCuda:
        is_cuda = True

    monkeypatch.setattr(ops, "_COMPILE", False)
    op = ops._row_invariant(lambda *a: "kernels")(ops._fused(lambda *a: "fused"))
    assert op(FakeCuda()) == "kernels"
    monkeypatch.setattr(invariance, "ROW_INVARIANT", False)
    assert op(FakeCuda()) == "fused"


@pytest.mark.parametrize("plus_one", [False, True])
def test_ops_row_invariant_paths_bitwise_and_close(plus_one):
    B, H, Hkv, D, N, S, L, P = 2, 4, 2, 16, 64, 24, 3, 16
    g = torch.Generator().manual_seed(18)
    x, res = torch.randn(B, 16, N, generator=g) * 3, torch.randn(B, 16, N, generator=g) * 10
    w1, w2, wd, wp = torch.randn(N, generator=g), torch.randn(N, generator=g), torch.randn(D, generator=g), \
        torch.randn(P, generator=g)
    scalar = torch.tensor([0.8])
    qkv = torch.randn(B, 16, (H + 2 * Hkv) * D, generator=g)
    cos, sin = torch.randn(B, 16, 1, D, generator=g), torch.randn(B, 16, 1, D, generator=g)
    ctx, tok = torch.randn(B, 16, L, P, generator=g), torch.randn(B, 16, L, P, generator=g)
    positions = (20 + torch.arange(16))[None].repeat(B, 1)
    rows = torch.arange(B)[:, None].expand(B, 16)

    def run(path, T):
        """All norm ops at width T; returns position 0 of each output."""
        qkv_t = qkv[:, :T]
        q = qkv_t[..., :H * D].view(B, T, H, D)
        k = qkv_t[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D)
        v = qkv_t[..., (H + Hkv) * D:].view(B, T, Hkv, D)
        c, s = cos[:, :T], sin[:, :T]
        kc, vc = torch.zeros(B, Hkv, S + 1, D), torch.zeros(B, Hkv, S + 1, D)
        sp = torch.full((B, S + 1), -1, dtype=torch.int32)
        path("write_kv")(k, v, wd, c, s, kc, vc, sp, rows[:, :T], positions[:, :T] % S,
                         positions[:, :T].to(torch.int32), EPS, plus_one, True)
        slot = positions[0, 0] % S
        outs = [path("norm")(x[:, :T], w1, EPS, plus_one), path("add_norm")(x[:, :T], res[:, :T], w1, EPS, plus_one),
                *path("sandwich")(x[:, :T], res[:, :T], w1, w2, scalar, EPS, plus_one),
                *path("sandwich")(x[:, :T], res[:, :T], w1, w2, None, EPS, plus_one),
                path("norm_rope")(q, wd, c, s, EPS, plus_one), path("scale_free_norm")(v, EPS),
                path("ple_combine")(ctx[:, :T], tok[:, :T], wp, N ** -0.5, P ** 0.5, EPS)]
        return [o[:, :1] for o in outs] + [kc[:, :, slot], vc[:, :, slot], sp[:, slot]]

    def kernels(name):
        return getattr(ops, name).row_invariant

    def reference(name):
        return getattr(ops, name).reference

    one = run(kernels, 1)
    for got, want in zip(one, run(reference, 1)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert (got.float() - want.float()).abs().max().item() <= 1e-5 * max(1.0, want.float().abs().max().item())
    for T in WIDTHS:
        for a, b in zip(one, run(kernels, T)):
            assert torch.equal(a, b), T


# ---- a whole decode step of a tiny Gemma 4 ------------------------------------------------------
def _per_position(op):
    """An elementwise op applied one stream position at a time. On CPU, ATen's vectorised gelu/tanh
    and its scalar tail loop round differently, so the same element can come out 1 ulp apart
    depending on the tensor's length; on the GPU an elementwise kernel runs one code path for every
    element. Per-position calls give the CPU that property for this test."""
    def run(*args):
        T = args[0].shape[1]
        return torch.cat([op(*(a[:, t:t + 1].contiguous() if isinstance(a, torch.Tensor) else a for a in args))
                          for t in range(T)], dim=1)

    return run


def _no_reference_norm(*args, **kwargs):
    raise AssertionError("a norm ran through the PyTorch reference inside the kernel-path step")


def test_tiny_gemma4_decode_step_first_position_bitwise(monkeypatch):
    model, arch, step, fresh_cache = _testutil.tiny_decode_setup("tiny-gemma4", (19, 20))

    with torch.no_grad():
        want = step(1, fresh_cache())  # the CPU reference path

    # route everything the way CUDA does in row-invariant mode
    _testutil.route_decode_as_cuda(monkeypatch)
    for name in ("gelu_mul", "gelu_gate"):
        monkeypatch.setattr(ops, name, _per_position(getattr(ops, name)))
    with torch.no_grad():
        cache = fresh_cache()
        monkeypatch.setattr(ops, "rms_norm", _no_reference_norm)
        wide = step(9, cache)[:, :1].clone()  # verify of 9 positions, then decode of the first again
        one = step(1, cache)
    assert torch.equal(one, wide)
    assert (one - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    assert torch.equal(model.greedy(one), model.greedy(wide))


def test_stage_repeat_changes_nothing_but_runs_twice(monkeypatch):
    """`VKAE_STAGE_REPEAT` (scripts/stage_costs_gpu.py) must leave results bit for bit unchanged, the K/V
    cache included, while really running each named stage twice."""
    import engine.model as model_mod

    model, arch, step, fresh_cache = _testutil.tiny_decode_setup("tiny-gemma4", (19, 20))
    with torch.no_grad():
        want_cache = fresh_cache()
        want = step(2, want_cache)
    calls = []
    real_stage = model_mod._stage
    monkeypatch.setattr(model_mod, "_stage", lambda name, fn, *a: (calls.append(name), real_stage(name, fn, *a))[1])
    monkeypatch.setattr(model_mod, "STAGE_REPEAT", frozenset(model_mod.STAGES))
    counted = []
    real_attend = model_mod.attend_cache
    monkeypatch.setattr(model_mod, "attend_cache", lambda *a, **k: (counted.append(1), real_attend(*a, **k))[1])
    with torch.no_grad():
        cache = fresh_cache()
        got = step(2, cache)
    assert torch.equal(got, want)
    for lw, lg in zip(want_cache.layers.values(), cache.layers.values()):
        assert torch.equal(lw.k, lg.k) and torch.equal(lw.v, lg.v) and torch.equal(lw.slot_pos, lg.slot_pos)
    assert set(calls) == set(model_mod.STAGES) - ({"ple"} if not arch.ple_dim else set())
    assert len(counted) == 2 * arch.num_layers  # attention ran twice per layer
