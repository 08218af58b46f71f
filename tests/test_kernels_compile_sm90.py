"""Compile the GEMV family (`kernels.gemv`, `kernels.gemv_epilogue`, `kernels.gemv_gated_input`, `kernels.splitk_norm`,
`kernels.pending_add_norm`, `kernels.pending_sandwich`,
`kernels.head_norm`, `kernels.qkv_heads`, `kernels.fused_mlp`, `kernels.gemv_merged_input`, decode attention's stage 2, the decode
step's prologue `kernels.decode_prologue`, the screened greedy head `kernels.head_argmax`) for an H100
(sm_90) without a GPU: Triton's compiler and the ptxas shipped in its wheel need none.

The interpreter tests run the kernels' arithmetic, but the interpreter accepts code the compiler
rejects (a plain module global read inside jit code, a reshape/split of a tensor-core accumulator
it cannot lay out). Compiling every variant the engine launches (bf16, tl.dot and CUDA-core paths,
with and without split-K, each epilogue flag) catches those before a GPU run does.
Triton picks interpreter or compiler at import, so the compile runs in a child process without
TRITON_INTERPRET (this file is also that child's script).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

SKIP = 77  # the child's exit code when this triton has no NVIDIA backend


def _compile_all() -> int:
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        return SKIP
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import kernels.fused_mlp as fm
    import kernels.gemv as gv
    import kernels.qkv_heads as qh
    import kernels.gemv_epilogue as ge
    import kernels.gemv_gated_input as gi
    import kernels.splitk_norm as sn

    target = GPUTarget("cuda", 90, 32)

    def build(fn, sig: dict[str, str], consts: dict, warps: int = 4, bulk_prefetches: int | None = None) -> None:
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        kernel = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": 4})
        assert kernel.asm.get("cubin"), fn.__name__
        ptx = kernel.asm["ptx"]
        # PDL (programmatic dependent launch): the wait must be in the code exactly when asked for
        assert ("griddepcontrol.wait" in ptx) == bool(consts["PDL"]), fn.__name__
        if consts["PDL"]:  # PDL == 2 (kernels._common.PDL_EARLY_SHORT): the next kernel may launch before the wait
            trigger, wait = ptx.find("griddepcontrol.launch_dependents"), ptx.find("griddepcontrol.wait")
            assert trigger >= 0 and (trigger < wait) == (consts["PDL"] == 2), fn.__name__
        # the L2 prefetch of the next weights (kernels.l2_prefetch): one bulk prefetch per segment asked for
        want = consts.get("PF_SEGS", 0) if bulk_prefetches is None else bulk_prefetches
        assert ptx.count("cp.async.bulk.prefetch.L2.global") == want, fn.__name__
        if consts.get("W_EVICT") == "evict_first":
            assert "evict_first" in ptx, fn.__name__

    i32 = "i32"
    strides = {k: i32 for k in ("M", "K", "sxm", "sxk", "swn", "swk", "sym", "syn", "k_per_split")}
    strides.update({f"pf_{x}{k}": ("i64" if x == "a" else i32) for k in range(4) for x in "an"})
    # (BLOCK_M, BLOCK_N, BLOCK_K): the row-invariant tensor-core tile, and the M == 1 CUDA-core path
    tiles = ((16, 32, 128), (1, 16, 256))
    for split in (1, 4):
        for bm, bn, bk in tiles:
            flags = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, USE_DOT=bm > 1, DOT_FP32=False,
                         EVEN_K=True, PDL=split > 1, PREFETCH=4 if split > 1 else 1,  # each variant, no doubling
                         W_EVICT="evict_first" if split > 1 else "", PF_SEGS=3 if split > 1 else 0,
                         PF_AT_END=bm == 1)
            build(gv._gemv_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "part_ptr": "*fp32",
                                    "N": i32, **strides}, flags)
            for geglu in (True, False):
                build(ge._gemv_act_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "o_ptr": "*bf16", "y_ptr": "*bf16",
                                            "part_ptr": "*fp32", "NY": i32, "som": i32, "son": i32, **strides},
                      dict(GEGLU=geglu, **flags))
    # the PLE projection computing its gated input from the gate's partials: tensor-core and M == 1 paths
    for bm, bn, bk in tiles:
        build(gi._gemv_gated_in_kernel,
              {"part_ptr": "*fp32", "o_ptr": "*bf16", "g_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16",
               **{k: i32 for k in ("M", "N", "P", "som", "son", "swn", "swk", "sym", "syn")}},
              dict(SPLIT=10, X_DTYPE=tl.bfloat16, G_BLOCK=gi.GATED_BLOCK, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                   USE_DOT=bm > 1, DOT_FP32=False, EVEN_K=True, PDL=bm > 1, PREFETCH=2, W_EVICT=""))
    # the PLE gate on down's pending add + norm (E4B: 7 down partials, 10 gate splits), and its reduce writing h
    import kernels.pending_add_norm as dn

    for pdl, even_k in ((True, True), (False, False)):
        build(dn._pending_gate_kernel,
              {"part_ptr": "*fp32", "r_ptr": "*bf16", "wpost_ptr": "*bf16", "w_ptr": "*bf16", "gpart_ptr": "*fp32",
               "ss_ptr": "*fp32", **{k: i32 for k in ("M", "N", "H", "srm", "swn", "swk", "k_per_split")}},
              dict(S_IN=7, X_DTYPE=tl.bfloat16, HAS_WPOST=True, PLUS_ONE=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
                   DOT_FP32=False, EVEN_K=even_k, PDL=pdl, PREFETCH=2, W_EVICT=""))
        build(dn._pending_gate_reduce_kernel,
              {"gpart_ptr": "*fp32", "ss_ptr": "*fp32", "o_ptr": "*bf16", "g_ptr": "*bf16", "part_ptr": "*fp32",
               "r_ptr": "*bf16", "wpost_ptr": "*bf16", "h_ptr": "*bf16",
               **{k: i32 for k in ("M", "N", "H", "som", "son", "sgm", "srm", "shm")}, "eps": "fp32",
               "n_gate_programs": i32},
              dict(SPLIT=10, S_IN=7, X_DTYPE=tl.bfloat16, HAS_WPOST=pdl, PLUS_ONE=not pdl, BLOCK=dn.REDUCE_BLOCK,
                   PDL=pdl))
    # the o projection merging decode attention's splits itself (sliding layers: 9 splits of D = 256), and
    # stage 2, which shares its merge code
    import kernels.decode_attention as da
    import kernels.gemv_merged_input as gm

    for bm, bn, bk in tiles:
        build(gm._gemv_merge_in_kernel,
              {"opart_ptr": "*fp32", "lse_ptr": "*fp32", "x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16",
               "part_ptr": "*fp32", **{k: i32 for k in ("M", "N", "K", "HQ", "NUM_SPLITS", "swn", "swk", "sym",
                                                        "syn", "k_per_split")}},
              dict(D=256, BLOCK_S=16, M_BLOCK=512 if bm == 1 else 1024, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                   SPLIT_K=4, USE_DOT=bm > 1, DOT_FP32=False, EVEN_K=True, PDL=True, PREFETCH=2, W_EVICT=""))
    # decode attention stage 1, with and without the L2 prefetch of its split (K, V and slot positions: 3 spans)
    ints = ("sqb", "sqt", "sqh", "sqd", "skb", "skh", "sks", "skd", "svb", "svh", "svs", "svd", "ssb", "sss",
            "spb", "spt", "sob", "sot", "soh", "sod", "S", "T", "HQ", "HKV", "window", "split_len")
    # (the E4B sliding layer's default tile since stop 21: 64 slots, 9 splits, 8 warps; the stop-20 one: 128, 5, 4)
    for l2_pf, eager, bn, warps in ((False, True, 64, 8), (True, True, 64, 8), (True, False, 64, 8),
                                    (False, True, 128, 4)):
        build(da._attn_stage1,
              {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "slot_ptr": "*i32", "qpos_ptr": "*i32",
               "out_ptr": "*bf16", "opart_ptr": "*fp32", "lse_ptr": "*fp32", **{k: i32 for k in ints},
               "qk_scale": "fp32", "softcap": "fp32"},
              dict(G=4, D=256, BLOCK_M=16, BLOCK_N=bn, NUM_SPLITS=9 if bn == 64 else 5, HAS_SOFTCAP=False,
                   DOT_FP32=False, EAGER_KV=eager, L2_PF=l2_pf, ROW_BYTES=512, BLOCK_T=2, PDL=True),
              warps=warps, bulk_prefetches=3 if l2_pf else 0)
    for block_s, sequential in ((16, True), (64, False)):  # the o projection's merge order; the vector merge
        build(da._attn_stage2, {"opart_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "NUM_SPLITS": i32},
              dict(D=512, BLOCK_S=block_s, CHUNK_S=da.STAGE2_CHUNK_S, SEQUENTIAL=sequential, PDL=2))
    for geglu in (True, False):
        build(ge._splitk_act_kernel, {"part_ptr": "*fp32", "o_ptr": "*bf16", "y_ptr": "*bf16", "M": i32, "NY": i32,
                                      "som": i32, "son": i32, "sym": i32, "syn": i32},
              dict(GEGLU=geglu, X_DTYPE=tl.bfloat16, SPLIT_K=10, BLOCK=ge.REDUCE_BLOCK, PDL=geglu))
    for write_y, scalar in ((True, True), (True, False), (False, False)):
        build(sn._splitk_sandwich_kernel,
              {"part_ptr": "*fp32", "r_ptr": "*bf16", "wpost_ptr": "*bf16", "wpre_ptr": "*bf16", "s_ptr": "*bf16",
               "h_ptr": "*bf16", "y_ptr": "*bf16", "M": i32, "N": i32, "srr": i32, "shr": i32, "syr": i32,
               "eps": "fp32"},
              dict(X_DTYPE=tl.bfloat16, SPLIT_K=4, HAS_WPOST=True, HAS_WPRE=write_y, PLUS_ONE=not scalar,
                   HAS_SCALAR=scalar, WRITE_Y=write_y, BLOCK_N=4096, PDL=(2 if scalar else True) if write_y else False),
              warps=8)
    # the fused q/k/v epilogue: from split-K partials (fp32) and from the GEMV's own output (bf16)
    ints = ("T", "HQ", "k_col", "v_col", "s_split", "s_row", "scr", "ssr", "sqr", "sqh", "skcb", "skch", "skcs",
            "svcb", "svch", "svcs", "sspb", "ssps", "srb", "srt", "slb", "slt", "spb", "spt")
    # (split, v norm, pending sandwich input): the pending form combines two row sets and writes h' (E4B: 11 splits)
    pend_sig = {"ss_ptr": "*fp32", "sc_ptr": "*bf16", "py_ptr": "*bf16", "pr_ptr": "*bf16", "pw_ptr": "*bf16",
                "ph_ptr": "*bf16", **{k: i32 for k in ("M", "HID", "sym", "srm", "n_heads", "b_off")}}
    for split, v_norm, pend in ((3, True, False), (0, False, False), (11, True, True)):
        build(qh._qkv_heads_kernel,
              {"src_ptr": "*fp32" if split else "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "cos_ptr": "*bf16",
               "sin_ptr": "*bf16", "q_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "sp_ptr": "*i32",
               "rows_ptr": "*i64", "slots_ptr": "*i64", "pos_ptr": "*i32", **{k: i32 for k in ints}, "eps": "fp32",
               **pend_sig},
              dict(D=256, BLOCK_D=256, SPLIT=split, XD=tl.bfloat16, PLUS_ONE=False, V_NORM=v_norm,
                   PDL=True if split else 2, PEND=pend, HAS_WPOST=pend, HAS_SCALAR=pend), warps=1)
    # the q/k/v GEMV on a pending sandwich (`kernels.pending_sandwich`)
    import kernels.pending_sandwich as ps

    for even_k in (True, False):
        build(ps._pending_qkv_gemv_kernel,
              {"y_ptr": "*bf16", "r_ptr": "*bf16", "wpost_ptr": "*bf16", "wnext_ptr": "*bf16", "w_ptr": "*bf16",
               "gpart_ptr": "*fp32", "ss_ptr": "*fp32",
               **{k: i32 for k in ("M", "N", "H", "sym", "srm", "swn", "swk", "k_per_split")}},
              dict(HAS_WPOST=True, HAS_WNEXT=True, PLUS_ONE=False, X_DTYPE=tl.bfloat16, BLOCK_M=16, BLOCK_N=64,
                   BLOCK_K=128, DOT_FP32=False, EVEN_K=even_k, PDL=True, PREFETCH=2, W_EVICT=""))
    # the MLP as one weight stream: tensor-core and M == 1 paths, then its partial sum
    for bm in (16, 1):
        build(fm._mlp_kernel,
              {"x_ptr": "*bf16", "wgu_ptr": "*bf16", "wd_ptr": "*bf16", "h_ptr": "*bf16", "part_ptr": "*fp32",
               **{k: i32 for k in ("M", "H", "I", "sxm", "sxk", "sgn", "sgk", "sdn", "sdi", "shm")}},
              dict(BLOCK_M=bm, GROUP_I=fm.GROUP_I, UNIT=fm.UNIT, BLOCK_K=fm.BLOCK_K, BLOCK_H=fm.BLOCK_H,
                   USE_DOT=bm > 1, DOT_FP32=False, EVEN_K=True, PDL=bm > 1, PREFETCH=2, W_EVICT=""))
    build(fm._partials_sum_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32", "P": i32, "MN": i32},
          dict(BLOCK=fm.REDUCE_BLOCK, BLOCK_P=fm.REDUCE_BLOCK_P, PDL=2))
    # the decode step's prologue (E4B: hidden 2560, RoPE tables of 256 and 512, a ring and a linear cache) and
    # the PLE gather + combine (ple_dim 256), token ids read before or after the wait
    import kernels.decode_prologue as dp

    ptrs = ("tok_ptr", "pos_ptr", "emb_ptr", "nw_ptr", "h_ptr", "x_ptr", "pos32_ptr", "rows_ptr", "cos0_ptr",
            "sin0_ptr", "ctab0_ptr", "stab0_ptr", "cos1_ptr", "sin1_ptr", "ctab1_ptr", "stab1_ptr", "slots_ptr")
    types = {"tok_ptr": "*i64", "pos_ptr": "*i64", "pos32_ptr": "*i32", "rows_ptr": "*i64", "slots_ptr": "*i64"}
    for plus_one, tables, geom, pdl in ((False, 2, 2, True), (True, 1, 4, 2), (False, 2, 1, False)):
        build(dp._prologue_kernel,
              {**{p: types.get(p, "*bf16") for p in ptrs},
               **{k: i32 for k in ("R", "T", "N", "stb", "stt", "spb", "spt", "s_emb", "s_tab0", "s_tab1",
                                   "n_slots0", "n_slots1", "n_slots2", "n_slots3")},
               "embed_scale": "fp32", "eps": "fp32"},
              dict(PLUS_ONE=plus_one, BLOCK_N=4096, NUM_TABLES=tables, D0=256, BLOCK_D0=256, D1=512, BLOCK_D1=512,
                   NUM_GEOM=geom, RING0=True, RING1=False, RING2=True, RING3=False, PDL=pdl), warps=dp._warps(2560))
    for early, pdl in ((True, True), (False, 2)):
        build(dp._ple_combine_kernel,
              {"ctx_ptr": "*bf16", "tok_ptr": "*i64", "ple_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
               **{k: i32 for k in ("T", "P", "s_ctx", "stb", "stt", "s_ple", "s_out")},
               "ctx_scale": "fp32", "tok_scale": "fp32", "eps": "fp32"},
              dict(BLOCK_P=256, EARLY_TOKENS=early, PDL=pdl), warps=dp._warps(256))
    # the int8-screened greedy head: digits, screen, threshold, exact recompute (tensor-core and M == 1 GEMV tiles), final argmax
    import kernels.head_argmax as ha

    build(ha._digits_kernel, {"x_ptr": "*bf16", "d_ptr": "*i8", "sx_ptr": "*fp32", "xn_ptr": "*fp32",
                              **{k: i32 for k in ("K", "sxm")}}, dict(ROWS=16, BLOCK_K=1024, PDL=2))
    for even_k in (True, False):  # int8 x int8 tensor-core dots (mma s8 -> s32)
        build(ha._screen_digits_kernel, {"d_ptr": "*i8", "q_ptr": "*i8", "scale_ptr": "*fp32", "err_ptr": "*fp32",
                                         "sx_ptr": "*fp32", "xn_ptr": "*fp32", "hi_ptr": "*fp32",
                                         "lo_part_ptr": "*fp32", "blk_ptr": "*fp32",
                                         **{k: i32 for k in ("M", "N", "K", "sqn", "P", "NG")},
                                         "xn_slack": "fp32", "ex_coef": "fp32"},
              dict(ROWS=16, G=64, BLOCK_N=ha.DIGITS_BLOCK_N, BLOCK_K=ha.DIGITS_BLOCK_K, DOT_FP32=False, EVEN_K=even_k, PDL=True))
    build(ha._threshold_kernel, {"lo_part_ptr": "*fp32", "xn_ptr": "*fp32", "sx_ptr": "*fp32", "thresh_ptr": "*fp32",
                                 "P": i32, "err_max": "fp32", "ex_coef": "fp32"}, dict(P_BLOCK=1024, PDL=2))
    for bm, bn, bk in ((16, 64, 128), (1, 16, 256)):
        build(ha._exact_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "hi_ptr": "*fp32", "thresh_ptr": "*fp32",
                                 "blk_ptr": "*fp32", "best_ptr": "*fp32", "best_idx_ptr": "*i32",
                                 **{k: i32 for k in ("M", "N", "K", "sxm", "sxk", "swn", "swk", "NG", "P2")}},
              dict(CHUNK=2048, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=bm > 1, DOT_FP32=False,
                   EVEN_K=True, PDL=True, PREFETCH=2, W_EVICT="", OUT_DTYPE=tl.bfloat16))
    build(ha._final_kernel, {"best_ptr": "*fp32", "best_idx_ptr": "*i32", "out_ptr": "*i64", "P2": i32},
          dict(BLOCK=128, PDL=2))
    return 0


def test_gemv_family_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VKAE_TRITON_INTERPRET_TESTS")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated (silences a warning)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == SKIP:
        pytest.skip("this triton has no NVIDIA backend")
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


if __name__ == "__main__":
    raise SystemExit(_compile_all())
