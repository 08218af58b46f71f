"""gemma-4-mini (real weights trained in this project, shipped in engine/assets): transformers loads and
runs both folders, the engine agrees with it, the model beats a unigram model by far, the window knob
moves PPL, and the MTP assistant is lossless with real acceptance."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.knobs import Knobs
from engine.measure import text_to_records
from engine.registry import BUNDLED_DIR
from engine.worker import EngineWorker

TARGET, ASSISTANT = BUNDLED_DIR / "gemma-4-mini", BUNDLED_DIR / "gemma-4-mini-assistant"
HELDOUT = BUNDLED_DIR / "gemma4_mini_heldout_python_docs.txt"


@pytest.fixture(scope="module")
def worker() -> EngineWorker:
    return EngineWorker("gemma-4-mini", device="cpu", assistant="gemma-4-mini-assistant")


@pytest.fixture(scope="module")
def records(worker: EngineWorker):
    ids = worker.tokenizer.encode(HELDOUT.read_text(encoding="utf-8"), add_bos=False)
    return text_to_records(ids, worker.tokenizer.bos_id, 512, 3)


def test_both_folders_fit_the_size_budget_and_are_plain_hf_folders() -> None:
    total = sum(f.stat().st_size for d in (TARGET, ASSISTANT) for f in d.iterdir())
    assert total <= 25_000_000
    for d in (TARGET, ASSISTANT):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / name).is_file(), d / name
    cfg = json.loads((TARGET / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_text" and cfg["hidden_size_per_layer_input"] > 0
    assert cfg["num_kv_shared_layers"] > 0 and cfg["layer_types"].count("full_attention") * 5 == \
        cfg["layer_types"].count("sliding_attention")
    acfg = json.loads((ASSISTANT / "config.json").read_text())
    assert acfg["model_type"] == "gemma4_assistant" and acfg["num_centroids"] >= 64
    assert acfg["text_config"]["vocab_size"] // acfg["num_centroids"] == 128


def test_heldout_ppl_matches_transformers_and_beats_unigram(worker: EngineWorker, records) -> None:
    from transformers import Gemma4ForCausalLM

    worker.set_knobs(Knobs())
    ours = worker.measure_ppl(records)["ppl"]
    hf = Gemma4ForCausalLM.from_pretrained(TARGET, dtype=torch.float32, attn_implementation="eager").eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([list(r.context) + list(r.target)])
            logp = torch.log_softmax(hf(input_ids=ids).logits[0, len(r.context) - 1:-1].float(), dim=-1)
            nll -= logp.gather(1, torch.tensor(r.target)[:, None]).sum().item()
            n += len(r.target)
    theirs = math.exp(nll / n)
    assert abs(ours - theirs) / theirs < 0.005
    counts = json.loads((BUNDLED_DIR / "gemma4_mini_unigram_counts.json").read_text())["counts"]
    total = sum(counts) + len(counts)
    unigram = math.exp(-sum(math.log((counts[t] + 1) / total) for r in records for t in r.target) / n)
    assert unigram / ours >= 4.0, (unigram, ours)


def test_window_knob_raises_ppl(worker: EngineWorker, records) -> None:
    ppl = {}
    for win in (None, 32, 8):
        worker.set_knobs(Knobs(sliding_window=win))
        ppl[win] = worker.measure_ppl(records[:1])["ppl"]
    assert ppl[None] < ppl[32] < ppl[8]


def test_assistant_runs_in_transformers_and_matches_the_engine(worker: EngineWorker) -> None:
    """transformers' Gemma4AssistantForCausalLM drafts from the real target's shared K/V; our drafter's first
    step gives the same candidate logits and the same draft token."""
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    from engine.generate import Generator

    tgt = Gemma4ForCausalLM.from_pretrained(TARGET, dtype=torch.float32, attn_implementation="eager").eval()
    asst = Gemma4AssistantForCausalLM.from_pretrained(ASSISTANT, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    ids = worker.tokenizer.encode("The socket module provides access to the BSD socket interface.")
    L, new = len(ids), 278
    with torch.no_grad():
        out = tgt(torch.tensor([ids]), output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
        emb = torch.cat([tgt.get_input_embeddings()(torch.tensor([[new]])), out.hidden_states[-1][:, -1:]], dim=-1)
        want = asst(inputs_embeds=emb, position_ids=torch.tensor([[L]]), shared_kv_states=out.shared_kv_states)
        ours = worker.assistant
        target = worker.loaded.model
        gen = Generator(worker.loaded, Knobs(), max_context=256, use_cuda_graphs=False)
        h_last = gen.prefill(ids, 0)
        e = torch.nn.functional.embedding(torch.tensor([new]), target.embed) * target.embed_scale
        x = ours.pre_projection(torch.cat([e, h_last[None]], dim=-1))[:, None]
        xn = ours.step_hidden(x, torch.tensor([[L]]), torch.tensor([[L - 1]], dtype=torch.int32), gen.cache,
                              ours.target_sources(target.arch), ours.arch.sliding_window + 1)
        got = ours.full_vocab_logits(xn[:, 0], None)[0]
    assert (got - want.logits[0, 0]).abs().max().item() <= 1e-4
    assert int(got.argmax()) == int(want.logits[0, 0].argmax())


def test_mtp_is_lossless_with_real_acceptance(worker: EngineWorker) -> None:
    text = HELDOUT.read_text(encoding="utf-8")
    tok = worker.tokenizer
    ids = tok.encode(text, add_bos=False)
    prompts = [[tok.bos_id] + ids[s:s + 40] for s in (0, 3000)]
    worker.set_knobs(Knobs())
    plain = worker.generate(prompts, 40)
    accepted = {}
    for k, ctk in ((4, None), (4, 4), (8, 16), (1, 64)):
        worker.set_knobs(Knobs(drafter="mtp", draft_tokens=k, centroid_top_k=ctk))
        out = worker.generator().generate(prompts, 40)
        assert out.tokens == plain, (k, ctk)
        accepted[(k, ctk)] = out.mean_accepted
    assert accepted[(4, None)] >= 2.0, accepted
