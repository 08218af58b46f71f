"""Prompt-lookup (n-gram) drafter: no weights; proposes the tokens that followed the most recent
earlier occurrence of the stream's last n tokens (n = max_n .. 1), in the prompt or the output so far."""
from __future__ import annotations

from typing import Sequence


class NgramIndex:
    """Per-stream index: n-gram -> index of the token that followed its latest occurrence.

    Updated incrementally as tokens are appended, so a lookup costs O(max_n) instead of a scan."""

    def __init__(self, tokens: Sequence[int], max_n: int = 3) -> None:
        self.max_n = max_n
        self.tokens: list[int] = []
        self.follow: list[dict[tuple[int, ...], int]] = [dict() for _ in range(max_n + 1)]
        self.extend(tokens)

    def extend(self, new: Sequence[int]) -> None:
        for t in new:
            i = len(self.tokens)
            for n in range(1, self.max_n + 1):
                if i >= n:  # the n-gram ending just before token i is followed by token i
                    self.follow[n][tuple(self.tokens[i - n:i])] = i
            self.tokens.append(int(t))

    def propose(self, k: int) -> list[int] | None:
        """Up to k continuation tokens, or None when no suffix of length max_n..1 occurred before."""
        toks = self.tokens
        for n in range(min(self.max_n, len(toks)), 0, -1):
            start = self.follow[n].get(tuple(toks[-n:]))
            if start is not None:
                return toks[start:start + k]
        return None


def propose_padded(index: NgramIndex, k: int, pad: int) -> tuple[list[int], bool]:
    """Exactly k tokens (a static verify width): short proposals repeat their last token; a stream with
    no match proposes `pad` tokens, which verification simply rejects."""
    got = index.propose(k)
    if not got:
        return [pad] * k, False
    return got + [got[-1]] * (k - len(got)), True
