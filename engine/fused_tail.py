"""The decoder layer tail's projection + epilogue pairs, each one op (one launch fewer on the GPU).

After attention every layer runs, per stream position:
    o_proj -> sandwich        gate_up -> gelu_mul        down -> add_norm (or sandwich)
    PLE gate -> gelu_gate     PLE proj -> sandwich
At decode/verify widths (<= 16 rows on CUDA, `engine.linear.routes_to_gemv`) each pair runs as one
fused Triton path (`kernels.gemv_epilogue`, `kernels.splitk_norm`): GeGLU and the PLE gate in the
GEMV or its split-K reduction, the residual adds and norms in the split-K reduction. At E4B geometry
that is 4 launches fewer per layer (168 per decode step): o_proj, down and PLE gate each lose their
norm/activation kernel, gate_up its gelu_mul; the PLE projection (K = 256, not split) keeps its norm.

Everywhere else (CPU, prefill widths, `VKAE_FUSED_EPILOGUES=0`) each function is the unfused
composition the model ran before, call for call: `ops.<op>(linear(x), ...)`, so the CPU path and
its results are unchanged.

`FUSED_EPILOGUES` (env VKAE_FUSED_EPILOGUES, default on) is read at call time: a benchmark can flip
it in one process (CUDA graphs captured before keep the path they were captured with).
"""
from __future__ import annotations

import os

import torch

from . import linear as linear_mod
from . import ops
from .linear import Linear

FUSED_EPILOGUES: bool = os.environ.get("VKAE_FUSED_EPILOGUES", "1") != "0"
# The q/k/v projection's epilogue (q norm + RoPE, K/V norms + RoPE + cache write) reading the GEMV's split-K
# partials in one launch (`kernels.qkv_heads.linear_qkv_heads_triton`): 4 launches -> 2 per layer. Needs
# FUSED_EPILOGUES too; its own switch (env VKAE_FUSED_QKV) for the A/B. Read at call time.
FUSED_QKV: bool = os.environ.get("VKAE_FUSED_QKV", "1") != "0"
# The MLP as one weight stream (`kernels.fused_mlp`: gate+up, GeGLU and down split along the intermediate
# dimension, then the partial sum and the residual add + norms): replaces the gate_up GEMV, the down GEMV
# and their grid-wide dependency. Off: whole step H100 0.993x decode / 0.978x verify, H200 1.024x / 0.988x
# (docs/PERF.md, stop 13). Needs FUSED_EPILOGUES too; env VKAE_FUSED_MLP=1. Read at call time.
FUSED_MLP: bool = os.environ.get("VKAE_FUSED_MLP", "0") != "0"


