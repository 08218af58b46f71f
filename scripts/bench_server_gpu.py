"""Server throughput vs `vkae-tune bench` for one recipe (issue 5, GPU bar), measured in one run.

1. `vkae-tune bench` with the recipe's model and knobs at batch_size 1: single-stream TPS (reference);
2. `vkae-tune serve RECIPE` on loopback, then clients sending /v1/completions with token-id prompts
   (the same synthetic prompts, 256 tokens, greedy, EOS ignored): 1 client (single stream), then 4 and
   16 concurrent clients (aggregate TPS).
Prints a table and ends with one JSON line.   Usage: python scripts/bench_server_gpu.py RECIPE [--new-tokens 128]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import subprocess
import queue
import sys
import time

import httpx
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.commands import synthetic_prompts  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    recipe = yaml.safe_load(open(a.recipe))
    knobs, model = recipe["knobs"], recipe["model"]
    random = model.get("weights") == "random" or model.get("random_weights", False)
    ref = model.get("reference") or model.get("name")
    bench = [sys.executable, "-m", "tuner.cli", "bench", ref, "--batch-size", "1", "--max-new-tokens", str(a.new_tokens),
             "--prompt-len", "256", "--num-prompts", "4", "--repeats", "2", "--json"]
    if random:
        bench.append("--random-weights")
    if knobs.get("sliding_window"):
        bench += ["--sliding-window", str(knobs["sliding_window"])]
    if knobs.get("draft_tokens"):
        bench += ["--drafter", knobs["drafter"], "--draft-tokens", str(knobs["draft_tokens"])]
    out = subprocess.run(bench, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        print(out.stderr[-3000:])
        return 1
    bench_res = json.loads(out.stdout.strip().splitlines()[-1])
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tuner.cli", "serve", a.recipe, "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open("/tmp/server.log", "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                print(open("/tmp/server.log").read()[-3000:])
                return 1
            time.sleep(1)
        name = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        vocab = 262144 if "gemma" in ref else 512
        prompts = synthetic_prompts(64, 256, vocab, 0)

        # keep-alive clients, created and connected during the warm-up, as a real client (the openai SDK)
        # holds one: a fresh httpx.post per request would time TLS-context set-up and a new TCP connection
        idle: queue.Queue[httpx.Client] = queue.Queue()
        for _ in range(16):
            idle.put(httpx.Client(timeout=600))

        def one(p: list[int]) -> int:
            client = idle.get()
            try:
                r = client.post(base + "/v1/completions", json={
                    "model": name, "prompt": p, "max_tokens": a.new_tokens, "temperature": 0, "ignore_eos": True})
            finally:
                idle.put(client)
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        # warm-up, untimed: compile and CUDA-graph capture of every (busy rows, width) the timed runs use
        for clients in (1, 4, 16):
            with cf.ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, prompts[:clients]))
        rows = {}
        for clients, n_req in ((1, 4), (4, 8), (16, 32)):
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(one, prompts[:n_req]))
            rows[clients] = tokens / (time.perf_counter() - t0)
    finally:
        server.terminate()
        server.wait(timeout=60)
    res = {"recipe": a.recipe, "weights": "random" if random else "real", "knobs": knobs,
           "bench_single_stream_tps": bench_res["tps"], "server_tps_by_clients": rows,
           "server_vs_bench_single_stream": rows[1] / bench_res["tps"], "gpu": bench_res.get("gpu_name")}
    print(f"bench (batch 1): {bench_res['tps']:.1f} TPS | server 1 client: {rows[1]:.1f} TPS "
          f"({100 * rows[1] / bench_res['tps']:.1f}% of bench) | 4 clients: {rows[4]:.1f} | 16 clients: {rows[16]:.1f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
