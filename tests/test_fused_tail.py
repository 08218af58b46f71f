"""The fused layer-tail ops (`engine.fused_tail`) wired into whole decode steps, under TRITON_INTERPRET=1.

Tiny Gemma 4 (PLE, layer scalars, plain-weight norms) and Gemma 3 ((1 + w) norms, no PLE) decode steps
routed the way CUDA routes them (Triton GEMV, norms, attention), with the fused epilogues on, against
the same step with them off and against the CPU reference: fp32 within 1e-5. Also with a GEMV config
that splits K everywhere (at tiny widths the heuristic never splits), so the split-K reduce + norm and
reduce + GELU kernels run inside the model; and the row-invariance property end to end: position 0 of
a 9-position verify step equals a 1-token decode step bit for bit. On CPU the ops are the unfused
composition, call for call.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import engine.fused_tail as fused_tail  # noqa: E402
import engine.linear as linear_mod  # noqa: E402
import engine.ops as ops  # noqa: E402
import kernels.fused_mlp as fm  # noqa: E402
import kernels.gemv as gv  # noqa: E402
import kernels.gemv_epilogue as ge  # noqa: E402
import kernels.gemv_gated_input as gi  # noqa: E402
import kernels.qkv_heads as qh  # noqa: E402
import kernels.invariance as invariance  # noqa: E402
import kernels.splitk_norm as sn  # noqa: E402
from kernels._common import cdiv  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)

EPS = 1e-6
FUSED_KERNELS = ((sn, "linear_sandwich_triton"), (sn, "linear_add_norm_triton"), (ge, "linear_geglu_triton"),
                 (ge, "linear_gelu_gate_triton"), (qh, "linear_qkv_heads_triton"), (gi, "gelu_gate_linear_triton"))


@pytest.fixture(autouse=True)
def _switches(monkeypatch):
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    monkeypatch.setattr(gv, "BATCH_INVARIANT", None)
    monkeypatch.setattr(fused_tail, "FUSED_EPILOGUES", True)
    monkeypatch.setattr(fused_tail, "FUSED_PLE", True)
    # off here, so `_steps` gives the two-launch attention; on in the test of the merge in the o projection
    monkeypatch.setattr(fused_tail, "FUSED_ATTN_MERGE", False)


# ---- dispatch -----------------------------------------------------------------------------------
def test_cpu_ops_are_the_unfused_composition():
    from engine.linear import Linear

    g = torch.Generator().manual_seed(0)
    x, res, pli = torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 48, generator=g), \
        torch.randn(2, 3, 24, generator=g)
    lin, gate_up, gate = Linear(torch.randn(48, 32, generator=g)), Linear(torch.randn(64, 32, generator=g)), \
        Linear(torch.randn(24, 32, generator=g))
    w1, w2, scalar = torch.randn(48, generator=g), torch.randn(48, generator=g), torch.tensor([0.5])
    assert not fused_tail.fusable(x, lin.weight)  # CPU tensors never fuse
    for got, want in ((fused_tail.proj_sandwich(lin, x, res, w1, w2, scalar, EPS, True),
                       ops.sandwich(lin(x), res, w1, w2, scalar, EPS, True)),
                      (fused_tail.proj_add_norm(lin, x, res, w1, EPS, False),
                       ops.add_norm(lin(x), res, w1, EPS, False)),
                      (fused_tail.proj_geglu(gate_up, x), ops.gelu_mul(gate_up(x))),
                      (fused_tail.proj_gelu_gate(gate, x, pli), ops.gelu_gate(gate(x), pli))):
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(a, b)


def test_cpu_mlp_ops_are_the_unfused_composition(monkeypatch):
    """The whole-MLP ops with the fused-MLP switch on: CPU tensors never fuse, so each is the unfused
    composition, call for call (down(gelu_mul(gate_up(x))), then the sandwich / add + norm)."""
    from engine.linear import Linear

    monkeypatch.setattr(fused_tail, "FUSED_MLP", True)
    g = torch.Generator().manual_seed(1)
    x, res = torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    gate_up, down = Linear(torch.randn(128, 32, generator=g)), Linear(torch.randn(32, 64, generator=g))
    w1, w2, scalar = torch.randn(32, generator=g), torch.randn(32, generator=g), torch.tensor([0.5])
    assert not fused_tail._mlp_fusable(gate_up, down, x)
    mlp = down(ops.gelu_mul(gate_up(x)))
    for got, want in ((fused_tail.mlp_sandwich(gate_up, down, x, res, w1, w2, scalar, EPS, True),
                       ops.sandwich(mlp, res, w1, w2, scalar, EPS, True)),
                      (fused_tail.mlp_sandwich(gate_up, down, x, res, w1, w2, None, EPS, False),
                       ops.sandwich(mlp, res, w1, w2, None, EPS, False)),
                      (fused_tail.mlp_add_norm(gate_up, down, x, res, w1, EPS, False),
                       ops.add_norm(mlp, res, w1, EPS, False)),
                      (fused_tail.mlp_add_norm(gate_up, down, x, res, w1, EPS, True),
                       ops.add_norm(mlp, res, w1, EPS, True))):
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(a, b)


def test_switch_gates_fusion(monkeypatch):
    monkeypatch.setattr(linear_mod, "routes_to_gemv", lambda x, w: True)  # as a CUDA decode-width call
    monkeypatch.setattr("kernels._common.use_triton", lambda t: True)
    x = torch.zeros(1, 8)
    assert fused_tail.fusable(x, x)
    monkeypatch.setattr(fused_tail, "FUSED_EPILOGUES", False)
    assert not fused_tail.fusable(x, x)


# ---- whole decode steps routed as on CUDA --------------------------------------------------------
def _split_everywhere(orig):
    """gemv_config with BLOCK_K 16 and up to 4 splits whatever the shape (tiny K never splits otherwise)."""
    def config(M, N, K, elem_bytes, sms):
        cfg = orig(M, N, K, elem_bytes, sms)
        split = max(1, min(4, K // 32))
        kps = cdiv(cdiv(K, split), 16) * 16
        cfg.update(BLOCK_K=16, SPLIT_K=cdiv(K, kps), k_per_split=kps)
        return cfg

    return config


def _route_as_cuda(monkeypatch, fused: bool, calls: dict[str, int]) -> None:
    _testutil.route_decode_as_cuda(monkeypatch)
    monkeypatch.setattr(fused_tail, "FUSED_EPILOGUES", fused)
    monkeypatch.setattr(fused_tail, "fusable",
                        lambda x, w: fused_tail.FUSED_EPILOGUES and x.numel() <= 16 * x.shape[-1])
    for mod, name in FUSED_KERNELS:
        def counted(*a, _fn=getattr(mod, name), _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **kw)

        monkeypatch.setattr(mod, name, counted)


def _steps(alias: str, monkeypatch, split_everywhere: bool):
    """(CPU reference decode, unfused kernel decode, fused kernel decode, fused verify row 0), fp32."""
    model, arch, step, fresh_cache = _testutil.tiny_decode_setup(alias, (1, 2))

    with torch.no_grad():
        want = step(1, fresh_cache())
        if split_everywhere:
            monkeypatch.setattr(gv, "gemv_config", _split_everywhere(gv.gemv_config))
        calls: dict[str, int] = {}
        _route_as_cuda(monkeypatch, False, calls)
        unfused = step(1, fresh_cache())
        assert not calls
        monkeypatch.setattr(fused_tail, "FUSED_EPILOGUES", True)
        cache = fresh_cache()
        wide = step(9, cache)[:, :1].clone()
        one = step(1, cache)
    return model, arch, want, unfused, one, wide, calls


def _assert_fused_step(model, want, unfused, one, wide) -> None:
    """The fused decode step `one` matches the unfused kernels and the CPU reference `want` (fp32, 1e-5 of the
    scale), row 0 of the 9-wide verify `wide` bit for bit (row invariance holds with the fusions on), and
    greedy picks the reference's token."""
    scale = max(1.0, want.abs().max().item())
    assert (one - unfused).abs().max().item() <= 1e-5 * scale
    assert (one - want).abs().max().item() <= 1e-5 * scale
    assert torch.equal(one, wide)
    assert torch.equal(model.greedy(one), model.greedy(want))


