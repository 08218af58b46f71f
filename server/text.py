"""Output text of one stream: incremental decoding with stop strings, safe for streaming.

Text is re-decoded from all output ids each time (byte-level and SentencePiece-style tokens only form
valid UTF-8 in context). What is sent is held back while it could still turn into a stop string, or while it
ends in an incomplete UTF-8 sequence (U+FFFD), so a streamed client never receives text it must take back.
"""
from __future__ import annotations

from typing import Any, Sequence


class TextAssembler:
    def __init__(self, tokenizer: Any, stops: Sequence[str], eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.eos = eos_ids
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.stopped = False  # a stop string was found: the stream must end

    def _decode(self) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([i for i in self.ids if i not in self.eos])

    def add(self, token_id: int) -> str:
        """Add one output token; return the new text that is safe to send now."""
        self.ids.append(token_id)
        text = self._decode()
        if self.stops:
            hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                return self._take(text[:min(hits)])
        safe = len(text)
        for s in self.stops:  # hold back a suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(text[:safe])

    def finish(self) -> str:
        """At the end of the stream: whatever was held back (unless a stop string cut it)."""
        if self.stopped:
            return ""
        return self._take(self._decode())

    def _take(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id])
