"""Where a graphed decode step's time goes, kernel by kernel, with PDL overlap accounted for.

E4B geometry, RANDOM bf16 weights, batch 1, context 256; graphed decode (T = 1) and verify (T = 9) steps.
A plain kernel profile sums kernel durations, but under programmatic dependent launch each kernel starts
while its predecessor runs, so durations overlap and their sum is not the step. In a chain every kernel
ends after the one before it, so here each kernel is charged its *marginal* time: its end minus the end of
the kernel before it. The marginals add up to the step's kernel span, and a stage's share of them is what
removing it would save if nothing else moved.

Kernels of a graph replay come from the profiler (one correlation id per replay). Their stage (q/k/v,
attention, o, MLP, PLE, head) comes from one eager step profiled with `engine.model._stage` wrapped in
profiler ranges: the graph was captured from the same code, so its i-th kernel is the eager step's i-th
(the script checks that the two name sequences agree, and labels by kernel name alone if they do not).

Usage: python scripts/critical_path_gpu.py [--replays 20] [--max-context 1024[,4096]] [--context 256]
Prints a table per step width and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "scripts"))


def _trace(fn, *args) -> dict:
    """Chrome-trace JSON of fn(*args) run under the profiler (CPU + CUDA activity)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)


def _kernels(trace: dict) -> list[dict]:
    return sorted((e for e in trace["traceEvents"] if e.get("cat") == "kernel" and e.get("ph") == "X"),
                  key=lambda e: e["ts"])


def short_name(name: str) -> str:
    """Triton kernel names as written in the source; other kernels cut to 40 characters."""
    return name.split("(")[0][:40]