@pytest.mark.parametrize("alias,split_everywhere,fused_ple", [("tiny-gemma4", False, True), ("tiny-gemma4", True, True),
                                                              ("tiny-gemma4", True, False), ("tiny-gemma3", True, True)],
                         ids=["gemma4-heuristic", "gemma4-split-everywhere", "gemma4-split-everywhere-ple-3-launches",
                              "gemma3-split-everywhere"])
def test_fused_decode_step_matches_unfused_and_reference(alias, split_everywhere, fused_ple, monkeypatch):
    monkeypatch.setattr(fused_tail, "FUSED_PLE", fused_ple)
    model, arch, want, unfused, one, wide, calls = _steps(alias, monkeypatch, split_everywhere)
    L, ple = arch.num_layers, arch.ple_dim > 0
    # per layer: o_proj, gate_up, then down (+ PLE gate and PLE projection); decode and verify steps
    expected = {"linear_sandwich_triton": 4 * L, "linear_geglu_triton": 2 * L,  # o_proj + (down or PLE proj)
                "linear_qkv_heads_triton": 2 * L}
    if ple and split_everywhere and fused_ple:
        # the gate splits K and the projection (K = ple_dim < 64) does not: the two-launch PLE path, whose
        # projection computes the gated input itself; its norms are the plain sandwich kernel
        assert arch.ple_dim < 64
        expected.update(linear_add_norm_triton=2 * L, gelu_gate_linear_triton=2 * L, linear_sandwich_triton=2 * L)
    elif ple:  # nothing splits: the gate's reduce is in its GEMV already, the three-launch path
        expected.update(linear_add_norm_triton=2 * L, linear_gelu_gate_triton=2 * L)
    assert calls == expected
    _assert_fused_step(model, want, unfused, one, wide)


