"""Speculative decoding: lossless greedy identity (n-gram and MTP assistant drafters) and the assistant
vs transformers 5.17's Gemma4AssistantForCausalLM (the version that builds all-shared assistants)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from engine.assistant import Gemma4Assistant
from engine.assistant_loader import _parse
from engine.generate import Generator
from engine.knobs import Knobs
from engine.loader import load_model, model_from_hf_state_dict
from engine.registry import TINY_GEMMA4, TINY_GEMMA4_ASSISTANT
from engine.worker import EngineWorker
from hf_reference import hf_causal_lm


@pytest.fixture(scope="module")
def worker() -> EngineWorker:
    return EngineWorker("tiny-gemma4", device="cpu", random_weights=True, assistant="tiny-gemma4-assistant", seed=4)


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, 500, (9,), generator=g).tolist()
    return [motif * 4, [2] + motif * 2 + motif[:4], torch.randint(3, 500, (33,), generator=g).tolist(), [2, 7]]


@pytest.mark.parametrize("drafter", ["ngram", "mtp"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_is_token_identical(worker: EngineWorker, drafter: str, batch: int) -> None:
    prompts = _prompts(1)
    window = 6  # shorter than every context here: the ring buffers wrap
    worker.set_knobs(Knobs(batch_size=batch, sliding_window=window))
    plain = worker.generate(prompts, 48)
    top_ks = [1, 4, 16] if drafter == "mtp" else [None]
    for k in range(1, 9):
        for ctk in top_ks:
            worker.set_knobs(Knobs(batch_size=batch, sliding_window=window, drafter=drafter, draft_tokens=k,
                                   centroid_top_k=ctk))
            assert worker.generate(prompts, 48) == plain, (k, ctk)


def test_ngram_acceptance_on_copies_and_stats() -> None:
    """A model that copies (a random tiny model locked in a repetition loop) accepts most n-gram drafts."""
    lm = load_model("tiny-gemma4", random_weights=True, seed=3)
    prompts = _prompts(2)[:2]
    plain = Generator(lm, Knobs(batch_size=2), max_context=512, use_cuda_graphs=False).generate(prompts, 96)
    spec = Generator(lm, Knobs(batch_size=2, drafter="ngram", draft_tokens=4), max_context=512,
                     use_cuda_graphs=False).generate(prompts, 96)
    assert spec.tokens == plain.tokens
    tail = plain.tokens[0][-32:]
    looping = any(tail[i:] == tail[:len(tail) - i] for i in range(1, 16))
    assert spec.verify_steps < plain.verify_steps  # fewer target forwards than tokens
    if looping:
        assert spec.mean_accepted > 1.5
    assert len(spec.acceptance_by_position) == 4
    assert all(0.0 <= a <= 1.0 for a in spec.acceptance_by_position)
    assert spec.acceptance_by_position == sorted(spec.acceptance_by_position, reverse=True)


def test_sampled_speculative_runs_and_is_seeded(worker: EngineWorker) -> None:
    from engine.sampling import SamplingParams

    prompts = _prompts(3)
    worker.set_knobs(Knobs(batch_size=2, drafter="mtp", draft_tokens=3, centroid_top_k=4))
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=5)
    a, b = worker.generate(prompts, 20, p), worker.generate(prompts, 20, p)
    assert a == b and all(len(t) == 20 for t in a)


def test_assistant_logits_match_transformers() -> None:
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    raw = copy.deepcopy(TINY_GEMMA4_ASSISTANT)
    target_hf = hf_causal_lm(TINY_GEMMA4, seed=11)
    cfg = Gemma4AssistantConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(12)
    asst_hf = Gemma4AssistantForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in asst_hf.named_parameters():
            p.normal_(0.0, 0.05) if p.ndim > 1 else p.add_(0.1 * torch.randn_like(p))
        asst_hf.masked_embedding.token_ordering.copy_(torch.randperm(cfg.text_config.vocab_size))
    sd = {(k[len("model."):] if k.startswith("model.") else k): v.clone() for k, v in asst_hf.state_dict().items()}
    sd["embed_tokens.weight"] = asst_hf.lm_head.weight.detach().clone()
    arch, meta = _parse(raw, "tiny assistant")
    ours = Gemma4Assistant(arch, sd, meta["num_centroids"], meta["top_k"], meta["ordered"]).eval()
    target = model_from_hf_state_dict(TINY_GEMMA4, target_hf.state_dict())

    L = 40  # longer than the sliding window (16): the window cut is exercised
    ids = torch.randint(3, 500, (1, L))
    new_token = torch.tensor([[77]])
    with torch.no_grad():
        out = target_hf(ids, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
        embeds = torch.cat([target_hf.get_input_embeddings()(new_token), out.hidden_states[-1][:, -1:]], dim=-1)
        want = asst_hf(inputs_embeds=embeds, position_ids=torch.tensor([[L]]),
                       shared_kv_states=out.shared_kv_states).logits[0, 0]
        loaded = SimpleNamespace(model=target, arch=target.arch)
        gen = Generator(loaded, Knobs(), max_context=128, use_cuda_graphs=False)
        h_last = gen.prefill(ids[0].tolist(), 0)
        e = torch.nn.functional.embedding(new_token[0], target.embed) * target.embed_scale
        x = ours.pre_projection(torch.cat([e, h_last[None]], dim=-1))[:, None]
        xn = ours.step_hidden(x, torch.tensor([[L]]), torch.tensor([[L - 1]], dtype=torch.int32), gen.cache,
                              ours.target_sources(target.arch), arch.sliding_window + 1)
        got = ours.full_vocab_logits(xn[:, 0], None)[0]
        next_hidden_want = asst_hf(inputs_embeds=embeds, position_ids=torch.tensor([[L]]),
                                   shared_kv_states=out.shared_kv_states).last_hidden_state[0, 0]
    assert (got - want).abs().max().item() <= 1e-4
    assert (ours.post_projection(xn)[0, 0] - next_hidden_want).abs().max().item() <= 1e-4
    for k in (1, 4, 16):  # the knob: fewer clusters -> fewer candidate tokens, argmax among them
        logits, cand = ours.head_logits(xn[:, 0], k)
        assert cand.shape[1] == k * (arch.vocab_size // meta["num_centroids"])


def test_assistant_loads_from_a_saved_folder(tmp_path) -> None:
    """A transformers-saved Gemma4AssistantForCausalLM folder loads as the drafter and stays lossless."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    raw = copy.deepcopy(TINY_GEMMA4_ASSISTANT)
    cfg = Gemma4AssistantConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    torch.manual_seed(21)
    asst_hf = Gemma4AssistantForCausalLM(cfg).eval()
    with torch.no_grad():
        asst_hf.masked_embedding.token_ordering.copy_(torch.randperm(cfg.text_config.vocab_size))
    asst_hf.save_pretrained(tmp_path / "asst")
    from engine.assistant_loader import load_assistant

    target = load_model("tiny-gemma4", random_weights=True, seed=4)
    asst = load_assistant(str(tmp_path / "asst"), target)  # real (saved) weights, random-weight target
    assert asst.num_centroids == 16 and isinstance(asst.describe()["weights"], dict)
    assert torch.equal(asst.clusters.flatten(), asst_hf.masked_embedding.token_ordering)
    assert torch.allclose(asst.centroids.weight, asst_hf.masked_embedding.centroids.weight)
    prompts = _prompts(5)
    plain = Generator(target, Knobs(batch_size=2), max_context=256, use_cuda_graphs=False).generate(prompts, 24)
    spec = Generator(target, Knobs(batch_size=2, drafter="mtp", draft_tokens=3, centroid_top_k=2), max_context=256,
                     use_cuda_graphs=False, assistant=asst).generate(prompts, 24)
    assert spec.tokens == plain.tokens


