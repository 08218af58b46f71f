"""Serve refuses recipes that do not apply here (hash, GPU) unless --force; stop strings; the wave scheduler
used for speculative recipes gives the same greedy tokens as continuous batching."""
from __future__ import annotations

import random
import threading

import pytest

from engine.byte_tokenizer import ByteTokenizer
from engine.sampling import SamplingParams
from server.metrics import Metrics
from server.recipe_runtime import check_weights, load_worker
from server.scheduler import DoneEvent, GenRequest, Scheduler, TokenEvent
from server.text import TextAssembler
from server_helpers import run_cli, start_server, tiny_recipe
from tuner.recipe import load_recipe, write_recipe


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    return tiny_recipe(tmp_path_factory)


def test_serve_refuses_an_edited_recipe_and_a_gpu_mismatch(recipe_path, tmp_path):
    edited = tmp_path / "edited.yaml"
    edited.write_text(recipe_path.read_text().replace("batch_size: 4", "batch_size: 3", 1))
    r = run_cli("serve", str(edited), "--port", "9")  # exits before binding: no port is used
    assert r.returncode == 2 and "content hash mismatch" in r.stderr, r.stderr
    recipe = load_recipe(recipe_path)
    hw = recipe.hardware.model_copy(update={"gpu_name": "NVIDIA H200", "device": "cuda", "dtype": "float32"})
    other = write_recipe(recipe.model_copy(update={"hardware": hw}), tmp_path / "h200.yaml")
    r = run_cli("serve", str(other), "--port", "9")
    assert r.returncode == 2 and "GPU mismatch" in r.stderr and "--force" in r.stderr, r.stderr


def test_serve_force_downgrades_to_a_logged_warning(recipe_path, tmp_path):
    edited = tmp_path / "edited.yaml"
    edited.write_text(recipe_path.read_text().replace("output_tokens: 8", "output_tokens: 9", 1))
    log = tmp_path / "serve.log"
    proc, base = start_server(edited, log, "--force")
    try:
        import httpx

        r = httpx.post(f"{base}/v1/completions", json={"model": "tiny-gemma4", "prompt": [2, 7], "max_tokens": 2,
                                                         "temperature": 0}, timeout=30)
        assert r.status_code == 200
    finally:
        from server_helpers import _kill_group

        _kill_group(proc)
    text = log.read_text()
    assert "WARNING" in text and "content hash mismatch" in text and "--force" in text


def test_weights_check_names_the_differing_file():
    a = {"model-00001.safetensors": "a" * 64, "model-00002.safetensors": "b" * 64}
    assert check_weights(a, dict(a), "model") is None
    msg = check_weights(a, {**a, "model-00002.safetensors": "c" * 64}, "model")
    assert "model-00002.safetensors" in msg and "00001" not in msg
    assert "random" in check_weights("random", a, "model")


def test_stop_strings_cut_text_and_hold_back_partial_matches():
    tok = ByteTokenizer()
    t = TextAssembler(tok, ["END"], {1})
    sent = [t.add(i) for i in tok.encode("abc EN", add_bos=False)]
    assert "".join(sent) == "abc " and not t.stopped  # "EN" could start "END": held back
    assert t.add(tok.encode("D", add_bos=False)[0]) == "" and t.stopped
    assert t.sent == "abc " and t.finish() == ""
    t = TextAssembler(tok, ["END"], {1})
    for i in tok.encode("xEN", add_bos=False):
        t.add(i)
    assert t.finish() == "EN"  # the stream ended without the stop string: the held text is released


def _run(scheduler: Scheduler, prompts: list[list[int]], n: int,
         sampling: list[SamplingParams] | None = None) -> list[list[int]]:
    outs: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(ev) -> None:
            if isinstance(ev, TokenEvent):
                outs[i].append(ev.token_id)
            elif isinstance(ev, DoneEvent):
                done.release()
        return sink
    for i, p in enumerate(prompts):
        scheduler.submit(GenRequest(p, n, (sampling or [SamplingParams()] * len(prompts))[i], sink_for(i)))
    for _ in prompts:
        assert done.acquire(timeout=60)
    return outs


