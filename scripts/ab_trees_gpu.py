"""A/B of source trees and environment switches (e.g. a `git archive` of the base commit vs the working
tree, or the working tree with VKAE_* switches) on the graphed decode and verify step, E4B geometry, RANDOM
bf16 weights, batch 1, context 256.

Kernels are module-level code, so two versions cannot share one process: each round runs one child process
per variant (order rotating round by round), each child times `--iters` replays of its captured decode
(T = 1) and verify (T = 9) graphs and reports the final hidden state's checksum, so a bitwise-neutral
change shows equal checksums. The first variant is the reference of the ratios. Prints a table (medians
over rounds) and ends with one JSON line.
Usage: python scripts/ab_trees_gpu.py --variant base=.stage/base --variant head=. \
           --variant pf3=.:VKAE_GEMV_PREFETCH_TILES=3 [--rounds 3] [--iters 100]
       (--base DIR is short for --variant base=DIR --variant head=.)
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
    """Step times and checksum of the engine under `root`. The timing loop is check_verify_invariance_gpu's
    graphed_step_ms written out again: importing that script would put this tree's engine on sys.path first."""
    sys.path.insert(0, root)
    import torch

    from engine.loader import load_model

    lm = load_model("gemma-4-e4b", device="cuda", dtype=torch.bfloat16, random_weights=True, seed=0)
    return time_steps(prefilled_generator(lm), iters)


def prefilled_generator(lm, max_context: int = 1024, context: int = 256):
    """A batch-1 Generator with CUDA graphs and a `context`-token prompt prefilled (the steps come at its end)."""
    from engine.generate import Generator
    from engine.knobs import Knobs

    gen = Generator(lm, Knobs(batch_size=1), max_context=max_context, use_cuda_graphs=True)
    gen.prefill(list(range(3, 3 + context)), 0)
    return gen


def parse_capacities(ap: argparse.ArgumentParser, max_context: str, context: int) -> list[int]:
    """The comma-listed `--max-context` capacities; `ap.error` unless each holds `context` tokens and a
    WIDTH-position verify step after them."""
    try:
        capacities = [int(c) for c in max_context.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--max-context must be integers separated by commas, got {max_context!r}")
    if not capacities:
        ap.error(f"--max-context needs at least one capacity, got {max_context!r}")
    if not 1 <= context <= min(capacities) - WIDTH:
        ap.error(f"--context must be in 1..(smallest --max-context) - {WIDTH} (the {WIDTH}-position verify step must "
                 f"fit the cache); got --context {context}, --max-context {max_context}")
    return capacities


def step_inputs(gen, context: int = 256) -> tuple:
    """(tokens [1, WIDTH], positions [1, WIDTH]): fixed draft tokens at positions context.. (after a prefill of
    `context` tokens)."""
    import torch

    dev = gen.device
    tokens = torch.randint(3, 1000, (1, WIDTH), device=dev, generator=torch.Generator(dev).manual_seed(0))
    return tokens, (torch.arange(WIDTH, device=dev) + context)[None]


def warm_steps(gen, context: int = 256) -> None:
    """A few decode (T = 1) and verify (T = WIDTH) steps: captures both graphs with the switches set now."""
    tokens, positions = step_inputs(gen, context)
    for t in (1, WIDTH):
        for _ in range(5):
            gen.step(tokens[:, :t], positions[:, :t])


def time_steps(gen, iters: int, warm: bool = True, context: int = 256) -> dict:
    """Mean ms of `iters` graphed decode and verify steps, the checksum of a decode step's final hidden state
    (bitwise-neutral changes keep it), and whether the verify step's first row equals that decode step bit for bit."""
    import torch

    tokens, positions = step_inputs(gen, context)
    out = {}
    for name, t in (("decode", 1), ("verify", WIDTH)):
        for _ in range(5 if warm else 1):
            gen.step(tokens[:, :t], positions[:, :t])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            gen.step(tokens[:, :t], positions[:, :t])
        end.record()
        torch.cuda.synchronize()
        out[f"{name}_ms"] = start.elapsed_time(end) / iters
    wide, _ = gen.step(tokens, positions)
    wide = wide[:, :1].clone()
    hidden, _ = gen.step(tokens[:, :1], positions[:, :1])
    out["checksum"] = hidden.double().abs().sum().item()
    # row invariance: the verify step's first row is the decode step of the same token at the same position
    out["verify_row0_equals_decode"] = bool(torch.equal(wide, hidden))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="root of the base tree (with --head: the two variants base and head)")
    ap.add_argument("--head", default=HERE, help="root of the tree under test (default: this one)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=ROOT[:ENV=VALUE[,ENV=VALUE...]] (repeatable; the first is the reference)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.iters)), flush=True)
        return 0
    variants: dict[str, tuple[str, dict[str, str]]] = {}
    if args.base:
        variants["base"] = (os.path.abspath(args.base), {})
        variants["head"] = (os.path.abspath(args.head), {})
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        root, _, envs = rest.partition(":")
        if not name or not root or name in variants:
            raise SystemExit(f"bad or repeated --variant {spec!r}: want NAME=ROOT[:ENV=VALUE,...]")
        env = dict(e.split("=", 1) for e in envs.split(",") if e)
        variants[name] = (os.path.abspath(root), env)
    if len(variants) < 2:
        raise SystemExit("need two variants at least (--base DIR, or --variant twice)")
    names = list(variants)
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            root, env = variants[name]
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", root, "--iters",
                                str(args.iters)], capture_output=True, text=True, cwd=root,
                               env={**os.environ, **env})
            if p.returncode != 0:
                print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"child for {name} failed (rc {p.returncode})")
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    res: dict = {"weights": "random", "geometry": "gemma-4-e4b", "rounds": args.rounds, "iters": args.iters,
                 "variants": {k: {"root": v[0], "env": v[1]} for k, v in variants.items()}}
    ref = names[0]
    for name, rs in runs.items():
        for key in ("decode_ms", "verify_ms"):
            res[f"{name}_{key}"] = statistics.median(x[key] for x in rs)
        res[f"{name}_checksums"] = sorted({x["checksum"] for x in rs})
    for name in names[1:]:
        for key in ("decode_ms", "verify_ms"):
            res[f"{name}_speedup_{key.split('_')[0]}"] = res[f"{ref}_{key}"] / res[f"{name}_{key}"]
        res[f"{name}_same_checksum"] = res[f"{name}_checksums"] == res[f"{ref}_checksums"]
    try:
        import torch

        res["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - the table still prints without a name
        res["gpu"] = "unknown"
    print(f"GPU {res['gpu']}; E4B geometry, RANDOM bf16 weights; medians of {args.rounds} rounds")
    print(f"{'variant':<10} {'decode ms':>10} {'verify ms':>10} {'vs ' + ref:>14} {'same bits':>10}")
    for name in names:
        ratio = "" if name == ref else (f"{res[f'{name}_speedup_decode']:.3f}x/"
                                        f"{res[f'{name}_speedup_verify']:.3f}x")
        same = "" if name == ref else str(res[f"{name}_same_checksum"])
        print(f"{name:<10} {res[f'{name}_decode_ms']:>10.3f} {res[f'{name}_verify_ms']:>10.3f} {ratio:>14} {same:>10}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