def test_padding_queries_never_overwrite_keys() -> None:
    """A step in which some entries are padding (position -1) writes only the real positions."""
    lm = load_model("tiny-gemma4", random_weights=True, seed=6)
    gen = Generator(lm, Knobs(batch_size=2, sliding_window=6), max_context=64, use_cuda_graphs=False)
    prompts = [list(range(3, 23)), list(range(40, 52))]
    for row, p in enumerate(prompts):
        gen.prefill(p, row)
    before = {i: (lc.k.clone(), lc.slot_pos.clone()) for i, lc in gen.cache.layers.items()}
    tokens = torch.tensor([[7, 8, 9], [5, 5, 5]])
    positions = torch.tensor([[20, -1, -1], [-1, -1, -1]])  # row 0: one real position; row 1: idle
    with torch.inference_mode():
        gen.step(tokens, positions)
    for i, lc in gen.cache.layers.items():
        k0, pos0 = before[i]
        changed = (lc.slot_pos != pos0).nonzero().tolist()
        assert changed == [[0, lc.slot_of(torch.tensor(20)).item()]], (i, changed)
        logical = torch.ones(lc.slots, dtype=torch.bool)
        logical[lc.slot_of(torch.tensor(20)).item()] = False
        assert torch.equal(lc.k[:, :, :lc.slots][:, :, logical][1], k0[:, :, :lc.slots][:, :, logical][1])
        assert torch.equal(lc.k[0, :, :lc.slots][:, logical], k0[0, :, :lc.slots][:, logical])
