"""A byte-level tokenizer for the tiny built-in test models (ids 0-2 are pad/eos/bos, bytes at 3..258)."""
from __future__ import annotations

from typing import Sequence

OFFSET = 3


class ByteTokenizer:
    bos_id = 2
    eos_ids = (1,)
    pad_id = 0
    vocab_size = 256 + OFFSET

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [b + OFFSET for b in text.encode("utf-8")]
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - OFFSET for i in ids if OFFSET <= i < 256 + OFFSET)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<model>"
        return self.encode(text)


class IdsOnlyTokenizer:
    """Stands in for the tokenizer of a geometry-only random-weight model: token-id workloads (synthetic
    prompts, JSONL ids) work; anything that needs text fails with a clear message."""

    def __init__(self, vocab_size: int, bos_id: int, eos_ids: tuple[int, ...], model: str) -> None:
        self.vocab_size, self.bos_id, self.eos_ids, self.pad_id, self.model = vocab_size, bos_id, eos_ids, 0, model

    def _no_text(self, *_: object, **__: object):
        from .errors import UserError

        raise UserError(f"{self.model}: random weights at this geometry come without a tokenizer; "
                        "use token-id prompts (synthetic or prompt_token_ids)")

    encode = decode = apply_chat_template = _no_text
