"""Real weights: Gemma 3 270M (Q4_K_M, dequantized) with the n-gram drafter on a copy-heavy prompt set built
from the shipped WikiText-2 slice (each prompt: a paragraph, then an instruction to repeat it with one word
changed, then the paragraph's first words so the copy has begun). Single stream, greedy, EOS ignored:
TPS for K in {0, 2, 4, 6, 8}, each run in the same process, and token identity with K = 0.
Prints a table and ends with one JSON line.   Usage: python scripts/bench_ngram_gemma3_gpu.py [--device cuda]"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.knobs import Knobs  # noqa: E402
from engine.tokenizer import ASSETS_DIR  # noqa: E402
from engine.worker import EngineWorker  # noqa: E402


def copy_prompts(tok, n: int) -> list[list[int]]:
    paras = [p.strip() for p in (ASSETS_DIR / "wikitext2_test_slice.txt").read_text(encoding="utf-8").split("\n")
             if len(p.split()) >= 60 and not p.strip().startswith("=")]
    prompts = []
    for p in paras[:n]:
        words = p.split()[:120]
        para = " ".join(words)
        prompts.append(tok.encode(f"{para}\n\nRepeat the paragraph above with one word changed:\n\n"
                                  + " ".join(words[:6])))
    return prompts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    w = EngineWorker("gemma-3-270m", device=a.device)
    prompts = copy_prompts(w.tokenizer, a.prompts)
    rows = {}
    plain = None
    for k in (0, 2, 4, 6, 8):
        w.set_knobs(Knobs(drafter="ngram" if k else "none", draft_tokens=k))
        r = w.measure_tps(prompts, a.new_tokens, repeats=3, warmup=2)
        out = w.generate(prompts, a.new_tokens)
        plain = out if k == 0 else plain
        rows[k] = {"tps": r["tps"], "tps_min": r["tps_min"], "tps_max": r["tps_max"], "mean_accepted": r["mean_accepted"],
                   "acceptance_by_position": r["acceptance_by_position"], "identical_to_k0": out == plain,
                   "drafter_time_share": r["drafter_time_share"]}
    best = max((k for k in rows if k), key=lambda k: rows[k]["tps"])
    info = w.describe()
    print(f"{info['model']['label']} on {info['gpu_name']} ({info['dtype']}), {len(prompts)} copy prompts, "
          f"{a.new_tokens} new tokens, batch 1")
    print("| K | TPS (median) | min-max | mean accepted | identical to K=0 |\n|---:|---:|---:|---:|:---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['tps']:.1f} | {r['tps_min']:.1f}-{r['tps_max']:.1f} | {r['mean_accepted']:.2f} | "
              f"{'yes' if r['identical_to_k0'] else 'NO'} |")
    print(f"best K={best}: {rows[best]['tps'] / rows[0]['tps']:.2f}x K=0")
    print(json.dumps({"model": info["model"]["label"], "gpu": info["gpu_name"], "rows": rows, "best_k": best,
                      "speedup": rows[best]["tps"] / rows[0]["tps"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