def test_speculative_recipes_stream_per_row_and_stay_lossless(recipe_path):
    """draft_tokens > 0: greedy requests get per-stream speculation inside continuous batching and equal
    plain greedy decoding; a sampled request in the same queue runs as a wave and equals worker.generate."""
    from dataclasses import replace

    from engine.knobs import Knobs

    worker = load_worker(load_recipe(recipe_path))
    motif = [2] + [40 + (i % 7) for i in range(20)]  # repetitive prompts: the n-gram drafter gets proposals
    prompts = [motif[: 8 + i] for i in range(6)]
    plain = Knobs(**worker.knobs.to_dict())
    expected = worker.generate(prompts, 12, stop_at_eos=True)
    worker.set_knobs(replace(plain, drafter="ngram", draft_tokens=3))
    seeded = SamplingParams(temperature=0.8, seed=3)
    expected_sampled = worker.generate([prompts[0]], 12, seeded, stop_at_eos=True)[0]
    s = Scheduler(worker, Metrics("tiny"))
    s.start()
    try:
        assert _run(s, prompts, 12) == expected
        got = _run(s, prompts[:3] + [prompts[0]], 12, [SamplingParams()] * 3 + [seeded])
        assert got[:3] == expected[:3] and got[3] == expected_sampled
    finally:
        s.stop()
        worker.set_knobs(plain)


def test_wave_scheduler_for_speculative_recipes_matches_continuous_batching(recipe_path):
    """Sampled / logprobs requests of speculative recipes run in waves through Generator.generate; with
    draft_tokens=0 that path is plain decoding, so both schedulers must give the engine's greedy tokens."""
    worker = load_worker(load_recipe(recipe_path))
    prompts = [[2, 10 + i, 20 + 2 * i, 30] for i in range(6)]
    expected = worker.generate(prompts, 7, stop_at_eos=True)
    for waves in (False, True):
        s = Scheduler(worker, Metrics("tiny"))
        s.start()
        try:
            if waves:  # the wave path directly, as the speculative scheduler uses it for such requests
                outs = _run_waves(s, prompts, 7)
            else:
                outs = _run(s, prompts, 7)
            assert outs == expected, f"waves={waves}"
        finally:
            s.stop()


def _run_waves(scheduler: Scheduler, prompts: list[list[int]], n: int) -> list[list[int]]:
    scheduler.stop()  # drive the wave path on this thread instead of the engine loop
    outs: list[list[int]] = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        scheduler._pending.append(GenRequest(p, n, SamplingParams(),
                                             lambda ev, i=i: outs[i].append(ev.token_id)
                                             if isinstance(ev, TokenEvent) else None))
    import torch

    with torch.inference_mode():
        while scheduler._pending:
            scheduler._wave()
    return outs


@pytest.mark.parametrize("folder", ["gemma3-tokenizer", "gemma-4-mini"])
def test_incremental_text_equals_decoding_every_id(folder):
    """The per-token incremental decode streams exactly the text of decoding all output ids at once,
    through multi-byte characters split over byte tokens, leading spaces and EOS ids."""
    from engine.registry import BUNDLED_DIR
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(BUNDLED_DIR / folder)
    eos = set(tok.eos_ids)
    text = "Grüße — naïve café: 東京 ✓ 🙂🙂 x\n\n  def f(a, b):\n\treturn a ≤ b  # ok"
    ids = tok.encode(text, add_bos=False)
    ids = ids[:20] + [min(eos)] + ids[20:]  # an EOS in the middle (ignore_eos) adds no text
    t = TextAssembler(tok, [], eos)
    streamed = "".join(t.add(i) for i in ids) + t.finish()
    assert streamed == tok.decode([i for i in ids if i not in eos])
    rng = random.Random(0)  # arbitrary id soup: broken UTF-8 sequences included
    soup = [rng.randrange(tok.vocab_size) for _ in range(300)]
    t = TextAssembler(tok, [], eos)
    pieces = [t.add(i) for i in soup]
    assert "".join(pieces) + t.finish() == tok.decode([i for i in soup if i not in eos])
    assert all("\ufffd" not in p[-1:] for p in pieces)  # never a half character at the end of a piece
