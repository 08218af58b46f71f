"""GPU check of the int8-screened greedy head (`kernels.head_argmax`) at E4B geometry, RANDOM bf16 weights.

In one run:
  1. build time and size of the int8 copy of the tied 262,144 x 2560 head;
  2. ids of the screen vs the Triton GEMV's argmax (what greedy decode used before) on the model's own final
     hidden states (a 512-token prompt), at M = 1, 9 and 16 rows, and on those states scaled x4 (sharper logits);
  3. how many rows survive the screen (are recomputed exactly) per hidden row;
  4. the head alone, CUDA-graphed: GEMV + torch argmax vs the screen, M = 1 and 9;
  5. end to end: greedy generation with the screen on and off gives the same tokens.
Prints a table and ends with one JSON line.
  6. with --sweep: screen tile variants (head alone, graphed) and the per-kernel split of one call (profiler).
Usage: python scripts/check_screened_head_gpu.py [--positions 512] [--new-tokens 128] [--sweep] [--sweep-only]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels.head_argmax as ha  # noqa: E402
from engine.generate import Generator  # noqa: E402
from engine.knobs import Knobs  # noqa: E402
from engine.loader import load_model  # noqa: E402


def graphed_ms(fn, calls: int = 10) -> float:
    """Median ms per call of fn() captured `calls` times in one CUDA graph (`bench_kernels.bench_graphed`; the head
    streams 0.67-1.34 GB a call, far past L2, so the same operands serve every call)."""
    from bench_kernels import bench_graphed

    return bench_graphed(fn, [()] * calls) / 1e3


def survivors(x: torch.Tensor, head: ha.ScreenedHead) -> list[int]:
    """Rows per hidden row whose band reaches the best lower bound (what the exact kernel recomputes, margin aside)."""
    out = []
    for r in range(x.shape[0]):
        lo, hi = ha.screen_bounds_ref(x[r:r + 1], head)
        out.append(int((hi >= lo.max()).sum()))
    return out


SWEEP = {  # name -> module globals of kernels.head_argmax
    "digits": {},  # the default: x as two int8 digit rows, int8 x int8 dots, 64 x 256 tiles
    "d_bk128": {"DIGITS_BLOCK_K": 128},
    "d_bn128_bk128": {"DIGITS_BLOCK_N": 128, "DIGITS_BLOCK_K": 128},
    "d_bk512_st3": {"DIGITS_BLOCK_K": 512, "DIGITS_STAGES": 3},
    "d_st3": {"DIGITS_STAGES": 3},
    "d_st6": {"DIGITS_STAGES": 6},
    "d_w8": {"DIGITS_WARPS": 8},
    "exact_chunk1024": {"EXACT_CHUNK": 1024},  # rows per exact-kernel program (default 64 since stop 25; was 2048)
    "exact_chunk256": {"EXACT_CHUNK": 256},
    "exact_chunk2048": {"EXACT_CHUNK": 2048},  # the stop-24 default (64, the default now, is the sweep's "digits")
}


def sweep(w: torch.Tensor, head: ha.ScreenedHead, xs: torch.Tensor) -> dict:
    """Head-alone graphed ms of each screen variant at M = 1 and 9 (ids checked against the GEMV's), then the
    per-kernel device time of one default call from the profiler."""
    out = {}
    ref = {M: ha.greedy_ids_ref(xs[:M].contiguous(), w) for M in (1, 9)}
    out["gemv_argmax"] = {f"ms_{M}": graphed_ms(lambda: ha.greedy_ids_ref(xs[:M].contiguous(), w)) for M in (1, 9)}
    print(f"sweep gemv_argmax (the bf16 head it replaces): {out['gemv_argmax']}", flush=True)
    for name, sw in SWEEP.items():
        saved = {k: getattr(ha, k) for k in sw}
        try:
            for k, v in sw.items():
                setattr(ha, k, v)
            row = {}
            for M in (1, 9):
                x = xs[:M].contiguous()
                row[f"ok_{M}"] = bool(torch.equal(ha.greedy_ids(x, w, head), ref[M]))
                row[f"ms_{M}"] = graphed_ms(lambda: ha.greedy_ids(x, w, head))
            out[name] = row
        except Exception as e:  # a variant that fails to compile must not cost the others
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        finally:
            for k, v in saved.items():
                setattr(ha, k, v)
        print(f"sweep {name}: {out[name]}", flush=True)
    from torch.profiler import ProfilerActivity, profile

    for M in (1, 9):
        x = xs[:M].contiguous()
        ha.greedy_ids(x, w, head)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                ha.greedy_ids(x, w, head)
            torch.cuda.synchronize()
        kern = {}
        for e in prof.key_averages():
            total = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
            if total > 0:
                kern[e.key[:60]] = total / max(e.count, 1) / 1e3  # ms per launch
        out[f"kernels_ms_M{M}"] = kern
        print(f"kernels M={M}: {kern}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--sweep", action="store_true", help="also time screen tile variants and profile one call")
    ap.add_argument("--sweep-only", action="store_true", help="only build the screen and run the sweep")
    args = ap.parse_args()
    lm = load_model("gemma-4-e4b", device="cuda", dtype=torch.bfloat16, random_weights=True, seed=0)
    model, w = lm.model, lm.model.lm_head
    res: dict = {"weights": "random", "geometry": "gemma-4-e4b", "gpu": torch.cuda.get_device_name(0)}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    head = ha.build_screened_head(w)
    torch.cuda.synchronize()
    res.update(build_s=time.perf_counter() - t0, screen_bytes=head.nbytes, head_bytes=w.numel() * w.element_size())
    model.screened_head = head
    ha.ENABLED = True  # this script measures the screen whatever the engine's default
    if args.sweep or args.sweep_only:
        xs = torch.randn(16, w.shape[1], device="cuda", dtype=w.dtype) * 1.0  # final-norm-like rows (|x| ~ 50)
        res["sweep"] = sweep(w, head, xs)
        if args.sweep_only:
            print(json.dumps(res))
            return 0

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, lm.arch.vocab_size, (args.positions,), generator=g).tolist()
    with torch.inference_mode():
        ids = torch.tensor([prompt], device="cuda")
        pos = torch.arange(len(prompt), device="cuda")[None]
        hidden = model.forward_fresh(ids, pos, None)[0]  # [P, H], final normed states
        checks = {}
        for label, xs in (("model states", hidden), ("model states x4", hidden * 4)):
            for M in (1, 9, 16):
                bad = total = 0
                for s0 in range(0, xs.shape[0] - M + 1, M if M > 1 else 1):
                    x = xs[s0:s0 + M].contiguous()
                    got, want = ha.greedy_ids(x, w, head), ha.greedy_ids_ref(x, w)
                    bad += int((got != want).sum())
                    total += M
                checks[f"{label}, M={M}"] = {"rows": total, "mismatches": bad}
        res["ids_checks"] = checks
        surv = survivors(hidden[:64], head) + survivors(4 * hidden[:64], head)
        res["survivors"] = {"min": min(surv), "median": statistics.median(surv), "max": max(surv), "rows": len(surv)}
        timings = {}
        for M in (1, 9):
            x = hidden[:M].contiguous()
            timings[M] = {"gemv_argmax_ms": graphed_ms(lambda: ha.greedy_ids_ref(x, w)),
                          "screen_ms": graphed_ms(lambda: ha.greedy_ids(x, w, head))}
        res["head_timings"] = timings

    tokens = {}
    for on in (True, False):
        ha.ENABLED = on
        gen = Generator(lm, Knobs(batch_size=1), max_context=2048, use_cuda_graphs=True)
        gen.generate([prompt[:256]], 8)  # compiles and captures: not timed
        out = gen.generate([prompt[:256]], args.new_tokens)
        tokens[on] = out.tokens[0]
        res[f"generate_tps_screen_{'on' if on else 'off'}"] = out.decode_tokens / out.decode_seconds
        del gen
    ha.ENABLED = True
    res["greedy_tokens_equal"] = tokens[True] == tokens[False]
    res["greedy_tokens"] = len(tokens[True])

    print(f"GPU {res['gpu']}; E4B geometry, RANDOM bf16 weights")
    print(f"int8 screen: {res['screen_bytes'] / 1e9:.3f} GB (head {res['head_bytes'] / 1e9:.3f} GB), built in {res['build_s']:.2f} s")
    print(f"{'ids check':<28} {'rows':>6} {'mismatches':>11}")
    for k, v in checks.items():
        print(f"{k:<28} {v['rows']:>6} {v['mismatches']:>11}")
    s = res["survivors"]
    print(f"rows recomputed per hidden row: min {s['min']}, median {s['median']}, max {s['max']} (of {lm.arch.vocab_size})")
    print(f"{'head alone (graphed)':<28} {'GEMV+argmax ms':>15} {'screen ms':>10} {'speedup':>8}")
    for M, t in timings.items():
        print(f"{'M=' + str(M):<28} {t['gemv_argmax_ms']:>15.3f} {t['screen_ms']:>10.3f} "
              f"{t['gemv_argmax_ms'] / t['screen_ms']:>7.2f}x")
    print(f"greedy generation, {res['greedy_tokens']} tokens: screen on == off: {res['greedy_tokens_equal']}; "
          f"decode TPS on {res['generate_tps_screen_on']:.1f}, off {res['generate_tps_screen_off']:.1f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
