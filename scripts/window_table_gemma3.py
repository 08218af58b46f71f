"""Gemma 3 270M (real weights) PPL through the engine at several sliding windows, on texts longer than
the window: the first 8 windows of 1,024 tokens of the shipped WikiText-2 test slice. Prints a markdown
table and ends with one JSON line.   Usage: python scripts/window_table_gemma3.py [--windows 512,256,...]"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.knobs import Knobs  # noqa: E402
from engine.measure import text_to_records  # noqa: E402
from engine.tokenizer import ASSETS_DIR  # noqa: E402
from engine.worker import EngineWorker  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", default="512,256,128,64,32")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    w = EngineWorker("gemma-3-270m", device=a.device)
    ids = w.tokenizer.encode((ASSETS_DIR / "wikitext2_test_slice.txt").read_text(encoding="utf-8"), add_bos=False)
    records = text_to_records(ids, w.tokenizer.bos_id, 1024, 8)
    rows = []
    for win in (int(x) for x in a.windows.split(",")):
        w.set_knobs(Knobs(sliding_window=win))
        t0 = time.perf_counter()
        r = w.measure_ppl(records, batch_tokens=2048)
        rows.append({"sliding_window": win, "ppl": r["ppl"], "tokens": r["tokens"], "seconds": time.perf_counter() - t0})
    print("| sliding_window | PPL (engine) |\n|---:|---:|")
    for r in rows:
        print(f"| {r['sliding_window']} | {r['ppl']:.4f} |")
    print(json.dumps({"model": "gemma-3-270m Q4_K_M, dequantized", "device": a.device, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