@pytest.mark.parametrize("alias,split_everywhere", [("tiny-gemma4", False), ("tiny-gemma3", True)],
                         ids=["gemma4-heuristic", "gemma3-split-everywhere"])
def test_fused_mlp_decode_step_matches_unfused_and_reference(alias, split_everywhere, monkeypatch):
    """FUSED_MLP on: each layer's gate_up + GeGLU + down runs as `kernels.fused_mlp.mlp_sum_triton` and the
    partial-sum norm tail, once per layer and step, instead of the GeGLU GEMV and the down GEMV + norm."""
    monkeypatch.setattr(fused_tail, "FUSED_MLP", True)
    # the tiny models' intermediate size (128) in GROUP_I 32 slices of two UNIT 16 tiles (the unfused GeGLU
    # GEMV's tile), down outputs (hidden 64) in two BLOCK_H tiles
    monkeypatch.setattr(fm, "GROUP_I", 32)
    monkeypatch.setattr(fm, "UNIT", 16)
    monkeypatch.setattr(fm, "BLOCK_H", 32)
    mlp_calls: list[int] = []

    def counted(x, *a, _fn=fm.mlp_sum_triton, **kw):
        mlp_calls.append(x.shape[0])
        return _fn(x, *a, **kw)

    monkeypatch.setattr(fm, "mlp_sum_triton", counted)
    model, arch, want, unfused, one, wide, calls = _steps(alias, monkeypatch, split_everywhere)
    L, ple = arch.num_layers, arch.ple_dim > 0
    assert all(i % fm.GROUP_I == 0 for i in arch.intermediate_sizes)
    assert mlp_calls == [9] * L + [1] * L  # the verify step's layers, then the decode step's
    # per layer: o_proj (+ PLE gate and PLE projection); the MLP is no GeGLU GEMV, no down GEMV
    expected = {"linear_sandwich_triton": (4 if ple else 2) * L, "linear_qkv_heads_triton": 2 * L}
    if ple:
        expected.update(linear_gelu_gate_triton=2 * L)
    assert calls == expected
    _assert_fused_step(model, want, unfused, one, wide)


