"""A/B of two source trees (e.g. a `git archive` of the base commit vs the working tree) on the graphed
decode and verify step, E4B geometry, RANDOM bf16 weights, batch 1, context 256.

Kernels are module-level code, so two versions cannot share one process: each round runs one child process
per tree (order alternating round by round), each child times `--iters` replays of its captured decode
(T = 1) and verify (T = 9) graphs and reports the final hidden state's checksum, so a bitwise-neutral
change shows equal checksums. Prints a table (medians over rounds) and ends with one JSON line.
Usage: python scripts/ab_trees_gpu.py --base .stage/base [--rounds 3] [--iters 100]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 9  # K + 1 with K = 8 draft tokens


def child(root: str, iters: int) -> dict:
    sys.path.insert(0, root)
    import torch

    from engine.generate import Generator
    from engine.knobs import Knobs
    from engine.loader import load_model

    lm = load_model("gemma-4-e4b", device="cuda", dtype=torch.bfloat16, random_weights=True, seed=0)
    gen = Generator(lm, Knobs(batch_size=1), max_context=1024, use_cuda_graphs=True)
    gen.prefill(list(range(3, 259)), 0)
    dev = gen.device
    tokens = torch.randint(3, 1000, (1, WIDTH), device=dev, generator=torch.Generator(dev).manual_seed(0))
    positions = (torch.arange(WIDTH, device=dev) + 256)[None]
    out = {}
    for name, t in (("decode", 1), ("verify", WIDTH)):
        for _ in range(5):
            gen.step(tokens[:, :t], positions[:, :t])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            gen.step(tokens[:, :t], positions[:, :t])
        end.record()
        torch.cuda.synchronize()
        out[f"{name}_ms"] = start.elapsed_time(end) / iters
    hidden, _ = gen.step(tokens[:, :1], positions[:, :1])
    out["checksum"] = hidden.double().abs().sum().item()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="root of the base tree")
    ap.add_argument("--head", default=HERE, help="root of the tree under test (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.iters)), flush=True)
        return 0
    trees = {"base": os.path.abspath(args.base), "head": os.path.abspath(args.head)}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for r in range(args.rounds):
        for name in (("base", "head") if r % 2 == 0 else ("head", "base")):
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--base", trees["base"], "--child",
                                trees[name], "--iters", str(args.iters)], capture_output=True, text=True,
                               cwd=trees[name])
            if p.returncode != 0:
                print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"child for {name} failed (rc {p.returncode})")
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    res: dict = {"weights": "random", "geometry": "gemma-4-e4b", "rounds": args.rounds, "iters": args.iters}
    for name, rs in runs.items():
        for key in ("decode_ms", "verify_ms"):
            res[f"{name}_{key}"] = statistics.median(x[key] for x in rs)
        res[f"{name}_checksums"] = sorted({x["checksum"] for x in rs})
    for key in ("decode_ms", "verify_ms"):
        res[f"speedup_{key.split('_')[0]}"] = res[f"base_{key}"] / res[f"head_{key}"]
    res["bitwise_same_checksum"] = res["base_checksums"] == res["head_checksums"]
    try:
        import torch

        res["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - the table still prints without a name
        res["gpu"] = "unknown"
    print(f"{'tree':<6} {'decode ms':>10} {'verify ms':>10}")
    for name in trees:
        print(f"{name:<6} {res[f'{name}_decode_ms']:>10.3f} {res[f'{name}_verify_ms']:>10.3f}")
    print(f"head vs base: decode {res['speedup_decode']:.3f}x, verify {res['speedup_verify']:.3f}x; "
          f"same checksum: {res['bitwise_same_checksum']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
