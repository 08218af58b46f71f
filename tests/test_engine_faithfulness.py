"""Engine vs transformers on tiny random configs of both families (fp32, CPU).

Covers KV sharing of both layer types, per-layer embeddings, 256/512-style two head dims,
proportional RoPE, softcaps, and sliding windows shorter than the sequence.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from engine.generate import Generator
from engine.knobs import Knobs
from engine.loader import model_from_hf_state_dict
from engine.measure import PplRecord, measure_ppl_records
from engine.registry import TINY_GEMMA3, TINY_GEMMA4
from hf_reference import hf_causal_lm

GEMMA4_VARIANTS = {
    "e4b-style": TINY_GEMMA4,
    # E2B style: MQA, double-wide MLP in the KV-shared layers
    "e2b-style": {**TINY_GEMMA4, "num_key_value_heads": 1, "use_double_wide_mlp": True},
    # 26B/31B style global layers: V is the raw K projection, own kv-head count
    "k-eq-v": {**TINY_GEMMA4, "attention_k_eq_v": True, "num_global_key_value_heads": 1, "num_kv_shared_layers": 0},
}
CONFIGS = {**{f"gemma4-{k}": v for k, v in GEMMA4_VARIANTS.items()}, "gemma3": TINY_GEMMA3,
           "gemma3-softcap-linear-rope": {**TINY_GEMMA3, "final_logit_softcapping": 15.0,
                              "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                  "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                     "rope_theta": 1000000.0}}}}


def _pair(raw: dict, window: int | None = None, seed: int = 0):
    raw = copy.deepcopy(raw)
    if window is not None:
        raw["sliding_window"] = window
    ref = hf_causal_lm(raw, seed=seed)
    ref.generation_config.eos_token_id = None  # generate exactly N tokens, like the engine with EOS ignored
    eng = model_from_hf_state_dict(raw, ref.state_dict())
    return ref, eng


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name: str) -> None:
    raw = CONFIGS[name]
    ref, eng = _pair(raw)
    seq = 3 * raw["sliding_window"] + 5  # longer than the window
    ids = torch.randint(3, raw["vocab_size"], (2, seq))
    with torch.no_grad():
        want = ref(ids).logits
        got = eng.logits(eng.forward_fresh(ids, torch.arange(seq)[None].expand(2, -1), raw["sliding_window"]))
    assert want.shape == got.shape
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["gemma4-e4b-style", "gemma4-e2b-style", "gemma3"])
@pytest.mark.parametrize("window", [None, 5])
def test_greedy_64_tokens_identical_batched(name: str, window: int | None) -> None:
    """Prefill + cached decode (ring buffers wrap many times) equals transformers' greedy output."""
    raw = CONFIGS[name]
    ref, eng = _pair(raw, window=window)
    loaded = SimpleNamespace(model=eng, arch=eng.arch)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, raw["vocab_size"], (n,), generator=gen).tolist() for n in (4, 21, 37)]
    out = Generator(loaded, Knobs(batch_size=2, sliding_window=window), max_context=256,
                    use_cuda_graphs=False).generate(prompts, 64)
    for p, got in zip(prompts, out.tokens):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=64, do_sample=False)[0, len(p):].tolist()
        assert got == want


@pytest.mark.parametrize("name", ["gemma4-e4b-style", "gemma3"])
def test_ppl_matches_transformers(name: str) -> None:
    raw = CONFIGS[name]
    ref, eng = _pair(raw)
    gen = torch.Generator().manual_seed(2)
    records = [PplRecord(tuple(torch.randint(3, 500, (c,), generator=gen).tolist()),
                         tuple(torch.randint(3, 500, (t,), generator=gen).tolist())) for c, t in ((5, 30), (17, 9), (1, 50))]
    nll, count = 0.0, 0
    for r in records:
        ids = torch.tensor([r.context + r.target])
        with torch.no_grad():
            logits = ref(ids).logits[0].float()
        c = len(r.context)
        nll += F.cross_entropy(logits[c - 1:-1], ids[0, c:], reduction="sum").item()
        count += len(r.target)
    want = math.exp(nll / count)
    loaded = SimpleNamespace(model=eng, arch=eng.arch)
    got = measure_ppl_records(loaded, records, Knobs(), batch_tokens=64)  # forces several padded batches
    assert got["tokens"] == count
    assert abs(got["ppl"] - want) / want <= 1e-4


def test_shrunk_window_is_in_force_for_ppl() -> None:
    raw = CONFIGS["gemma4-e4b-style"]
    ref, eng = _pair(raw)  # trained window 16
    ref5 = hf_causal_lm({**raw, "sliding_window": 5})
    ref5.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(3)
    rec = PplRecord((2,), tuple(torch.randint(3, 500, (60,), generator=gen).tolist()))
    ids = torch.tensor([rec.context + rec.target])
    with torch.no_grad():
        want = math.exp(F.cross_entropy(ref5(ids).logits[0, :-1].float(), ids[0, 1:]).item())
    loaded = SimpleNamespace(model=eng, arch=eng.arch)
    full = measure_ppl_records(loaded, [rec], Knobs())["ppl"]
    shrunk = measure_ppl_records(loaded, [rec], Knobs(sliding_window=5))["ppl"]
    assert abs(shrunk - want) / want <= 1e-4
    assert abs(full - shrunk) / shrunk > 1e-3  # the knob changes the numbers