def eager_stage_labels(gen, tokens, positions) -> list[tuple[str, str]]:
    """(stage, kernel name) of every kernel of one eager step, in launch order. Stages are the ranges
    `engine.model._stage` is wrapped in; kernels outside every stage are 'embed' before the first layer and
    'head' after the last."""
    import torch

    import engine.model as model_mod

    orig = model_mod._stage

    def ranged(name, fn, *a):
        with torch.profiler.record_function(f"stage:{name}"):
            return orig(name, fn, *a)

    model_mod._stage = ranged
    try:
        with torch.inference_mode():
            gen._step_eager(tokens, positions)  # warm (no JIT inside the trace)
            trace = _trace(gen._step_eager, tokens, positions)
    finally:
        model_mod._stage = orig
    ev = trace["traceEvents"]
    ranges = sorted((e["ts"], e["ts"] + e["dur"], e["name"][6:]) for e in ev
                    if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("stage:"))
    launch_ts = {e["args"]["correlation"]: e["ts"] for e in ev
                 if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    out, seen_layer = [], False
    for k in _kernels(trace):
        ts = launch_ts.get(k["args"].get("correlation"))
        stage = next((s for a, b, s in ranges if ts is not None and a <= ts <= b), None)
        if stage is None:
            stage = "head" if seen_layer else "embed"
        else:
            seen_layer = True
        out.append((stage, short_name(k["name"])))
    return out


def replay_chains(gen, tokens, positions, replays: int) -> list[list[dict]]:
    """The kernels of each of `replays` graph replays (grouped by the replay's correlation id), in start order."""
    import torch

    def run():
        for _ in range(replays):
            gen.step(tokens, positions)

    with torch.inference_mode():
        run()  # warm
        trace = _trace(run)
    groups: dict[int, list[dict]] = collections.defaultdict(list)
    for k in _kernels(trace):
        groups[k["args"].get("correlation", -1)].append(k)
    # a replay is the biggest group per launch; the input copies before it are their own small groups
    size = max(len(g) for g in groups.values())
    return [g for g in groups.values() if len(g) == size]


def marginals(chain: list[dict]) -> list[float]:
    """Per kernel: its end minus the latest end of the kernels before it (us); the first kernel: its duration."""
    out, last_end = [], None
    for k in chain:
        end = k["ts"] + k["dur"]
        out.append(k["dur"] if last_end is None else max(0.0, end - last_end))
        last_end = end if last_end is None else max(last_end, end)
    return out


def analyse(gen, width: int, replays: int, context: int = 256) -> dict:
    from ab_trees_gpu import step_inputs

    tokens, positions = step_inputs(gen, context)
    tokens, positions = tokens[:, :width], positions[:, :width]
    labels = eager_stage_labels(gen, tokens, positions)
    chains = replay_chains(gen, tokens, positions, replays)
    names = [short_name(k["name"]) for k in chains[0]]
    aligned = [n for _, n in labels] == names
    if not aligned:
        labels = [("?", n) for n in names]
    per_kernel = [[] for _ in names]  # marginal us of kernel i over replays
    durs = [[] for _ in names]
    spans = []
    for ch in chains:
        for i, (m, k) in enumerate(zip(marginals(ch), ch)):
            per_kernel[i].append(m)
            durs[i].append(k["dur"])
        spans.append(ch[-1]["ts"] + ch[-1]["dur"] - ch[0]["ts"])
    rows: dict[tuple[str, str], dict] = {}
    for (stage, name), ms, ds in zip(labels, per_kernel, durs):
        r = rows.setdefault((stage, name), {"stage": stage, "kernel": name, "calls": 0, "marginal_us": 0.0,
                                             "duration_us": 0.0})
        r["calls"] += 1
        r["marginal_us"] += statistics.median(ms)
        r["duration_us"] += statistics.median(ds)
    span = statistics.median(spans)
    table = sorted(rows.values(), key=lambda r: -r["marginal_us"])
    for r in table:
        r["share"] = r["marginal_us"] / span
        r["marginal_per_call_us"] = r["marginal_us"] / r["calls"]
    stages: dict[str, float] = collections.defaultdict(float)
    for r in table:
        stages[r["stage"]] += r["marginal_us"]
    return {"width": width, "replays": len(chains), "kernels_per_step": len(names), "labels_aligned": aligned,
            "span_us": span, "stages_us": dict(sorted(stages.items(), key=lambda kv: -kv[1])), "table": table}


def compare(a: dict, b: dict, top: int = 12) -> list[dict]:
    """(stage, kernel) rows whose marginal time differs most between two analyses of one width."""
    ra = {(r["stage"], r["kernel"]): r for r in a["table"]}
    rb = {(r["stage"], r["kernel"]): r for r in b["table"]}
    rows = []
    for key in ra.keys() | rb.keys():
        ma = ra[key]["marginal_us"] if key in ra else 0.0
        mb = rb[key]["marginal_us"] if key in rb else 0.0
        rows.append({"stage": key[0], "kernel": key[1], "calls_a": ra[key]["calls"] if key in ra else 0,
                     "calls_b": rb[key]["calls"] if key in rb else 0, "marginal_us_a": ma, "marginal_us_b": mb,
                     "diff_us": mb - ma})
    return sorted(rows, key=lambda r: -abs(r["diff_us"]))[:top]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--max-context", default="1024",
                    help="cache capacity; a comma list profiles each and prints the kernels whose time moved most")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens before the profiled steps")
    args = ap.parse_args()
    if args.replays < 1:
        ap.error(f"--replays must be at least 1, got {args.replays}")
    from ab_trees_gpu import parse_capacities, prefilled_generator, time_steps, warm_steps

    capacities = parse_capacities(ap, args.max_context, args.context)
    import torch

    from engine.loader import load_model

    lm = load_model("gemma-4-e4b", device="cuda", dtype=torch.bfloat16, random_weights=True, seed=0)
    layers = lm.model.arch.num_layers
    res = {"weights": "random", "geometry": "gemma-4-e4b", "gpu": torch.cuda.get_device_name(0),
           "context": args.context, "runs": []}
    for capacity in capacities:
        gen = prefilled_generator(lm, capacity, args.context)
        warm_steps(gen, args.context)
        timed = time_steps(gen, 100, warm=False, context=args.context)
        run = {"max_context": capacity, "event_timed": timed, "steps": []}
        res["runs"].append(run)
        print(f"GPU {res['gpu']}; E4B geometry, RANDOM bf16 weights; context {args.context}, {capacity}-slot cache; "
              f"event-timed decode {timed['decode_ms']:.3f} ms, verify (9) {timed['verify_ms']:.3f} ms")
        for width in (1, 9):
            a = analyse(gen, width, args.replays, args.context)
            run["steps"].append(a)
            print(f"\nwidth {width}: {a['kernels_per_step']} kernels, kernel span {a['span_us']:.1f} us "
                  f"(profiled, {a['replays']} replays), stage labels aligned: {a['labels_aligned']}")
            print("  by stage (marginal us / step; per layer): " + ", ".join(
                f"{s} {v:.0f} ({v / layers:.1f})" for s, v in a["stages_us"].items()))
            print(f"  {'stage':<6} {'kernel':<32} {'calls':>5} {'marginal us':>12} {'per call':>9} "
                  f"{'duration us':>12} {'share':>7}")
            for r in a["table"]:
                print(f"  {r['stage']:<6} {r['kernel']:<32} {r['calls']:>5} {r['marginal_us']:>12.1f} "
                      f"{r['marginal_per_call_us']:>9.2f} {r['duration_us']:>12.1f} {100 * r['share']:>6.1f}%")
        del gen
        torch.cuda.empty_cache()
    first = res["runs"][0]
    for other in res["runs"][1:]:
        other["vs_first"] = []
        for i, width in enumerate((1, 9)):
            rows = compare(first["steps"][i], other["steps"][i])
            other["vs_first"].append({"width": width, "rows": rows})
            print(f"\nwidth {width}: {first['max_context']} -> {other['max_context']} slots, span "
                  f"{first['steps'][i]['span_us']:.1f} -> {other['steps'][i]['span_us']:.1f} us; kernels that moved most:")
            print(f"  {'stage':<6} {'kernel':<32} {'calls':>9} {'us a':>9} {'us b':>9} {'diff':>8}")
            for r in rows:
                print(f"  {r['stage']:<6} {r['kernel']:<32} {r['calls_a']:>4}/{r['calls_b']:<4} "
                      f"{r['marginal_us_a']:>9.1f} {r['marginal_us_b']:>9.1f} {r['diff_us']:>8.1f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
