"""Bar 1 (load): 200 concurrent requests through continuous batching give the engine's greedy outputs (and
`vkae-tune generate`'s); 1,000 malformed requests all get a 4xx OpenAI error body and the server keeps serving."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest

from server.recipe_runtime import load_worker
from server_helpers import last_json_line, metric, metrics, run_cli, serving, tiny_recipe
from tuner.recipe import load_recipe

MODEL = "tiny-gemma4"
N_CONCURRENT = 200
N_MALFORMED = 1000


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    return tiny_recipe(tmp_path_factory)


@pytest.fixture(scope="module")
def base(recipe_path, tmp_path_factory):
    yield from serving(recipe_path, tmp_path_factory.mktemp("load") / "serve.log")


def _requests(vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(5)
    return [([2] + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))], rng.randrange(1, 13))
            for _ in range(N_CONCURRENT)]


def test_200_concurrent_requests_equal_engine_greedy(base, recipe_path):
    recipe = load_recipe(recipe_path)
    worker = load_worker(recipe)
    reqs = _requests(worker.loaded.arch.vocab_size)
    before = metrics(base)

    async def fire() -> list[list[int]]:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=180) as c:
            calls = [c.completions.create(model=MODEL, prompt=ids, max_tokens=n, temperature=0,
                                          extra_body={"return_token_ids": True}) for ids, n in reqs]
            done = await asyncio.gather(*calls)
        return [r.choices[0].model_dump()["token_ids"] for r in done]

    got = asyncio.run(fire())
    # greedy streams are prefix-consistent: one reference run at the longest length, cut per request
    ref = worker.generate([ids for ids, _ in reqs], max(n for _, n in reqs), stop_at_eos=True)
    expected = [r[:n] for r, (_, n) in zip(ref, reqs)]
    wrong = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not wrong, f"{len(wrong)} of {N_CONCURRENT} differ, first #{wrong[0]}: {got[wrong[0]]} vs {expected[wrong[0]]}"
    after = metrics(base)
    assert metric(after, "vkae_generation_tokens_total") - metric(before, "vkae_generation_tokens_total") == \
        sum(map(len, expected))
    assert metric(after, "vkae_queue_length") == 0 and metric(after, "vkae_running_requests") == 0
    # continuous batching really shared steps: far fewer batched forwards than tokens decoded one stream at a time
    steps = metric(after, "vkae_engine_steps_total") - metric(before, "vkae_engine_steps_total")
    assert steps < sum(len(e) - 1 for e in expected) * 0.75

    # and the same as the CLI `vkae-tune generate` with the recipe's knobs, for two of them
    k = recipe.knobs
    for i in (0, 7):
        ids, n = reqs[i]
        out = run_cli("generate", MODEL, "--random-weights", "--device", "cpu", "--sliding-window",
                      str(k["sliding_window"]), "--batch-size", str(k["batch_size"]), "--prompt-ids",
                      ",".join(map(str, ids)), "--max-new-tokens", str(n), "--json")
        assert out.returncode == 0, out.stderr
        assert last_json_line(out.stdout)["output_token_ids"] == got[i]


def _malformed(vocab: int, rng: random.Random) -> tuple[str, str, bytes | None]:
    """(method, path, body) of one bad request; cycles through the kinds of mistake clients make."""
    ok = {"model": MODEL, "prompt": [2, 5, 6], "max_tokens": 4}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    kinds = [
        lambda: b"{not json",
        lambda: b"",
        lambda: json.dumps([1, 2, 3]).encode(),
        lambda: json.dumps({**ok, "max_tokens": -rng.randrange(1, 100)}).encode(),
        lambda: json.dumps({**ok, "max_tokens": 10**9}).encode(),
        lambda: json.dumps({**ok, "max_tokens": "16"}).encode(),
        lambda: json.dumps({**ok, "temperature": -0.5}).encode(),
        lambda: json.dumps({**ok, "top_p": 0}).encode(),
        lambda: json.dumps({**ok, "model": f"gpt-{rng.randrange(9)}"}).encode(),
        lambda: json.dumps({**ok, "prompt": [2] * 5000}).encode(),
        lambda: json.dumps({**ok, "prompt": [2, vocab + rng.randrange(1000)]}).encode(),
        lambda: json.dumps({**ok, "prompt": []}).encode(),
        lambda: json.dumps({**ok, "prompt": 42}).encode(),
        lambda: json.dumps({**ok, "bogus_field": 1}).encode(),
        lambda: json.dumps({**ok, "n": 3}).encode(),
        lambda: json.dumps({**ok, "logprobs": 99}).encode(),
        lambda: json.dumps({**ok, "stream": "yes"}).encode(),
        lambda: json.dumps({k: v for k, v in ok.items() if k != "prompt"}).encode(),
        lambda: json.dumps({**chat, "messages": []}).encode(),
        lambda: json.dumps({**chat, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        lambda: json.dumps({**chat, "top_logprobs": 2}).encode(),
        lambda: json.dumps({**chat, "max_completion_tokens": 0}).encode(),
    ]
    i = rng.randrange(len(kinds) + 2)
    if i == len(kinds):
        return "GET", "/v1/completions", None
    if i == len(kinds) + 1:
        return "POST", f"/v1/nothing-{rng.randrange(99)}", b"{}"
    body = kinds[i]()
    return "POST", "/v1/chat/completions" if b'"messages"' in body else "/v1/completions", body


def test_1000_malformed_requests_get_4xx_and_the_server_keeps_serving(base):
    rng = random.Random(11)
    statuses = []
    with httpx.Client(base_url=base, timeout=30) as http:
        for _ in range(N_MALFORMED):
            method, path, body = _malformed(512, rng)
            r = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
            statuses.append(r.status_code)
            assert 400 <= r.status_code < 500, (method, path, body[:200] if body else None, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
        good = http.post("/v1/completions", json={"model": MODEL, "prompt": [2, 5, 6], "max_tokens": 4,
                                                  "temperature": 0})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
        assert http.get("/health").status_code == 200
    assert len(set(statuses)) >= 3  # 400, 404 and 405 all occurred
