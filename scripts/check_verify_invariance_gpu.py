"""Is a speculative verify step bit-for-bit a decode step? E4B geometry, random bf16 weights: the final
hidden state and greedy token of position p computed by a width-1 decode step vs the first row of a
width-9 verify step (same cache, same token), over several positions, with the row-invariance switch
(`kernels.invariance.ROW_INVARIANT`, env VKAE_ROW_INVARIANT, on by default) on and off. Also times the
CUDA-graphed decode and verify steps of each mode (what the invariance costs).
Prints a table and ends with one JSON line."""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine.linear as linear_mod  # noqa: E402
import engine.ops as ops  # noqa: E402
import kernels.gemv as gemv  # noqa: E402
import kernels.invariance as invariance  # noqa: E402
from engine.generate import Generator  # noqa: E402
from engine.knobs import Knobs  # noqa: E402
from engine.loader import load_model  # noqa: E402

WIDTH = 9  # K + 1 with K = 8 draft tokens


def graphed_step_ms(gen: Generator, tokens: torch.Tensor, positions: torch.Tensor, iters: int = 50) -> float:
    """Mean milliseconds of `iters` replays of an already captured step, after a warm-up (also used by
    bench_fused_epilogues_gpu.py)."""
    for _ in range(5):
        gen.step(tokens, positions)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        gen.step(tokens, positions)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run(lm, positions: int = 12) -> dict:
    gen = Generator(lm, Knobs(batch_size=1), max_context=1024, use_cuda_graphs=True)
    dev = gen.device
    prompt = list(range(3, 259))
    gen.prefill(prompt, 0)
    g = torch.Generator(device=dev).manual_seed(0)
    worst, same_tok, bitwise = 0.0, 0, 0
    for i in range(positions):
        p = len(prompt) + i
        toks = torch.randint(3, 1000, (1, WIDTH), device=dev, generator=g)
        h9, g9 = gen.step(toks, (torch.arange(WIDTH, device=dev) + p)[None])
        h9, g9 = h9[:, 0].clone(), g9[:, 0].clone()
        h1, g1 = gen.step(toks[:, :1], torch.tensor([[p]], device=dev))
        worst = max(worst, (h1[:, 0].float() - h9.float()).abs().max().item())
        same_tok += int(g1[0, 0] == g9[0])
        bitwise += int(torch.equal(h1[:, 0], h9))
    p = len(prompt) + positions
    toks = torch.randint(3, 1000, (1, WIDTH), device=dev, generator=g)
    decode_ms = graphed_step_ms(gen, toks[:, :1], torch.tensor([[p]], device=dev))
    verify_ms = graphed_step_ms(gen, toks, (torch.arange(WIDTH, device=dev) + p)[None])
    return {"max_abs_hidden_diff": worst, "same_greedy": same_tok, "bitwise_equal": bitwise,
            "positions": positions, "decode_step_ms": round(decode_ms, 4), "verify_step_ms": round(verify_ms, 4)}


def main() -> int:
    lm = load_model("gemma-4-e4b", device="cuda", dtype=torch.bfloat16, random_weights=True)
    res: dict[str, dict] = {}
    for name, switch in (("row_invariant_on", True), ("row_invariant_off", False)):
        # everything else at its default: GEMV for all matrices (following the switch), static ops
        invariance.ROW_INVARIANT = switch
        gemv.BATCH_INVARIANT = None
        linear_mod.GEMV_POLICY = "all"
        ops.COMPILE_DYNAMIC = False
        ops.reset_compiled()
        torch._dynamo.reset()
        res[name] = run(lm)
        print(f"{name:<20} {json.dumps(res[name])}", flush=True)
    on, off = res["row_invariant_on"], res["row_invariant_off"]
    print(f"{'':<20} {'max|dh|':>10} {'same greedy':>12} {'bitwise':>8} {'decode ms':>10} {'verify ms':>10}")
    for name, r in res.items():
        print(f"{name:<20} {r['max_abs_hidden_diff']:>10.3g} {r['same_greedy']:>6}/{r['positions']:<5} "
              f"{r['bitwise_equal']:>8} {r['decode_step_ms']:>10.3f} {r['verify_step_ms']:>10.3f}")
    summary = {"device": torch.cuda.get_device_name(), "width": WIDTH, **res,
               "decode_cost_ratio": round(on["decode_step_ms"] / off["decode_step_ms"], 4),
               "verify_cost_ratio": round(on["verify_step_ms"] / off["verify_step_ms"], 4)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
