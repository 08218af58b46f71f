"""Bar 1 (API): the official openai client against a live `vkae-tune serve` of a tuner-made tiny recipe on loopback:
completions (text and token ids), chat, streaming, logprobs, and PPL through prompt_logprobs = the engine's PPL."""
from __future__ import annotations

import math
import urllib.request

import openai
import pytest

from server.recipe_runtime import load_worker
from server.workload_replay import rebuild_workload
from server_helpers import metric, metrics, serving, tiny_recipe
from tuner.recipe import load_recipe

MODEL = "tiny-gemma4"


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    return tiny_recipe(tmp_path_factory)


@pytest.fixture(scope="module")
def base(recipe_path, tmp_path_factory):
    yield from serving(recipe_path, tmp_path_factory.mktemp("api") / "serve.log")


@pytest.fixture(scope="module")
def client(base):
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def worker(recipe_path):
    """The engine with the recipe's knobs, in this process: the reference the server must match."""
    return load_worker(load_recipe(recipe_path))


def test_models_health_metrics(base, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
        assert resp.status == 200
    m = metrics(base)
    for name in ("vkae_tokens_per_second", "vkae_mean_accepted_tokens", "vkae_queue_length", "vkae_requests_total"):
        assert any(k.split("{")[0] == name for k in m), name


def test_completion_token_ids_equal_engine_greedy(client, worker):
    ids = [2, 40, 77, 120, 9, 33, 250, 18]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True})
    choice = r.choices[0].model_dump()
    expected = worker.generate([ids], 12, stop_at_eos=True)[0]
    assert choice["token_ids"] == expected and choice["prompt_token_ids"] == ids
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    assert choice["finish_reason"] == ("stop" if expected[-1] in worker.loaded.arch.eos_token_ids else "length")


def test_completion_text_prompt_uses_the_tokenizer(client, worker):
    text = "Once upon a time"
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=6, temperature=0,
                                  extra_body={"return_token_ids": True})
    choice = r.choices[0].model_dump()
    ids = worker.loaded.tokenizer.encode(text)
    assert choice["prompt_token_ids"] == ids
    out = worker.generate([ids], 6, stop_at_eos=True)[0]
    assert choice["token_ids"] == out
    eos = set(worker.loaded.arch.eos_token_ids)
    assert r.choices[0].text == worker.loaded.tokenizer.decode([t for t in out if t not in eos])


def test_chat_uses_the_chat_template_and_streams_the_same_tokens(client, worker):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0,
                                       extra_body={"return_token_ids": True})
    choice = r.choices[0].model_dump()
    ids = worker.loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert choice["prompt_token_ids"] == ids
    assert choice["token_ids"] == worker.generate([ids], 9, stop_at_eos=True)[0]
    assert r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True})
    tokens, text, finish, usage = [], "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            tokens += c.model_dump().get("token_ids") or []
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert tokens == choice["token_ids"] and text == r.choices[0].message.content
    assert finish == r.choices[0].finish_reason and usage.completion_tokens == len(tokens)


def test_completion_stream_equals_non_stream(client):
    ids = [2, 100, 101, 102, 103]
    whole = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0,
                                      extra_body={"return_token_ids": True})
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"return_token_ids": True}))
    assert len(chunks) >= 2  # really streamed, not one final blob
    assert sum((c.choices[0].model_dump().get("token_ids") or [] for c in chunks), []) == \
        whole.choices[0].model_dump()["token_ids"]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_logprobs_are_the_engines_log_softmax(client, worker):
    import torch

    ids = [2, 61, 62, 63, 64, 65]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"return_token_ids": True})
    out = r.choices[0].model_dump()["token_ids"]
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(out) == len(lp.top_logprobs)
    # teacher-forced reference over prompt + output, computed here with the engine's own model
    g = worker.generator()
    seq = torch.tensor([ids + out])
    hidden = g.model.forward_fresh(seq, torch.arange(seq.shape[1])[None], g.window)
    ref = torch.log_softmax(g.model.logits(hidden[0, len(ids) - 1:-1]), -1)
    for i, tok in enumerate(out):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i, tok]), abs=1e-4)
        # greedy: the chosen token is the most likely one. (top_logprobs is keyed by token text, so ids without
        # bytes, which all decode to "", collide there, as in OpenAI's and vLLM's format: bounds only)
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i].max()), abs=1e-4)
        assert all(v <= lp.token_logprobs[i] + 1e-6 for v in lp.top_logprobs[i].values())
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 for c in content)


def test_ppl_through_prompt_logprobs_equals_engine_ppl(client, worker, recipe_path):
    recipe = load_recipe(recipe_path)
    records = rebuild_workload(recipe, worker.loaded.tokenizer).records
    nll, tokens = 0.0, 0
    for rec in records:
        ids = rec["context_token_ids"] + rec["target_token_ids"]
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                      extra_body={"prompt_logprobs": 0})
        entries = r.choices[0].model_dump()["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        for p in range(len(rec["context_token_ids"]), len(ids)):
            nll -= entries[p][str(ids[p])]["logprob"]
            tokens += 1
    server_ppl = math.exp(nll / tokens)
    engine = worker.measure_ppl(records)
    assert tokens == engine["tokens"]
    assert server_ppl == pytest.approx(engine["ppl"], rel=1e-4)
    assert engine["ppl"] == pytest.approx(recipe.metrics.ppl, rel=1e-4)  # and both are the recipe's own PPL


def test_seeded_sampling_is_reproducible_and_counts_metrics(client, base):
    before = metric(metrics(base), "vkae_generation_tokens_total")
    kw = dict(model=MODEL, prompt=[2, 5, 6, 7], max_tokens=8, temperature=0.9, top_p=0.9, seed=1234,
              extra_body={"return_token_ids": True, "ignore_eos": True, "top_k": 50})
    a = client.completions.create(**kw).choices[0].model_dump()["token_ids"]
    b = client.completions.create(**kw).choices[0].model_dump()["token_ids"]
    c = client.completions.create(**{**kw, "seed": 99}).choices[0].model_dump()["token_ids"]
    assert a == b and len(a) == 8 and a != c
    assert metric(metrics(base), "vkae_generation_tokens_total") - before == 24
