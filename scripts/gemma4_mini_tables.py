"""gemma-4-mini's measured tables (issue 7): held-out PPL vs a unigram model and vs transformers, PPL by
sliding window, and greedy MTP acceptance + single-stream TPS over K x centroid_top_k with token identity.

    python scripts/gemma4_mini_tables.py --device cpu                  # CPU, shipped held-out slice
    python scripts/gemma4_mini_tables.py --device cuda --dtype float32 --heldout .stage/mini-data/heldout.txt

Prints markdown tables and ends with one JSON line. TPS is output tokens / wall time of a batch-1 run
over the prompt set (prefill included), after an untimed warm-up; K=0 is plain greedy decoding.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.knobs import Knobs  # noqa: E402
from engine.measure import text_to_records  # noqa: E402
from engine.registry import BUNDLED_DIR  # noqa: E402
from engine.worker import EngineWorker  # noqa: E402

HELDOUT = BUNDLED_DIR / "gemma4_mini_heldout_python_docs.txt"
WIKITEXT = BUNDLED_DIR / "wikitext2_test_slice.txt"
TINYSTORIES = Path(__file__).resolve().parents[2] / "shared/data/tinystories-valid/tinystories_val.txt"
RECORD = 1024  # tokens per PPL record: longer than every window, within the 2048-token training length
TRAINED_WINDOW = 512


def unigram_ppl(records) -> float:
    counts = json.loads((BUNDLED_DIR / "gemma4_mini_unigram_counts.json").read_text())["counts"]
    total = sum(counts) + len(counts)
    nll = [-math.log((counts[t] + 1) / total) for r in records for t in r.target]
    return math.exp(sum(nll) / len(nll))


def transformers_ppl(folder: Path, records, device: str) -> float:
    """transformers' own fp32 scoring of the same records (the reference)."""
    from transformers import Gemma4ForCausalLM

    model = Gemma4ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model.to(device)
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([list(r.context) + list(r.target)], device=device)
            logits = model(input_ids=ids).logits[0].float()
            c = len(r.context)
            logp = torch.log_softmax(logits[c - 1:-1], dim=-1)
            nll -= logp.gather(1, torch.tensor(r.target, device=device)[:, None]).sum().item()
            n += len(r.target)
    return math.exp(nll / n)


def prompts_from(tok, text: str, n: int, length: int) -> list[list[int]]:
    ids = tok.encode(text, add_bos=False)
    step = max(length, (len(ids) - length) // n)
    return [[tok.bos_id] + ids[i:i + length] for i in range(0, step * n, step)][:n]


def timed_generate(worker: EngineWorker, prompts, new_tokens: int):
    gen = worker.generator()
    gen.generate(prompts[:1], new_tokens)  # warm-up: compile / capture graphs
    if worker.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = gen.generate(prompts, new_tokens)
    if worker.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return out, sum(len(t) for t in out.tokens) / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--heldout", type=Path, default=HELDOUT, help="held-out Debian-docs text")
    ap.add_argument("--ppl-windows", type=int, default=16, help="1024-token windows scored per text (0 = all)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--top-ks", default="4,8,16,32,64")
    ap.add_argument("--no-transformers", action="store_true")
    a = ap.parse_args()
    w = EngineWorker("gemma-4-mini", device=a.device, dtype=a.dtype, assistant="gemma-4-mini-assistant")
    tok = w.tokenizer
    out: dict = {"model": "gemma-4-mini", "device": w.describe().get("device_name") or a.device,
                 "dtype": str(w.dtype).replace("torch.", "")}
    cap = a.ppl_windows or None

    # ---- PPL: held-out vs unigram and transformers; other texts --------------------------------------
    held = text_to_records(tok.encode(a.heldout.read_text(encoding="utf-8"), add_bos=False), tok.bos_id, RECORD, cap)
    eng = w.measure_ppl(held)["ppl"]
    uni = unigram_ppl(held)
    ppl = {"heldout_text": str(a.heldout.name), "heldout_tokens": sum(len(r.target) for r in held),
           "engine": eng, "unigram": uni, "unigram_over_engine": uni / eng}
    if not a.no_transformers:
        hf = transformers_ppl(BUNDLED_DIR / "gemma-4-mini", held, w.device)
        ppl["transformers_fp32"] = hf
        ppl["engine_vs_transformers_rel"] = abs(eng - hf) / hf
    for name, path in (("wikitext2_slice", WIKITEXT), ("tinystories_slice", TINYSTORIES)):
        if path.is_file():
            recs = text_to_records(tok.encode(path.read_text(encoding="utf-8")[:200_000], add_bos=False),
                                   tok.bos_id, RECORD, cap)
            ppl[name] = w.measure_ppl(recs)["ppl"]
    out["ppl"] = ppl
    print("| text | tokens | engine PPL | unigram PPL | transformers fp32 |\n|---|---:|---:|---:|---:|")
    print(f"| held-out Debian docs | {ppl['heldout_tokens']} | {eng:.4f} | {uni:.2f} | "
          f"{ppl.get('transformers_fp32', float('nan')):.4f} |")

    # ---- PPL by sliding window (records of 1024 tokens > every window) --------------------------------
    rows = []
    for win in (TRAINED_WINDOW, 256, 128, 64, 32, 16, 8):
        w.set_knobs(Knobs(sliding_window=win))
        rows.append({"sliding_window": win, "ppl": w.measure_ppl(held)["ppl"]})
    out["window_table"] = rows
    print("\n| sliding_window | held-out PPL |\n|---:|---:|")
    for r in rows:
        print(f"| {r['sliding_window']}{' (trained, full)' if r['sliding_window'] == TRAINED_WINDOW else ''} | {r['ppl']:.4f} |")

    # ---- MTP acceptance and single-stream TPS ---------------------------------------------------------
    prompts = prompts_from(tok, a.heldout.read_text(encoding="utf-8"), a.prompts, a.prompt_len)
    w.set_knobs(Knobs())
    plain, plain_tps = timed_generate(w, prompts, a.new_tokens)
    grid = []
    for k in (int(x) for x in a.ks.split(",")):
        for ctk in (int(x) for x in a.top_ks.split(",")):
            w.set_knobs(Knobs(drafter="mtp", draft_tokens=k, centroid_top_k=ctk))
            res, tps = timed_generate(w, prompts, a.new_tokens)
            grid.append({"draft_tokens": k, "centroid_top_k": ctk, "mean_accepted": res.mean_accepted,
                         "tps": tps, "speedup": tps / plain_tps, "identical": res.tokens == plain.tokens})
    out["plain_tps"] = plain_tps
    out["acceptance_grid"] = grid
    out["all_identical"] = all(g["identical"] for g in grid)
    tks = [int(x) for x in a.top_ks.split(",")]
    print(f"\nplain greedy: {plain_tps:.1f} TPS (batch 1, {len(prompts)} held-out prompts x {a.new_tokens} tokens)")
    print("\nmean accepted tokens per verify step / single-stream TPS (identical to plain greedy: "
          f"{out['all_identical']})\n")
    print("| K | " + " | ".join(f"ctk {t}" + (" (all)" if t == w.assistant.num_centroids else "") for t in tks)
          + " |\n|---:|" + "---:|" * len(tks))
    for k in sorted({g["draft_tokens"] for g in grid}):
        cells = [next(g for g in grid if g["draft_tokens"] == k and g["centroid_top_k"] == t) for t in tks]
        print(f"| {k} | " + " | ".join(f"{g['mean_accepted']:.2f} / {g['tps']:.0f}" for g in cells) + " |")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
