"""The Gemma 3 / Gemma 4 text decoder.

One class runs both families from the frozen `ArchConfig`: Gemma 4's per-layer embeddings (PLE),
KV sharing, 256/512-dim heads, proportional RoPE, v-norm and layer scalars, and Gemma 3's (1 + w)
norms and query_pre_attn_scalar. Two forward modes share every layer:

- `forward_fresh`: attention among the given tokens only (teacher-forced scoring and prefill from
  position 0); with a cache it also writes the K/V of those tokens into the cache rows given.
- `forward_step`: T (1..K+1) new tokens per stream for every cache row; writes their K/V first,
  then attends over the cache. Static shapes, so the decode/verify step can be a CUDA graph.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_tail, ops
from .attention import attend, attend_cache, visibility
from .cache import KVCache
from .config import FULL, SLIDING, ArchConfig
from .linear import Linear, matmul, routes_to_gemv
from .rope import RopeTable


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


# Measurement switch (env VKAE_STAGE_REPEAT, e.g. "attn+ple"; default none): each named stage of a decode step
# runs twice, the second run's result kept. Every stage is a pure function of its inputs (the q/k/v stage writes
# the same K/V again), so results do not change, and a graphed step's extra time is that stage's cost on the
# step's critical path, with PDL overlap included (`scripts/stage_costs_gpu.py`). o, mlp and ple sit in the layer
# tail that prefill shares, so they repeat there too (unmeasured). Read at call time (graphs keep what they were
# captured with). Stages: qkv (projection + norms/RoPE/cache write), attn, o (o_proj + norms),
# mlp (gate_up + down + norms), ple (PLE gate + projection + norms).
STAGES = ("qkv", "attn", "o", "mlp", "ple")
STAGE_REPEAT: frozenset[str] = frozenset(s for s in os.environ.get("VKAE_STAGE_REPEAT", "").split("+") if s)
if STAGE_REPEAT - set(STAGES):
    raise ValueError(f"VKAE_STAGE_REPEAT names unknown stages {sorted(STAGE_REPEAT - set(STAGES))}; "
                     f"known: {'+'.join(STAGES)}")


# The decode/verify step's prologue (embedding, layer 0's input norm, RoPE rows, int32 positions, cache rows and
# slots, the PLE token gather and combine) as two Triton launches around the PLE model projection GEMV
# (`kernels.decode_prologue`) instead of ~25 small, mostly PyTorch-native kernels. Only where the step's other
# fused kernels run (CUDA + Triton at decode widths, `fused_tail.fusable`); env VKAE_FUSED_PROLOGUE=0 turns it
# off. Read at call time (a benchmark flips it in one process; graphs keep what they captured).
FUSED_PROLOGUE: bool = os.environ.get("VKAE_FUSED_PROLOGUE", "1") != "0"


def _stage(name: str, fn, *args):
    """fn(*args), run twice when `name` is in STAGE_REPEAT (the second result is returned)."""
    if name in STAGE_REPEAT:
        fn(*args)
    return fn(*args)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, i: int, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.index = i
        self.source = arch.kv_source[i]
        self.owns_kv = self.source == i
        self.k_eq_v = arch.k_eq_v[i]
        self.head_dim = arch.head_dims[i]
        self.num_heads = arch.num_heads
        self.kv_heads = arch.kv_heads[i]
        self.layer_type = arch.layer_types[i]
        p = f"layers.{i}."
        parts = [w[p + "self_attn.q_proj.weight"]]
        if self.owns_kv:
            parts.append(w[p + "self_attn.k_proj.weight"])
            if not self.k_eq_v:
                parts.append(w[p + "self_attn.v_proj.weight"])
        self.qkv = Linear.fused(parts)
        self.o_proj = Linear(w[p + "self_attn.o_proj.weight"])
        self.q_norm = _param(w[p + "self_attn.q_norm.weight"])
        self.k_norm = _param(w[p + "self_attn.k_norm.weight"]) if self.owns_kv else None
        self.gate_up = Linear.fused([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])
        self.down = Linear(w[p + "mlp.down_proj.weight"])
        self.norms = nn.ParameterDict({
            name: _param(w[p + name + ".weight"])
            for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm")
        })
        self.has_ple = arch.ple_dim > 0
        if self.has_ple:
            self.ple_gate = Linear(w[p + "per_layer_input_gate.weight"])
            self.ple_proj = Linear(w[p + "per_layer_projection.weight"])
            self.ple_norm = _param(w[p + "post_per_layer_input_norm.weight"])
        scalar = w.get(p + "layer_scalar")
        self.layer_scalar = _param(scalar.reshape(1)) if scalar is not None else None


class GemmaDecoder(nn.Module):
    def __init__(self, arch: ArchConfig, weights: dict[str, torch.Tensor], max_positions: int = 4096) -> None:
        super().__init__()
        self.arch = arch
        w = weights
        self.embed = _param(w["embed_tokens.weight"])
        self.lm_head = self.embed if arch.tie_word_embeddings else _param(w["lm_head.weight"])
        self.final_norm = _param(w["norm.weight"])
        self.layers = nn.ModuleList(DecoderLayer(arch, i, w) for i in range(arch.num_layers))
        dtype, device = self.embed.dtype, self.embed.device
        if arch.ple_dim:
            self.ple_embed = _param(w["embed_tokens_per_layer.weight"])
            self.ple_model_proj = Linear(w["per_layer_model_projection.weight"])
            self.ple_proj_norm = _param(w["per_layer_projection_norm.weight"])
        # The reference multiplies embeddings by the scale cast to the weight dtype (50.5 in bf16).
        self.embed_scale = float(torch.tensor(arch.embed_scale, dtype=dtype))
        self.ple_embed_scale = float(torch.tensor(math.sqrt(arch.ple_dim or 1), dtype=dtype))
        self.rope = {t: RopeTable(arch.rope[t], max_positions, device, dtype) for t in (SLIDING, FULL)}
        self.screened_head = None  # int8 screen of the head for greedy decode (`prepare_greedy_head`)

    # ---- pieces ------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def _eps(self) -> tuple[float, bool]:
        return self.arch.rms_norm_eps, self.arch.norm_plus_one

    def _embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = F.embedding(tokens, self.embed) * self.embed_scale
        if not self.arch.ple_dim:
            return h, None
        a = self.arch
        shape = (*tokens.shape, a.num_layers, a.ple_dim)
        tok = F.embedding(tokens, self.ple_embed).reshape(shape)
        ctx = self.ple_model_proj(h).reshape(shape)
        return h, ops.ple_combine(ctx, tok, self.ple_proj_norm, a.hidden_size ** -0.5, self.ple_embed_scale,
                                  a.rms_norm_eps)

    def _project(self, layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The fused QKV projection -> (q after q-norm and RoPE, raw k, raw v); k/v are None in layers
        that read another layer's cache. K/V norms and RoPE are applied by the caller (the decode step
        runs all of it through `fused_tail.proj_qkv_heads` instead)."""
        eps, plus_one = self._eps()
        q, k_raw, v_raw = fused_tail.split_qkv(layer.qkv(x), layer.num_heads, layer.kv_heads, layer.head_dim,
                                               layer.owns_kv, layer.k_eq_v)
        return ops.norm_rope(q, layer.q_norm, cos, sin, eps, plus_one), k_raw, v_raw

    def _layer_tail(self, layer: DecoderLayer, h: torch.Tensor, attn: torch.Tensor,
                    per_layer: torch.Tensor | None, w_next: torch.Tensor, next_qkv: Linear | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything after attention; returns the new residual stream and the next layer's normed input.
        next_qkv (decode steps): the next layer's q/k/v projection, which may take that input pending
        (`fused_tail.PENDING_SANDWICH`; the residual returned is then written by its epilogue)."""
        n, (eps, plus_one) = layer.norms, self._eps()
        # each call is a projection and its epilogue: one fused kernel path at decode widths on CUDA,
        # the unfused ops (the reference) elsewhere (engine/fused_tail.py)
        h, x = _stage("o", fused_tail.proj_sandwich, layer.o_proj, attn, h, n["post_attention_layernorm"],
                      n["pre_feedforward_layernorm"], None, eps, plus_one)
        if layer.has_ple:
            # h may come back pending (`fused_tail.PENDING_ADD_NORM`): the PLE gate then does the add + norm
            h = _stage("mlp", fused_tail.mlp_add_norm, layer.gate_up, layer.down, x, h,
                       n["post_feedforward_layernorm"], eps, plus_one, layer.ple_gate)
            return _stage("ple", self._ple_tail, layer, h, per_layer, w_next, next_qkv)
        return _stage("mlp", fused_tail.mlp_sandwich, layer.gate_up, layer.down, x, h,
                      n["post_feedforward_layernorm"], w_next, layer.layer_scalar, eps, plus_one)

    def _ple_tail(self, layer: DecoderLayer, h: torch.Tensor, per_layer: torch.Tensor, w_next: torch.Tensor,
                  next_qkv: Linear | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-layer input's gate and projection: (new residual h, next layer's normed input)."""
        eps, plus_one = self._eps()
        return fused_tail.ple_sandwich(layer.ple_gate, layer.ple_proj, h, per_layer[:, :, layer.index],
                                       layer.ple_norm, w_next, layer.layer_scalar, eps, plus_one, next_qkv)

    def decode_weight_order(self) -> list[torch.Tensor]:
        """The projection weights in the order a decode step reads them (one GEMV each): the PLE model
        projection, then per layer q/k/v, o, gate+up, down, PLE gate, PLE projection; the LM head last.
        `kernels.l2_prefetch` prefetches along this order."""
        out = [self.ple_model_proj.weight] if self.arch.ple_dim else []
        for layer in self.layers:
            out += [layer.qkv.weight, layer.o_proj.weight, layer.gate_up.weight, layer.down.weight]
            if layer.has_ple:
                out += [layer.ple_gate.weight, layer.ple_proj.weight]
        return out + [self.lm_head]

    def _next_norm(self, i: int) -> torch.Tensor:
        return self.layers[i + 1].norms["input_layernorm"] if i + 1 < len(self.layers) else self.final_norm

    def _window(self, layer: DecoderLayer, window: int | None) -> int | None:
        return window if layer.layer_type == SLIDING else None

    # ---- forward modes -----------------------------------------------------------------
    def forward_fresh(self, tokens: torch.Tensor, positions: torch.Tensor, window: int | None,
                      cache: KVCache | None = None, rows: torch.Tensor | None = None,
                      graph_safe: bool = False) -> torch.Tensor:
        """tokens/positions [B, T] (positions 0..L-1 per stream, -1 for right padding) -> hidden [B, T, H].
        With `cache`, also writes each stream's K/V into cache row rows[b] (the row is reset first).
        `graph_safe`: no host reads (CUDA-graph capture); the caller has sized the RoPE tables and
        checked that every prompt fits the cache."""
        if not graph_safe:
            longest = int(positions.max()) + 1
            for t in self.rope.values():
                t.ensure(longest)
            if cache is not None:
                cache.check_fits(longest)
        rope = {t: tab.lookup(positions) for t, tab in self.rope.items()}
        h, per_layer = self._embed(tokens)
        masks = {SLIDING: visibility(positions, positions, window), FULL: visibility(positions, positions, None)}
        fresh_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if cache is not None:
            cache.reset_rows(rows)
        eps, plus_one = self._eps()
        x = ops.norm(h, self.layers[0].norms["input_layernorm"], eps, plus_one)
        for layer in self.layers:
            cos, sin = rope[layer.layer_type]
            q, k, v = self._project(layer, x, cos, sin)
            if layer.owns_kv:
                k = ops.norm_rope(k, layer.k_norm, cos, sin, eps, plus_one)
                if self.arch.has_v_norm:
                    v = ops.scale_free_norm(v, eps)
                fresh_kv[layer.index] = (k, v)
                if cache is not None:
                    cache.layers[layer.index].write(rows, positions, k, v)
            k, v = fresh_kv[layer.source]
            o = self._attend_chunked(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), masks[layer.layer_type],
                                     self._window(layer, window))
            h, x = self._layer_tail(layer, h, o.transpose(1, 2).reshape(*h.shape[:2], -1), per_layer,
                                    self._next_norm(layer.index))
        return x

    def _attend_chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        window: int | None, chunk: int = 1024) -> torch.Tensor:
        """Attention among fresh tokens (key index = position), in query chunks that attend only to the
        keys they can see: none past the chunk's last query (causal), and in sliding layers none before
        its first query's window. Chunks of 1024 queries bound the [T, S] score memory (a 4K prompt on a
        24 GB card); sliding layers use chunks of about the window, so their prefill costs
        O(T * (window + chunk)) instead of O(T^2): this is what makes a smaller `sliding_window` faster on
        long prompts. Keys outside a slice are exactly masked-out ones, so results do not change beyond
        float summation order."""
        a = self.arch
        T = q.shape[2]
        if window is not None and window < T:
            chunk = min(chunk, max(64, window))
        if T <= chunk:
            return attend(q, k, v, mask, a.attn_scale, a.attn_softcap)
        out = []
        for i in range(0, T, chunk):
            lo, hi = (max(0, i - window + 1) if window is not None else 0), min(T, i + chunk)
            out.append(attend(q[:, :, i:hi], k[:, :, lo:hi], v[:, :, lo:hi], mask[:, :, i:hi, lo:hi],
                              a.attn_scale, a.attn_softcap))
        return torch.cat(out, dim=2)

    def _prologue_fusable(self, tokens: torch.Tensor, geometries: int) -> bool:
        """The fused prologue runs where the step's projections fuse: the rule of `fused_tail.fusable` for the
        step's first GEMV (the PLE model projection, else layer 0's q/k/v) on hidden rows shaped like the step's."""
        if not FUSED_PROLOGUE:
            return False
        probe = self.embed[:1].expand(tokens.numel(), -1)  # a view: [B * T, H] hidden rows, no kernel
        first = self.ple_model_proj.weight if self.arch.ple_dim else self.layers[0].qkv.weight
        if not fused_tail.fusable(probe, first):  # first: it imports triton only where the step fuses
            return False
        from kernels.decode_prologue import supports  # lazily: the engine must not import triton early

        return supports(self.arch.hidden_size, len(self.rope), geometries)

    def _step_prologue(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache):
        """Everything forward_step computes before layer 0: (rope {type: (cos, sin)}, h, per-layer inputs,
        layer 0's normed input x, cache rows, int32 positions, physical slots {(ring, slots): [B, T]})."""
        geometries = list(dict.fromkeys((lc.ring, lc.slots) for lc in cache.layers.values()))
        if self._prologue_fusable(tokens, len(geometries)):
            return self._fused_prologue(tokens, positions, geometries)
        rope = {t: tab.lookup(positions) for t, tab in self.rope.items()}
        h, per_layer = self._embed(tokens)
        B, T = tokens.shape
        rows = torch.arange(B, device=tokens.device)[:, None].expand(B, T)
        pos32 = positions.to(torch.int32)  # once per step, shared by every layer's write and attention
        # physical slots per cache geometry (padding -> the trash slot), computed once per step: one
        # slot_of per distinct (ring, slots), not per layer (each call is ~5 small kernels)
        slots: dict[tuple[bool, int], torch.Tensor] = {}
        for lc in cache.layers.values():
            if (lc.ring, lc.slots) not in slots:
                slots[(lc.ring, lc.slots)] = lc.slot_of(positions)
        eps, plus_one = self._eps()
        x = ops.norm(h, self.layers[0].norms["input_layernorm"], eps, plus_one)
        return rope, h, per_layer, x, rows, pos32, slots

    def _fused_prologue(self, tokens: torch.Tensor, positions: torch.Tensor, geometries: list[tuple[bool, int]]):
        """`_step_prologue` in three launches: the prologue kernel, the PLE model projection GEMV, the PLE
        gather + combine kernel (`kernels.decode_prologue`). The caller has sized the RoPE tables."""
        from kernels.decode_prologue import decode_prologue_triton, ple_combine_gather_triton

        a, (eps, plus_one) = self.arch, self._eps()
        types = list(self.rope)
        pro = decode_prologue_triton(tokens, positions, self.embed, self.embed_scale,
                                     self.layers[0].norms["input_layernorm"], eps, plus_one,
                                     [(self.rope[t].cos, self.rope[t].sin) for t in types], geometries)
        per_layer = None
        if a.ple_dim:
            # the prologue kernel read the token ids after its PDL wait and the GEMV waits on it: settled
            per_layer = ple_combine_gather_triton(self.ple_model_proj(pro.h), tokens, self.ple_embed,
                                                  self.ple_proj_norm, a.hidden_size ** -0.5, self.ple_embed_scale,
                                                  a.rms_norm_eps, tokens_settled=True)
        return (dict(zip(types, pro.rope)), pro.h, per_layer, pro.x, pro.rows, pro.pos32,
                dict(zip(geometries, pro.slots)))

    def forward_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                     window: int | None) -> torch.Tensor:
        """tokens/positions [B, T] for all B cache rows (position -1: inactive row) -> hidden [B, T, H].
        No host synchronisation: safe to capture in a CUDA graph."""
        B, T = tokens.shape
        eps, plus_one = self._eps()
        rope, h, per_layer, x, rows, pos32, slots = self._step_prologue(tokens, positions, cache)
        for layer in self.layers:
            cos, sin = rope[layer.layer_type]
            lc = cache.layers[layer.source]
            kv = (lc.k, lc.v, lc.slot_pos, rows, slots[(lc.ring, lc.slots)], pos32) if layer.owns_kv else None
            q = _stage("qkv", fused_tail.proj_qkv_heads, layer.qkv, x, layer.num_heads, layer.kv_heads,
                       layer.head_dim, layer.q_norm, layer.k_norm, cos, sin, kv, eps, plus_one, self.arch.has_v_norm,
                       layer.k_eq_v)
            o = _stage("attn", attend_cache, q, lc, pos32, self._window(layer, window), self.arch.attn_scale,
                       self.arch.attn_softcap, fused_tail.attn_merge_splits(q, layer.o_proj))
            # unmerged splits (a SplitAttention) go to the o projection as they are: it merges them itself
            attn = o.reshape(B, T, -1) if isinstance(o, torch.Tensor) else o
            i = layer.index
            h, x = self._layer_tail(layer, h, attn, per_layer, self._next_norm(i),
                                    self.layers[i + 1].qkv if i + 1 < len(self.layers) else None)
        return x

    # ---- head --------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits in fp32, final softcap applied (the PPL and sampling path)."""
        z = matmul(hidden, self.lm_head).float()
        cap = self.arch.final_softcap
        return torch.tanh(z / cap) * cap if cap else z

    def prepare_greedy_head(self) -> None:
        """Build the int8 screen of the head (`kernels.head_argmax`, +0.67 GB at E4B) once, where greedy decode
        runs the Triton GEMV (CUDA). Must run before any step graph is captured."""
        if self.screened_head is None and self.device.type == "cuda":
            from kernels import head_argmax

            if head_argmax.ENABLED:
                self.screened_head = head_argmax.build_screened_head(self.lm_head)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Argmax token ids; the softcap is monotonic, so it is skipped. At decode widths on CUDA with the screen
        built, the same ids from the int8 screen and the few rows that can win (half the head's bytes)."""
        if self.screened_head is not None and routes_to_gemv(hidden, self.lm_head):
            from kernels import head_argmax

            x = hidden.reshape(-1, hidden.shape[-1])
            if head_argmax.ENABLED and head_argmax.supports(x, self.lm_head, self.screened_head):
                return head_argmax.greedy_ids(x, self.lm_head, self.screened_head, checked=True).view(hidden.shape[:-1])
        return matmul(hidden, self.lm_head).argmax(dim=-1)
