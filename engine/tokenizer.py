"""Text tokenizer for Gemma model folders (Hugging Face `tokenizer.json` + `tokenizer_config.json`).

We do not use transformers' tokenizers here: its GGUF tokenizer for Gemma 3 (5.17) produces wrong ids
(see the field notes), and the engine only needs encode/decode/chat-template, which the `tokenizers`
library and `jinja2` give us directly from Google's files.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer

from .errors import ModelRefError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# Google's Gemma 3 tokenizer, shipped with the engine (Gemma Terms of Use: see its NOTICE.md).
GEMMA3_TOKENIZER_DIR = ASSETS_DIR / "gemma3-tokenizer"


def cache_root() -> Path:
    """Root of vkae-tune's on-disk cache: `$VKAE_CACHE` if set, else `~/.cache/vkae-tune`."""
    env = os.environ.get("VKAE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vkae-tune"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decompressed_tokenizer_json(xz_path: Path) -> Path:
    """Decompress `tokenizer.json.xz` once into the cache (keyed by the .xz sha256) and return the path.

    Decompressing 33 MB of JSON costs about a second; doing it once per machine keeps every later
    load at plain `Tokenizer.from_file` speed. The write is atomic so concurrent workers never read
    a half-written file.
    """
    key = _sha256_file(xz_path)[:16]
    target = cache_root() / "tokenizers" / key / "tokenizer.json"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tokenizer.json.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, lzma.open(xz_path, "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def _raise_exception(message: str) -> None:
    # The Gemma chat template calls raise_exception(...) for malformed conversations.
    raise ModelRefError(f"chat template: {message}")


class TextTokenizer:
    """Encode/decode with a `tokenizers.Tokenizer` plus the model's special tokens and chat template."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any], source: str) -> None:
        self._tok = tokenizer
        self._config = config
        self.source = source
        self.bos_id: int = self._special_id("bos_token")
        # Generation stops at the configured eos token (<end_of_turn> in the instruction-tuned
        # config) and also at plain <eos>: base-model continuations end with <eos>, chat turns with
        # <end_of_turn>; Google's generation_config lists both for Gemma 3.
        eos = {self._special_id("eos_token")}
        plain_eos = tokenizer.token_to_id("<eos>")
        if plain_eos is not None:
            eos.add(plain_eos)
        self.eos_ids: tuple[int, ...] = tuple(sorted(eos))
        pad = self._token_text("pad_token")
        self.pad_id: int | None = tokenizer.token_to_id(pad) if pad else None
        self._template: str | None = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
        self._jinja: Any = None

    def _token_text(self, key: str) -> str | None:
        value = self._config.get(key)
        if isinstance(value, dict):  # older configs store AddedToken dicts
            value = value.get("content")
        return value

    def _special_id(self, key: str) -> int:
        text = self._token_text(key)
        tid = self._tok.token_to_id(text) if text else None
        if tid is None:
            raise ModelRefError(f"{self.source}: tokenizer_config.json has no usable {key} ({text!r})")
        return tid

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit, added tokens included.

        For Gemma 3 this is 262,145: one more than the model's 262,144 embedding rows, because
        `<image_soft_token>` (262144) is a multimodal placeholder that text never produces.
        """
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # Special tokens are added by hand rather than by the post-processor so `add_bos` means
        # exactly one leading <bos>, whatever the tokenizer.json's template says.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template rendered to text, as transformers' `apply_chat_template(tokenize=False)`."""
        if self._template is None:
            raise ModelRefError(
                f"{self.source}: tokenizer_config.json has no chat_template; this tokenizer cannot format "
                "chat messages (use encode() on plain text instead)"
            )
        if self._jinja is None:
            # Same environment settings as transformers uses for chat templates, so whitespace
            # handling (trim_blocks/lstrip_blocks) renders identically.
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._jinja = env.from_string(self._template)
        special = {k: self._token_text(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes <bos> itself, so no extra BOS is added when encoding.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)


def load_tokenizer(folder: Path) -> TextTokenizer:
    """Load the tokenizer of a model folder: `tokenizer.json` (or `.json.xz`) + `tokenizer_config.json`."""
    folder = Path(folder)
    plain, packed = folder / "tokenizer.json", folder / "tokenizer.json.xz"
    if plain.is_file():
        tok_path = plain
    elif packed.is_file():
        tok_path = decompressed_tokenizer_json(packed)
    else:
        raise ModelRefError(f"{folder}: no tokenizer.json or tokenizer.json.xz")
    cfg_path = folder / "tokenizer_config.json"
    if not cfg_path.is_file():
        raise ModelRefError(f"{folder}: no tokenizer_config.json (needed for bos/eos ids and the chat template)")
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except Exception as exc:  # a corrupt file: say which one instead of a bare JSON/Rust error
        raise ModelRefError(f"{folder}: cannot read tokenizer files: {exc}") from exc
    return TextTokenizer(tokenizer, config, source=str(folder))


def load_gemma3_tokenizer() -> TextTokenizer:
    """Google's Gemma 3 tokenizer shipped in engine/assets."""
    return load_tokenizer(GEMMA3_TOKENIZER_DIR)
