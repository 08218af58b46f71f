"""`vkae-tune bench` and `vkae-tune generate`: the engine's own command-line verbs."""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError
from .knobs import Knobs
from .measure import text_to_records
from .sampling import SamplingParams
from .workload import load_ppl_records, load_prompts


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="alias (vkae-tune models), local HF folder, or HF repo id in the local cache")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--random-weights", action="store_true", help="exact geometry of MODEL, random weights (speed runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--sliding-window", type=int, default=None, help="attention window of sliding layers (<= trained)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--drafter", default="none", choices=["none", "ngram", "mtp"])
    p.add_argument("--assistant", default=None, help="MTP assistant reference (with --drafter mtp)")
    p.add_argument("--draft-tokens", type=int, default=0, help="K tokens proposed per verify step (0 = plain)")
    p.add_argument("--centroid-top-k", type=int, default=None, help="MTP assistant: clusters kept in its LM head")
    p.add_argument("--json", action="store_true", help="end with one JSON line")


def _knobs(a: argparse.Namespace) -> Knobs:
    drafter = a.drafter
    if a.draft_tokens > 0 and drafter == "none":
        raise UserError("--draft-tokens needs --drafter ngram or --drafter mtp")
    if drafter == "mtp" and not a.assistant:
        raise UserError("--drafter mtp needs --assistant REF")
    return Knobs(sliding_window=a.sliding_window, batch_size=a.batch_size, draft_tokens=a.draft_tokens,
                 drafter=drafter, centroid_top_k=a.centroid_top_k)


def _worker(a: argparse.Namespace):
    from .worker import EngineWorker

    w = EngineWorker(a.model, device=a.device, dtype=a.dtype, random_weights=a.random_weights,
                     assistant=a.assistant if a.drafter == "mtp" else None, max_context=a.max_context,
                     seed=a.seed, use_cuda_graphs=not a.no_cuda_graphs)
    w.set_knobs(_knobs(a))
    return w


def synthetic_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[2] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(n)]


def _ppl_records(paths: Sequence[str], tokenizer: Any, bos: int, window: int, max_windows: int | None):
    records = []
    for p in paths:
        path = Path(p)
        if path.suffix == ".jsonl":
            records += load_ppl_records(path)
        else:
            if tokenizer is None:
                raise UserError(f"{path}: text PPL data needs a tokenizer; this model has none")
            if not path.is_file():
                raise UserError(f"{path}: PPL data file not found")
            ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_bos=False)
            records += text_to_records(ids, bos, window, max_windows)
    return records


def bench_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="vkae-tune bench", description="Measure TPS (and PPL) of one knob setting.")
    _add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--prompts", default=None, help="ShareGPT .json, .jsonl or text file; default: synthetic ids")
    p.add_argument("--num-prompts", type=int, default=None, help="limit / count of prompts (synthetic: 2 waves)")
    p.add_argument("--prompt-len", type=int, default=256, help="length of synthetic prompts")
    p.add_argument("--ppl-data", nargs="*", default=[], help="PPL records .jsonl or text files")
    p.add_argument("--ppl-window", type=int, default=1024, help="text PPL: tokens per window incl. BOS")
    p.add_argument("--ppl-max-windows", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args(argv)
    w = _worker(a)
    tok = w.loaded.tokenizer
    if a.prompts:
        prompts, prompt_source = load_prompts(a.prompts, tok, a.num_prompts), a.prompts
    else:
        n = a.num_prompts or 2 * a.batch_size
        prompts = synthetic_prompts(n, a.prompt_len, w.loaded.arch.vocab_size, a.seed)
        prompt_source = f"synthetic ({n} x {a.prompt_len} random ids)"
    result: dict[str, Any] = {}
    if a.ppl_data:
        records = _ppl_records(a.ppl_data, tok, w.loaded.arch.bos_token_id, a.ppl_window, a.ppl_max_windows)
        ppl = w.measure_ppl(records)
        result.update(ppl=ppl["ppl"], ppl_tokens=ppl["tokens"], ppl_seconds=ppl["seconds"])
    else:
        result.update(ppl=None, ppl_tokens=0)
    tps = w.measure_tps(prompts, a.max_new_tokens, repeats=a.repeats, warmup=a.warmup)
    info = w.describe()
    result.update({k: v for k, v in tps.items() if k != "runs"})
    result.update(weights=info["model"]["weights"], model=info["model"]["name"], device=info["device"],
                  gpu_name=info["gpu_name"], dtype=info["dtype"], knobs=w.knobs.to_dict(), prompts_source=prompt_source,
                  engine_version=info["engine_version"], torch=info["torch"])
    rows = [("model", f"{info['model']['label']}"), ("weights", "random" if result["weights"] == "random" else "real"),
            ("device", f"{info['device']} ({info['gpu_name']}, {info['dtype']})"),
            ("knobs", json.dumps(w.knobs.to_dict())), ("prompts", f"{len(prompts)} ({prompt_source})"),
            ("output tokens / prompt", a.max_new_tokens),
            ("TPS (incl. prefill), median", f"{tps['tps']:.2f}  [min {tps['tps_min']:.2f}, max {tps['tps_max']:.2f}]"),
            ("TPS decode-only", f"{tps['tps_decode']:.2f}"), ("TPS per stream", f"{tps['tps_per_stream']:.2f}"),
            ("prefill, mean per prompt", f"{1e3 * tps['prefill_seconds'] / len(prompts):.1f} ms"),
            ("mean accepted / step", f"{tps['mean_accepted']:.3f}"),
            ("peak memory", f"{tps['peak_memory_bytes'] / 2**30:.2f} GiB")]
    if result["ppl"] is not None:
        rows.append(("PPL", f"{result['ppl']:.4f} over {result['ppl_tokens']} tokens"))
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if a.json:
        print(json.dumps(result))
    return 0


def generate_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="vkae-tune generate", description="Generate from one prompt.")
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with BOS)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, used as is")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true")
    a = p.parse_args(argv)
    w = _worker(a)
    tok = w.loaded.tokenizer
    if a.prompt_ids is not None:
        try:
            ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UserError("--prompt-ids: expected comma-separated integers") from None
    else:
        if tok is None:
            raise UserError(f"{a.model}: no tokenizer available; use --prompt-ids")
        ids = tok.apply_chat_template([{"role": "user", "content": a.prompt}]) if a.chat else tok.encode(a.prompt)
    sampling = SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    out = w.generate([ids], a.max_new_tokens, sampling, stop_at_eos=not a.ignore_eos)[0]
    text = tok.decode(out) if tok is not None else None
    if text is not None:
        print(text)
    else:
        print(" ".join(map(str, out)))
    if a.json:
        print(json.dumps({"prompt_token_ids": ids, "output_token_ids": out, "text": text,
                          "weights": w.loaded.describe()["weights"], "knobs": w.knobs.to_dict()}))
    return 0


def run(fn, argv: Sequence[str]) -> int:
    """Run a verb, turning user errors into one clear line on stderr and exit code 2."""
    try:
        return fn(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
