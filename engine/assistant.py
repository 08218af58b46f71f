"""The Gemma 4 MTP assistant drafter (`gemma4_assistant`, transformers' Gemma4AssistantForCausalLM).

A small Gemma 4 stack whose every layer is KV-shared: it has no K/V projections and reads the
target's own caches (the target's last sliding and last full cache layer, E4B: layers 22 and 23).
One draft step: x = pre_projection([target_embed(token), target_hidden]) -> layers -> final norm ->
(a) post_projection -> the hidden state fed to the next draft step, and (b) the clustered LM head:
score `num_centroids` centroids, keep the top `centroid_top_k` clusters (vocab/num_centroids tokens
each) and compute logits only for their tokens. That cut is the CENTROID_TOP_K knob: it changes the
draft cost and the acceptance rate, never the verified output.

Queries sit at the position of the token being extended (as the reference does for every step) and
see the target K/V of all positions before it (sliding layers: the last window + 1 of them, as the
reference's bidirectional sliding mask does).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from . import ops
from .attention import attend_cache
from .config import FULL, SLIDING, ArchConfig
from .linear import Linear
from .model import GemmaDecoder
from .sampling import SamplingParams, filtered_probs, sample


class Gemma4Assistant(GemmaDecoder):
    def __init__(self, arch: ArchConfig, weights: dict[str, torch.Tensor], num_centroids: int,
                 default_top_k: int, ordered: bool) -> None:
        # every layer reads the target's cache: source -1 marks "not this model's own"
        super().__init__(replace(arch, kv_source=(-1,) * arch.num_layers), weights)
        self.pre_projection = Linear(weights["pre_projection.weight"])
        self.post_projection = Linear(weights["post_projection.weight"])
        self.ordered = ordered
        self.num_centroids = num_centroids
        self.default_top_k = default_top_k
        if ordered:
            self.centroids = Linear(weights["masked_embedding.centroids.weight"])
            ordering = weights["masked_embedding.token_ordering"].long()
            self.register_buffer("clusters", ordering.view(num_centroids, -1).contiguous(), persistent=False)

    def target_sources(self, target_arch: ArchConfig) -> dict[str, int]:
        """The target cache layer each of our layer types reads: its last cache-owning layer of that type."""
        own = target_arch.cache_layers
        return {t: max(i for i in own if target_arch.layer_types[i] == t) for t in (SLIDING, FULL)
                if any(target_arch.layer_types[i] == t for i in own)}

    # ---- one draft step ----------------------------------------------------------------
    def step_hidden(self, x: torch.Tensor, rope_pos: torch.Tensor, see_upto: torch.Tensor, cache: Any,
                    sources: dict[str, int], window: int | None) -> torch.Tensor:
        """x [B, 1, hidden] (after pre_projection) -> final-normed hidden [B, 1, hidden]."""
        eps, plus_one = self._eps()
        rope = {t: tab.lookup(rope_pos) for t, tab in self.rope.items()}
        h = x
        xn = ops.norm(h, self.layers[0].norms["input_layernorm"], eps, plus_one)
        B = x.shape[0]
        for layer in self.layers:
            cos, sin = rope[layer.layer_type]
            q, _, _ = self._project(layer, xn, cos, sin)
            lc = cache.layers[sources[layer.layer_type]]
            o = attend_cache(q, lc, see_upto, window if layer.layer_type == SLIDING else None,
                             self.arch.attn_scale, None)
            h, xn = self._layer_tail(layer, h, o.reshape(B, 1, -1), None, self._next_norm(layer.index))
        return xn

    def head_logits(self, h: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h [B, hidden] -> (logits over candidates [B, C], candidate token ids [B, C] or None = whole vocab)."""
        if not self.ordered:
            return F.linear(h, self.lm_head).float(), None
        k = top_k or self.default_top_k
        top = self.centroids(h).topk(k, dim=-1).indices  # [B, k]
        cand = self.clusters[top].reshape(h.shape[0], -1)  # [B, k * tokens_per_cluster]
        emb = F.embedding(cand, self.lm_head)  # [B, C, hidden]
        return torch.bmm(emb, h[:, :, None]).squeeze(-1).float(), cand

    def full_vocab_logits(self, h: torch.Tensor, top_k: int | None) -> torch.Tensor:
        """The reference's scattered form: non-candidates filled with (min candidate logit - 1)."""
        logits, cand = self.head_logits(h, top_k)
        if cand is None:
            return logits
        full = torch.full((h.shape[0], self.arch.vocab_size), 0.0, device=h.device, dtype=logits.dtype)
        full = full + (logits.min() - 1.0)
        return full.scatter(1, cand, logits)

    @torch.inference_mode()
    def draft(self, gen: Any, last: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor, k: int,
              top_k: int | None, params: SamplingParams, rng: torch.Generator | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K draft tokens per row [B, K] (and their draft distributions [B, K, V] when sampling)."""
        target = gen.model
        sources = self.target_sources(gen.arch)
        # the reference's bidirectional sliding mask over the shared K/V keeps window + 1 entries
        window = min(w for w in (self.arch.sliding_window, gen.window) if w is not None) + 1
        rope_pos = pos.clamp(min=0)[:, None]
        see_upto = (pos - 1)[:, None].to(torch.int32)  # idle rows (pos -1) become padding queries
        tok, h_t = last, hidden
        drafts, qs = [], []
        for _ in range(k):
            e = F.embedding(tok, target.embed) * target.embed_scale
            x = self.pre_projection(torch.cat([e, h_t.to(e.dtype)], dim=-1))[:, None]
            xn = self.step_hidden(x, rope_pos, see_upto, gen.cache, sources, window)
            h_t = self.post_projection(xn)[:, 0]
            logits, cand = self.head_logits(xn[:, 0], top_k)
            if params.greedy:
                best = logits.argmax(dim=-1, keepdim=True)
                tok = best[:, 0] if cand is None else cand.gather(1, best)[:, 0]
            else:
                full = logits if cand is None else torch.full(
                    (logits.shape[0], self.arch.vocab_size), float("-inf"), device=logits.device).scatter(1, cand, logits)
                q = filtered_probs(full, params)
                tok = sample(q, rng)
                qs.append(q)
            drafts.append(tok)
        return torch.stack(drafts, dim=1), (torch.stack(qs, dim=1) if qs else None)

    def describe(self) -> dict[str, Any]:
        return getattr(self, "_describe", {})
