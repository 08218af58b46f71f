"""Prefill and decode for a batch of independent streams, with the decode step as a CUDA graph on GPU.

Prompts run in waves of `knobs.batch_size` streams (the challenge's way: that many at a time).
Each stream is prefilled into its own cache row, then all rows decode together; a row with no
stream has position -1 and is ignored. With EOS ignored (benchmarks), the decode loop never
synchronises with the host: tokens accumulate in a device buffer that is read once per wave.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import ops
from .cache import KVCache
from .errors import UserError
from .knobs import MAX_DRAFT_TOKENS, Knobs
from .sampling import SamplingParams, filtered_probs, sample

__all__ = ["Generator", "GenerationOutput", "SamplingParams"]


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (the first token of each stream comes from prefill)
    verify_steps: int = 0
    accepted_by_position: list[int] = field(default_factory=list)  # speculative: drafts accepted at each depth
    drafted_steps: int = 0
    draft_seconds: float = 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """Fraction of draft steps whose d-th drafted token was accepted (d = 1..K)."""
        return [n / self.drafted_steps for n in self.accepted_by_position] if self.drafted_steps else []

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per target forward in decode (1.0 for plain decoding)."""
        return self.decode_tokens / self.verify_steps if self.verify_steps else 1.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepGraph:
    """A captured forward_step of fixed width T (1 = decode, K+1 = verify) over static buffers."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 batch: int, width: int, device: torch.device) -> None:
        self.tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.positions = torch.full((batch, width), -1, dtype=torch.long, device=device)
        self.fn = fn
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels (and Triton JIT) outside the capture
                fn(self.tokens, self.positions)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.hidden, self.greedy = fn(self.tokens, self.positions)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.hidden, self.greedy


# Prompts up to the largest bucket prefill through a CUDA graph captured per length bucket (the prompt
# right-padded with position -1): an eager prefill of a short prompt is bound by Python launch cost (H100,
# E4B geometry: 256 tokens took 47 ms of wall time for 17 ms of GPU kernels). Past ~1K tokens the GPU work
# outgrows the launch cost, eager launches run ahead of the GPU, and padding would only add work.
PREFILL_GRAPH_BUCKETS = (64, 128, 256, 384, 512, 768, 1024)


def prefill_bucket(n: int) -> int | None:
    """The graph length a prompt of n tokens pads to, or None (eager prefill)."""
    return next((b for b in PREFILL_GRAPH_BUCKETS if b >= n), None)


class PrefillGraph:
    """A captured `forward_fresh` of one stream over `length` tokens that writes the prompt's K/V into
    one cache row (both set per call). Padding positions (-1) write only the trash slot."""

    def __init__(self, model: Any, cache: KVCache, window: int | None, length: int, row: int,
                 device: torch.device, pool: Any) -> None:
        self.tokens = torch.zeros(1, length, dtype=torch.long, device=device)
        self.positions = torch.full((1, length), -1, dtype=torch.long, device=device)
        self.rows = torch.full((1,), row, dtype=torch.long, device=device)
        self._arange = torch.arange(length, device=device)[None]

        def fn() -> torch.Tensor:
            return model.forward_fresh(self.tokens, self.positions, window, cache=cache, rows=self.rows,
                                       graph_safe=True)

        # Warm-up (Triton JIT, cuBLAS / cuDNN plans) outside the capture. All positions are -1, so it
        # only resets `row` (about to be prefilled anyway) and writes the trash slot.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.hidden = fn()

    def __call__(self, ids: torch.Tensor, row: int) -> torch.Tensor:
        """ids [1, n] -> the last prompt position's hidden state [H] (a copy: the graphs share memory)."""
        n = ids.shape[1]
        self.tokens.zero_()
        self.tokens[:, :n] = ids
        self.positions.copy_(torch.where(self._arange < n, self._arange, -1))
        self.rows.fill_(row)
        self.graph.replay()
        return self.hidden[0, n - 1].clone()