def test_sampling_is_seeded_and_respects_top_k() -> None:
    from engine.sampling import SamplingParams

    raw = CONFIGS["gemma4-e4b-style"]
    _, eng = _pair(raw)
    loaded = SimpleNamespace(model=eng, arch=eng.arch)
    g = Generator(loaded, Knobs(batch_size=2), max_context=128, use_cuda_graphs=False)
    prompts = [[2, 50, 60], [2, 70]]
    p = SamplingParams(temperature=1.0, top_k=1, seed=7)
    assert g.generate(prompts, 12, p).tokens == g.generate(prompts, 12).tokens  # top-1 sampling is greedy
    s = SamplingParams(temperature=1.5, top_p=0.9, seed=11)
    a, b = g.generate(prompts, 12, s).tokens, g.generate(prompts, 12, s).tokens
    assert a == b
    assert a != g.generate(prompts, 12, SamplingParams(temperature=1.5, top_p=0.9, seed=12)).tokens


def test_chunked_prefill_attention_equals_whole() -> None:
    _, eng = _pair(CONFIGS["gemma4-e4b-style"])
    from engine.attention import visibility

    B, H, T, D = 2, 4, 37, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    pos = torch.arange(T)[None].expand(B, -1)
    mask = visibility(pos, pos, 5)
    whole = eng._attend_chunked(q, k, v, mask, None, chunk=1024)
    assert torch.allclose(eng._attend_chunked(q, k, v, mask, None, chunk=8), whole, atol=1e-6)


def test_sliding_prefill_attends_only_inside_the_window() -> None:
    """Sliding layers slice the keys per query band; the result equals masked attention over every key,
    also with right padding (positions -1) in the batch."""
    _, eng = _pair(CONFIGS["gemma4-e4b-style"])
    from engine.attention import attend, visibility

    a = eng.arch
    B, H, T, D = 2, 4, 300, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    pos = torch.arange(T)[None].repeat(B, 1)
    pos[1, 250:] = -1  # the second stream is 250 tokens long
    for window in (5, 64, 100, 299):
        mask = visibility(pos, pos, window)
        banded = eng._attend_chunked(q, k, v, mask, window)
        full = attend(q, k, v, mask, a.attn_scale, a.attn_softcap)
        live = (pos >= 0)[:, None, :, None].expand_as(full)
        assert torch.allclose(banded[live], full[live], atol=1e-5), window
        assert torch.isfinite(banded).all()


def test_padded_graph_safe_prefill_equals_eager_prefill() -> None:
    """What a prefill CUDA graph runs (`forward_fresh(graph_safe=True)` over the prompt right-padded with
    position -1 to its bucket) gives the eager prefill's hidden states and leaves the same cache: the
    padding only touches the trash slot, and a ring keeps the prompt's newest positions (the 40-token
    prompt is longer than the 16 + 9 slots of the sliding layers' ring)."""
    from engine.cache import KVCache
    from engine.generate import prefill_bucket

    _, eng = _pair(CONFIGS["gemma4-e4b-style"])
    a, n, row = eng.arch, 40, 1
    bucket = prefill_bucket(n)
    assert bucket == 64 and prefill_bucket(1025) is None
    ids = torch.randint(3, a.vocab_size, (1, n), generator=torch.Generator().manual_seed(3))
    caches = [KVCache(a, 2, 128, a.sliding_window, "cpu", torch.float32) for _ in range(2)]
    rows = torch.tensor([row])
    with torch.inference_mode():
        eager = eng.forward_fresh(ids, torch.arange(n)[None], a.sliding_window, cache=caches[0], rows=rows)
        padded_ids = torch.cat([ids, torch.zeros(1, bucket - n, dtype=torch.long)], dim=1)
        padded_pos = torch.where(torch.arange(bucket) < n, torch.arange(bucket), -1)[None]
        graphed = eng.forward_fresh(padded_ids, padded_pos, a.sliding_window, cache=caches[1], rows=rows,
                                    graph_safe=True)
    assert torch.allclose(graphed[:, :n], eager, atol=1e-5)
    for i, lc in caches[0].layers.items():
        other = caches[1].layers[i]
        assert torch.equal(lc.slot_pos[:, :lc.slots], other.slot_pos[:, :other.slots]), i
        filled = lc.slot_pos[row, :lc.slots] >= 0
        if lc.ring:
            assert sorted(lc.slot_pos[row, :lc.slots][filled].tolist()) == list(range(n - lc.slots, n))
        assert torch.allclose(lc.k[row][:, :lc.slots][:, filled], other.k[row][:, :other.slots][:, filled], atol=1e-5)
        assert torch.allclose(lc.v[row][:, :lc.slots][:, filled], other.v[row][:, :other.slots][:, filled], atol=1e-5)
        assert int(other.slot_pos[row, other.trash]) == -1  # padding went to the trash slot, never visible


def test_ring_write_of_a_long_prompt_scatters_each_slot_once(monkeypatch) -> None:
    """A prompt longer than the ring is written in one scatter; the GPU's scatter picks an arbitrary
    winner among duplicate indices, so only the newest `slots` positions may reach real slots."""
    from engine.cache import LayerCache

    lc = LayerCache(1, 1, 10, 4, True, "cpu", torch.float32)
    seen: list[torch.Tensor] = []
    real_slot_of = lc.slot_of
    monkeypatch.setattr(lc, "slot_of", lambda p: seen.append(real_slot_of(p)) or seen[-1])
    n = 23
    pos = torch.cat([torch.arange(n), torch.full((5,), -1)])[None]  # right padding too
    k = torch.randn(1, pos.shape[1], 1, 4)
    lc.write(torch.tensor([0]), pos, k, k)
    slots = seen[-1][0]
    real = slots[slots != lc.trash]
    assert len(real) == len(set(real.tolist())) == lc.slots
    assert sorted(lc.slot_pos[0, :lc.slots].tolist()) == list(range(n - lc.slots, n))
    assert torch.equal(lc.k[0, 0, (n - 1) % lc.slots], k[0, n - 1, 0])
