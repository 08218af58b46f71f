"""Speculative decoding: K drafted tokens per stream, verified by the target in one forward of width K+1.

Each verify step feeds [last committed token, d1..dK] at positions p..p+K for every stream at once.
Greedy acceptance runs on the device (match -> cumulative product -> count), so the committed tokens
are exactly what plain greedy decoding would produce; sampled acceptance uses the standard rejection
rule (accept d with min(1, p/q), else sample the normalised residual max(0, p - q)). Rejected drafts
leave stale K/V behind, but every cache slot records its position, so those entries are invisible to
later queries and are overwritten by the next step's writes: no re-prefill, ring buffers included.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

import torch

from . import ops
from .ngram import NgramIndex, propose_padded
from .sampling import SamplingParams, filtered_probs, sample

if TYPE_CHECKING:
    from .generate import GenerationOutput, Generator


class NgramDrafter:
    def __init__(self, k: int, max_n: int = 3) -> None:
        self.k, self.max_n = k, max_n
        self.index: dict[int, NgramIndex] = {}

    def begin(self, row: int, tokens: Sequence[int]) -> None:
        self.index[row] = NgramIndex(tokens, self.max_n)

    def commit(self, row: int, tokens: Sequence[int]) -> None:
        self.index[row].extend(tokens)

    def propose(self, gen: "Generator", state: "WaveState") -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        rows, any_match = [], False
        for row in range(gen.cache.batch):
            if state.active[row]:
                toks, hit = propose_padded(self.index[row], self.k, state.outputs[row][-1])
                any_match |= hit
            else:
                toks = [0] * self.k
            rows.append(toks)
        return torch.tensor(rows, dtype=torch.long, device=gen.device), None, any_match


class MtpDrafter:
    """The Gemma 4 MTP assistant: drafts from the target's last hidden state and shared K/V."""

    def __init__(self, assistant: Any, k: int, top_k: int | None) -> None:
        self.assistant, self.k, self.top_k = assistant, k, top_k

    def begin(self, row: int, tokens: Sequence[int]) -> None:
        pass

    def commit(self, row: int, tokens: Sequence[int]) -> None:
        pass

    def propose(self, gen: "Generator", state: "WaveState") -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        with ops.step_scope():  # fixed shapes (all cache rows): compiled ops are safe and fewer kernels
            if gen.use_graphs and state.params.greedy:
                return self._graphed(gen, state), None, True
            drafts, q = self.assistant.draft(gen, state.last, state.hidden, state.pos, self.k, self.top_k,
                                             state.params, state.rng)
        return drafts, q, True

    def _graphed(self, gen: "Generator", state: "WaveState") -> torch.Tensor:
        """Greedy drafting as one CUDA graph per generator: K assistant passes (about 20 small kernels
        each) would otherwise be bound by Python launch overhead."""
        g = getattr(gen, "_draft_graph", None)
        if g is None or g[0] != (self.k, self.top_k):
            last, hidden, pos = state.last.clone(), state.hidden.clone(), state.pos.clone()
            run = lambda: self.assistant.draft(gen, last, hidden, pos, self.k, self.top_k,  # noqa: E731
                                               SamplingParams(), None)[0]
            side = torch.cuda.Stream(gen.device)
            side.wait_stream(torch.cuda.current_stream(gen.device))
            with torch.cuda.stream(side):
                run()  # warm-up outside the capture (compiles, Triton JIT)
            torch.cuda.current_stream(gen.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
            g = gen._draft_graph = ((self.k, self.top_k), graph, (last, hidden, pos), out)
        _, graph, (last, hidden, pos), out = g
        last.copy_(state.last)
        hidden.copy_(state.hidden)
        pos.copy_(state.pos)
        graph.replay()
        return out.clone()


class WaveState:
    def __init__(self, gen: "Generator", params: SamplingParams, rng: torch.Generator | None) -> None:
        B, dev = gen.cache.batch, gen.device
        self.last = torch.zeros(B, dtype=torch.long, device=dev)  # last committed token (not yet fed)
        self.pos = torch.full((B,), -1, dtype=torch.long, device=dev)  # its position; -1 = idle row
        self.hidden = torch.zeros(B, gen.arch.hidden_size, dtype=gen.model.dtype, device=dev)  # hidden that predicted it
        self.outputs: list[list[int]] = [[] for _ in range(B)]
        self.active = [False] * B
        self.params, self.rng = params, rng


def make_drafter(gen: "Generator") -> Any:
    k = gen.knobs
    if k.drafter == "ngram":
        return NgramDrafter(k.draft_tokens)
    if k.drafter == "mtp":
        if gen.assistant is None:
            raise ValueError("drafter=mtp needs an assistant")
        return MtpDrafter(gen.assistant, k.draft_tokens, k.centroid_top_k)
    raise ValueError(f"drafter {k.drafter!r} cannot draft")


def _accept(gen: "Generator", hidden: torch.Tensor, greedy: torch.Tensor, drafts: torch.Tensor,
            q: torch.Tensor | None, params: SamplingParams, rng: torch.Generator | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (accepted count n [B], next token [B]) on the device."""
    K = drafts.shape[1]
    if params.greedy:
        n = (drafts == greedy[:, :K]).long().cumprod(dim=1).sum(dim=1)
        return n, greedy.gather(1, n[:, None]).squeeze(1)
    p = filtered_probs(gen.model.logits(hidden), params)  # [B, K+1, V]
    p_d = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = torch.ones_like(p_d) if q is None else q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(p_d.shape, device=p_d.device, generator=rng)
    n = (u * q_d < p_d).long().cumprod(dim=1).sum(dim=1)
    target = p.gather(1, n[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)  # p at the first rejection
    if q is None:
        draft_q = torch.zeros_like(target).scatter_(1, drafts.gather(1, n.clamp(max=K - 1)[:, None]), 1.0)
    else:
        draft_q = q.gather(1, n.clamp(max=K - 1)[:, None, None].expand(-1, 1, q.shape[-1])).squeeze(1)
    resid = torch.where((n < K)[:, None], (target - draft_q).clamp(min=0), target)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, target)  # p == q exactly: fall back to p
    return n, sample(resid / resid.sum(-1, keepdim=True), rng)


class SpeculativeRows:
    """Row-level speculative decoding over a Generator's cache: `admit` a stream into a free row (prefill,
    first token), then every `step` advances all active rows by one verify and returns each row's newly
    committed tokens. `speculative_wave` and the server's continuous batching both run on this."""

    def __init__(self, gen: "Generator", params: SamplingParams, rng: torch.Generator | None) -> None:
        self.gen, self.params, self.rng = gen, params, rng
        self.k = gen.knobs.draft_tokens
        self.drafter = make_drafter(gen)
        self.state = WaveState(gen, params, rng)
        self.offsets = torch.arange(self.k + 1, device=gen.device)
        self.accepted_by_position = [0] * self.k
        self.verify_steps = self.drafted_steps = 0
        self.draft_seconds = 0.0

    def admit(self, row: int, prompt: Sequence[int]) -> int:
        gen, st = self.gen, self.state
        h = gen.prefill(prompt, row)
        tok = int(gen._pick(h[None, None], gen.model.greedy(h[None, None]), self.params, self.rng)[0, 0])
        st.last[row], st.pos[row], st.hidden[row] = tok, len(prompt), h
        st.outputs[row] = [tok]
        st.active[row] = True
        self.drafter.begin(row, list(prompt) + [tok])
        return tok

    def release(self, row: int) -> None:
        self.state.active[row] = False

    def step(self) -> dict[int, list[int]]:
        gen, st, dev = self.gen, self.state, self.gen.device
        td = time.perf_counter()
        drafts, q, worth_it = self.drafter.propose(gen, st)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.draft_seconds += time.perf_counter() - td
        live = 1 + max(r for r, a in enumerate(st.active) if a)  # rows past the last busy one are not stepped
        active_t = torch.tensor(st.active[:live], device=dev)
        last, pos = st.last[:live], st.pos[:live]
        if worth_it:
            tokens = torch.cat([last[:, None], drafts[:live]], dim=1)
            positions = torch.where(active_t[:, None], pos[:, None] + self.offsets, torch.full_like(self.offsets, -1))
            hidden, greedy = gen.step(tokens, positions)
            n, nxt = _accept(gen, hidden, greedy, drafts[:live], None if q is None else q[:live], self.params,
                             self.rng)
        else:  # no stream has a proposal: a plain width-1 step costs less than a wasted verify
            positions = torch.where(active_t, pos, torch.full_like(pos, -1))[:, None]
            hidden, greedy = gen.step(last[:, None], positions)
            n = torch.zeros(live, dtype=torch.long, device=dev)
            nxt = gen._pick(hidden, greedy, self.params, self.rng)[:, 0]
        # rows at and past `live` are idle and keep their state; only the stepped prefix is updated
        st.hidden[:live] = hidden.gather(1, n[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)
        st.last[:live] = torch.where(active_t, nxt, last)
        st.pos[:live] = torch.where(active_t, pos + n + 1, pos)
        n_host, nxt_host, drafts_host = n.tolist(), nxt.tolist(), drafts.tolist()  # one host read per step
        committed: dict[int, list[int]] = {}
        for row, active in enumerate(st.active):
            if not active:
                continue
            self.verify_steps += 1
            if worth_it:
                self.drafted_steps += 1
                for d in range(n_host[row]):
                    self.accepted_by_position[d] += 1
            new = drafts_host[row][:n_host[row]] + [nxt_host[row]]
            st.outputs[row] += new
            self.drafter.commit(row, new)
            committed[row] = new
        return committed


def speculative_wave(gen: "Generator", prompts: list[Sequence[int]], idx: list[int], max_new: int,
                     params: SamplingParams, rng: torch.Generator | None, stop_at_eos: bool,
                     out: "GenerationOutput") -> None:
    rows = SpeculativeRows(gen, params, rng)
    eos = set(gen.arch.eos_token_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    for row, prompt in enumerate(prompts):
        tok = rows.admit(row, prompt)
        outputs[row] = [tok]
        if (stop_at_eos and tok in eos) or max_new <= 1:
            rows.release(row)
    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)
    t1 = time.perf_counter()
    out.prefill_seconds += t1 - t0
    while any(rows.state.active):
        for row, new in rows.step().items():
            if stop_at_eos:
                cut = next((j for j, t in enumerate(new) if t in eos), None)
                if cut is not None:
                    new = new[:cut + 1]
                    rows.release(row)
            new = new[:max_new - len(outputs[row])]
            outputs[row] += new
            out.decode_tokens += len(new)
            if len(outputs[row]) >= max_new:
                rows.release(row)
    out.decode_seconds += time.perf_counter() - t1
    out.verify_steps += rows.verify_steps
    out.drafted_steps += rows.drafted_steps
    out.draft_seconds += rows.draft_seconds
    if len(out.accepted_by_position) < rows.k:
        out.accepted_by_position += [0] * (rows.k - len(out.accepted_by_position))
    for d, count in enumerate(rows.accepted_by_position):
        out.accepted_by_position[d] += count
    for row, i in enumerate(idx):
        out.tokens[i] = outputs[row]
