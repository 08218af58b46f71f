"""The bridge between HTTP handlers (asyncio) and the engine thread: submit requests, receive their events.

Each prompt of a request becomes one engine stream ("choice"). The engine thread appends events to a
deque and wakes the event loop at most once per batch of events (one `call_soon_threadsafe` while no wake-up
is pending, not one per token): a speculative step commits several tokens at once, and every wake-up costs
a syscall plus a GIL hand-over that the engine thread would otherwise wait for. The engine thread never
blocks on a slow client. A `Choice` accumulates what the response needs: text (via TextAssembler and its
stop strings), token ids, logprobs, finish reason.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from engine.sampling import SamplingParams

from .protocol import ApiError
from .scheduler import DoneEvent, ErrorEvent, GenRequest, PromptLogprobsEvent, Scheduler, TokenEvent
from .text import TextAssembler


@dataclass
class Choice:
    index: int
    prompt: list[int]
    text: TextAssembler
    req: GenRequest | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, dict] | None] | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Delta:
    """What one event changed in one choice: new text and the tokens behind it."""

    choice: Choice
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finished: bool = False


class StreamSet:
    """All choices of one HTTP request."""

    def __init__(self, scheduler: Scheduler, tokenizer: Any, eos: set[int]) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos = eos
        self.loop = asyncio.get_running_loop()
        self.events: collections.deque[tuple[int, Any]] = collections.deque()  # appended on the engine thread
        self._ready = asyncio.Event()  # set on the loop when events may be waiting
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self.choices: list[Choice] = []

    def _sink(self, index: int):
        def put(event: Any) -> None:
            self.events.append((index, event))
            with self._wake_lock:
                if self._wake_pending:
                    return  # the loop has not run the last wake-up yet: it will see this event too
                self._wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                pass
        return put

    def _wake(self) -> None:  # on the event loop
        with self._wake_lock:
            self._wake_pending = False
        self._ready.set()

    async def _next_event(self) -> tuple[int, Any]:
        while not self.events:
            self._ready.clear()
            if self.events:  # appended between the check and the clear: its wake-up may already have run
                break
            await self._ready.wait()
        return self.events.popleft()

    def submit(self, prompts: list[list[int]], *, max_tokens: int, sampling: SamplingParams, stops: list[str],
               ignore_eos: bool, logprobs: int | None, prompt_logprobs: int | None) -> None:
        for i, prompt in enumerate(prompts):
            choice = Choice(i, prompt, TextAssembler(self.tokenizer, stops, self.eos))
            # each prompt of a batch gets its own seed offset, so seeded batch prompts do not repeat each other
            params = sampling if sampling.seed is None or i == 0 else SamplingParams(
                sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed + i)
            choice.req = GenRequest(prompt, max_tokens, params, self._sink(i), ignore_eos=ignore_eos,
                                    logprobs=logprobs, prompt_logprobs=prompt_logprobs)
            self.choices.append(choice)
        for choice in self.choices:
            try:
                self.scheduler.submit(choice.req)
            except RuntimeError as exc:
                self.cancel()
                raise ApiError(503, f"{exc}", type_="server_error", code="engine_unavailable") from None

    def cancel(self) -> None:
        for c in self.choices:
            if c.req is not None:
                c.req.cancelled.set()

    async def deltas(self) -> AsyncIterator[Delta]:
        """Yield per-event changes until every choice is done (a stop string ends a choice at once)."""
        while not all(c.done for c in self.choices):
            index, event = await self._next_event()
            choice = self.choices[index]
            if choice.done:
                continue  # events after a stop string: the engine has not seen the cancel yet
            if isinstance(event, TokenEvent):
                choice.token_ids.append(event.token_id)
                choice.logprobs.append((event.token_id, event.logprob, event.top))
                text = choice.text.add(event.token_id)
                if choice.text.stopped:
                    choice.finish_reason = "stop"
                    choice.req.cancelled.set()  # frees the batch row before its next step
                yield Delta(choice, text, [event.token_id], finished=choice.done)
            elif isinstance(event, PromptLogprobsEvent):
                choice.prompt_logprobs = event.entries
            elif isinstance(event, DoneEvent):
                choice.finish_reason = "stop" if event.finish_reason == "cancelled" else event.finish_reason
                yield Delta(choice, choice.text.finish(), [], finished=True)
            elif isinstance(event, ErrorEvent):
                choice.error = event.message
                yield Delta(choice, "", [], finished=True)

    async def collect(self) -> None:
        async for _ in self.deltas():
            pass
        errors = [c.error for c in self.choices if c.error]
        if errors:
            raise ApiError(503, errors[0], type_="server_error", code="engine_unavailable")
