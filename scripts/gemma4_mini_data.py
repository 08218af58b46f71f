"""Data for gemma-4-mini: split the Debian-docs corpus, train its tokenizer, encode both splits.

    bash ../shared/data/corpus/make_corpus.sh /tmp/corpus.txt
    python scripts/gemma4_mini_data.py /tmp/corpus.txt --out .stage/mini-data

Writes to --out: tokenizer.json + tokenizer_config.json (byte-level BPE, 8,192 ids, Gemma's special
ids: <pad> 0, <eos> 1, <bos> 2), train.u16 / heldout.u16 (token ids, every document-chunk starting
with <bos>), heldout.txt and data.json (corpus sha256, split rule, token counts, unigram baseline).

Split rule (deterministic): the corpus is cut into chunks of about 64 KiB at line boundaries; every
32nd chunk (index % 32 == 7) is held out. Held-out text is never seen by the tokenizer or the model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 8192  # 64 clusters of 128 tokens for the assistant's clustered head
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CHUNK_BYTES = 64 * 1024
HELDOUT_EVERY, HELDOUT_AT = 32, 7

# Gemma-style turns; <bos> is written by the template itself (as Gemma's own template does).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def split_chunks(text: str) -> tuple[list[str], list[str]]:
    """Cut at line boundaries into ~64 KiB chunks; every 32nd chunk is held out."""
    train, held, buf, size, index = [], [], [], 0, 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            (held if index % HELDOUT_EVERY == HELDOUT_AT else train).append("".join(buf))
            buf, size, index = [], 0, index + 1
    if buf:
        (held if index % HELDOUT_EVERY == HELDOUT_AT else train).append("".join(buf))
    return train, held


def train_tokenizer(chunks: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((line for c in chunks for line in c.splitlines(keepends=True)), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} ids, wanted {VOCAB_SIZE}")
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_config() -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
            "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
            "model_max_length": 4096, "chat_template": CHAT_TEMPLATE}


def encode_chunks(tok: Tokenizer, chunks: list[str]) -> np.ndarray:
    bos = tok.token_to_id("<bos>")
    out: list[int] = []
    for enc in tok.encode_batch(chunks, add_special_tokens=False):
        out.append(bos)
        out.extend(enc.ids)
    return np.asarray(out, dtype=np.uint16)


def unigram_ppl(train: np.ndarray, held: np.ndarray, vocab: int) -> float:
    """Add-one smoothed unigram model of the training tokens, scored on held-out tokens after each <bos>."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    scored = held[1:]  # every token but the first, as the model's PPL scores them
    return float(math.exp(-logp[scored].mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    raw = args.corpus.read_bytes()
    text = raw.decode("utf-8")
    train, held = split_chunks(text)
    tok = train_tokenizer(train)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"))
    (args.out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    tr, he = encode_chunks(tok, train), encode_chunks(tok, held)
    tr.tofile(args.out / "train.u16")
    he.tofile(args.out / "heldout.u16")
    (args.out / "heldout.txt").write_text("".join(held), encoding="utf-8")
    info = {
        "corpus_bytes": len(raw), "corpus_sha256": hashlib.sha256(raw).hexdigest(),
        "split": f"~{CHUNK_BYTES} B line-aligned chunks; chunk i held out when i % {HELDOUT_EVERY} == {HELDOUT_AT}",
        "train_chunks": len(train), "heldout_chunks": len(held),
        "train_bytes": sum(len(c.encode()) for c in train), "heldout_bytes": sum(len(c.encode()) for c in held),
        "train_tokens": int(tr.size), "heldout_tokens": int(he.size), "vocab_size": VOCAB_SIZE,
        "heldout_unigram_ppl": unigram_ppl(tr, he, VOCAB_SIZE),
    }
    (args.out / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
