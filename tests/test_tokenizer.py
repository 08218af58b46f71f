"""The shipped Gemma 3 tokenizer gives Google's ids (NOTICE example, WikiText-2 counts, chat template)."""
from __future__ import annotations

import hashlib
import json
import lzma
import shutil
from pathlib import Path

import pytest

from engine.errors import ModelRefError
from engine.tokenizer import (
    ASSETS_DIR,
    GEMMA3_TOKENIZER_DIR,
    decompressed_tokenizer_json,
    load_gemma3_tokenizer,
    load_tokenizer,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_TEST = SHARED / "wikitext-2-raw" / "wiki.test.raw"
FOX = "The quick brown fox jumps over the lazy dog."
FOX_IDS = [2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761]  # from the tokenizer's NOTICE.md


@pytest.fixture(scope="module")
def tok():
    return load_gemma3_tokenizer()


def test_shipped_files_are_googles(tmp_path: Path) -> None:
    # The NOTICE pins the decompressed tokenizer.json's sha256; the engine must ship exactly that.
    raw = lzma.decompress((GEMMA3_TOKENIZER_DIR / "tokenizer.json.xz").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"
    assert (GEMMA3_TOKENIZER_DIR / "NOTICE.md").read_text().startswith("# Gemma 3 tokenizer: notice")


def test_notice_example(tok) -> None:
    assert tok.encode(FOX) == FOX_IDS
    assert tok.encode(FOX, add_bos=False) == FOX_IDS[1:]
    assert tok.decode(FOX_IDS[1:]) == FOX
    assert tok.decode(FOX_IDS) == "<bos>" + FOX
    assert tok.decode(FOX_IDS, skip_special_tokens=True) == FOX


def test_special_ids(tok) -> None:
    assert tok.bos_id == 2
    assert tok.token_to_id("<eos>") == 1 and tok.token_to_id("<end_of_turn>") == 106
    assert tok.eos_ids == (1, 106)
    assert tok.pad_id == 0
    assert tok.vocab_size == 262145  # 262,144 model rows + <image_soft_token>


@pytest.mark.skipif(not WIKI_TEST.is_file(), reason="needs shared/data/wikitext-2-raw")
def test_wikitext2_test_count(tok) -> None:
    assert len(tok.encode(WIKI_TEST.read_text(encoding="utf-8"), add_bos=False)) == 295_215


def test_wikitext_slice(tok) -> None:
    data = (ASSETS_DIR / "wikitext2_test_slice.txt").read_bytes()
    license_text = (ASSETS_DIR / "WIKITEXT_LICENSE.md").read_text()
    assert hashlib.sha256(data).hexdigest() in license_text and f"{len(data):,} bytes" in license_text
    ids = tok.encode(data.decode("utf-8"), add_bos=False)
    assert 8 * 1023 + 1 <= len(ids) <= 8 * 1023 + 1 + 400  # enough for 8 windows, with a small margin
    if WIKI_TEST.is_file():
        full = WIKI_TEST.read_bytes()
        assert full.startswith(data)
        # Cut on a line boundary, so the slice's tokens are the full file's first tokens.
        assert ids == tok.encode(full[: len(data) + 20000].decode("utf-8"), add_bos=False)[: len(ids)]


def test_chat_template(tok) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there "},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
    ]
    text = tok.render_chat(msgs)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a color.<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = tok.apply_chat_template(msgs)
    assert ids[:4] == [2, 105, 2364, 107]  # <bos> <start_of_turn> user \n: one <bos>, not two
    assert ids.count(2) == 1 and ids[-3:] == [105, 4368, 107]  # ends with "<start_of_turn>model\n"
    assert tok.decode(ids) == text
    no_prompt = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert no_prompt == ids[:-3]
    with pytest.raises(ModelRefError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_matches_transformers_chat_template(tok, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    shutil.copy(decompressed_tokenizer_json(GEMMA3_TOKENIZER_DIR / "tokenizer.json.xz"), tmp_path / "tokenizer.json")
    shutil.copy(GEMMA3_TOKENIZER_DIR / "tokenizer_config.json", tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " 4 "},
            {"role": "user", "content": "And 3+3?"}]
    assert tok.render_chat(msgs) == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok.encode("  Spaces\tand\nnewlines\n\n", add_bos=True) == ref("  Spaces\tand\nnewlines\n\n")["input_ids"]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelRefError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    shutil.copy(GEMMA3_TOKENIZER_DIR / "tokenizer.json.xz", tmp_path)
    with pytest.raises(ModelRefError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    cfg = json.loads((GEMMA3_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)  # .xz is read through the decompression cache
    assert tok.encode(FOX) == FOX_IDS
    with pytest.raises(ModelRefError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