# The PLE gate's split-K reduce + GELU x input computed inside the PLE projection's GEMV programs
# (`kernels.gemv_gated_input`): 4 launches -> 3 per layer, bitwise the same results. Off: H100 graphed step
# (`scripts/stage_costs_gpu.py`, variant ple_2launch, stop 19) decode 1.002x (noise), 9-row verify 0.955x.
# Needs FUSED_EPILOGUES too; env VKAE_FUSED_PLE=1. Read at call time.
FUSED_PLE: bool = os.environ.get("VKAE_FUSED_PLE", "0") != "0"
# Decode attention's split merge (stage 2) done inside the o projection's GEMV (`kernels.gemv_merged_input`):
# 1 launch fewer per layer where the keys split into at most ATTN_MERGE_MAX_SPLITS pieces (E4B's sliding
# layers: 9) and the step has at most ATTN_MERGE_MAX_ROWS rows: each GEMV program re-reads its heads' partials
# from L2 for every row, which a 9-row verify step pays for. Bitwise the two-launch path. H100, graphed E4B
# step (`scripts/stage_costs_gpu.py`, stop 19): decode 4.519 -> 4.469 ms (1.011x, 4 rounds, every round
# faster); merging at verify widths too made the 9-row verify 0.956x, hence 1 row. Needs FUSED_EPILOGUES too;
# env VKAE_FUSED_ATTN_MERGE=0 turns it off. Read at call time.
FUSED_ATTN_MERGE: bool = os.environ.get("VKAE_FUSED_ATTN_MERGE", "1") != "0"
# 9: E4B's sliding layers split into 9 pieces since stop 21 (64-slot splits, `kernels.decode_attention`). The global
# layers (16 splits at 1024 slots, more past it) merge in stage 2 before a plain o GEMV: H100, graphed step at 1024
# slots, context 768 (`scripts/stage_costs_gpu.py` variant merge_max9_seq16, stop 24): decode 4.198 -> 4.165 ms,
# verify 4.379 -> 4.376 ms; neutral at 4096 slots (4.184 -> 4.178 ms), where the global layers split 64 ways anyway.
ATTN_MERGE_MAX_SPLITS = 9
ATTN_MERGE_MAX_ROWS = 1
# Down's residual add + post-norm left pending for the PLE gate GEMV (`kernels.pending_add_norm`): the gate reads
# down's split-K partials and applies the norm's scalar in its own split-K reduction, which also writes h. One
# dependent launch fewer per layer with per-layer inputs (the add_norm kernel). Off by default until measured;
# env VKAE_PENDING_ADD_NORM=1. Needs FUSED_EPILOGUES too. Read at call time.
PENDING_ADD_NORM: bool = os.environ.get("VKAE_PENDING_ADD_NORM", "0") != "0"
# The layer-ending PLE sandwich (post-norm, residual add, layer scalar, next input norm) left pending for the next
# layer's q/k/v GEMV (`kernels.pending_sandwich`): the GEMV reads h and the PLE projection's output, its epilogue
# applies the two norms' scalars and writes h'. One dependent launch fewer per layer but the last. Off by default
# until measured; env VKAE_PENDING_SANDWICH=1. Needs FUSED_EPILOGUES and FUSED_QKV too. Read at call time.
PENDING_SANDWICH: bool = os.environ.get("VKAE_PENDING_SANDWICH", "0") != "0"


def fusable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Fuse only where the unfused projection would run the Triton GEMV (tests patch this to force
    the fused kernels onto CPU tensors under the interpreter)."""
    if not (FUSED_EPILOGUES and linear_mod.routes_to_gemv(x, w)):
        return False
    from kernels._common import use_triton  # imported lazily: the engine must not import triton early

    return use_triton(x)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def split_qkv(y: torch.Tensor, num_heads: int, kv_heads: int, head_dim: int, has_kv: bool, k_eq_v: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The fused [q; k; v] projection's output [B, T, N] -> (q, k, v) head views [B, T, heads, D]; k and v are
    None without a K/V part, and the same view when k = v."""
    B, T, _ = y.shape
    k_col = num_heads * head_dim
    q = y[..., :k_col].view(B, T, num_heads, head_dim)
    if not has_kv:
        return q, None, None
    kv_width = kv_heads * head_dim
    k = y[..., k_col:k_col + kv_width].view(B, T, kv_heads, head_dim)
    return q, k, k if k_eq_v else y[..., k_col + kv_width:k_col + 2 * kv_width].view(B, T, kv_heads, head_dim)


