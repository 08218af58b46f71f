"""Is a speculative verify step bit-for-bit a decode step? E4B geometry, random bf16 weights: the final
hidden state and greedy token of position p computed by a width-1 decode step vs the first row of a
width-9 verify step (same cache, same token), over several positions, for switchable kernel policies.
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
from engine.generate import Generator  # noqa: E402
from engine.knobs import Knobs  # noqa: E402
from engine.loader import load_model  # noqa: E402


def run(lm, positions: int = 12) -> dict:
    gen = Generator(lm, Knobs(batch_size=1), max_context=1024, use_cuda_graphs=True)
    dev = gen.device
    prompt = list(range(3, 259))
    gen.prefill(prompt, 0)
    g = torch.Generator(device=dev).manual_seed(0)
    worst, same_tok = 0.0, 0
    for i in range(positions):
        p = len(prompt) + i
        toks = torch.randint(3, 1000, (1, 9), device=dev, generator=g)
        h9, g9 = gen.step(toks, (torch.arange(9, device=dev) + p)[None])
        h9, g9 = h9[:, 0].clone(), g9[:, 0].clone()
        h1, g1 = gen.step(toks[:, :1], torch.tensor([[p]], device=dev))
        worst = max(worst, (h1[:, 0].float() - h9.float()).abs().max().item())
        same_tok += int(g1[0, 0] == g9[0])
    return {"max_abs_hidden_diff": worst, "same_greedy": same_tok, "positions": positions}


def main() -> int:
    lm = load_model("gemma-4-e4b", device="cuda", dtype=torch.bfloat16, random_weights=True)
    res = {}
    for name, policy, inv, dyn in (("gemv all, invariant, static ops", "all", True, False),
                                   ("gemv all, invariant, dynamic ops", "all", True, None),
                                   ("gemv auto, non-invariant (before)", "auto", False, None)):
        linear_mod.GEMV_POLICY, gemv.BATCH_INVARIANT, ops.COMPILE_DYNAMIC = policy, inv, dyn
        ops.reset_compiled()
        torch._dynamo.reset()
        res[name] = run(lm)
        print(f"{name:<40} {json.dumps(res[name])}", flush=True)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
