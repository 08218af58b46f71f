"""Reference perplexity of Gemma 3 270M (dequantized Q4_K_M) with transformers, for the engine to match.

What is measured: the WikiText-2 test slice shipped in engine/assets, tokenized with Google's Gemma 3
tokenizer without <bos>; window i is `[<bos>] + tokens[i*1023 : (i+1)*1023]` (consecutive,
non-overlapping), the first 8 windows; every token after the first of a window is scored
(8 x 1023 = 8184 tokens); PPL = exp(total NLL / scored tokens). transformers runs in fp32 on CPU
with eager attention, from the folder engine.gguf_import caches.

The same is repeated with `config.sliding_window` set to 512 (the model's own), 256, 128, 64, 32,
and 1024 (covers a whole window: every layer then attends causally to everything). The attention
mask a sliding layer and a full layer actually receive is captured with a hook and reported, so a
row whose mask did not change cannot pass silently.

Usage: python scripts/reference_ppl_gemma3.py [--windows 8] [--sliding 512,256,128,64,32,1024]
                                              [--out docs/reference_ppl_gemma3.txt]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.gguf_import import dequantized_weights_sha256, materialize_gemma3_270m  # noqa: E402
from engine.tokenizer import ASSETS_DIR, load_tokenizer  # noqa: E402

SLICE = ASSETS_DIR / "wikitext2_test_slice.txt"
WINDOW = 1024  # tokens per window, <bos> included
FIELD_NOTES_PPL_523 = 22.885  # transformers 5.23 on exactly this protocol (field notes), for comparison


class MaskProbe:
    """Records, per layer type, the most keys any query may attend to in the mask the layer gets."""

    def __init__(self, model: Any) -> None:
        self.window = model.config.sliding_window
        self.max_keys: dict[str, int] = {}
        self.exact: dict[str, bool] = {}
        self._handles = []
        types = model.config.layer_types
        for kind in ("sliding_attention", "full_attention"):
            if kind in types:
                layer = model.model.layers[types.index(kind)]
                self._handles.append(
                    layer.self_attn.register_forward_pre_hook(self._hook(kind), with_kwargs=True)
                )

    def _hook(self, kind: str) -> Any:
        def hook(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            mask = kwargs.get("attention_mask")
            if mask is None:  # no mask at all means unrestricted attention: record the sequence length
                self.max_keys[kind] = -1
                return
            # Eager attention adds a float mask (0 = attend, dtype-min = blocked); bool masks are allowed=True.
            allowed = (mask if mask.dtype == torch.bool else mask == 0)[0, 0]
            self.max_keys[kind] = int(allowed.sum(-1).max())
            # The whole pattern, not just its widest row: causal, and for sliding layers banded.
            q = torch.arange(allowed.shape[0])[:, None]
            k = torch.arange(allowed.shape[1])[None, :]
            expect = k <= q
            if kind == "sliding_attention":
                expect &= q - k < self.window
            self.exact[kind] = bool(torch.equal(allowed, expect))

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def load_model(folder: Path, sliding_window: int) -> Any:
    from transformers import AutoConfig, Gemma3ForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    config.sliding_window = sliding_window
    # A fresh model per window size: layers read config.sliding_window when they are built.
    model = Gemma3ForCausalLM.from_pretrained(
        str(folder), config=config, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def window_nll(model: Any, ids: list[int]) -> tuple[float, int]:
    x = torch.tensor([ids], dtype=torch.long)
    with torch.inference_mode():
        logits = model(input_ids=x).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
    return float(nll), len(ids) - 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--sliding", default="512,256,128,64,32,1024", help="comma-separated sliding windows")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "reference_ppl_gemma3.txt")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sliding.split(",") if s.strip()]

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    import transformers

    folder = materialize_gemma3_270m()
    source = json.loads((folder / "vkae_source.json").read_text())
    tok = load_tokenizer(folder)
    text = SLICE.read_bytes()
    tokens = tok.encode(text.decode("utf-8"), add_bos=False)
    need = args.windows * (WINDOW - 1) + 1
    if len(tokens) < need:
        raise SystemExit(f"{SLICE} gives {len(tokens)} tokens, fewer than the {need} needed")
    windows = [[tok.bos_id, *tokens[i * (WINDOW - 1):(i + 1) * (WINDOW - 1)]] for i in range(args.windows)]
    scored = args.windows * (WINDOW - 1)

    say("# Reference perplexity: Gemma 3 270M (gemma-3-270m Q4_K_M, dequantized) with transformers")
    say(f"transformers {transformers.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
        f"CPU fp32, eager attention, {torch.get_num_threads()} threads")
    say(f"model folder: {folder}")
    say(f"weights: {source['label']}, GGUF sha256 {source['gguf_sha256']}, "
        f"dequantized weights sha256 {dequantized_weights_sha256(folder)}")
    say(f"text: engine/assets/{SLICE.name} ({len(text):,} bytes, sha256 {hashlib.sha256(text).hexdigest()}), "
        f"{len(tokens):,} Gemma 3 tokens without <bos>")
    say(f"protocol: {args.windows} windows of [<bos>] + next {WINDOW - 1} tokens, {scored:,} scored tokens, "
        "PPL = exp(total NLL / scored tokens)")
    say()
    say("| sliding_window | PPL | mean NLL | max keys/query: sliding layer | full layer | per-window PPL | seconds |")
    say("|---:|---:|---:|---:|---:|---|---:|")

    results: dict[str, float] = {}
    for sw in sizes:
        t0 = time.time()
        model = load_model(folder, sw)
        probe = MaskProbe(model)
        total, count, per_window = 0.0, 0, []
        for ids in windows:
            nll, n = window_nll(model, ids)
            total += nll
            count += n
            per_window.append(math.exp(nll / n))
        probe.close()
        assert count == scored
        expect = min(sw, WINDOW)
        got = probe.max_keys.get("sliding_attention")
        # The sliding mask must follow config.sliding_window, or the row is meaningless.
        if got != expect or probe.exact != {"sliding_attention": True, "full_attention": True}:
            raise SystemExit(f"sliding_window={sw}: masks are not the expected causal/banded ones "
                             f"(sliding layers allow up to {got} keys, expected {expect}; exact: {probe.exact})")
        ppl = math.exp(total / count)
        results[str(sw)] = round(ppl, 4)
        say(f"| {sw} | {ppl:.4f} | {total / count:.5f} | {got} | {probe.max_keys.get('full_attention')} | "
            f"{' '.join(f'{p:.2f}' for p in per_window)} | {time.time() - t0:.0f} |")
        del model

    say()
    if "512" in results:
        say(f"sliding_window 512 is the model's own setting; field notes: transformers 5.23 gives "
            f"{FIELD_NOTES_PPL_523} on this protocol, transformers {transformers.__version__} gives {results['512']:.4f}.")
    say("A sliding layer lets query q attend keys k with q - window < k <= q (the window counts q itself).")
    say(json.dumps({
        "transformers": transformers.__version__, "torch": torch.__version__, "device": "cpu", "dtype": "float32",
        "attn": "eager", "model": source["label"], "gguf_sha256": source["gguf_sha256"],
        "slice_sha256": hashlib.sha256(text).hexdigest(), "windows": args.windows, "window_tokens": WINDOW,
        "scored_tokens": scored, "ppl_by_sliding_window": results,
    }))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"saved to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