def proj_qkv_heads(lin: Linear, x: torch.Tensor, num_heads: int, kv_heads: int, head_dim: int,
                   q_norm: torch.Tensor, k_norm: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                   kv: tuple | None, eps: float, plus_one: bool, v_norm: bool, k_eq_v: bool) -> torch.Tensor:
    """The fused [q; k; v] projection of x [B, T, K] -> q [B, T, H, D] after its norm and RoPE; with
    kv = (k_cache, v_cache, slot_pos, rows, slots, pos32) also the K/V norms, RoPE and cache write of
    `ops.write_kv` (k = v's raw projection when k_eq_v). kv None: a layer that reads another's cache.
    x may be a pending sandwich (`ple_sandwich` with a consumer): its h' is written on the way."""
    if not isinstance(x, torch.Tensor):
        from kernels.pending_sandwich import materialize_ref, supports

        if FUSED_QKV and fusable(x.y, lin.weight) and supports(x, lin.weight):
            from kernels.qkv_heads import linear_qkv_heads_triton

            return linear_qkv_heads_triton(x, lin.weight, num_heads, kv_heads, head_dim, q_norm,
                                           k_norm if kv is not None else None, cos, sin, kv, eps, plus_one, v_norm,
                                           k_eq_v)
        x = materialize_ref(x)[1]
    if FUSED_QKV and fusable(x, lin.weight):
        from kernels.qkv_heads import linear_qkv_heads_triton

        return linear_qkv_heads_triton(x, lin.weight, num_heads, kv_heads, head_dim, q_norm,
                                       k_norm if kv is not None else None, cos, sin, kv, eps, plus_one, v_norm,
                                       k_eq_v)
    q_raw, k_raw, v_raw = split_qkv(lin(x), num_heads, kv_heads, head_dim, kv is not None, k_eq_v)
    q = ops.norm_rope(q_raw, q_norm, cos, sin, eps, plus_one)
    if kv is not None:
        ops.write_kv(k_raw, v_raw, k_norm, cos, sin, *kv, eps, plus_one, v_norm)
    return q


def attn_merge_splits(q: torch.Tensor, o_proj: Linear) -> int:
    """`engine.attention.attend_cache`'s defer_merge_max_splits for q [B, T, Hq, D] whose output feeds o_proj:
    ATTN_MERGE_MAX_SPLITS where the o projection can merge the splits itself, else 0."""
    rows = q.numel() // (q.shape[-1] * q.shape[-2])
    if not (FUSED_ATTN_MERGE and rows <= ATTN_MERGE_MAX_ROWS
            and fusable(q.view(rows, -1) if q.is_contiguous() else q.reshape(rows, -1), o_proj.weight)):
        return 0
    from kernels.decode_attention import SEQUENTIAL_MERGE_MAX_SPLITS

    # past stage 2's sequential merge a verify row (stage 2) would no longer match its decode row (merged here)
    return min(ATTN_MERGE_MAX_SPLITS, SEQUENTIAL_MERGE_MAX_SPLITS)


