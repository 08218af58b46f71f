"""Time the challenge's PPL volume (issue 6, bar 4) and E4B's peak memory at 4K context (issue 2, bar 5).

1. Teacher-forced scoring of every PPL record (the challenge's 128 records, 61,797 target tokens, contexts
   up to 2.9K) through `EngineWorker.measure_ppl`: the tuner's own quality path (records batched by length,
   fp32 log-softmax over the full vocabulary). One untimed warm-up pass, then `--repeats` timed passes.
2. Batch 1 at 4K context: a 3,840-token prompt (prefill) and 256 greedy tokens in a 4,096-token cache,
   with torch's peak allocated and reserved memory, against the 24 GB of an A10G.

E4B geometry with RANDOM bf16 weights (their PPL is meaningless; only the time and memory count).
The challenge's records are not shipped (no licence): pass --records or set VKAE_CHALLENGE_DATA.
Prints a table and ends with one JSON line.   Usage: python scripts/bench_ppl_gpu.py [--records FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.commands import synthetic_prompts  # noqa: E402
from engine.knobs import Knobs  # noqa: E402
from engine.measure import PplRecord  # noqa: E402
from engine.worker import EngineWorker  # noqa: E402

GIB = 2**30


def main() -> int:
    ap = argparse.ArgumentParser()
    default = os.path.join(os.environ.get("VKAE_CHALLENGE_DATA", ""), "ppl_ground_truth_tokens.jsonl")
    ap.add_argument("--records", default=default)
    ap.add_argument("--model", default="gemma-4-e4b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script on a tiny model")
    a = ap.parse_args()
    if not os.path.isfile(a.records):
        print(f"no PPL records at {a.records!r}: pass --records FILE or set VKAE_CHALLENGE_DATA")
        return 2
    records = [PplRecord.from_dict(json.loads(line)) for line in open(a.records) if line.strip()]
    targets = sum(len(r.target) for r in records)
    scored = sum(len(r) for r in records)
    w = EngineWorker(a.model, device=a.device, random_weights=True, max_context=a.context)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    weight_bytes = sum(p.numel() * p.element_size() for p in w.loaded.model.parameters())

    # 1. PPL volume
    w.set_knobs(Knobs())
    w.measure_ppl(records)  # warm-up: kernels, autotuning, allocator
    times = []
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        w.measure_ppl(records)
        sync()
        times.append(time.perf_counter() - t0)
    ppl_peak = torch.cuda.max_memory_allocated(dev) if cuda else 0

    # 2. batch 1 at 4K context (scoring built no generator: the worker's, at its default knobs, is batch 1)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    gen = w.generator()
    prompt = synthetic_prompts(1, a.context - 256, w.loaded.arch.vocab_size, 0)
    t0 = time.perf_counter()
    out = gen.generate(prompt, 256 - 16)  # 16 slots stay free for the engine's draft headroom
    sync()
    long_s = time.perf_counter() - t0
    peak_alloc = torch.cuda.max_memory_allocated(dev) if cuda else 0
    peak_reserved = torch.cuda.max_memory_reserved(dev) if cuda else 0

    med = statistics.median(times)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{a.model} (RANDOM {str(w.dtype).replace('torch.', '')} weights) on {gpu}")
    print("| quantity | value |\n|---|---|")
    print(f"| PPL records / target tokens / tokens scored | {len(records)} / {targets:,} / {scored:,} |")
    print(f"| scoring time, median of {a.repeats} (min-max) | {med:.2f} s ({min(times):.2f}-{max(times):.2f}) |")
    print(f"| tokens scored per second | {scored / med:,.0f} |")
    print(f"| peak memory while scoring | {ppl_peak / GIB:.2f} GiB |")
    print(f"| weights | {weight_bytes / GIB:.2f} GiB |")
    print(f"| batch 1, {len(prompt[0])}-token prompt + {len(out.tokens[0])} tokens in a {a.context}-token cache |"
          f" {long_s:.2f} s, peak allocated {peak_alloc / GIB:.2f} GiB, reserved {peak_reserved / GIB:.2f} GiB |")
    print(json.dumps({"model": a.model, "weights": "random", "gpu": gpu,
                      "records": len(records), "target_tokens": targets, "tokens_scored": scored,
                      "ppl_seconds": times, "ppl_seconds_median": med, "ppl_peak_bytes": ppl_peak,
                      "weight_bytes": weight_bytes, "long_context": {"prompt": len(prompt[0]),
                      "new_tokens": len(out.tokens[0]), "cache": a.context, "seconds": long_s,
                      "peak_allocated_bytes": peak_alloc, "peak_reserved_bytes": peak_reserved},
                      "fits_24gb": peak_reserved < 24e9, "ppl_bar_15s": med <= 15.0}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
