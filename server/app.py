"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, metrics.

Handlers only validate, tokenize and format; generation happens on the engine thread (server/scheduler.py).
Every error, including unknown routes, has the OpenAI body {"error": {message, type, param, code}}.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import UserError
from engine.knobs import MAX_DRAFT_TOKENS
from engine.sampling import SamplingParams

from .metrics import Metrics
from .protocol import ApiError, ChatRequest, CompletionRequest, parse
from .render import (chat_logprobs, chat_logprobs_for, completion_logprobs, completion_logprobs_for,
                     prompt_logprobs_json)
from .scheduler import Scheduler
from .streams import Choice, StreamSet

MAX_BODY_BYTES = 16 * 2**20


@dataclass
class ServingState:
    scheduler: Scheduler
    metrics: Metrics
    tokenizer: Any
    model_names: tuple[str, ...]  # first = the id reported; any of them is accepted in "model"
    vocab_size: int
    max_context: int
    eos: set[int]
    recipe_sha256: str


class _StatusRecorder:
    """ASGI middleware: count every HTTP response by endpoint and status (streams too)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.add_request(path, int(message["status"]))
            await send(message)
        await self.app(scope, receive, send_wrapper)


_KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _json_body(request: Request) -> Any:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


def create_app(state: ServingState) -> Any:
    """The ASGI app: FastAPI routes wrapped in the status-counting middleware."""
    app = FastAPI(title="vkae-tune serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(ApiError(exc.status_code, str(exc.detail), type_=kind))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return _error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"))

    @app.get("/health")
    async def health() -> Response:
        if state.scheduler.alive():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped", "error": repr(state.scheduler.error)}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": state.model_names[0], "object": "model", "created": int(state.metrics.started),
            "owned_by": "vkae-tune", "max_model_len": state.max_context, "recipe_sha256": state.recipe_sha256}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse(CompletionRequest, await _json_body(request))
        _check_model(state, req.model)
        prompts = [_prompt_ids(state, p) for p in req.prompts()]
        max_tokens = _check_length(state, prompts, req.max_tokens)
        streams = StreamSet(state.scheduler, state.tokenizer, state.eos)
        streams.submit(prompts, max_tokens=max_tokens, sampling=_sampling(req), stops=req.stop_list(),
                       ignore_eos=req.ignore_eos, logprobs=req.logprobs, prompt_logprobs=req.prompt_logprobs)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model}
        if req.stream:
            return _sse(_completion_chunks(state, streams, meta, req), streams)
        try:
            await streams.collect()
        finally:
            streams.cancel()
        choices = []
        for c in streams.choices:
            choice: dict[str, Any] = {
                "index": c.index, "text": c.text.sent, "finish_reason": c.finish_reason,
                "logprobs": completion_logprobs(c, c.text) if req.logprobs is not None else None}
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs_json(c.prompt_logprobs, c.text)
            if req.return_token_ids:
                choice.update(prompt_token_ids=c.prompt, token_ids=c.token_ids)
            choices.append(choice)
        return JSONResponse({**meta, "choices": choices, "usage": _usage(streams.choices)})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req: ChatRequest = parse(ChatRequest, await _json_body(request))
        _check_model(state, req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if state.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: chat needs one (use /v1/completions with token ids)")
        try:
            ids = state.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages],
                                                      add_generation_prompt=True)
        except UserError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        max_tokens = _check_length(state, [ids], req.token_limit())
        streams = StreamSet(state.scheduler, state.tokenizer, state.eos)
        streams.submit([ids], max_tokens=max_tokens, sampling=_sampling(req), stops=req.stop_list(),
                       ignore_eos=req.ignore_eos, logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                       prompt_logprobs=None)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model}
        if req.stream:
            return _sse(_chat_chunks(streams, meta, req), streams)
        try:
            await streams.collect()
        finally:
            streams.cancel()
        c = streams.choices[0]
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": c.text.sent},
                                  "logprobs": chat_logprobs(c, c.text) if req.logprobs else None,
                                  "finish_reason": c.finish_reason}
        if req.return_token_ids:
            choice.update(prompt_token_ids=c.prompt, token_ids=c.token_ids)
        return JSONResponse({**meta, "choices": [choice], "usage": _usage(streams.choices)})

    return _StatusRecorder(app, state.metrics)  # type: ignore[return-value]


# ---- request checks --------------------------------------------------------------------
def _check_model(state: ServingState, model: str) -> None:
    if model not in state.model_names:
        raise ApiError(404, f"model '{model}' does not exist; this server serves '{state.model_names[0]}'",
                       param="model", code="model_not_found")


def _prompt_ids(state: ServingState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if state.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return state.tokenizer.encode(prompt)
    bad = [t for t in prompt if not 0 <= t < state.vocab_size]
    if bad:
        raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {state.vocab_size})",
                       param="prompt")
    return prompt


def _check_length(state: ServingState, prompts: list[list[int]], max_tokens: int | None) -> int:
    """The engine's own rule (Generator.generate): prompt + max_tokens + draft headroom must fit the context."""
    longest = max(len(p) for p in prompts)
    room = state.max_context - longest - MAX_DRAFT_TOKENS - 1
    if room < 1:
        raise ApiError(400, f"prompt of {longest} tokens is longer than this server's context ({state.max_context}"
                       f" tokens, {MAX_DRAFT_TOKENS + 1} kept for speculative drafts and at least 1 output token)",
                       param="prompt", code="context_length_exceeded")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ApiError(400, f"max_tokens={max_tokens} does not fit: the prompt ({longest} tokens) leaves {room} of"
                       f" the {state.max_context}-token context", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _sampling(req: CompletionRequest | ChatRequest) -> SamplingParams:
    return SamplingParams(temperature=req.temperature, top_k=max(0, req.top_k), top_p=req.top_p, seed=req.seed)


def _usage(choices: list[Choice]) -> dict[str, int]:
    prompt = sum(len(c.prompt) for c in choices)
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- streaming -------------------------------------------------------------------------
def _sse(chunks: AsyncIterator[dict], streams: StreamSet) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:  # client gone or stream over: free the batch rows
            streams.cancel()
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _stream_error(choice: Choice) -> dict:
    return ApiError(503, choice.error or "engine error", type_="server_error", code="engine_unavailable").body()


async def _completion_chunks(state: ServingState, streams: StreamSet, meta: dict, req: CompletionRequest
                             ) -> AsyncIterator[dict]:
    async for d in streams.deltas():
        c = d.choice
        if c.error:
            yield _stream_error(c)
            return
        if not d.text and not d.tokens and not d.finished:
            continue
        choice: dict[str, Any] = {"index": c.index, "text": d.text, "finish_reason": c.finish_reason if d.finished
                                  else None, "logprobs": None}
        if req.logprobs is not None and d.tokens:
            choice["logprobs"] = completion_logprobs_for(c.logprobs[-len(d.tokens):], c.text)
        if req.return_token_ids:
            choice["token_ids"] = d.tokens
        if req.prompt_logprobs is not None and len(c.token_ids) == len(d.tokens) and d.tokens:
            choice["prompt_logprobs"] = prompt_logprobs_json(c.prompt_logprobs, c.text)
        yield {**meta, "choices": [choice]}
    if req.stream_options is not None and req.stream_options.include_usage:
        yield {**meta, "choices": [], "usage": _usage(streams.choices)}


async def _chat_chunks(streams: StreamSet, meta: dict, req: ChatRequest) -> AsyncIterator[dict]:
    meta = {**meta, "object": "chat.completion.chunk"}
    yield {**meta, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    async for d in streams.deltas():
        c = d.choice
        if c.error:
            yield _stream_error(c)
            return
        if not d.text and not d.finished and not ((req.logprobs or req.return_token_ids) and d.tokens):
            continue  # nothing the client asked for changed (e.g. a token whose text is held back)
        choice: dict[str, Any] = {"index": 0, "delta": {"content": d.text} if d.text else {},
                                  "finish_reason": c.finish_reason if d.finished else None}
        if req.logprobs and d.tokens:
            choice["logprobs"] = chat_logprobs_for(c.logprobs[-len(d.tokens):], c.text)
        if req.return_token_ids:
            choice["token_ids"] = d.tokens
        yield {**meta, "choices": [choice]}
    if req.stream_options is not None and req.stream_options.include_usage:
        yield {**meta, "choices": [], "usage": _usage(streams.choices)}