def proj_sandwich(lin: Linear, x, residual: torch.Tensor, w_post: torch.Tensor,
                  w_next: torch.Tensor, scalar: torch.Tensor | None, eps: float, plus_one: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.sandwich(lin(x), residual, ...)`: (new residual h, next layer's normed input). x may be the unmerged
    attention (`kernels.decode_attention.SplitAttention`, see `attn_merge_splits`): its merge runs in the GEMV."""
    if not isinstance(x, torch.Tensor):
        from kernels.gemv_merged_input import merged_sandwich_triton

        return merged_sandwich_triton(x, lin.weight, residual, w_post, w_next, scalar, eps, plus_one)
    if fusable(x, lin.weight):
        from kernels.splitk_norm import linear_sandwich_triton

        return linear_sandwich_triton(_rows(x), lin.weight, residual, w_post, w_next, scalar, eps, plus_one)
    return ops.sandwich(lin(x), residual, w_post, w_next, scalar, eps, plus_one)


def proj_add_norm(lin: Linear, x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, eps: float,
                  plus_one: bool) -> torch.Tensor:
    """`ops.add_norm(lin(x), residual, ...)`: residual + norm(x @ W.T)."""
    if fusable(x, lin.weight):
        from kernels.splitk_norm import linear_add_norm_triton

        return linear_add_norm_triton(_rows(x), lin.weight, residual, w_post, eps, plus_one)
    return ops.add_norm(lin(x), residual, w_post, eps, plus_one)


def proj_geglu(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    """`ops.gelu_mul(lin(x))` for the fused [gate; up] projection: [..., I]."""
    if fusable(x, lin.weight):
        from kernels.gemv_epilogue import linear_geglu_triton

        return linear_geglu_triton(_rows(x), lin.weight).view(*x.shape[:-1], -1)
    return ops.gelu_mul(lin(x))


def proj_gelu_gate(lin: Linear, x: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
    """`ops.gelu_gate(lin(x), per_layer_input)`: gelu_tanh(x @ W.T) * the layer's per-layer input."""
    if fusable(x, lin.weight):
        from kernels.gemv_epilogue import linear_gelu_gate_triton

        return linear_gelu_gate_triton(_rows(x), lin.weight, _rows(per_layer_input)).view(*x.shape[:-1], -1)
    return ops.gelu_gate(lin(x), per_layer_input)


def _mlp_fusable(gate_up: Linear, down: Linear, x: torch.Tensor) -> bool:
    if not (FUSED_MLP and fusable(x, gate_up.weight) and fusable(x, down.weight)):
        return False
    from kernels.fused_mlp import fusable_shapes

    return fusable_shapes(_rows(x).shape[0], gate_up.weight, down.weight)


def _mlp_tail(gate_up: Linear, down: Linear, x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor,
              w_next: torch.Tensor | None, scalar: torch.Tensor | None, eps: float, plus_one: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.fused_mlp import mlp_sum_triton
    from kernels.splitk_norm import sandwich_from_partials

    part = mlp_sum_triton(_rows(x), gate_up.weight, down.weight)
    return sandwich_from_partials(part, x.dtype, residual, w_post, w_next, scalar, eps, plus_one, w_next is not None)


def mlp_sandwich(gate_up: Linear, down: Linear, x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor,
                 w_next: torch.Tensor, scalar: torch.Tensor | None, eps: float, plus_one: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`proj_sandwich(down, proj_geglu(gate_up, x), residual, ...)`: the MLP, then (new residual h, next
    layer's normed input)."""
    if _mlp_fusable(gate_up, down, x):
        return _mlp_tail(gate_up, down, x, residual, w_post, w_next, scalar, eps, plus_one)
    return proj_sandwich(down, proj_geglu(gate_up, x), residual, w_post, w_next, scalar, eps, plus_one)


def _down_partials(gate_up: Linear, down: Linear, x: torch.Tensor) -> torch.Tensor | None:
    """The MLP's output as fp32 partial sums [S, M, H] (the fused MLP's one partial, or down's split-K partials),
    or None where down would not split K (then there are no partials to hand on)."""
    if _mlp_fusable(gate_up, down, x):
        from kernels.fused_mlp import mlp_sum_triton

        return mlp_sum_triton(_rows(x), gate_up.weight, down.weight)
    if not (fusable(x, gate_up.weight) and fusable(x, down.weight)):
        return None
    from kernels.gemv import launch_gemv, resolve_config

    act = _rows(proj_geglu(gate_up, x))
    cfg = resolve_config(act, down.weight)
    if cfg["SPLIT_K"] == 1:
        return None
    part = torch.empty(cfg["SPLIT_K"], act.shape[0], down.weight.shape[0], dtype=torch.float32, device=act.device)
    launch_gemv(act, down.weight, part, part, cfg)
    return part


def mlp_add_norm(gate_up: Linear, down: Linear, x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor,
                 eps: float, plus_one: bool, consumer: Linear | None = None):
    """`proj_add_norm(down, proj_geglu(gate_up, x), residual, ...)`: residual + norm(MLP(x)). With `consumer` (the
    PLE gate that reads the result) and PENDING_ADD_NORM, where the gate can take it pending
    (`kernels.pending_add_norm`): a `PendingAddNorm` of the MLP's partials instead, for `ple_sandwich`."""
    if consumer is not None and PENDING_ADD_NORM and fusable(residual, consumer.weight):
        from kernels.pending_add_norm import PendingAddNorm, supports

        part = _down_partials(gate_up, down, x)
        if part is not None:
            pending = PendingAddNorm(part, x.dtype, residual, w_post, eps, plus_one)
            if supports(pending, consumer.weight):
                return pending
            return _pending_h(pending)
    if _mlp_fusable(gate_up, down, x):
        return _mlp_tail(gate_up, down, x, residual, w_post, None, None, eps, plus_one)[0]
    return proj_add_norm(down, proj_geglu(gate_up, x), residual, w_post, eps, plus_one)


def _pending_h(pending) -> torch.Tensor:
    """h of a `PendingAddNorm` by the split-K add + norm kernel (where the gate cannot take it pending)."""
    from kernels.splitk_norm import sandwich_from_partials

    p = pending
    return sandwich_from_partials(p.part, p.x_dtype, p.residual, p.w_post, None, None, p.eps, p.plus_one, False)[0]


def ple_sandwich(gate: Linear, proj: Linear, h, per_layer_input: torch.Tensor, w_post: torch.Tensor,
                 w_next: torch.Tensor, scalar: torch.Tensor | None, eps: float, plus_one: bool,
                 consumer: Linear | None = None):
    """`proj_sandwich(proj, proj_gelu_gate(gate, h, per_layer_input), h, ...)`: the per-layer input's gate and
    projection, then (new residual h, next layer's normed input). h may be pending (`mlp_add_norm`'s
    `PendingAddNorm`): the gate GEMV then applies the add + norm itself and writes h. With `consumer` (the next
    layer's q/k/v projection) and PENDING_SANDWICH, where it can take it: (h', a `PendingSandwich`) whose h' the
    consumer's epilogue writes (`proj_qkv_heads`); not after FUSED_PLE's two-launch path (its own sandwich)."""
    if not isinstance(h, torch.Tensor):
        from kernels.pending_add_norm import pending_gate_triton

        h, g = pending_gate_triton(h, gate.weight, _rows(per_layer_input))
        return _ple_proj_tail(proj, g.view(*h.shape[:-1], -1), h, w_post, w_next, scalar, eps, plus_one, consumer)
    if FUSED_PLE and fusable(h, gate.weight) and fusable(h, proj.weight):
        from kernels.gemv_gated_input import fusable_shapes, gelu_gate_linear_triton
        from kernels.rmsnorm import post_norm_residual_pre_norm_triton

        x, other = _rows(h), _rows(per_layer_input)
        if fusable_shapes(x, gate.weight, proj.weight):
            y = gelu_gate_linear_triton(x, gate.weight, other, proj.weight).view(*h.shape[:-1], -1)
            res = h.to(torch.promote_types(y.dtype, h.dtype))  # a no-op in the engine
            return post_norm_residual_pre_norm_triton(y, res, w_post, w_next, eps, plus_one, scalar=scalar)
    g = proj_gelu_gate(gate, h, per_layer_input)
    return _ple_proj_tail(proj, g, h, w_post, w_next, scalar, eps, plus_one, consumer)


def _ple_proj_tail(proj: Linear, g: torch.Tensor, h: torch.Tensor, w_post: torch.Tensor, w_next: torch.Tensor,
                   scalar: torch.Tensor | None, eps: float, plus_one: bool, consumer: Linear | None):
    """`proj_sandwich(proj, g, h, ...)`, or (h', a `PendingSandwich` of proj(g)) where the consumer takes it."""
    if consumer is not None and PENDING_SANDWICH and FUSED_QKV and g.dtype == h.dtype and fusable(g, proj.weight) \
            and fusable(h, consumer.weight):
        from kernels.pending_sandwich import PendingSandwich, supports

        # h stands in for proj(g) (same shape and dtype) so the check runs before the projection
        if supports(PendingSandwich(h, h, w_post, w_next, scalar, eps, plus_one, h), consumer.weight):
            pending = PendingSandwich(proj(g), h, w_post, w_next, scalar, eps, plus_one, torch.empty_like(h))
            return pending.h_out, pending
    return proj_sandwich(proj, g, h, w_post, w_next, scalar, eps, plus_one)
