"""Output text of one stream: incremental decoding with stop strings, safe for streaming.

Byte-level and SentencePiece-style tokens only form valid UTF-8 (and the right leading spaces) in context,
so each new token is decoded together with the tokens since the last complete character boundary, behind
one token of already-decoded context: constant work per token, where re-decoding every output id each time
costs O(n^2) over a long completion. What is sent is held back while it could still turn into a stop
string, or while it ends in an incomplete UTF-8 sequence (U+FFFD), so a streamed client never receives
text it must take back.
"""
from __future__ import annotations

from typing import Any, Sequence


class TextAssembler:
    def __init__(self, tokenizer: Any, stops: Sequence[str], eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.eos = eos_ids
        self.ids: list[int] = []  # output ids without EOS: what the text is decoded from
        self.sent = ""  # text already handed out
        self.stopped = False  # a stop string was found: the stream must end
        self._stable = ""  # decoded text of ids[:self._read], which ends on a complete character
        self._context = 0  # ids[self._context:self._read] are re-decoded as context for the new ids
        self._read = 0
        self._longest_stop = max((len(x) for x in self.stops), default=0)

    def _decode(self) -> str:
        """The text of every output id so far."""
        if self.tokenizer is None:
            return ""
        head = self.tokenizer.decode(self.ids[self._context:self._read])
        full = self.tokenizer.decode(self.ids[self._context:])
        if not full.startswith(head):  # a decoder that rewrites earlier text: decode everything (rare)
            text = self.tokenizer.decode(self.ids)
        else:
            text = self._stable + full[len(head):]
        if not text.endswith("\ufffd"):
            self._stable, self._context, self._read = text, self._read, len(self.ids)
        return text

    def add(self, token_id: int) -> str:
        """Add one output token; return the new text that is safe to send now."""
        if token_id not in self.eos:
            self.ids.append(token_id)
        text = self._decode()
        if self.stops:
            # a stop string cannot start inside the sent text (a suffix that could begin one is held back)
            start = max(0, len(self.sent) - self._longest_stop)
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
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
