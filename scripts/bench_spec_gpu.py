"""Speculative-decoding costs at E4B geometry with RANDOM bf16 weights (target + E4B-geometry assistant).

Measures, in one run: the wall time of one target verify step of width K+1 in {1, 2, 4, 8} relative to
one plain decode step (CUDA graphs, batch 1, context 256), and the time of one assistant draft pass at
centroid_top_k in {16, 32, 44, 64, 2048} (eager, as the engine runs it, and CUDA-graphed). From these,
a PROJECTED single-stream TPS for the per-position acceptance the challenge measured on real E4B
weights (0.69, 0.53, 0.43, 0.34, 0.27, 0.22, 0.17):
    E[T](K) = 1 + sum_{i<=K} alpha_i;   TPS(K) = E[T](K) / (K * t_draft + t_verify(K+1)).
Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.generate import Generator  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.worker import EngineWorker  # noqa: E402

ALPHA = [0.69, 0.53, 0.43, 0.34, 0.27, 0.22, 0.17]


def timed(fn, iters: int = 40) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main() -> int:
    w = EngineWorker("gemma-4-e4b", device="cuda", random_weights=True, assistant="gemma-4-e4b-assistant")
    gen: Generator = w.generator()
    prompt = list(range(3, 259))
    h = gen.prefill(prompt, 0)
    dev = gen.device
    res: dict = {"weights": "random", "gpu": torch.cuda.get_device_name(0), "context": len(prompt)}
    verify = {}
    for width in (1, 2, 4, 8):
        toks = torch.randint(3, 1000, (1, width), device=dev)
        pos = (torch.arange(width, device=dev) + len(prompt))[None]
        verify[width] = timed(lambda: gen.step(toks, pos))
    res["verify_ms"] = {k: v * 1e3 for k, v in verify.items()}
    res["verify_over_decode"] = {k: v / verify[1] for k, v in verify.items()}
    last = torch.tensor([5], device=dev)
    pos = torch.tensor([len(prompt)], device=dev)
    hid = h[None]
    asst = w.assistant
    draft = {}
    for ctk in (16, 32, 44, 64, 2048):
        eager = timed(lambda: asst.draft(gen, last, hid, pos, 1, ctk, SamplingParams(), None))
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            asst.draft(gen, last, hid, pos, 1, ctk, SamplingParams(), None)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            asst.draft(gen, last, hid, pos, 1, ctk, SamplingParams(), None)
        graphed = timed(graph.replay)
        draft[ctk] = {"eager_ms": eager * 1e3, "graph_ms": graphed * 1e3}
    res["draft_pass_ms"] = draft
    proj = {}
    t_dec = verify[1]
    for ctk in (32, 44):
        rows = {}
        for K in range(1, 8):
            width = K + 1
            t_ver = verify.get(width) or (verify[4] + (verify[8] - verify[4]) * (width - 4) / 4 if width > 4
                                          else verify[2] + (verify[4] - verify[2]) * (width - 2) / 2)
            et = 1 + sum(ALPHA[:K])
            for mode in ("eager_ms", "graph_ms"):
                rows.setdefault(mode, {})[K] = et / (K * draft[ctk][mode] / 1e3 + t_ver)
        proj[ctk] = rows
    res["plain_decode_tps"] = 1 / t_dec
    res["projected_tps"] = proj
    print(f"GPU {res['gpu']}, E4B geometry, RANDOM weights, context {len(prompt)}")
    print("verify width : " + "  ".join(f"{k}: {v * 1e3:.3f} ms ({v / t_dec:.3f}x)" for k, v in verify.items()))
    print("draft pass   : " + "  ".join(f"ctk {k}: {v['eager_ms']:.3f} ms eager / {v['graph_ms']:.3f} ms graph"
                                         for k, v in draft.items()))
    print(f"plain decode : {1 / t_dec:.1f} TPS")
    for ctk, rows in proj.items():
        for mode, r in rows.items():
            print(f"PROJECTED TPS (ctk {ctk}, drafter {mode[:-3]}): " + "  ".join(f"K={k}: {v:.0f}" for k, v in r.items()))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
