"""JSON shapes of logprobs in responses: the OpenAI completions and chat layouts, vLLM's prompt_logprobs."""
from __future__ import annotations

from typing import Any

from .streams import Choice
from .text import TextAssembler

TokenLogprobs = list[tuple[int, float | None, list[tuple[int, float]] | None]]


def completion_logprobs_for(entries: TokenLogprobs, text: TextAssembler, offset: int = 0) -> dict[str, Any]:
    """Legacy completions layout: parallel lists tokens / token_logprobs / top_logprobs / text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for tok, lp, top in entries:
        s = text.token_text(tok)
        tokens.append(s)
        lps.append(lp)
        tops.append({text.token_text(t): v for t, v in top} if top else None)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_logprobs(choice: Choice, text: TextAssembler) -> dict[str, Any]:
    return completion_logprobs_for(choice.logprobs, text)


def chat_logprobs_for(entries: TokenLogprobs, text: TextAssembler) -> dict[str, Any]:
    content = []
    for tok, lp, top in entries:
        s = text.token_text(tok)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [{"token": text.token_text(t), "logprob": v,
                                          "bytes": list(text.token_text(t).encode("utf-8"))} for t, v in top or []]})
    return {"content": content}


def chat_logprobs(choice: Choice, text: TextAssembler) -> dict[str, Any]:
    return chat_logprobs_for(choice.logprobs, text)


def prompt_logprobs_json(entries: list[dict[int, dict] | None] | None, text: TextAssembler) -> list | None:
    """vLLM layout: [None, {"<token id>": {"logprob", "rank", "decoded_token"}}, ...] (JSON keys are strings)."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {**v, "decoded_token": text.token_text(t)} for t, v in e.items()}
            for e in entries]
