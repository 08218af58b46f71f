"""Fused GEMV epilogues (VKAE_FUSED_EPILOGUES, `engine.fused_tail`) on vs off at E4B geometry, RANDOM bf16
weights, batch 1, in one process:
  1. kernels per eager step (torch.profiler) for the decode (T = 1) and verify (T = 9) steps of each mode;
  2. CUDA-graphed decode and verify step times, the two modes alternating round by round (median);
  3. the fused decode step's final hidden state and greedy token vs the unfused one on identical caches
     (first position: bitwise-identical caches; later positions: each mode's own cache, drift included);
  4. with fusion on, row invariance end to end: each of the 9 positions of a verify step equals, bit for
     bit, the 1-token decode step of the same token at the same position (9 decode steps in sequence).
Each mode has its own Generator (graphs are captured with the switch as it was at capture time).
`--switch qkv` runs the same A/B for the fused q/k/v epilogue alone (VKAE_FUSED_QKV: q/k/v GEMV, then one
launch for the split-K reduction, q norm + RoPE and the K/V norms + RoPE + cache write), the other fusions on;
its arithmetic is the unfused path's, so fused vs unfused must be bitwise equal. `--switch mlp`: the MLP as
one weight stream (VKAE_FUSED_MLP, `kernels.fused_mlp`) vs the two GEMVs (its down sums run in another order:
bf16 noise, not bitwise).
Prints a table and ends with one JSON line.
Usage: python scripts/bench_fused_epilogues_gpu.py [--rounds 7] [--switch epilogues|qkv|mlp]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine.fused_tail as fused_tail  # noqa: E402
import engine.linear as linear_mod  # noqa: E402
import kernels.invariance as invariance  # noqa: E402
from engine.generate import Generator  # noqa: E402
from engine.knobs import Knobs  # noqa: E402
from engine.loader import load_model  # noqa: E402
from check_verify_invariance_gpu import graphed_step_ms  # noqa: E402  (this script's folder is on sys.path)

WIDTH = 9  # K + 1 with K = 8 draft tokens
PROMPT = list(range(3, 259))
MODES = {"fused": True, "unfused": False}
TOKEN_HI = 1000  # random token ids below this
SWITCHES = {"epilogues": "FUSED_EPILOGUES", "qkv": "FUSED_QKV", "mlp": "FUSED_MLP"}
SWITCH = SWITCHES["epilogues"]  # the fused_tail attribute this run flips (--switch)


def set_mode(fused: bool) -> None:
    setattr(fused_tail, SWITCH, fused)


def make_generator(lm, fused: bool, positions: torch.Tensor) -> Generator:
    """A Generator whose decode and verify graphs are captured with the switch at `fused`."""
    set_mode(fused)
    gen = Generator(lm, Knobs(batch_size=1), max_context=1024, use_cuda_graphs=True)
    gen.prefill(PROMPT, 0)
    dev = gen.device
    toks = torch.full((1, WIDTH), 5, dtype=torch.long, device=dev)
    gen.step(toks, positions[:, :WIDTH])  # captures the verify graph
    gen.step(toks[:, :1], positions[:, :1])  # captures the decode graph
    torch.cuda.synchronize()
    return gen


def kernels_per_step(gen: Generator, fused: bool, tokens: torch.Tensor, positions: torch.Tensor,
                     steps: int = 3) -> float:
    """GPU kernels launched by one eager step (the step a CUDA graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    set_mode(fused)
    with torch.inference_mode():
        gen._step_eager(tokens, positions)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                gen._step_eager(tokens, positions)
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    return sum(e.count for e in kernels) / steps


def compare_modes(gens: dict[str, Generator], rounds: int, g: torch.Generator) -> dict:
    """Both generators decode the same tokens at the same positions from the same prefilled cache
    (prefill resets the row, so the positions the capture and timing steps wrote are gone)."""
    dev = gens["fused"].device
    for gen in gens.values():
        gen.prefill(PROMPT, 0)  # prefill widths never take the fused path: identical caches
    p0 = len(PROMPT)
    first, worst, same_greedy, scale = None, 0.0, 0, 0.0
    for i in range(rounds):
        tok = torch.randint(3, TOKEN_HI, (1, 1), device=dev, generator=g)
        pos = torch.tensor([[p0 + i]], device=dev)
        (hf, gf), (hu, gu) = (gens[m].step(tok, pos) for m in ("fused", "unfused"))
        diff = (hf.float() - hu.float()).abs().max().item()
        first = diff if first is None else first
        worst = max(worst, diff)
        scale = max(scale, hu.float().abs().max().item())
        same_greedy += int(torch.equal(gf, gu))
    return {"first_position_max_abs_hidden_diff": first, "max_abs_hidden_diff": worst,
            "hidden_abs_max": scale, "same_greedy": same_greedy, "positions": rounds}


def verify_vs_decode(gen: Generator, rounds: int, g: torch.Generator) -> dict:
    """Each position of a 9-wide verify vs the 1-token decode step of the same token (fusion on)."""
    dev = gen.device
    p0 = len(PROMPT) + 64
    bitwise_first, bitwise_all, worst = 0, 0, 0.0
    for i in range(rounds):
        p = p0 + WIDTH * i
        toks = torch.randint(3, TOKEN_HI, (1, WIDTH), device=dev, generator=g)
        h9 = gen.step(toks, (torch.arange(WIDTH, device=dev) + p)[None])[0][0].clone()  # [9, H]
        for j in range(WIDTH):
            h1 = gen.step(toks[:, j:j + 1], torch.tensor([[p + j]], device=dev))[0][0, 0]
            same = torch.equal(h1, h9[j])
            bitwise_all += int(same)
            bitwise_first += int(same and j == 0)
            worst = max(worst, (h1.float() - h9[j].float()).abs().max().item())
    return {"bitwise_first_position": bitwise_first, "bitwise_all_positions": bitwise_all,
            "rounds": rounds, "positions_checked": rounds * WIDTH, "max_abs_hidden_diff": worst}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (median)")
    ap.add_argument("--iters", type=int, default=50, help="graph replays per timing")
    ap.add_argument("--check-positions", type=int, default=8)
    ap.add_argument("--switch", choices=sorted(SWITCHES), default="epilogues")
    args = ap.parse_args()
    global SWITCH
    SWITCH = SWITCHES[args.switch]
    lm = load_model("gemma-4-e4b", device="cuda", dtype=torch.bfloat16, random_weights=True)
    dev = torch.device("cuda")
    p = len(PROMPT)
    positions = (torch.arange(WIDTH, device=dev) + p)[None]
    tokens = torch.randint(3, TOKEN_HI, (1, WIDTH), device=dev, generator=torch.Generator(dev).manual_seed(0))
    env_default = getattr(fused_tail, SWITCH)
    gens = {m: make_generator(lm, fused, positions) for m, fused in MODES.items()}
    set_mode(env_default)  # graphs already captured keep their mode

    res: dict = {"device": torch.cuda.get_device_name(), "geometry": "gemma-4-e4b", "weights": "random",
                 "dtype": "bfloat16", "row_invariant": invariance.ROW_INVARIANT, "width": WIDTH,
                 "gemv_policy": linear_mod.GEMV_POLICY, "switch": SWITCH}
    res["kernels_per_step"] = {m: {"decode": kernels_per_step(gens[m], f, tokens[:, :1], positions[:, :1]),
                                   "verify": kernels_per_step(gens[m], f, tokens, positions)}
                               for m, f in MODES.items()}
    set_mode(env_default)
    print("kernels per step:", json.dumps(res["kernels_per_step"]), flush=True)

    times: dict[str, dict[str, list[float]]] = {m: {"decode": [], "verify": []} for m in MODES}
    for _ in range(args.rounds):
        for m in MODES:
            times[m]["decode"].append(graphed_step_ms(gens[m], tokens[:, :1], positions[:, :1], args.iters))
            times[m]["verify"].append(graphed_step_ms(gens[m], tokens, positions, args.iters))
    res["step_ms_median"] = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    res["step_ms_all"] = times
    print("step ms (median):", json.dumps(res["step_ms_median"]), flush=True)

    g = torch.Generator(dev).manual_seed(1)
    res["fused_vs_unfused"] = compare_modes(gens, args.check_positions, g)
    res["fused_verify_vs_decode"] = verify_vs_decode(gens["fused"], max(1, args.check_positions // 2), g)

    med, kps = res["step_ms_median"], res["kernels_per_step"]
    for step in ("decode", "verify"):
        saved_ms = med["unfused"][step] - med["fused"][step]
        saved_k = kps["unfused"][step] - kps["fused"][step]
        res[f"{step}_speedup"] = med["unfused"][step] / med["fused"][step]
        res[f"{step}_saved_us"] = 1e3 * saved_ms
        res[f"{step}_kernels_saved"] = saved_k
        res[f"{step}_us_per_saved_kernel"] = 1e3 * saved_ms / saved_k if saved_k else None
    print(f"{'':<10} {'decode ms':>10} {'verify ms':>10} {'kernels/decode':>15} {'kernels/verify':>15}")
    for m in MODES:
        print(f"{m:<10} {med[m]['decode']:>10.3f} {med[m]['verify']:>10.3f} {kps[m]['decode']:>15.0f} "
              f"{kps[m]['verify']:>15.0f}")
    print(f"{'speedup':<10} {res['decode_speedup']:>10.3f}x {res['verify_speedup']:>9.3f}x "
          f"{res['decode_kernels_saved']:>15.0f} {res['verify_kernels_saved']:>15.0f}  (saved)")
    c, v = res["fused_vs_unfused"], res["fused_verify_vs_decode"]
    print(f"fused vs unfused hidden: first position max|dh| {c['first_position_max_abs_hidden_diff']:.3g}, "
          f"over {c['positions']} positions {c['max_abs_hidden_diff']:.3g} (|h| max {c['hidden_abs_max']:.3g}); "
          f"same greedy {c['same_greedy']}/{c['positions']}")
    print(f"fused verify == decode (bitwise): first position {v['bitwise_first_position']}/{v['rounds']}, "
          f"all positions {v['bitwise_all_positions']}/{v['positions_checked']} "
          f"(max|dh| {v['max_abs_hidden_diff']:.3g})")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