@pytest.mark.parametrize("alias,max_rows", [("tiny-gemma4", 1), ("tiny-gemma4", 16), ("tiny-gemma3", 16)])
def test_attention_merge_in_o_proj_decode_step_bitwise(alias, max_rows, monkeypatch):
    """FUSED_ATTN_MERGE on, with decode attention forced to split its caches into 16-slot pieces: every
    layer's o projection in a step of at most `max_rows` rows runs `kernels.gemv_merged_input.merged_sandwich_triton`
    on the unmerged splits (no stage 2 launch), and the steps are bit for bit those with the switch off; verify
    row 0 equals decode (with max_rows 1, the default, decode merges in the o projection and verify in stage 2)."""
    import kernels.decode_attention as da
    import kernels.gemv_merged_input as gm

    monkeypatch.setattr(da, "ATTN_BLOCK_N", 16)
    monkeypatch.setattr(da, "MIN_SPLIT_SLOTS", 16)
    model, arch, want, unfused, one, wide, calls = _steps(alias, monkeypatch, True)
    merged: list[int] = []

    def counted(split, *a, _fn=gm.merged_sandwich_triton, **kw):
        merged.append(split.num_splits)
        return _fn(split, *a, **kw)

    monkeypatch.setattr(gm, "merged_sandwich_triton", counted)
    monkeypatch.setattr(fused_tail, "FUSED_ATTN_MERGE", True)
    monkeypatch.setattr(fused_tail, "ATTN_MERGE_MAX_ROWS", max_rows)
    _, _, step, fresh_cache = _testutil.tiny_decode_setup(alias, (1, 2))
    with torch.no_grad():
        cache = fresh_cache()
        wide_m = step(9, cache)[:, :1].clone()
        one_m = step(1, cache)
    L = arch.num_layers
    assert len(merged) == (2 if max_rows >= 9 else 1) * L and min(merged) > 1  # every layer took the deferred merge
    assert torch.equal(one_m, one) and torch.equal(wide_m, wide)
    _assert_fused_step(model, want, unfused, one_m, wide_m)


def test_pending_norms_decode_step_matches_unfused_and_reference(monkeypatch):
    """PENDING_ADD_NORM and PENDING_SANDWICH on, with every GEMV splitting K: each layer's down add + norm is left
    pending for the PLE gate (`kernels.pending_add_norm.pending_gate_triton`, once per layer and step; no add_norm
    kernel), and every layer's closing sandwich but the last is left pending for the next layer's q/k/v GEMV
    (`kernels.pending_sandwich`); the last layer runs the pending gate with the plain sandwich after it. The step
    still matches the unfused kernels and the CPU reference, and verify row 0 equals decode bit for bit. (With the
    fused MLP the pending partials are its one partial: the kernel tests cover one input partial.)"""
    import kernels.pending_add_norm as pa
    import kernels.pending_sandwich as ps

    monkeypatch.setattr(fused_tail, "PENDING_ADD_NORM", True)
    monkeypatch.setattr(fused_tail, "PENDING_SANDWICH", True)
    gate_rows: list[int] = []
    qkv_rows: list[int] = []

    def counted_gate(pending, *a, _fn=pa.pending_gate_triton, **kw):
        gate_rows.append(pending.part.shape[1])
        return _fn(pending, *a, **kw)

    def counted_qkv(pending, *a, _fn=ps.launch_pending_gemv, **kw):
        qkv_rows.append(pending.y.reshape(-1, pending.y.shape[-1]).shape[0])
        return _fn(pending, *a, **kw)

    monkeypatch.setattr(pa, "pending_gate_triton", counted_gate)
    monkeypatch.setattr(ps, "launch_pending_gemv", counted_qkv)
    model, arch, want, unfused, one, wide, calls = _steps("tiny-gemma4", monkeypatch, True)
    L = arch.num_layers
    assert gate_rows == [9] * L + [1] * L  # the verify step's layers, then the decode step's
    assert qkv_rows == [9] * (L - 1) + [1] * (L - 1)
    assert "linear_add_norm_triton" not in calls and "gelu_gate_linear_triton" not in calls
    _assert_fused_step(model, want, unfused, one, wide)
