"""Registers, shared memory, spills and load widths of the decode-path Triton kernels, compiled for an H100
(sm_90) on the CPU at E4B shapes, specialised the way Triton's JIT specialises a real launch: an integer
argument equal to 1 becomes a constant, one divisible by 16 gets the divisibility hint, pointers are
16-byte aligned. That matters: compiled with plain runtime strides the GEMV reports 168 registers and
2-byte loads; as launched it takes 72 registers and 16-byte cp.async loads (docs/PERF.md, stop 16).

Per kernel: registers a thread, shared bytes, local-memory spill stores/loads in the SASS, the global load
instructions by width, CTA barriers, and the programs one SM can hold (registers, shared memory, threads).
Needs no GPU (Triton's compiler and the cuobjdump / nvdisasm in its wheel). Prints a table and ends with one
JSON line.   Usage: python scripts/kernel_resources.py [--only SUBSTRING]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SM90_REGS, SM90_SMEM, SM90_THREADS, SM90_CTAS = 65536, 233472, 2048, 32  # per SM (shared: 228 KB)
SMEM_RESERVED = 1024  # the driver's per-CTA shared-memory reservation on sm_90


def _tools() -> tuple[str, str]:
    import triton

    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.join(d, "cuobjdump"), os.path.join(d, "nvdisasm")


def compile_like_jit(fn, ints: dict[str, int], ptrs: dict[str, str], floats: tuple[str, ...],
                     consts: dict, warps: int, stages: int = 3):
    """triton.compile of `fn` for sm_90 with the JIT's specialisation of these argument values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs, constexprs = {}, {}, dict(consts)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        elif name in ints:
            v = ints[name]
            if v == 1:
                sig[name], constexprs[name] = "constexpr", 1
            else:
                sig[name] = "i64" if name.startswith("pf_a") else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{fn.__name__}: no value for argument {name!r}")
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def resources(kernel, warps: int) -> dict:
    cuobjdump, nvdisasm = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([nvdisasm, path], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    smem = int(kernel.metadata.shared)
    loads: dict[str, int] = {}
    for op in re.findall(r"\b(LDG(?:STS)?[A-Z0-9._]*)", sass):
        loads[op] = loads.get(op, 0) + 1
    threads = 32 * warps
    by_regs = SM90_REGS // (regs * threads)  # allocation granularity ignored: an upper bound
    by_smem = SM90_SMEM // (smem + SMEM_RESERVED)
    return {"registers": regs, "shared_bytes": smem, "spill_stores": sass.count("STL"),
            "spill_loads": sass.count("LDL"), "global_loads": loads, "barriers": sass.count("BAR.SYNC"),
            "programs_per_sm": min(by_regs, by_smem, SM90_THREADS // threads, SM90_CTAS),
            "bound": min((by_regs, "registers"), (by_smem, "shared"), (SM90_THREADS // threads, "threads"))[1]}


def _gemv_cases() -> list[tuple]:
    import kernels.gemv as gv
    import kernels.gemv_epilogue as ge

    cases = []
    # (name, N, K): E4B decode shapes, M = 1 (the row-invariant tile pads to 16 rows)
    for name, N, K, act in (("q/k/v sliding", 3072, 2560, None), ("q/k/v full", 6144, 2560, None),
                            ("o_proj sliding", 2560, 2048, None), ("down", 2560, 10240, None),
                            ("PLE projection", 2560, 256, None), ("LM head", 262144, 2560, None),
                            ("gate_up + GeGLU", 20480, 2560, "geglu"), ("PLE gate", 256, 2560, "gate")):
        cfg = gv.gemv_config(1, N, K, 2, 132)
        flags = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
                     USE_DOT=cfg["BLOCK_M"] > 1, DOT_FP32=False,
                     EVEN_K=K % cfg["BLOCK_K"] == 0 and cfg["k_per_split"] % cfg["BLOCK_K"] == 0, PDL=True,
                     PREFETCH=gv.PREFETCH_TILES, W_EVICT="", PF_SEGS=0, PF_AT_END=False)
        ints = dict(M=1, K=K, sxm=K, sxk=1, swn=K, swk=1, k_per_split=cfg["k_per_split"],
                    **{f"pf_{x}{k}": 0 for k in range(4) for x in "an"})
        ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "part_ptr": "*fp32", "o_ptr": "*bf16"}
        if act is None:
            ints.update(N=N, sym=N, syn=1)
            cases.append((f"_gemv_kernel {name} split {cfg['SPLIT_K']}", gv._gemv_kernel, ints, ptrs, (), flags,
                          cfg["num_warps"], cfg["num_stages"]))
        else:
            ny = N // 2 if act == "geglu" else N
            ints.update(NY=ny, som=ny, son=1, sym=ny, syn=1)
            cases.append((f"_gemv_act_kernel {name} split {cfg['SPLIT_K']}", ge._gemv_act_kernel, ints, ptrs, (),
                          dict(GEGLU=act == "geglu", **flags), cfg["num_warps"], cfg["num_stages"]))
    return cases


def _small_cases() -> list[tuple]:
    import triton.language as tl

    import kernels.decode_attention as da
    import kernels.gemv as gv
    import kernels.gemv_epilogue as ge
    import kernels.head_norm as hn
    import kernels.qkv_heads as qh
    import kernels.rmsnorm as rn
    import kernels.splitk_norm as sn
    from engine.fused_tail import ATTN_MERGE_MAX_SPLITS

    H = 2560
    bf = "*bf16"
    norm_ptrs = {k: bf for k in ("r_ptr", "wpost_ptr", "wpre_ptr", "s_ptr", "h_ptr", "y_ptr", "x_ptr")}
    _, _, block_n, warps = rn._config(H, 1)
    split = gv.gemv_config(1, H, 10240, 2, 132)["SPLIT_K"]
    norm_flags = dict(HAS_WPOST=True, HAS_WPRE=True, PLUS_ONE=False, HAS_SCALAR=True, WRITE_Y=True, PDL=True)
    cases = [
        (f"_splitk_sandwich_kernel split {split}", sn._splitk_sandwich_kernel, dict(M=1, N=H, srr=H, shr=H, syr=H),
         {**norm_ptrs, "part_ptr": "*fp32"}, ("eps",),
         dict(X_DTYPE=tl.bfloat16, SPLIT_K=split, BLOCK_N=block_n, **norm_flags), warps, 3),
        ("_sandwich_kernel", rn._sandwich_kernel, dict(R=1, N=H, sxr=H, srr=H, shr=H, syr=H), norm_ptrs, ("eps",),
         dict(SINGLE=True, BLOCK_R=1, BLOCK_N=block_n, **norm_flags), warps, 3),
    ]
    gate_split = gv.gemv_config(1, 256, H, 2, 132)["SPLIT_K"]
    cases.append((f"_splitk_act_kernel PLE gate split {gate_split}", ge._splitk_act_kernel,
                  dict(M=1, NY=256, som=256, son=1, sym=256, syn=1),
                  {"part_ptr": "*fp32", "o_ptr": bf, "y_ptr": bf}, (),
                  dict(GEGLU=False, X_DTYPE=tl.bfloat16, SPLIT_K=gate_split, BLOCK=ge.REDUCE_BLOCK, PDL=True), 4, 3))
    import kernels.gemv_gated_input as gi

    p_cfg = gv.gemv_config(1, H, 256, 2, 132)
    cases.append((f"_gemv_gated_in_kernel PLE projection, gate split {gate_split}", gi._gemv_gated_in_kernel,
                  dict(M=1, N=H, P=256, som=256, son=1, swn=256, swk=1, sym=H, syn=1),
                  {"part_ptr": "*fp32", "o_ptr": bf, "g_ptr": bf, "w_ptr": bf, "y_ptr": bf}, (),
                  dict(SPLIT=gate_split, X_DTYPE=tl.bfloat16, G_BLOCK=gi.GATED_BLOCK, BLOCK_M=p_cfg["BLOCK_M"],
                       BLOCK_N=p_cfg["BLOCK_N"], BLOCK_K=p_cfg["BLOCK_K"], USE_DOT=p_cfg["BLOCK_M"] > 1,
                       DOT_FP32=False, EVEN_K=True, PDL=True, PREFETCH=min(2, gv.PREFETCH_TILES), W_EVICT=""),
                  p_cfg["num_warps"], p_cfg["num_stages"]))
    for D, hkv, n in ((256, 2, 3072), (512, 2, 6144)):
        qkv_split = gv.gemv_config(1, n, H, 2, 132)["SPLIT_K"]
        S = 528 if D == 256 else 4096
        ints = dict(T=1, HQ=8, k_col=8 * D, v_col=8 * D + hkv * D, s_split=n, s_row=n, scr=D, ssr=D, sqr=8 * D,
                    sqh=D, skcb=hkv * S * D, skch=S * D, skcs=D, svcb=hkv * S * D, svch=S * D, svcs=D,
                    sspb=S, ssps=1, srb=1, srt=1, slb=1, slt=1, spb=1, spt=1,
                    M=1, HID=H, sym=0, srm=0, n_heads=8 + hkv, b_off=0)  # the pending-sandwich args, unused
        ptrs = {"src_ptr": "*fp32", "qw_ptr": bf, "kw_ptr": bf, "cos_ptr": bf, "sin_ptr": bf, "q_ptr": bf,
                "kc_ptr": bf, "vc_ptr": bf, "sp_ptr": "*i32", "rows_ptr": "*i64", "slots_ptr": "*i64",
                "pos_ptr": "*i32", **{k: "*fp32" for k in ("ss_ptr", "sc_ptr", "py_ptr", "pr_ptr", "pw_ptr", "ph_ptr")}}
        cases.append((f"_qkv_heads_kernel D {D} split {qkv_split}", qh._qkv_heads_kernel, ints, ptrs, ("eps",),
                      dict(D=D, BLOCK_D=D, SPLIT=qkv_split, XD=tl.bfloat16, PLUS_ONE=False, V_NORM=True, PDL=True,
                           PEND=False, HAS_WPOST=False, HAS_SCALAR=False),
                      hn._warps(D), 3))
        G = 4
        block_m, block_n_a, warps_a, splits = da.launch_config(D, G, 1, hkv, S, 132)
        split_len, splits = da.split_layout(S, splits, block_n_a)
        ints = dict(sqb=8 * D, sqt=8 * D, sqh=D, sqd=1, skb=hkv * S * D, skh=S * D, sks=D, skd=1,
                    svb=hkv * S * D, svh=S * D, svs=D, svd=1, ssb=S, sss=1, spb=1, spt=1,
                    sob=8 * D, sot=8 * D, soh=D, sod=1, S=S, T=1, HQ=8, HKV=hkv, window=512 if D == 256 else 0,
                    split_len=split_len)
        ptrs = {"q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "slot_ptr": "*i32", "qpos_ptr": "*i32", "out_ptr": bf,
                "opart_ptr": "*fp32", "lse_ptr": "*fp32"}
        cases.append((f"_attn_stage1 D {D} S {S} splits {splits}", da._attn_stage1, ints, ptrs,
                      ("qk_scale", "softcap"),
                      dict(G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n_a, NUM_SPLITS=splits, HAS_SOFTCAP=False,
                           DOT_FP32=False, EAGER_KV=D == 256, L2_PF=False, ROW_BYTES=2 * D, BLOCK_T=2, PDL=True),
                      warps_a, da.ATTN_STAGES))
        cases.append((f"_attn_stage2 D {D} splits {splits}", da._attn_stage2, dict(NUM_SPLITS=splits),
                      {"opart_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": bf}, (),
                      dict(D=D, BLOCK_S=da.stage2_block(splits), CHUNK_S=da.STAGE2_CHUNK_S,
                           SEQUENTIAL=splits <= da.SEQUENTIAL_MERGE_MAX_SPLITS, PDL=True), 4 if D >= 256 else 2, 3))
        if splits <= ATTN_MERGE_MAX_SPLITS:  # where engine.fused_tail defers the merge to the o projection
            import kernels.gemv_merged_input as gm
            from kernels._common import next_pow2

            K = 8 * D
            o_cfg = gv.gemv_config(1, H, K, 2, 132)
            cases.append((f"_gemv_merge_in_kernel o_proj D {D} splits {splits}", gm._gemv_merge_in_kernel,
                          dict(M=1, N=H, K=K, HQ=8, NUM_SPLITS=splits, swn=K, swk=1, sym=H, syn=1,
                               k_per_split=o_cfg["k_per_split"]),
                          {"opart_ptr": "*fp32", "lse_ptr": "*fp32", "x_ptr": bf, "w_ptr": bf, "y_ptr": bf,
                           "part_ptr": "*fp32"}, (),
                          dict(D=D, BLOCK_S=da.stage2_block(splits), M_BLOCK=min(gm.MERGE_BLOCK, next_pow2(o_cfg["k_per_split"])),
                               BLOCK_M=o_cfg["BLOCK_M"], BLOCK_N=o_cfg["BLOCK_N"], BLOCK_K=o_cfg["BLOCK_K"],
                               SPLIT_K=o_cfg["SPLIT_K"], USE_DOT=o_cfg["BLOCK_M"] > 1, DOT_FP32=False, EVEN_K=True,
                               PDL=True, PREFETCH=min(2, gv.PREFETCH_TILES), W_EVICT=""),
                          o_cfg["num_warps"], o_cfg["num_stages"]))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="only the kernels whose name contains this")
    args = ap.parse_args()
    rows = []
    for name, fn, ints, ptrs, floats, consts, warps, stages in _gemv_cases() + _small_cases():
        if args.only not in name:
            continue
        k = compile_like_jit(fn, ints, ptrs, floats, consts, warps, stages)
        rows.append({"kernel": name, "warps": warps, **resources(k, warps)})
    print(f"{'kernel (E4B decode shape, sm_90)':<44} {'warps':>5} {'regs':>5} {'smem B':>7} {'spill':>5} "
          f"{'bars':>4} {'per SM':>6}  bound     global loads")
    for r in rows:
        loads = " ".join(f"{k}x{v}" for k, v in sorted(r["global_loads"].items()))
        print(f"{r['kernel']:<44} {r['warps']:>5} {r['registers']:>5} {r['shared_bytes']:>7} "
              f"{r['spill_stores'] + r['spill_loads']:>5} {r['barriers']:>4} {r['programs_per_sm']:>6}  "
              f"{r['bound']:<9} {loads}")
    print(json.dumps({"target": "sm_90", "specialised_like_jit": True, "kernels": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
