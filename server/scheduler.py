"""The engine loop: one background thread owns the model and runs continuous batching over its cache rows.

HTTP handlers `submit()` requests and receive events through a callback; they never touch the model. The
loop admits a waiting request whenever a cache row is free (prefill into that row while the other rows keep
their decoding state), then advances every busy row by one token with one batched `Generator.step`. A row
that finishes (EOS, max_tokens, or cancelled by its client, e.g. on a stop string) is freed at once and can
take the next request before the next step: that is the continuous batching, up to the recipe's batch_size.

Greedy rows take the step's argmax ids, exactly as `Generator.generate` does, so greedy output through the
server equals `worker.generate` / `vkae-tune generate` for the same prompt. Sampled rows draw from
`filtered_probs` with a per-request torch.Generator, so a seeded request is reproducible whatever else
shares the batch.

Speculative recipes (draft_tokens > 0): greedy requests without per-token logprobs get per-stream
speculative decoding inside the same continuous batching (`engine.speculative.SpeculativeRows`: each row
accepts its own number of drafted tokens per verify step; tokens stream as they are committed). Sampled
requests and requests for logprobs run, once the speculative rows have drained, through
`Generator.generate` one wave (up to batch_size requests of the same sampling settings) at a time.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from engine.errors import UserError
from engine.generate import Generator
from engine.sampling import SamplingParams, filtered_probs, sample
from engine.speculative import SpeculativeRows

from .logprobs import prompt_logprobs, token_logprobs
from .metrics import Metrics


@dataclass
class TokenEvent:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptLogprobsEvent:
    entries: list[dict[str, Any] | None]  # vLLM layout: None for the first prompt token


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" (EOS), "length" (max_tokens), "cancelled"


@dataclass
class ErrorEvent:
    message: str


Event = TokenEvent | PromptLogprobsEvent | DoneEvent | ErrorEvent


@dataclass
class GenRequest:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    sink: Callable[[Event], None]  # called on the engine thread; must not block
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; N: chosen token's logprob plus the top N alternatives
    prompt_logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    req: GenRequest
    produced: int = 0
    gen: torch.Generator | None = None
    pending_logprobs: tuple[float, list[tuple[int, float]]] | None = None  # of the token about to be emitted


class Scheduler:
    """Owns `worker`'s Generator on one thread. `start()` once; `submit()` from any thread; `stop()` at exit."""

    def __init__(self, worker: Any, metrics: Metrics) -> None:
        self.worker = worker
        self.metrics = metrics
        self.g: Generator = worker.generator()
        self.batch = self.g.cache.batch
        self.eos = set(worker.loaded.arch.eos_token_ids)
        self.speculative = worker.knobs.draft_tokens > 0
        self.spec = SpeculativeRows(self.g, SamplingParams(), None) if self.speculative else None
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._rows: dict[int, _Row] = {}
        dev = self.g.device
        self._tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self._positions = torch.full((self.batch, 1), -1, dtype=torch.long, device=dev)
        self._thread = threading.Thread(target=self._run, name="vkae-engine", daemon=True)
        self.error: BaseException | None = None

    # ---- public ------------------------------------------------------------------------
    def capture_steps(self) -> tuple[int, int]:
        """Every step graph this scheduler can replay (busy rows x {decode, verify} width) and every
        prefill graph (one per prompt-length bucket), before the first request, as vLLM captures at
        start-up: otherwise the first request that meets a new shape stalls for a compile and capture.
        Call before `start()`. Returns how many (step, prefill) graphs were captured."""
        widths = (1, self.spec.k + 1) if self.speculative else (1,)
        return self.g.capture_steps(widths), self.g.capture_prefills()

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if self._stopping or self.error is not None:
                raise RuntimeError("the engine is not running")
            self._pending.append(req)
            self.metrics.set_queue(len(self._pending), len(self._rows))
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- loop --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not self._pending and not self._rows and not self._stopping:
                            self._cv.wait()
                        if self._stopping:
                            break
                    if self.speculative:
                        self._spec_admit()
                        if self._rows:
                            self._spec_step()
                    else:
                        self._admit()
                        if self._rows:
                            self._step()
                    self.metrics.set_queue(len(self._pending), len(self._rows))
        except BaseException as exc:  # noqa: BLE001 - tell every waiting client, then let /health say so
            self.error = exc
            self._fail_all(f"engine failure: {type(exc).__name__}: {exc}")
            raise
        finally:
            self._fail_all("server is shutting down")

    def _fail_all(self, message: str) -> None:
        with self._cv:
            waiting = list(self._pending) + [r.req for r in self._rows.values()]
            self._pending.clear()
            self._rows.clear()
        for req in waiting:
            req.sink(ErrorEvent(message))

    def _next_pending(self) -> GenRequest | None:
        with self._cv:
            while self._pending:
                req = self._pending.popleft()
                if not req.cancelled.is_set():
                    return req
            return None

    def _start(self, req: GenRequest, prefill: Callable[[], Any]) -> Any:
        """Prompt logprobs (when asked) and the prefill of one request. A request the HTTP checks let
        through but the engine rejects fails alone (returns None), not the engine."""
        try:
            if req.prompt_logprobs is not None:
                req.sink(PromptLogprobsEvent(prompt_logprobs(self.g.model, req.prompt, self.g.window,
                                                             req.prompt_logprobs)))
            return prefill()
        except UserError as exc:
            req.sink(ErrorEvent(str(exc)))
            return None

    def _admit(self) -> None:
        free = [r for r in range(self.batch) if r not in self._rows]
        for row in free:
            req = self._next_pending()
            if req is None:
                return
            last = self._start(req, lambda: self.g.prefill(req.prompt, row)[None, None])  # [1, 1, H]
            if last is None:
                continue
            state = _Row(req)
            if not req.sampling.greedy:
                state.gen = torch.Generator(device=self.g.device)
                state.gen.manual_seed(req.sampling.seed if req.sampling.seed is not None else torch.seed())
            self._rows[row] = state
            self.metrics.add_prompt(len(req.prompt), time.perf_counter() - req.submitted)
            token = self._choose(state, last[0], self.g.model.greedy(last)[0, 0].item())
            self._positions[row, 0] = len(req.prompt)
            self._emit(row, token)

    def _choose(self, state: _Row, hidden: torch.Tensor, greedy_id: int) -> int:
        """hidden [1, H] of this row -> the next token id (and its logprobs, sent with the token)."""
        req = state.req
        logits = None
        if not req.sampling.greedy or req.logprobs is not None:
            logits = self.g.model.logits(hidden)  # [1, V] fp32
        token = greedy_id if req.sampling.greedy else int(sample(filtered_probs(logits, req.sampling), state.gen)[0])
        state.pending_logprobs = token_logprobs(logits[0], token, req.logprobs) if req.logprobs is not None else None
        return token

    def _emit(self, row: int, token: int) -> None:
        state = self._rows[row]
        state.produced += 1
        lp = state.pending_logprobs
        state.req.sink(TokenEvent(token, *(lp if lp is not None else (None, None))))
        self.metrics.add_tokens(1)
        reason = None
        if token in self.eos and not state.req.ignore_eos:
            reason = "stop"
        elif state.produced >= state.req.max_tokens:
            reason = "length"
        if reason is not None:
            self._finish(row, reason)
        else:
            self._tokens[row, 0] = token

    def _finish(self, row: int, reason: str) -> None:
        state = self._rows.pop(row)
        self._positions[row, 0] = -1  # an idle row: the step skips it; the next prefill resets its cache
        if self.spec is not None:
            self.spec.release(row)
        state.req.sink(DoneEvent(reason))
        self.metrics.add_finished(reason)

    def _step(self) -> None:
        for row in [r for r, s in self._rows.items() if s.req.cancelled.is_set()]:
            self._finish(row, "cancelled")
        if not self._rows:
            return
        live = max(self._rows) + 1  # rows fill from 0 up: idle rows past the last busy one are not stepped
        hidden, greedy = self.g.step(self._tokens[:live], self._positions[:live])
        self._positions.add_(torch.where(self._positions >= 0, 1, 0))
        greedy_ids = greedy[:, 0].tolist()
        self.metrics.add_step(len(self._rows))
        for row in sorted(self._rows):
            state = self._rows[row]
            self._emit(row, self._choose(state, hidden[row], greedy_ids[row]))

    # ---- speculative recipes: per-stream speculation for greedy rows --------------------
    @staticmethod
    def _spec_eligible(req: GenRequest) -> bool:
        return req.sampling.greedy and req.logprobs is None

    def _spec_admit(self) -> None:
        for row in [r for r in range(self.batch) if r not in self._rows]:
            with self._cv:
                while self._pending and self._pending[0].cancelled.is_set():
                    self._pending.popleft()
                head = self._pending[0] if self._pending else None
            if head is None:
                return
            if not self._spec_eligible(head):
                if not self._rows:  # drained: the sampled / logprobs request runs as a wave of its own kind
                    self._wave()
                return  # otherwise wait for the speculative rows to finish, keeping the queue's order
            req = self._next_pending()
            if req is None:
                return
            token = self._start(req, lambda: self.spec.admit(row, req.prompt))
            if token is None:
                continue
            self._rows[row] = _Row(req)
            self.metrics.add_prompt(len(req.prompt), time.perf_counter() - req.submitted)
            self._emit_many(row, [token])

    def _emit_many(self, row: int, tokens: list[int]) -> None:
        """Emit a row's newly committed tokens in order, stopping at EOS, max_tokens or a cancel."""
        for token in tokens:
            if row not in self._rows:
                return
            self._rows[row].pending_logprobs = None
            self._emit(row, token)

    def _spec_step(self) -> None:
        for row in [r for r, s in self._rows.items() if s.req.cancelled.is_set()]:
            self._finish(row, "cancelled")
        if not self._rows:
            return
        committed = self.spec.step()  # one verify forward: each row committed 1 + its accepted drafts
        self.metrics.add_accepted(sum(len(t) for t in committed.values()), len(committed))
        for row in sorted(committed):
            self._emit_many(row, committed[row])

    # ---- sampled / logprobs requests of speculative recipes: waves through Generator.generate ----
    def _wave(self) -> None:
        first = self._next_pending()
        if first is None:
            return
        wave = [first]
        key = (first.sampling, first.ignore_eos)
        with self._cv:  # same sampling settings share one generate() call; a seeded request runs alone
            if first.sampling.greedy:
                for req in list(self._pending):
                    if len(wave) >= self.batch:
                        break
                    if (req.sampling, req.ignore_eos) == key and not req.cancelled.is_set():
                        self._pending.remove(req)
                        wave.append(req)
            self.metrics.set_queue(len(self._pending), len(wave))
        for req in wave:
            if req.prompt_logprobs is not None:
                req.sink(PromptLogprobsEvent(prompt_logprobs(self.g.model, req.prompt, self.g.window,
                                                             req.prompt_logprobs)))
            self.metrics.add_prompt(len(req.prompt), time.perf_counter() - req.submitted)
        out = self.g.generate([r.prompt for r in wave], max(r.max_tokens for r in wave), first.sampling,
                              stop_at_eos=not first.ignore_eos)
        self.metrics.add_accepted(out.decode_tokens, out.verify_steps)
        for req, tokens in zip(wave, out.tokens):
            tokens = tokens[:req.max_tokens]
            lps = self._score_output(req, tokens) if req.logprobs is not None else [(None, None)] * len(tokens)
            for tok, (lp, top) in zip(tokens, lps):
                req.sink(TokenEvent(tok, lp, top))
            self.metrics.add_tokens(len(tokens))
            reason = "stop" if tokens and tokens[-1] in self.eos and not req.ignore_eos else "length"
            req.sink(DoneEvent(reason))
            self.metrics.add_finished(reason)

    def _score_output(self, req: GenRequest, tokens: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
        """Logprobs of already generated tokens: teacher-forced over prompt + output (what decode computed)."""
        entries = prompt_logprobs(self.g.model, req.prompt + tokens, self.g.window, req.logprobs or 0)
        out = []
        for tok, entry in zip(tokens, entries[len(req.prompt):]):
            top = [(int(t), v["logprob"]) for t, v in entry.items() if v["rank"] <= (req.logprobs or 0)]
            out.append((entry[tok]["logprob"], sorted(top, key=lambda x: -x[1])))
        return out