class Generator:
    def __init__(self, loaded: Any, knobs: Knobs, max_context: int = 4096, use_cuda_graphs: bool = True,
                 assistant: Any = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.arch = loaded.arch
        self.knobs = knobs
        self.assistant = assistant
        self.device = self.model.device
        self.window = knobs.sliding_window or self.arch.sliding_window
        self.max_context = max_context
        for table in self.model.rope.values():
            table.ensure(max_context + MAX_DRAFT_TOKENS + 1)
        self.cache = KVCache(self.arch, knobs.batch_size, max_context, self.window, self.device, self.model.dtype)
        self.use_graphs = use_cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], StepGraph] = {}  # (rows, width) -> captured step
        self._prefixes: dict[int, KVCache] = {}  # rows -> view of the first rows (built once, not per step)
        self.prefill_graphs = self.use_graphs  # benchmarks flip it for an eager A/B
        self._prefill_graphs: dict[int, PrefillGraph] = {}  # bucket length -> captured prefill
        self._prefill_pool: Any = None  # one memory pool for all prefill graphs (they never run at once)
        if self.device.type == "cuda":  # the GEMVs' L2 prefetch follows the step's weight order
            from kernels.l2_prefetch import register_stream

            register_stream(self.model.decode_weight_order())
            self.model.prepare_greedy_head()  # before any graph capture: the screen's int8 copy of the head

    # ---- steps -------------------------------------------------------------------------
    def _step_eager(self, tokens: torch.Tensor, positions: torch.Tensor,
                    cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with ops.step_scope():
            hidden = self.model.forward_step(tokens, positions, cache or self.cache, self.window)
        return hidden, self.model.greedy(hidden)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One target forward of width T over the first B' cache rows (B' = tokens.shape[0] <= batch)
        -> (hidden [B', T, H], greedy ids [B', T]). Callers pass only the rows up to the last busy one."""
        rows, width = tokens.shape
        cache = self._prefixes.get(rows)
        if cache is None:
            cache = self._prefixes[rows] = self.cache.prefix(rows)
        if not self.use_graphs:
            return self._step_eager(tokens, positions, cache)
        if (rows, width) not in self._graphs:
            self._graphs[(rows, width)] = StepGraph(lambda t, p: self._step_eager(t, p, cache), rows, width,
                                                    self.device)
        return self._graphs[(rows, width)](tokens, positions)

    @torch.inference_mode()
    def capture_steps(self, widths: Sequence[int]) -> int:
        """Compile and capture the step graph of every (busy rows, width) now, rows 1..batch, so that no
        request pays for it later (a server does this before it reports healthy; the first request of a
        new shape would otherwise stall for seconds). Idle rows (position -1) write only the trash slot,
        so the caches are untouched. Returns how many graphs were captured."""
        if not self.use_graphs:
            return 0
        captured = 0
        for rows in range(1, self.cache.batch + 1):
            for width in widths:
                if (rows, width) not in self._graphs:
                    tokens = torch.zeros(rows, width, dtype=torch.long, device=self.device)
                    self.step(tokens, torch.full_like(tokens, -1))
                    captured += 1
        return captured

    def _prefill_graph(self, bucket: int, row: int) -> PrefillGraph:
        """The prefill graph of one length bucket, captured on first use (the capture resets `row`)."""
        graph = self._prefill_graphs.get(bucket)
        if graph is None:
            if self._prefill_pool is None:
                self._prefill_pool = torch.cuda.graph_pool_handle()
            graph = self._prefill_graphs[bucket] = PrefillGraph(self.model, self.cache, self.window, bucket, row,
                                                                self.device, self._prefill_pool)
        return graph

    @torch.inference_mode()
    def capture_prefills(self, lengths: Sequence[int] | None = None) -> int:
        """Capture now the prefill graph of every length bucket a prompt can land in, or only the buckets
        of prompts of these `lengths`, as `capture_steps` does for the steps (the first prompt of a new
        bucket would otherwise stall for its capture, inside a timed run). Each capture resets cache row 0:
        call it before any stream is live. Returns how many were captured."""
        if not (self.use_graphs and self.prefill_graphs):
            return 0
        if lengths is None:  # every bucket a prompt below the max context can land in
            lengths = [min(b, self.max_context - 1) for b in PREFILL_GRAPH_BUCKETS]
        wanted = {prefill_bucket(n) for n in lengths} - {None}
        todo = sorted(b for b in wanted if b not in self._prefill_graphs)
        for bucket in todo:
            self._prefill_graph(bucket, 0)
        return len(todo)

    @torch.inference_mode()
    def prefill(self, prompt: Sequence[int], row: int) -> torch.Tensor:
        """Fill cache row `row` with the prompt; returns the last position's hidden state [H]."""
        n = len(prompt)
        if n == 0:
            raise UserError("empty prompt")
        if n >= self.max_context:
            raise UserError(f"prompt of {n} tokens does not fit the max context {self.max_context}")
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        if int(ids.max()) >= self.arch.vocab_size or int(ids.min()) < 0:
            raise UserError(f"prompt token ids must be in [0, {self.arch.vocab_size})")
        bucket = prefill_bucket(n) if self.use_graphs and self.prefill_graphs else None
        if bucket is not None:
            return self._prefill_graph(bucket, row)(ids, row)
        pos = torch.arange(n, device=self.device)[None]
        rows = torch.tensor([row], device=self.device)
        hidden = self.model.forward_fresh(ids, pos, self.window, cache=self.cache, rows=rows)
        return hidden[0, -1]

    def _pick(self, hidden: torch.Tensor, greedy_ids: torch.Tensor, params: SamplingParams,
              gen: torch.Generator | None) -> torch.Tensor:
        if params.greedy:
            return greedy_ids
        return sample(filtered_probs(self.model.logits(hidden), params), gen)

    # ---- generation --------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams | None = None, stop_at_eos: bool = False) -> GenerationOutput:
        params = sampling or SamplingParams()
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens={max_new_tokens}: must be at least 1")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens + MAX_DRAFT_TOKENS + 1 > self.max_context:
            raise UserError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the max "
                            f"context {self.max_context}")
        out = GenerationOutput(tokens=[[] for _ in prompts])
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        B = self.knobs.batch_size
        for start in range(0, len(prompts), B):
            wave = list(range(start, min(start + B, len(prompts))))
            if self.knobs.draft_tokens > 0:
                from .speculative import speculative_wave

                speculative_wave(self, [prompts[i] for i in wave], wave, max_new_tokens, params, gen, stop_at_eos, out)
            else:
                self._plain_wave([prompts[i] for i in wave], wave, max_new_tokens, params, gen, stop_at_eos, out)
        return out

    def _plain_wave(self, prompts: list[Sequence[int]], idx: list[int], max_new: int, params: SamplingParams,
                    gen: torch.Generator | None, stop_at_eos: bool, out: GenerationOutput) -> None:
        B, dev = len(prompts), self.device  # a short last wave steps only its own rows
        t0 = time.perf_counter()
        tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        positions = torch.full((B, 1), -1, dtype=torch.long, device=dev)
        for row, prompt in enumerate(prompts):
            last = self.prefill(prompt, row)
            tokens[row, 0] = self._pick(last[None, None], self.model.greedy(last[None, None]), params, gen)[0, 0]
            positions[row, 0] = len(prompt)
        _sync(dev)
        t1 = time.perf_counter()
        out.prefill_seconds += t1 - t0
        produced = torch.zeros(B, max_new, dtype=torch.long, device=dev)
        produced[:, 0] = tokens[:, 0]
        eos = set(self.arch.eos_token_ids)
        lengths = [max_new] * B
        done = [False] * B
        steps = 0
        for t in range(1, max_new):
            if stop_at_eos:  # one host read per step, only when the caller wants early stops
                for row, tok in enumerate(tokens[:, 0].tolist()):
                    if not done[row] and tok in eos:
                        done[row], lengths[row] = True, t
                if all(done):
                    break
                positions[torch.tensor(done, device=dev)] = -1
            hidden, greedy_ids = self.step(tokens, positions)
            tokens = self._pick(hidden, greedy_ids, params, gen)
            produced[:, t] = tokens[:, 0]
            positions = torch.where(positions >= 0, positions + 1, positions)
            steps += 1
        _sync(dev)
        out.decode_seconds += time.perf_counter() - t1
        rows = produced.tolist()
        for row, i in enumerate(idx):
            n = min(lengths[row], steps + 1)
            out.tokens[i] = rows[row][:n]
            out.decode_tokens += n - 1
        out.verify_steps += steps * len(prompts)
