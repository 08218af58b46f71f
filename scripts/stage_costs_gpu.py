"""What each stage of a decode step costs on the step's critical path, and switch A/Bs, in one process.

E4B geometry, RANDOM bf16 weights, batch 1, context 256 (`--context`), graphed decode (T = 1) and verify (T = 9) steps.
A kernel profile sums kernel durations, but with PDL the graphed step overlaps neighbouring kernels, so a
kernel's duration is not what it adds to the step. Here each stage (`engine.model.STAGES`) is run twice
inside the captured step (`engine.model.STAGE_REPEAT`): the extra time over the default step is what one
run of that stage costs the step, overlap included. Results are unchanged by a repeat (checksums show it).

The same loop A/Bs module switches that are read at launch (decode attention tiles, GEMV prefetch): each
variant sets its switches, builds its own Generator and captures its graphs, then the switches go back
to their defaults; the graphs keep what they were captured with. Rounds rotate the variant order; medians.

Usage: python scripts/stage_costs_gpu.py [--rounds 3] [--iters 100] [--only default,rep_attn,...] [--max-context 1024] [--context 256]
       python scripts/stage_costs_gpu.py --pick-from run.txt   # env of the fastest bit-exact variant in a run's output
Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)


def variants() -> dict[str, dict[tuple[str, str], object]]:
    """name -> {(module, attribute): value}."""
    from engine.model import STAGES

    out: dict[str, dict[tuple[str, str], object]] = {"default": {}}
    for s in STAGES:
        out[f"rep_{s}"] = {("engine.model", "STAGE_REPEAT"): frozenset({s})}
    out["ple_2launch"] = {("engine.fused_tail", "FUSED_PLE"): True}  # the PLE gate's reduce inside the projection
    da = "kernels.decode_attention"
    out["attn_bn32"] = {(da, "ATTN_BLOCK_N"): 32, (da, "MIN_SPLIT_SLOTS"): 32}
    out["attn_bn64"] = {(da, "ATTN_BLOCK_N"): 64, (da, "MIN_SPLIT_SLOTS"): 64}
    out["attn_bn32_st1"] = {(da, "ATTN_BLOCK_N"): 32, (da, "MIN_SPLIT_SLOTS"): 32, (da, "ATTN_STAGES"): 1}
    out["attn_st1"] = {(da, "ATTN_STAGES"): 1}
    out["attn_l2pf"] = {(da, "L2_PREFETCH"): True}  # each split's K/V asked of the L2 before the PDL wait
    out["pdl_early"] = {("kernels._common", "PDL_EARLY_SHORT"): True}  # short kernels trigger before their wait
    out["pdl_early_ple2"] = {**out["pdl_early"], **out["ple_2launch"]}
    ft = "engine.fused_tail"  # attention's split merge inside the o projection (on for 1-row steps; bitwise)
    out["attn_merge_off"] = {(ft, "FUSED_ATTN_MERGE"): False}
    out["attn_merge_all"] = {(ft, "ATTN_MERGE_MAX_ROWS"): 16}  # verify steps too
    gv = "kernels.gemv"  # GEMV tiles: the order of each row's K sums is unchanged, so results stay bitwise
    out["gemv_n32"] = {(gv, "TILE_OVERRIDES"): {"BLOCK_N": 32}}  # the stop-19 tile (64 is the default now)
    out["gemv_w8"] = {(gv, "TILE_OVERRIDES"): {"num_warps": 8}}
    out["gemv_split1"] = {(gv, "SPLIT_BELOW_WAVES"): 1.0}  # fewer K splits
    out["gemv_split1_5"] = {(gv, "SPLIT_BELOW_WAVES"): 1.5}
    out["gemv_st3"] = {(gv, "TILE_OVERRIDES"): {"num_stages": 3}}
    out["gemv_st6"] = {(gv, "TILE_OVERRIDES"): {"num_stages": 6}}
    out["gemv_split4"] = {(gv, "SPLIT_BELOW_WAVES"): 4.0}  # more K splits: changes the sums' order
    out["gemv_split3"] = {(gv, "SPLIT_BELOW_WAVES"): 3.0}
    out["gemv_split6"] = {(gv, "SPLIT_BELOW_WAVES"): 6.0}
    out["gemv_target1"] = {(gv, "SPLIT_TARGET_WAVES"): 1.0}  # fewer K splits (down 7 -> 4), fewer partials to sum
    out["gemv_target1_5"] = {(gv, "SPLIT_TARGET_WAVES"): 1.5}
    # weight tiles requested before the PDL wait (default 2): with the early trigger a GEMV waits longer, so a
    # deeper prefetch may pay where it did not before (bitwise neutral: same K order)
    out["gemv_pf4"] = {(gv, "PREFETCH_TILES"): 4}
    out["gemv_pf1"] = {(gv, "PREFETCH_TILES"): 1}
    out["gemv_pf3"] = {(gv, "PREFETCH_TILES"): 3}
    # 32-slot attention tiles (17 splits in a sliding layer) with the o projection still merging them
    out["attn_bn32_merge"] = {**out["attn_bn32"], (ft, "ATTN_MERGE_MAX_SPLITS"): 32}
    # the stop-20 attention tiles (128 slots, 4 warps, splits >= 128 slots, merged in o up to 8): now 64 / 8 / 64 / 16
    out["attn_stop20"] = {(da, "ATTN_BLOCK_N"): 128, (da, "MIN_SPLIT_SLOTS"): 128, (da, "ATTN_NUM_WARPS"): 4,
                          (ft, "ATTN_MERGE_MAX_SPLITS"): 8}
    out["pdl_early_pf4"] = {**out["pdl_early"], **out["gemv_pf4"]}
    # splits of >= 128 slots with the stop-21 tiles: a global layer over a 4096-slot cache runs 32 splits, not 64
    # (stop 22's bench step at 4096 slots was 0.7-0.9 ms slower than at 1024: stage 2's unrolled merge of 65
    # splits, 131 us a call; stop 23's vector merge fixed it)
    out["attn_split128"] = {(da, "MIN_SPLIT_SLOTS"): 128}
    out["attn_split256"] = {(da, "MIN_SPLIT_SLOTS"): 256}
    # the o projection merging up to 16 splits (the stop-23 default; 9 since stop 24: the global layers' 16 splits at
    # 1024 slots go to stage 2 and a plain o GEMV), and stage 2 merging past 9 splits with its vector merge
    out["merge_max16"] = {(ft, "ATTN_MERGE_MAX_SPLITS"): 16}
    out["merge_max9_vec"] = {(da, "SEQUENTIAL_MERGE_MAX_SPLITS"): 9}
    out["head_gemv"] = {("kernels.head_argmax", "ENABLED"): False}  # greedy from the bf16 GEMV (the int8 screen off)
    ha = "kernels.head_argmax"  # rows per exact-recompute program (default 64 since stop 25)
    out["exact_chunk256"] = {(ha, "EXACT_CHUNK"): 256}
    out["exact_chunk2048"] = {(ha, "EXACT_CHUNK"): 2048}  # the stop-24 default
    out["fused_mlp"] = {(ft, "FUSED_MLP"): True}  # the MLP as one weight stream (off since stop 13: 0.993x there)
    # down's add + norm pending in the PLE gate GEMV, the closing PLE sandwich pending in the next q/k/v GEMV (stop 26):
    # one launch fewer a layer each; other rounding points, so the checksum changes; verify == decode must hold
    out["pending_add_norm"] = {(ft, "PENDING_ADD_NORM"): True}
    out["pending_sandwich"] = {(ft, "PENDING_SANDWICH"): True}
    out["pending_both"] = {(ft, "PENDING_ADD_NORM"): True, (ft, "PENDING_SANDWICH"): True}
    out["pending_both_fused_mlp"] = {**out["pending_both"], (ft, "FUSED_MLP"): True}
    first = ("default", "attn_merge_off", "pdl_early", "ple_2launch", "pdl_early_ple2", "attn_merge_all",
             "pdl_early_pf4", "gemv_pf4")
    return {n: out[n] for n in first} | {n: v for n, v in out.items() if n not in first}


# the switches a process can also set from its environment (read at import), for `--pick-from`
ENV_OF = {("kernels._common", "PDL_EARLY_SHORT"): "VKAE_PDL_EARLY", ("engine.fused_tail", "FUSED_PLE"): "VKAE_FUSED_PLE",
          ("engine.fused_tail", "FUSED_ATTN_MERGE"): "VKAE_FUSED_ATTN_MERGE",
          ("kernels.gemv", "PREFETCH_TILES"): "VKAE_GEMV_PREFETCH_TILES",
          ("kernels.decode_attention", "ATTN_BLOCK_N"): "VKAE_ATTN_BLOCK_N",
          ("kernels.decode_attention", "MIN_SPLIT_SLOTS"): "VKAE_ATTN_MIN_SPLIT_SLOTS",
          ("kernels.decode_attention", "ATTN_STAGES"): "VKAE_ATTN_STAGES",
          ("kernels.decode_attention", "L2_PREFETCH"): "VKAE_ATTN_L2_PREFETCH",
          ("kernels.decode_attention", "ATTN_NUM_WARPS"): "VKAE_ATTN_NUM_WARPS",
          ("kernels.head_argmax", "ENABLED"): "VKAE_SCREENED_HEAD",
          ("engine.fused_tail", "PENDING_ADD_NORM"): "VKAE_PENDING_ADD_NORM",
          ("engine.fused_tail", "PENDING_SANDWICH"): "VKAE_PENDING_SANDWICH",
          ("engine.fused_tail", "FUSED_MLP"): "VKAE_FUSED_MLP"}


def pick_env(result: dict, min_speedup: float = 1.005) -> str:
    """`VAR=value ...` of the fastest variant (decode step) that keeps verify == decode bit for bit, beats the
    default by `min_speedup` and is settable from the environment alone; "" for the default."""
    table = variants()
    best, best_ms = "default", result["variants"]["default"]["decode_ms"] / min_speedup
    for name, row in result["variants"].items():
        sw = table.get(name)
        if sw and all(k in ENV_OF for k in sw) and row["verify_row0_equals_decode"] and row["decode_ms"] < best_ms:
            best, best_ms = name, row["decode_ms"]
    return " ".join(f"{ENV_OF[k]}={int(v)}" for k, v in table[best].items())


def build(lm, switches: dict[tuple[str, str], object], max_context: int = 1024, context: int = 256):
    """A Generator whose decode and verify graphs are captured with `switches` set; restores them after."""
    from ab_trees_gpu import prefilled_generator, warm_steps

    saved = {}
    for (mod, attr), value in switches.items():
        m = importlib.import_module(mod)
        saved[(mod, attr)] = getattr(m, attr)
        setattr(m, attr, value)
    try:
        gen = prefilled_generator(lm, max_context, context)
        warm_steps(gen, context)
    finally:
        for (mod, attr), value in saved.items():
            setattr(importlib.import_module(mod), attr, value)
    return gen


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all); 'default' is added")
    ap.add_argument("--max-context", default="1024",
                    help="cache capacity (the full layers' attention splits follow it; bench_e4b_gpu uses 4096); "
                         "a comma list runs every variant at each, labelled NAME@CAPACITY past the first")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens before the timed steps (their position)")
    ap.add_argument("--pick-from", default="", help="print the env of the best variant in this run's output, and exit")
    args = ap.parse_args()
    from ab_trees_gpu import parse_capacities

    capacities = parse_capacities(ap, args.max_context, args.context)
    if args.pick_from:
        with open(args.pick_from) as f:
            lines = [ln for ln in f if ln.startswith("{")]
        print(pick_env(json.loads(lines[-1])) if lines else "")
        return 0
    import torch

    from ab_trees_gpu import time_steps
    from engine.loader import load_model

    table = variants()
    if args.only:
        wanted = ["default"] + [n for n in args.only.split(",") if n and n != "default"]
        unknown = [n for n in wanted if n not in table]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {', '.join(table)}")
        table = {n: table[n] for n in wanted}
    lm = load_model("gemma-4-e4b", device="cuda", dtype=torch.bfloat16, random_weights=True, seed=0)
    # label -> (variant, capacity); the first capacity's labels are the bare variant names
    plan = {(n if c == capacities[0] else f"{n}@{c}"): (n, c) for c in capacities for n in table}
    names = list(plan)
    gens = {}
    runs: dict[str, list[dict]] = {n: [] for n in names}

    hidden: dict = {}

    def decode_hidden(name: str) -> None:
        """The variant's decode-step hidden state (fp32 copy), to hold a changed-rounding variant against the
        default: max |diff| over max |default| and the greedy token, below."""
        from ab_trees_gpu import step_inputs

        tokens, positions = step_inputs(gens[name], args.context)
        h, _ = gens[name].step(tokens[:, :1], positions[:, :1])
        hidden[name] = h.float().clone()
        if name != "default" and "default" in hidden:  # as it comes (a run cut short still tells it)
            d = hidden["default"]
            print(f"{name}: decode hidden max |diff| / max |default| = "
                  f"{((hidden[name] - d).abs().max() / d.abs().max()).item():.2e}", flush=True)

    def timed(r: int, name: str) -> None:
        runs[name].append(time_steps(gens[name], args.iters, warm=False, context=args.context))
        t = runs[name][-1]  # as it comes, so a run cut short by a time limit still tells something
        print(f"round {r} {name}: decode {t['decode_ms']:.3f} ms, verify {t['verify_ms']:.3f} ms", flush=True)

    # round 0 times each variant right after its capture (captures compile, so they take most of the run:
    # a run cut short still has one timing of every variant captured); later rounds rotate the order
    for name in list(names):
        try:
            variant, capacity = plan[name]
            gens[name] = build(lm, table[variant], capacity, args.context)
        except Exception as e:  # a variant that fails to compile or capture must not cost the others' timings
            if name == "default":
                raise
            print(f"variant {name} failed: {type(e).__name__}: {e}", flush=True)
            names.remove(name)
            torch.cuda.synchronize()
            continue
        decode_hidden(name)
        timed(0, name)
    for r in range(1, args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            timed(r, name)
    res: dict = {"weights": "random", "geometry": "gemma-4-e4b", "gpu": torch.cuda.get_device_name(0),
                 "rounds": args.rounds, "iters": args.iters, "context": args.context, "max_context": capacities,
                 "verify_width": 9, "variants": {}}
    base = {k: statistics.median(x[k] for x in runs["default"]) for k in ("decode_ms", "verify_ms")}
    base_sum = sorted({x["checksum"] for x in runs["default"]})
    print(f"GPU {res['gpu']}; E4B geometry, RANDOM bf16 weights; medians of {args.rounds} rounds of {args.iters} steps")
    print(f"{'variant':<20} {'decode ms':>10} {'verify ms':>10} {'+decode us':>11} {'+verify us':>11} "
          f"{'per layer us':>13} {'same bits':>10} {'verify==decode':>15} {'rel diff':>9} {'token':>6}")
    layers = lm.model.arch.num_layers
    for name in names:
        med = {k: statistics.median(x[k] for x in runs[name]) for k in ("decode_ms", "verify_ms")}
        sums = sorted({x["checksum"] for x in runs[name]})
        row = {**med, "checksums": sums, "same_checksum": sums == base_sum,
               "verify_row0_equals_decode": all(x["verify_row0_equals_decode"] for x in runs[name]),
               "extra_decode_us": 1e3 * (med["decode_ms"] - base["decode_ms"]),
               "extra_verify_us": 1e3 * (med["verify_ms"] - base["verify_ms"]),
               "speedup_decode": base["decode_ms"] / med["decode_ms"],
               "speedup_verify": base["verify_ms"] / med["verify_ms"],
               "hidden_max_rel_diff": ((hidden[name] - hidden["default"]).abs().max()
                                       / hidden["default"].abs().max()).item(),
               "same_greedy_token": bool(torch.equal(lm.model.greedy(hidden[name].to(lm.model.dtype)),
                                                     lm.model.greedy(hidden["default"].to(lm.model.dtype))))}
        res["variants"][name] = row
        per_layer = f"{row['extra_decode_us'] / layers:13.2f}" if name.startswith("rep_") else f"{'':>13}"
        print(f"{name:<20} {med['decode_ms']:>10.3f} {med['verify_ms']:>10.3f} {row['extra_decode_us']:>11.1f} "
              f"{row['extra_verify_us']:>11.1f} {per_layer} {str(row['same_checksum']):>10} "
              f"{str(row['verify_row0_equals_decode']):>15} {row['hidden_max_rel_diff']:>9.1e} "
              f"{str(row['same_greedy_token']):>6}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
