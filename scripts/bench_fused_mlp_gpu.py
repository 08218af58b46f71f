"""The MLP as one weight stream (`kernels.fused_mlp`, VKAE_FUSED_MLP) against the two-GEMV path, at E4B
geometry (H 2560, I 10240), RANDOM bf16 weights, one GPU:
  1. a CUDA graph of 42 MLP blocks with distinct weights (6.6 GB: the L2 starts cold for every block),
     each `fused_tail.mlp_add_norm` (MLP + residual add + post-norm, as an E4B layer runs it), for the
     two-GEMV path and for fused-kernel configs (GROUP_I / UNIT / BLOCK_H / warps / stages / the down
     weight's layout), variants interleaved over rounds, median per block and the rate over the bytes;
  2. each variant's block output vs an fp32 reference of the same block (bf16 noise: max |diff| / max |ref|)
     and M = 1 vs the first row of M = 9 (row invariance: must be bitwise).
Prints a table and ends with one JSON line.
Usage: python scripts/bench_fused_mlp_gpu.py [--rounds 5] [--layers 42] [--variants default,g128,...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine.fused_tail as fused_tail  # noqa: E402
import kernels.fused_mlp as fm  # noqa: E402
from engine.linear import Linear  # noqa: E402

H, I = 2560, 10240
EPS = 1e-6
# name -> (fused?, config overrides of kernels.fused_mlp module globals, transposed down weight?)
VARIANTS = {
    "two_gemv": (False, {}, False),
    "default": (True, {}, False),
    "u16_s4": (True, {"UNIT": 16, "NUM_STAGES": 4}, False),
    "u32": (True, {"UNIT": 32}, False),
    "s4": (True, {"NUM_STAGES": 4}, False),
    "g128": (True, {"GROUP_I": 128}, False),
    "g32_u32": (True, {"GROUP_I": 32, "UNIT": 32}, False),
    "rb64": (True, {"REDUCE_BLOCK": 64, "REDUCE_BLOCK_P": 32}, False),
    "T_bh256": (True, {"BLOCK_H": 256}, True),
}
DEFAULTS = {k: getattr(fm, k) for k in ("GROUP_I", "UNIT", "BLOCK_H", "BLOCK_K", "NUM_WARPS", "NUM_STAGES",
                                        "REDUCE_BLOCK", "REDUCE_BLOCK_P")}


def set_variant(name: str) -> bool:
    fused, over, _ = VARIANTS[name]
    fused_tail.FUSED_MLP = fused
    for k, v in DEFAULTS.items():
        setattr(fm, k, over.get(k, v))
    return VARIANTS[name][2]


def block(layer: tuple[Linear, Linear], x: torch.Tensor, h: torch.Tensor, w_post: torch.Tensor) -> torch.Tensor:
    return fused_tail.mlp_add_norm(layer[0], layer[1], x, h, w_post, EPS, False)


def reference(layer: tuple[Linear, Linear], x: torch.Tensor, h: torch.Tensor, w_post: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x.float(), layer[0].weight.float()).chunk(2, dim=-1)
    y = F.linear(F.gelu(gate, approximate="tanh") * up, layer[1].weight.float())
    return h.float() + y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + EPS) * w_post.float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=42)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="also print per-kernel times (eager, torch.profiler)")
    args = ap.parse_args()
    names = args.variants.split(",")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    fused_tail.FUSED_EPILOGUES = True
    layers, layers_t = [], []
    for _ in range(args.layers):
        gu = (torch.randn(2 * I, H, device=dev) * 0.02).to(torch.bfloat16)
        dn = (torch.randn(H, I, device=dev) * 0.02).to(torch.bfloat16)
        layers.append((Linear(gu), Linear(dn)))
    if any(VARIANTS[n][2] for n in names):
        for gu, dn in layers:  # the down weight stored [I, H], seen as its [H, I] transpose
            layers_t.append((gu, Linear(dn.weight.t().contiguous().t())))
    w_post = (1 + 0.1 * torch.randn(H, device=dev)).to(torch.bfloat16)
    x9 = torch.randn(9, H, device=dev).to(torch.bfloat16)
    h9 = torch.randn(9, H, device=dev).to(torch.bfloat16)
    x, h0 = x9[:1].clone(), h9[:1].clone()
    bytes_per_block = 3 * H * I * 2
    ref = reference(layers[0], x, h0, w_post)

    graphs, checks = {}, {}
    for name in names:
        transposed = set_variant(name)
        stack = layers_t if transposed else layers
        out1 = block(stack[0], x, h0, w_post)
        out9 = block(stack[0], x9, h9, w_post)
        checks[name] = dict(rel_err=((out1.float() - ref).abs().max() / ref.abs().max()).item(),
                            rows_bitwise=bool(torch.equal(out1[0], out9[0])))
        h = h0.clone()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            cur = h
            for layer in stack:  # warm-up (compiles) outside the graph
                cur = block(layer, x, cur, w_post)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            cur = h
            for layer in stack:
                cur = block(layer, x, cur, w_post)
        graphs[name] = g
    kernel_us = {}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in names:
            stack = layers_t if set_variant(name) else layers
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                cur = h0
                for layer in stack:
                    cur = block(layer, x, cur, w_post)
                torch.cuda.synchronize()
            kernel_us[name] = {e.key[:40]: round(e.self_device_time_total / e.count, 2)
                               for e in prof.key_averages() if e.self_device_time_total > 0}
            print(name, json.dumps(kernel_us[name]), flush=True)
    times = {n: [] for n in names}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(args.rounds):
        for name in names:
            graphs[name].replay()
            torch.cuda.synchronize()
            start.record()
            for _ in range(args.replays):
                graphs[name].replay()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3 / (args.replays * args.layers))
    base = statistics.median(times["two_gemv"]) if "two_gemv" in times else None
    rows = []
    print(f"{torch.cuda.get_device_name()} | E4B MLP blocks (H {H}, I {I}), RANDOM bf16, {args.layers} distinct layers")
    print(f"{'variant':10s} {'us/block':>9s} {'TB/s':>6s} {'vs two_gemv':>11s} {'rel err':>9s} {'rows bitwise':>12s}")
    for name in names:
        us = statistics.median(times[name])
        row = dict(variant=name, us_per_block=round(us, 2), tb_s=round(bytes_per_block / us / 1e6, 3),
                   speedup=round(base / us, 3) if base else None, **checks[name])
        rows.append(row)
        print(f"{name:10s} {us:9.2f} {row['tb_s']:6.3f} {str(row['speedup']):>11s} {row['rel_err']:9.2e} "
              f"{str(row['rows_bitwise']):>12s}")
    print(json.dumps(dict(device=torch.cuda.get_device_name(), weights="RANDOM bf16", H=H, I=I,
                          layers=args.layers, rounds=args.rounds, rows=rows,
                          kernel_us=kernel_us)))


if __name__ == "__main__":
    main()
