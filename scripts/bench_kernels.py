"""Check and time the Triton kernels at real Gemma 4 E4B shapes (bf16) on one CUDA GPU.

    python scripts/bench_kernels.py                 # everything, ~1-3 min on an H100
    python scripts/bench_kernels.py --only gemv     # gemv | attn | norm (comma-separated)

For every case: the Triton output is compared with the fp32 reference
(rel = ||out - ref|| / ||ref||, must be < 1e-2, i.e. bf16 noise; max |out - ref| is printed).
Timing (`triton.testing.do_bench`, median): the main columns replay a CUDA graph of calls over
enough distinct operand copies to exceed L2, divided by the call count: HBM-bound kernel time
without Python launch cost, as a CUDA-graphed decode step sees it. "eager" is one plain call
(L2 flushed) and includes the Python launch overhead. Baselines: cuBLAS (F.linear) for gemv,
SDPA with a boolean mask for attention, eager PyTorch for the norms. GB/s counts the bytes a
kernel must move (weights + activations; for attention the K/V rows some query can see).
`--sweep` instead times a grid of gemv block configurations (for retuning `gemv_config`; `--stages 3,4,6`
also tries those pipeline depths with every tile).
A failing case is reported in the table and the run continues. The last stdout line is one
JSON object with every result. A time budget (--budget-s) skips what would not fit.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels.decode_attention import decode_attention_ref, decode_attention_triton  # noqa: E402
from kernels.gemv import linear_small_m_triton  # noqa: E402
from kernels.rmsnorm import (post_norm_residual_pre_norm_ref, post_norm_residual_pre_norm_triton,  # noqa: E402
                             rmsnorm_ref, rmsnorm_triton)

HIDDEN, FFN, PLE = 2560, 10240, 256
# (name, N, K) of every weight a decode step reads (gemma4.md §1.1, §3.1). q/k/v are listed
# both separately and fused (q+k+v in one matrix, as engine/linear.py fuses them).
GEMV_SHAPES = [
    ("q_sliding", 2048, HIDDEN), ("q_global", 4096, HIDDEN),
    ("kv_sliding", 512, HIDDEN), ("kv_global", 1024, HIDDEN),
    ("qkv_sliding", 3072, HIDDEN), ("qkv_global", 6144, HIDDEN),
    ("o_sliding", HIDDEN, 2048), ("o_global", HIDDEN, 4096),
    ("gate_up", 2 * FFN, HIDDEN), ("down", HIDDEN, FFN),
    ("ple_gate", PLE, HIDDEN), ("ple_proj", HIDDEN, PLE),
    ("ple_model_proj", 42 * PLE, HIDDEN), ("lm_head", 262144, HIDDEN),
]
GEMV_M = [1, 2, 4, 8, 16]
REL_TOL = 1e-2


L2_SPAN = 160 << 20  # bytes of distinct operands per graph replay: > 3x the 50 MB H100 L2


def bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # microseconds


def copies_for(nbytes: int, cap: int = 64) -> int:
    return max(1, min(cap, -(-L2_SPAN // max(1, nbytes))))


def bench_graphed(fn, arg_sets: list) -> float:
    """Microseconds per call of fn, as a decode step would see it: calls over len(arg_sets)
    distinct operand copies (together larger than L2, so operands stream from HBM) are
    captured in one CUDA graph (no Python/launch overhead), replayed under do_bench."""
    for a in arg_sets:  # compile + warm up outside the capture
        fn(*a)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for a in arg_sets:
            fn(*a)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in arg_sets:
            fn(*a)
    t = bench(graph.replay) / len(arg_sets)
    del graph
    return t


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = out.float() - ref.float()
    return (d.norm() / ref.float().norm().clamp_min(1e-30)).item(), d.abs().max().item()


def run_case(results: list, kernel: str, shape: str, body) -> None:
    """Run one case; any exception (including a CUDA error) becomes a failed row."""
    row = {"kernel": kernel, "shape": shape}
    try:
        row.update(body())
        row["ok"] = row.get("rel_err", 0.0) < REL_TOL
    except Exception as e:  # report and continue: one bad kernel must not hide the others
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        traceback.print_exc(limit=2, file=sys.stderr)
    results.append(row)
    print(fmt(row), flush=True)


def fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['kernel']:<10} {r['shape']:<42} FAIL  {r['error']}"
    gbps = f"{r['gbps']:7.0f}" if r.get("gbps") is not None else "      -"
    base = f"{r['t_base_us']:9.1f}" if r.get("t_base_us") is not None else "        -"
    spd = f"{r['t_base_us'] / r['t_triton_us']:5.2f}x" if r.get("t_base_us") else "     -"
    return (f"{r['kernel']:<10} {r['shape']:<42} {'ok  ' if r['ok'] else 'BAD '} rel {r['rel_err']:.1e} "
            f"maxabs {r['max_abs']:.1e}  triton {r['t_triton_us']:8.1f} us  base {base} us  {spd}  {gbps} GB/s"
            f"  (eager {r.get('t_eager_us', float('nan')):6.1f} us)")


# ------------------------------------------------------------------------------------------ gemv
def gemv_case(M: int, N: int, K: int):
    def body():
        g = torch.Generator(device="cuda").manual_seed(M * 7919 + N + K)
        w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
        ref = x.float() @ w.float().T
        out = linear_small_m_triton(x, w)
        rel, mx = rel_err(out, ref)
        nbytes = 2 * (N * K + M * K + M * N)
        sets = [(x, w)] + [(x.clone(), w.clone()) for _ in range(copies_for(nbytes) - 1)]
        t = bench_graphed(linear_small_m_triton, sets)
        tb = bench_graphed(F.linear, sets)
        te = bench(lambda: linear_small_m_triton(x, w))
        del sets, w
        return dict(rel_err=rel, max_abs=mx, t_triton_us=t, t_base_us=tb, t_eager_us=te,
                    gbps=nbytes / t / 1e3, gbps_cublas=nbytes / tb / 1e3)
    return body


# ----------------------------------------------------------------------------------- attention
def attn_inputs(B: int, T: int, S: int, D: int, ring: bool, window: int, ctx: int):
    """Caches as the engine holds them. Ring: position p lives in slot p % S, the newest
    position is ctx + T - 1 (queries write their own K/V before attending). Linear: slot j
    holds position j, filled up to ctx + T - 1."""
    Hq, Hkv = 8, 2
    g = torch.Generator(device="cuda").manual_seed(B * 1000 + T * 10 + S)
    q = torch.randn(B, T, Hq, D, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(B, Hkv, S, D, device="cuda", generator=g).to(torch.bfloat16)
    newest = ctx + T - 1
    j = torch.arange(S, device="cuda")
    if ring:
        pos = newest - ((newest - j) % S)  # the latest position p <= newest with p % S == j
    else:
        pos = torch.where(j <= newest, j, -1)
    slot_pos = pos.to(torch.int32)[None].expand(B, S).contiguous()
    q_pos = (ctx + torch.arange(T, device="cuda", dtype=torch.int32))[None].expand(B, T).contiguous()
    return q, k, v, slot_pos, q_pos


def attn_case(B: int, T: int, S: int, D: int, ring: bool, window: int, ctx: int):
    def body():
        q, k, v, slot_pos, q_pos = attn_inputs(B, T, S, D, ring, window, ctx)
        scale = D ** -0.5  # keeps the random-input softmax non-degenerate (Gemma 4 itself uses 1.0)
        ref = decode_attention_ref(q, k, v, slot_pos, q_pos, window, scale)
        out = decode_attention_triton(q, k, v, slot_pos, q_pos, window, scale)
        rel, mx = rel_err(out, ref)
        # Baseline: SDPA over the whole cache with a precomputed boolean mask (what the engine's
        # PyTorch path does); the mask is built outside the timed region.
        qp, sp = q_pos[:, :, None], slot_pos[:, None, :]
        vis = (sp >= 0) & (sp <= qp)
        if window:
            vis &= sp > qp - window
        mask = vis[:, None]
        seen = int(vis.any(dim=1).sum().item())  # K/V rows some query can see, summed over B
        nbytes = seen * 2 * 2 * D * 2 + 2 * q.numel() * 2 + slot_pos.numel() * 4
        n = copies_for(2 * k.numel() * 2, cap=16)
        sets = [(q, k, v)] + [(q.clone(), k.clone(), v.clone()) for _ in range(n - 1)]
        t = bench_graphed(lambda a, b, c: decode_attention_triton(a, b, c, slot_pos, q_pos, window, scale), sets)
        tb = bench_graphed(lambda a, b, c: F.scaled_dot_product_attention(
            a.transpose(1, 2), b, c, attn_mask=mask, scale=scale, enable_gqa=True), sets)
        te = bench(lambda: decode_attention_triton(q, k, v, slot_pos, q_pos, window, scale))
        del sets
        return dict(rel_err=rel, max_abs=mx, t_triton_us=t, t_base_us=tb, t_eager_us=te,
                    gbps=nbytes / t / 1e3)
    return body


# --------------------------------------------------------------------------------------- norms
def norm_case(kind: str, R: int, N: int):
    def body():
        g = torch.Generator(device="cuda").manual_seed(R * 31 + N)
        x = torch.randn(R, N, device="cuda", generator=g).to(torch.bfloat16)
        res = torch.randn(R, N, device="cuda", generator=g).to(torch.bfloat16)
        w1 = (1 + 0.1 * torch.randn(N, device="cuda", generator=g)).to(torch.bfloat16)
        w2 = (1 + 0.1 * torch.randn(N, device="cuda", generator=g)).to(torch.bfloat16)
        if kind == "rmsnorm":
            out, ref = rmsnorm_triton(x, w1, 1e-6, False), rmsnorm_ref(x, w1, 1e-6, False)
            rel, mx = rel_err(out, ref)
            sets = [(x, w1, 1e-6, False)]
            t, tb = bench_graphed(rmsnorm_triton, sets), bench_graphed(rmsnorm_ref, sets)
            te = bench(lambda: rmsnorm_triton(x, w1, 1e-6, False))
            nbytes = 2 * (2 * R * N + N)
        else:
            h, y = post_norm_residual_pre_norm_triton(x, res, w1, w2, 1e-6, False)
            hr, yr = post_norm_residual_pre_norm_ref(x, res, w1, w2, 1e-6, False)
            rel = max(rel_err(h, hr)[0], rel_err(y, yr)[0])
            mx = max(rel_err(h, hr)[1], rel_err(y, yr)[1])
            sets = [(x, res, w1, w2, 1e-6, False)]
            t = bench_graphed(post_norm_residual_pre_norm_triton, sets)
            tb = bench_graphed(post_norm_residual_pre_norm_ref, sets)
            te = bench(lambda: post_norm_residual_pre_norm_triton(x, res, w1, w2, 1e-6, False))
            nbytes = 2 * (4 * R * N + 2 * N)
        return dict(rel_err=rel, max_abs=mx, t_triton_us=t, t_base_us=tb, t_eager_us=te,
                    gbps=nbytes / t / 1e3)
    return body


def sweep_gemv(stages: tuple[int | None, ...] = (None,)) -> list[dict]:
    """Time block configurations at the E4B shapes that matter; prints the best per shape. `stages`:
    the software-pipeline depths to try with every tile (None: the heuristic's)."""
    out = []
    tiles = {1: [(bn, bk, nw) for bn in (16, 32, 64) for bk in (128, 256, 512) for nw in (4, 8)],
             8: [(bn, bk, nw) for bn in (32, 64, 128) for bk in (64, 128, 256) for nw in (4, 8)]}
    shapes = [s for s in GEMV_SHAPES if s[0] in ("q_sliding", "kv_sliding", "o_sliding", "gate_up",
                                                 "down", "ple_gate", "ple_proj", "lm_head")]
    for name, N, K in shapes:
        for M in (1, 8):
            if name == "lm_head" and M == 8:
                continue
            w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
            x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
            sets = [(x, w)] + [(x.clone(), w.clone()) for _ in range(copies_for(2 * N * K) - 1)]
            res = []

            def t_of(cfg):
                try:
                    return bench_graphed(lambda a, b: linear_small_m_triton(a, b, config=cfg), sets)
                except Exception as e:  # a config may not compile (registers, shared memory)
                    print(f"  {cfg}: {type(e).__name__}", file=sys.stderr)
                    return float("inf")
            for bn, bk, nw in tiles[M]:
                for ns in stages:
                    cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, **({"num_stages": ns} if ns else {}))
                    res.append((t_of(cfg), cfg))
            best_t, best = min(res, key=lambda r: r[0])
            for sk in (1, 2, 4, 8, 16, 32):
                cfg = dict(best, SPLIT_K=sk)
                res.append((t_of(cfg), cfg))
            best_t, best = min(res, key=lambda r: r[0])
            heur = bench_graphed(linear_small_m_triton, sets)
            cub = bench_graphed(F.linear, sets)
            row = dict(shape=f"{name} M{M}", best_us=round(best_t, 2), best=best, heuristic_us=round(heur, 2),
                       cublas_us=round(cub, 2), best_gbps=round(2 * N * K / best_t / 1e3))
            print(json.dumps(row), flush=True)
            out.append(row)
            del sets, w
            torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="gemv,attn,norm", help="comma-separated subset of gemv,attn,norm")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip remaining cases after this")
    ap.add_argument("--sweep", action="store_true", help="time gemv block configs instead")
    ap.add_argument("--stages", default="", help="with --sweep: comma-separated num_stages to try with every tile")
    args = ap.parse_args()
    only = set(args.only.split(","))
    t0 = time.time()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this benchmark needs a GPU", "results": []}))
        return 1
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}", flush=True)
    if args.sweep:
        stages = tuple(int(n) for n in args.stages.split(",") if n.strip()) or (None,)
        print(json.dumps({"device": dev, "sweep": sweep_gemv(stages)}))
        return 0

    cases = []
    if "norm" in only:
        for R in (1, 8, 16, 64):
            cases.append(("rmsnorm", f"[{R}, {HIDDEN}]", norm_case("rmsnorm", R, HIDDEN)))
            cases.append(("sandwich", f"[{R}, {HIDDEN}]", norm_case("sandwich", R, HIDDEN)))
        for R, N in ((8, 256), (128, 256), (8, 512), (128, 512)):  # per-head q/k norms
            cases.append(("rmsnorm", f"[{R}, {N}] per-head", norm_case("rmsnorm", R, N)))
    if "attn" in only:
        for ring, S, D, window in ((True, 521, 256, 512), (False, 1024, 512, 0), (False, 4096, 512, 0)):
            for B in (1, 8, 32):
                for T in (1, 8):
                    ctx = 2000 if ring else S - T  # ring: wrapped several times; linear: full
                    name = f"B{B} T{T} {'ring' if ring else 'linear'} S{S} D{D} W{window}"
                    cases.append(("attn", name, attn_case(B, T, S, D, ring, window, ctx)))
    if "gemv" in only:
        for name, N, K in GEMV_SHAPES:
            for M in GEMV_M:
                cases.append(("gemv", f"{name} M{M} N{N} K{K}", gemv_case(M, N, K)))

    results: list[dict] = []
    for kernel, shape, body in cases:
        if time.time() - t0 > args.budget_s:
            results.append({"kernel": kernel, "shape": shape, "ok": False, "error": "skipped: time budget"})
            print(fmt(results[-1]))
            continue
        run_case(results, kernel, shape, body)
        torch.cuda.empty_cache()

    n_bad = sum(not r["ok"] for r in results)
    print(f"\n{len(results) - n_bad}/{len(results)} cases ok, {time.time() - t0:.0f} s", flush=True)
    clean = [{k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()}
             for r in results]
    print(json.dumps({"device": dev, "torch": torch.__version__, "n_ok": len(results) - n_bad,
                      "n_cases": len(results), "results": clean}))
    return 0 if n_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
