"""Decode attention: the Triton kernel under TRITON_INTERPRET=1 (CPU) against the fp32 reference.

Shapes are tiny (D 16..64, a few dozen slots, BLOCK_N forced to 16 so that every cache spans
several tiles) so the interpreter stays fast. Each case builds caches the way the engine does:
ring slots `pos % S`, linear slots `pos`, empty (-1), stale (position > query), padding queries.
"""
from __future__ import annotations

from kernels import _testutil

RUN_HERE = _testutil.enter_interpreter()  # sets TRITON_INTERPRET=1 before triton is imported

import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels._common as common  # noqa: E402
import kernels.decode_attention as da  # noqa: E402
import kernels.invariance as invariance  # noqa: E402


_needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)


TOL = {torch.float32: 2e-5, torch.float16: 4e-3}  # max |triton - ref|, outputs are O(1)


@pytest.fixture(params=[True, False], ids=["row-invariant", "row-heuristic"])
def row_mode(request, monkeypatch):
    """Both launch heuristics: fixed row block and T-free split count (default), or T-dependent."""
    monkeypatch.setattr(invariance, "ROW_INVARIANT", request.param)
    return request.param


def make(B, T, Hq, Hkv, D, S, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


def ring_slots(B, S, newest, fill=None):
    """Slot j holds the latest position p <= newest with p % S == j (a wrapped ring); slots whose
    position would be negative are empty. `fill` limits how many of the newest positions exist."""
    j = torch.arange(S)
    pos = newest - ((newest - j) % S)
    if fill is not None:
        pos = torch.where(pos > newest - fill, pos, -1)
    pos = torch.where(pos >= 0, pos, -1)
    return pos.to(torch.int32)[None].repeat(B, 1)


def check(q, k, v, slot_pos, q_pos, window, scale, softcap=None, **kw):
    out = da.decode_attention_triton(q, k, v, slot_pos, q_pos, window, scale, softcap, block_n=16, **kw)
    ref = da.decode_attention_ref(q, k, v, slot_pos, q_pos, window, scale, softcap)
    assert out.dtype == q.dtype and out.shape == q.shape
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[q.dtype], f"max abs err {err:.3e} > {TOL[q.dtype]:.1e}"
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("G", [1, 4])
def test_ring_wrapped_decode(dtype, G):
    # ring of 40 slots, 150 positions written (wrapped 3x), window 32 < filled length 40
    B, T, Hkv, D, S = 2, 1, 2, 32, 40
    q, k, v = make(B, T, G * Hkv, Hkv, D, S, dtype, seed=G)
    slot_pos = ring_slots(B, S, newest=149)
    q_pos = torch.full((B, T), 149, dtype=torch.int32)
    check(q, k, v, slot_pos, q_pos, window=32, scale=D ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ring_verify_T4_window_and_stale(dtype, row_mode):
    # speculative verify: 4 queries at 97..100 whose K/V are already in the ring; each query must
    # not see the later drafts (slot_pos > q_pos) and sees at most `window` keys.
    B, T, Hq, Hkv, D, S = 2, 4, 8, 2, 16, 28
    q, k, v = make(B, T, Hq, Hkv, D, S, dtype, seed=3)
    slot_pos = ring_slots(B, S, newest=100)
    q_pos = (97 + torch.arange(T, dtype=torch.int32))[None].repeat(B, 1)
    check(q, k, v, slot_pos, q_pos, window=20, scale=0.3)


def test_linear_empty_stale_window0_and_padding():
    # linear cache: stream 0 has positions 0..36 then empty slots; stream 1 has 0..20, then stale
    # slots from a rejected draft (positions 21..24 > its queries), then empty ones.
    B, T, Hq, Hkv, D, S = 2, 3, 4, 1, 32, 64
    q, k, v = make(B, T, Hq, Hkv, D, S, torch.float32, seed=4)
    j = torch.arange(S, dtype=torch.int32)
    slot_pos = torch.stack([torch.where(j <= 36, j, -1), torch.where(j <= 24, j, -1)])
    q_pos = torch.tensor([[34, 35, 36], [19, 20, -1]], dtype=torch.int32)  # last query is padding
    out, ref = check(q, k, v, slot_pos, q_pos, window=0, scale=D ** -0.5)
    assert torch.all(out[1, 2] == 0), "padding query must output zeros"


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_split_kv_matches_single_pass(num_splits):
    B, T, Hq, Hkv, D, S = 2, 2, 8, 2, 32, 96
    q, k, v = make(B, T, Hq, Hkv, D, S, torch.float32, seed=5)
    slot_pos = ring_slots(B, S, newest=250, fill=80)
    slot_pos[1, 10:30] = -1  # holes: some splits of stream 1 see nothing at all
    q_pos = torch.tensor([[249, 250], [200, -1]], dtype=torch.int32)
    out, _ = check(q, k, v, slot_pos, q_pos, window=64, scale=0.2, num_splits=num_splits)
    one = da.decode_attention_triton(q, k, v, slot_pos, q_pos, 64, 0.2, block_n=16, num_splits=1)
    assert (out - one).abs().max().item() <= 2e-6
    assert torch.all(out[1, 1] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap(dtype):
    B, T, Hq, Hkv, D, S = 1, 2, 4, 2, 32, 48
    q, k, v = make(B, T, Hq, Hkv, D, S, dtype, seed=6)
    slot_pos = ring_slots(B, S, newest=60)
    q_pos = torch.tensor([[59, 60]], dtype=torch.int32)
    # scale 1.0 (Gemma style) makes raw scores ~ +-10, so the cap at 5 really bends them
    check(q, k, v, slot_pos, q_pos, window=0, scale=1.0, softcap=5.0, num_splits=2)


def test_window_one_sees_only_itself():
    B, T, Hq, Hkv, D, S = 1, 3, 2, 1, 16, 32
    q, k, v = make(B, T, Hq, Hkv, D, S, torch.float32, seed=7)
    slot_pos = ring_slots(B, S, newest=12)
    q_pos = torch.tensor([[10, 11, 12]], dtype=torch.int32)
    out, _ = check(q, k, v, slot_pos, q_pos, window=1, scale=1.0)
    for t, p in enumerate((10, 11, 12)):  # softmax over one key returns that key's V exactly
        assert torch.allclose(out[0, t, 0], v[0, 0, p % S], atol=1e-6)


def test_all_empty_stream_and_nan_in_empty_slots():
    # never-written cache memory may hold anything; it must not leak into the output
    B, T, Hq, Hkv, D, S = 2, 1, 4, 2, 16, 40
    q, k, v = make(B, T, Hq, Hkv, D, S, torch.float32, seed=8)
    slot_pos = torch.full((B, S), -1, dtype=torch.int32)
    slot_pos[0, :25] = torch.arange(25, dtype=torch.int32)
    k[:, :, 25:] = float("nan")
    v[:, :, 25:] = float("nan")
    k[1] = float("nan")
    v[1] = float("inf")
    q_pos = torch.tensor([[24], [5]], dtype=torch.int32)
    out, _ = check(q, k, v, slot_pos, q_pos, window=0, scale=0.25, num_splits=2)
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)


def test_many_rows_several_row_blocks_and_strided_inputs():
    # T*G = 16*4 = 64 rows split into 4 row blocks; q is a slice of a fused qkv buffer and the
    # caches are [B, S, Hkv, D] tensors viewed as [B, Hkv, S, D] (non-contiguous strides).
    B, T, Hq, Hkv, D, S = 1, 16, 8, 2, 16, 40
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(B, T, Hq + 2 * Hkv, D, generator=g)
    q = qkv[:, :, :Hq]
    k = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    slot_pos = ring_slots(B, S, newest=70)
    q_pos = (55 + torch.arange(T, dtype=torch.int32))[None]
    check(q, k, v, slot_pos, q_pos, window=24, scale=0.25, block_m=16, num_splits=2)


@pytest.mark.parametrize("num_splits", [17, 20, 37])
def test_many_splits_vector_merge(num_splits):
    # past SEQUENTIAL_MERGE_MAX_SPLITS stage 2 takes the vector merge: whole chunks, a partial last chunk, and
    # empty splits (a hole in stream 0, the unwritten tail of a linear cache) that must weigh nothing
    B, T, Hq, Hkv, D, S = 2, 2, 4, 2, 16, 16 * num_splits
    assert num_splits > da.SEQUENTIAL_MERGE_MAX_SPLITS and num_splits % da.STAGE2_CHUNK_S
    q, k, v = make(B, T, Hq, Hkv, D, S, torch.float32, seed=num_splits)
    j = torch.arange(S, dtype=torch.int32)
    slot_pos = torch.stack([torch.where(j < S - 40, j, -1), torch.where(j < 150, j, -1)])
    slot_pos[0, 32:96] = -1
    for b in range(B):  # garbage in empty slots must not leak through the merge
        k[b][:, slot_pos[b] < 0] = float("nan")
    q_pos = torch.tensor([[S - 42, S - 41], [148, -1]], dtype=torch.int32)
    out, _ = check(q, k, v, slot_pos, q_pos, window=0, scale=0.25, num_splits=num_splits)
    one = da.decode_attention_triton(q, k, v, slot_pos, q_pos, 0, 0.25, block_n=16, num_splits=1)
    assert (out - one).abs().max().item() <= 2e-6
    assert torch.all(out[1, 1] == 0)


def test_many_rows_default_heuristics(row_mode):
    # T*G = 9*4 = 36 rows: three 16-row blocks (row-invariant) or one 64-row block (heuristic)
    B, T, Hq, Hkv, D, S = 2, 9, 8, 2, 16, 300
    q, k, v = make(B, T, Hq, Hkv, D, S, torch.float32, seed=12)
    j = torch.arange(S, dtype=torch.int32)
    slot_pos = torch.where(j < 260, j, -1)[None].repeat(B, 1)
    q_pos = (251 + torch.arange(T, dtype=torch.int32))[None].repeat(B, 1)
    out = da.decode_attention_triton(q, k, v, slot_pos, q_pos, 0, 0.25)
    ref = da.decode_attention_ref(q, k, v, slot_pos, q_pos, 0, 0.25)
    assert (out - ref).abs().max().item() <= 2e-5


def test_long_mostly_empty_linear_cache_default_heuristics(row_mode):
    # a 4096-slot linear cache holding 70 positions, window 0, default split heuristic
    B, T, Hq, Hkv, D, S = 1, 2, 4, 2, 16, 4096
    q, k, v = make(B, T, Hq, Hkv, D, S, torch.float32, seed=10)
    j = torch.arange(S, dtype=torch.int32)
    slot_pos = torch.where(j < 70, j, -1)[None]
    q_pos = torch.tensor([[68, 69]], dtype=torch.int32)
    out = da.decode_attention_triton(q, k, v, slot_pos, q_pos, 0, 0.25)
    ref = da.decode_attention_ref(q, k, v, slot_pos, q_pos, 0, 0.25)
    assert (out - ref).abs().max().item() <= 2e-5


def test_split_heuristic_shapes():
    bm, bn, _ = da._blocks(512, 8 * 4)
    assert (bm, bn) == (32, 64)
    assert da._blocks(256, 8) == (16, 64, 8)               # E4B sliding layer: one 64-slot tile a split, 8 warps
    assert da._blocks(64, 8) == (16, 64, 4)                # small heads keep 4 warps
    assert da._num_splits(131072, 2, bn, 132) == 132       # B=1: fill the GPU
    assert da._num_splits(529, 2 * 1, 64, 132) == 9        # short ring: >= 64 slots a split
    assert da._num_splits(4096, 64 * 2, 32, 132) == 3      # B=64: little to gain from splitting


def test_dispatch_uses_reference_on_cpu():
    q, k, v = make(1, 1, 2, 1, 16, 8, torch.float32, seed=11)
    slot_pos = torch.arange(8, dtype=torch.int32)[None]
    q_pos = torch.tensor([[7]], dtype=torch.int32)
    if not common.FORCE_TRITON_ON_CPU:
        out = da.decode_attention(q, k, v, slot_pos, q_pos, 0, 0.5)
        assert torch.equal(out, da.decode_attention_ref(q, k, v, slot_pos, q_pos, 0, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_finite_cache_loads_match_masked_loads(dtype, num_splits, row_mode):
    """finite_cache=True (K/V loaded with the slot positions, not after them: the engine's sliding layers)
    gives the masked-load results bit for bit, with stale keys, empty slots holding finite garbage, a
    partly filled ring, a window, padding queries and a verify width."""
    B, T, Hq, Hkv, D, S = 2, 3, 4, 2, 32, 48
    q, k, v = make(B, T, Hq, Hkv, D, S, dtype, seed=21)
    slot_pos = ring_slots(B, S, newest=60)
    slot_pos[1] = ring_slots(1, S, newest=20, fill=21)[0]  # stream 1 has not filled its ring: empty slots
    q_pos = torch.tensor([[58, 59, 60], [19, 20, -1]], dtype=torch.int32)
    for window in (0, 24):
        masked, _ = check(q, k, v, slot_pos, q_pos, window, 0.3, num_splits=num_splits)
        eager, _ = check(q, k, v, slot_pos, q_pos, window, 0.3, num_splits=num_splits, finite_cache=True)
        assert torch.equal(eager, masked)


def test_block_n_switch_gives_smaller_splits(monkeypatch):
    """VKAE_ATTN_BLOCK_N (module ATTN_BLOCK_N) sets the tile, and only with it can MIN_SPLIT_SLOTS go below one
    tile: E4B's sliding ring (528 slots, D 256, batch 1) is 9 splits by default, 17 with 32-slot tiles."""
    _, bn, _, splits = da.launch_config(256, 4, 1, 2, 528, 132)
    assert (bn, da.split_layout(528, splits, bn)[1]) == (64, 9)
    monkeypatch.setattr(da, "MIN_SPLIT_SLOTS", 32)
    _, bn, _, splits = da.launch_config(256, 4, 1, 2, 528, 132)
    assert (bn, da.split_layout(528, splits, bn)[1]) == (64, 9)  # still whole 64-slot tiles
    monkeypatch.setattr(da, "ATTN_BLOCK_N", 32)
    _, bn, _, splits = da.launch_config(256, 4, 1, 2, 528, 132)
    assert (bn, da.split_layout(528, splits, bn)[1]) == (32, 17)
    monkeypatch.setattr(da, "ATTN_NUM_WARPS", 4)
    assert da.launch_config(256, 4, 1, 2, 528, 132)[2] == 4  # the warps switch


@pytest.mark.parametrize("value", ["24", "8", "abc", "-32"])
def test_block_n_env_rejects_bad_values(value):
    import subprocess
    import sys

    env = {**os.environ, "VKAE_ATTN_BLOCK_N": value}
    p = subprocess.run([sys.executable, "-c", "import kernels.decode_attention"], env=env, capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode != 0 and "VKAE_ATTN_BLOCK_N must be 0" in p.stderr

