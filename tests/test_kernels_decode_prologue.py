"""The decode step's fused prologue (`kernels.decode_prologue`) and its wiring into `GemmaDecoder.forward_step`,
under TRITON_INTERPRET=1.

Kernel by kernel against the references: gathers (RoPE rows), int32 positions, cache rows and slots exact;
h = embed * scale exact (one rounding on both sides); the norms and the PLE combine within fp32 / fp16 noise
(fp16 may differ by one rounding step where sums accumulate in another order). bf16 is left out: the
interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest (see tests/test_kernels_rmsnorm.py).
Row invariance: a position computed in a call of one position equals, bit for bit, the same position in
wider calls. Whole tiny decode steps routed as on CUDA: the fused prologue on vs off (1e-5 in fp32), it
really replaces the unfused pieces, and verify row 0 == decode with it on.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import engine.fused_tail as fused_tail  # noqa: E402
import engine.model as model_mod  # noqa: E402
import engine.ops as ops  # noqa: E402
import kernels._common as common  # noqa: E402
import kernels.decode_prologue as dp  # noqa: E402
import kernels.gemv as gv  # noqa: E402
import kernels.invariance as invariance  # noqa: E402

_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)

EPS = 1e-6
REL = {torch.float32: 4e-6, torch.float16: 2 ** -10}
V, MAX_POS = 40, 64
GEOMETRIES = [(True, 7), (False, 48)]  # a ring (slot = p % 7) and a linear cache; trash slots 7 and 48


@pytest.fixture(autouse=True)
def _switches(monkeypatch):
    monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
    monkeypatch.setattr(gv, "BATCH_INVARIANT", None)


def _weights(dtype: torch.dtype, N: int, dims: tuple[int, ...], seed: int):
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(V, N, generator=g).to(dtype)
    norm_w = (0.5 * torch.randn(N, generator=g)).to(dtype)
    tables = [(torch.randn(MAX_POS, d, generator=g).to(dtype), torch.randn(MAX_POS, d, generator=g).to(dtype))
              for d in dims]
    return embed, norm_w, tables


def _inputs(B: int, T: int, seed: int, pad_rows: int = 1):
    """tokens/positions [B, T]: stream b at positions 3b + 5 .. (past the ring's 7 slots); the last
    `pad_rows` streams are inactive (-1), as the engine pads them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    positions = (torch.arange(B)[:, None] * 3 + 5 + torch.arange(T)[None]).long()
    if pad_rows:
        positions[B - pad_rows:] = -1
    return tokens, positions


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    _testutil.assert_close_scaled(out, ref, REL)


def _assert_prologue(out: dp.DecodePrologue, ref: dp.DecodePrologue) -> None:
    assert torch.equal(out.h, ref.h)  # embed * scale: one rounding on both sides
    _assert_close(out.x, ref.x)
    assert out.pos32.dtype == torch.int32 and torch.equal(out.pos32, ref.pos32)
    assert out.rows.dtype == torch.int64 and torch.equal(out.rows, ref.rows)
    assert len(out.rope) == len(ref.rope) and len(out.slots) == len(ref.slots)
    for (c, s), (cr, sr) in zip(out.rope, ref.rope):
        assert c.shape == cr.shape and torch.equal(c, cr) and torch.equal(s, sr)
    for got, want in zip(out.slots, ref.slots):
        assert got.dtype == want.dtype and torch.equal(got, want)


# ---- the prologue kernel --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,dims", [(64, (16, 32)), (100, (8,))], ids=["2-tables", "ragged-1-table"])
@pytest.mark.parametrize("plus_one", [False, True])
def test_prologue_matches_reference(dtype, N, dims, plus_one):
    embed, norm_w, tables = _weights(dtype, N, dims, seed=N)
    tokens, positions = _inputs(3, 4, seed=1)
    for geometries in (GEOMETRIES, GEOMETRIES[:1], [(False, 48), (True, 9), (True, 7), (False, 30)], []):
        out = dp.decode_prologue_triton(tokens, positions, embed, 7.5, norm_w, EPS, plus_one, tables, geometries)
        _assert_prologue(out, dp.decode_prologue_ref(tokens, positions, embed, 7.5, norm_w, EPS, plus_one, tables,
                                                     geometries))


def test_prologue_matches_engine_pieces():
    """Against the engine's own unfused prologue pieces: RopeTable.lookup, LayerCache.slot_of, ops.norm."""
    from engine.cache import LayerCache
    from engine.config import RopeSpec
    from engine.rope import RopeTable

    embed, norm_w, _ = _weights(torch.float32, 64, (), seed=3)
    table = RopeTable(RopeSpec(theta=10000.0, head_dim=16, rotary_pairs=8, linear_factor=1.0), MAX_POS, "cpu",
                      torch.float32)
    caches = [LayerCache(2, 1, n, 16, ring, "cpu", torch.float32) for ring, n in GEOMETRIES]
    tokens, positions = _inputs(3, 2, seed=4)
    out = dp.decode_prologue_triton(tokens, positions, embed, 8.0, norm_w, EPS, True, [(table.cos, table.sin)],
                                    GEOMETRIES)
    cos, sin = table.lookup(positions)
    assert torch.equal(out.rope[0][0], cos) and torch.equal(out.rope[0][1], sin)
    for got, lc in zip(out.slots, caches):
        assert torch.equal(got, lc.slot_of(positions))
    _assert_close(out.x, ops.norm.reference(embed[tokens] * 8.0, norm_w, EPS, True))


def test_prologue_strided_inputs_and_empty():
    embed, norm_w, tables = _weights(torch.float32, 64, (16, 32), seed=5)
    tokens, positions = _inputs(3, 4, seed=6)
    tok_t, pos_t = tokens.t().contiguous().t(), positions.t().contiguous().t()  # column-major [B, T]
    out = dp.decode_prologue_triton(tok_t, pos_t, embed, 2.0, norm_w, EPS, False, tables, GEOMETRIES)
    _assert_prologue(out, dp.decode_prologue_ref(tokens, positions, embed, 2.0, norm_w, EPS, False, tables,
                                                 GEOMETRIES))
    empty = dp.decode_prologue_triton(tokens[:0], positions[:0], embed, 2.0, norm_w, EPS, False, tables, GEOMETRIES)
    assert empty.h.shape == (0, 4, 64) and empty.slots[0].shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prologue_rows_bitwise(dtype):
    """Each position alone (one program) equals the same position inside wider calls, bit for bit."""
    embed, norm_w, tables = _weights(dtype, 64, (16, 32), seed=7)
    tokens, positions = _inputs(2, 9, seed=8, pad_rows=0)
    positions[1, 4:] = -1  # padding inside a row
    wide = dp.decode_prologue_triton(tokens, positions, embed, 5.0, norm_w, EPS, False, tables, GEOMETRIES)
    for b, t in ((0, 0), (0, 8), (1, 3), (1, 6)):
        one = dp.decode_prologue_triton(tokens[b:b + 1, t:t + 1], positions[b:b + 1, t:t + 1], embed, 5.0, norm_w,
                                        EPS, False, tables, GEOMETRIES)
        assert torch.equal(one.h[0, 0], wide.h[b, t]) and torch.equal(one.x[0, 0], wide.x[b, t])
        assert torch.equal(one.pos32[0, 0], wide.pos32[b, t])
        for (c, s), (cw, sw) in zip(one.rope, wide.rope):
            assert torch.equal(c[0, 0], cw[b, t]) and torch.equal(s[0, 0], sw[b, t])
        for s1, sw in zip(one.slots, wide.slots):
            assert torch.equal(s1[0, 0], sw[b, t])


def test_prologue_refuses_unsupported_widths():
    embed, norm_w, tables = _weights(torch.float32, 64, (16, 32, 16), seed=9)
    tokens, positions = _inputs(1, 1, seed=10, pad_rows=0)
    with pytest.raises(ValueError):
        dp.decode_prologue_triton(tokens, positions, embed, 1.0, norm_w, EPS, False, tables, GEOMETRIES)
    with pytest.raises(ValueError):
        dp.decode_prologue_triton(tokens, positions, embed, 1.0, norm_w, EPS, False, tables[:2], GEOMETRIES * 3)
    assert not dp.supports(64, 3, 2) and not dp.supports(64, 2, 5) and not dp.supports(32768, 2, 2)


# ---- the PLE gather + combine kernel ---------------------------------------------------------------
def _ple_inputs(dtype: torch.dtype, L: int, P: int, B: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ple = torch.randn(V, L * P, generator=g).to(dtype)
    ctx = (4 * torch.randn(B, T, L * P, generator=g)).to(dtype)
    w = (1 + 0.2 * torch.randn(P, generator=g)).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return ctx, tokens, ple, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L,P", [(3, 16), (2, 24)], ids=["pow2", "ragged"])
@pytest.mark.parametrize("settled", [False, True])
def test_ple_combine_matches_reference(dtype, L, P, settled):
    ctx, tokens, ple, w = _ple_inputs(dtype, L, P, 2, 3, seed=L * P)
    out = dp.ple_combine_gather_triton(ctx, tokens, ple, w, 0.125, 4.0, EPS, tokens_settled=settled)
    assert out.shape == (2, 3, L, P)
    _assert_close(out, dp.ple_combine_gather_ref(ctx, tokens, ple, w, 0.125, 4.0, EPS))
    # the engine's reference op (rounds tok * scale and the sum too in fp16: a few ulps more)
    tok = torch.nn.functional.embedding(tokens, ple).reshape(2, 3, L, P)
    want = ops.ple_combine.reference(ctx.reshape(2, 3, L, P), tok, w, 0.125, 4.0, EPS)
    _testutil.assert_close_scaled(out, want, {torch.float32: 4e-6, torch.float16: 2 ** -8})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ple_combine_rows_bitwise(dtype):
    ctx, tokens, ple, w = _ple_inputs(dtype, 3, 16, 2, 9, seed=11)
    wide = dp.ple_combine_gather_triton(ctx, tokens, ple, w, 0.125, 4.0, EPS)
    strided = dp.ple_combine_gather_triton(ctx, tokens.t().contiguous().t(), ple, w, 0.125, 4.0, EPS)
    assert torch.equal(strided, wide)
    for b, t in ((0, 0), (1, 5), (1, 8)):
        one = dp.ple_combine_gather_triton(ctx[b:b + 1, t:t + 1], tokens[b:b + 1, t:t + 1], ple, w, 0.125, 4.0, EPS)
        assert torch.equal(one[0, 0], wide[b, t])


def test_dispatch_uses_reference_on_cpu():
    embed, norm_w, tables = _weights(torch.float32, 64, (16,), seed=12)
    tokens, positions = _inputs(2, 2, seed=13)
    ctx, _, ple, w = _ple_inputs(torch.float32, 2, 16, 2, 2, seed=14)
    if not common.FORCE_TRITON_ON_CPU:
        got = dp.decode_prologue(tokens, positions, embed, 3.0, norm_w, EPS, False, tables, GEOMETRIES)
        want = dp.decode_prologue_ref(tokens, positions, embed, 3.0, norm_w, EPS, False, tables, GEOMETRIES)
        assert torch.equal(got.x, want.x)
        assert torch.equal(dp.ple_combine_gather(ctx, tokens, ple, w, 0.5, 4.0, EPS),
                           dp.ple_combine_gather_ref(ctx, tokens, ple, w, 0.5, 4.0, EPS))


# ---- whole tiny decode steps ------------------------------------------------------------------------
def _route_as_cuda(monkeypatch) -> dict[str, int]:
    """Route CPU steps through the kernels CUDA runs (as tests/test_fused_tail.py does) and count the calls of
    the fused prologue's kernels and of the unfused pieces it replaces."""
    from engine.cache import LayerCache
    from engine.rope import RopeTable

    _testutil.route_decode_as_cuda(monkeypatch)
    monkeypatch.setattr(fused_tail, "FUSED_EPILOGUES", True)
    monkeypatch.setattr(fused_tail, "FUSED_ATTN_MERGE", False)
    monkeypatch.setattr(fused_tail, "fusable", lambda x, w: fused_tail.FUSED_EPILOGUES and x.numel() <= 16 * x.shape[-1])
    calls: dict[str, int] = {}
    for owner, name in ((dp, "decode_prologue_triton"), (dp, "ple_combine_gather_triton"), (RopeTable, "lookup"),
                        (LayerCache, "slot_of"), (model_mod.GemmaDecoder, "_embed")):
        def counted(*a, _fn=getattr(owner, name), _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **kw)

        monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("alias", ["tiny-gemma4", "tiny-gemma3"])
def test_fused_prologue_decode_step(alias, monkeypatch):
    model, arch, step, fresh_cache = _testutil.tiny_decode_setup(alias, (3, 4))
    with torch.no_grad():
        reference = step(1, fresh_cache())  # the CPU path: FUSED_PROLOGUE is on, but nothing fuses on CPU
        calls = _route_as_cuda(monkeypatch)
        monkeypatch.setattr(model_mod, "FUSED_PROLOGUE", False)
        cache = fresh_cache()
        calls.clear()
        unfused_wide, unfused = step(9, cache)[:, :1].clone(), step(1, cache)
        geometries = len({(lc.ring, lc.slots) for lc in cache.layers.values()})
        assert calls == {"lookup": 4, "slot_of": 2 * geometries, "_embed": 2}  # two steps, unfused
        monkeypatch.setattr(model_mod, "FUSED_PROLOGUE", True)
        cache = fresh_cache()  # the prefill keeps the unfused pieces
        calls.clear()
        wide = step(9, cache)[:, :1].clone()
        one = step(1, cache)
    # the two steps take the fused prologue only
    assert calls == {"decode_prologue_triton": 2, **({"ple_combine_gather_triton": 2} if arch.ple_dim else {})}
    scale = max(1.0, reference.abs().max().item())
    assert (one - unfused).abs().max().item() <= 1e-5 * scale
    assert (one - reference).abs().max().item() <= 1e-5 * scale
    assert (wide - unfused_wide).abs().max().item() <= 1e-5 * scale
    assert torch.equal(one, wide)  # verify row 0 == decode, with the fused prologue
    assert torch.equal(model.greedy(one), model.greedy(reference))


def test_fused_prologue_needs_fusable_step(monkeypatch):
    """Wider than a GEMV's rows (prefill widths) or with the epilogue fusions off: the unfused prologue."""
    model, arch, step, fresh_cache = _testutil.tiny_decode_setup("tiny-gemma4", (5, 6))
    calls = _route_as_cuda(monkeypatch)
    tokens = torch.zeros(1, 17, dtype=torch.long)
    assert not model._prologue_fusable(tokens, 2)
    assert model._prologue_fusable(tokens[:, :16], 2)
    assert not model._prologue_fusable(tokens[:, :16], dp.MAX_GEOMETRIES + 1)
    monkeypatch.setattr(fused_tail, "FUSED_EPILOGUES", False)
    assert not model._prologue_fusable(tokens[:, :1], 2)
    with torch.no_grad():
        step(1, fresh_cache())
    assert "decode_prologue_triton" not in calls
