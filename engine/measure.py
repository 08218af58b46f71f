"""PPL and TPS, measured the way the Fast Gemma Challenge measured them.

PPL: records {context_token_ids, target_token_ids}; only target tokens are scored; PPL =
exp(total NLL / total target tokens), log-softmax in fp32 over the full vocabulary, with the knobs
in force (a shrunk sliding window applies). Records are teacher-forced in length-sorted batches.

TPS: a prompt set, a fixed number of output tokens with EOS ignored, `batch_size` streams at a
time, untimed warm-up requests; TPS = output tokens / wall time including prefill. Also decode-only
TPS (prefill excluded), per-stream TPS, median and min-max over repeats, and peak memory.
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .errors import UserError
from .knobs import Knobs


@dataclass(frozen=True)
class PplRecord:
    context: tuple[int, ...]
    target: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PplRecord":
        try:
            ctx, tgt = d["context_token_ids"], d["target_token_ids"]
        except (KeyError, TypeError):
            raise UserError("PPL record needs 'context_token_ids' and 'target_token_ids'") from None
        if not isinstance(ctx, list) or not isinstance(tgt, list) or not all(isinstance(t, int) for t in ctx + tgt):
            raise UserError("PPL record token ids must be lists of integers")
        if not ctx or not tgt:
            raise UserError("PPL record needs at least one context token and one target token")
        return cls(tuple(ctx), tuple(tgt))

    def to_dict(self) -> dict[str, list[int]]:
        return {"context_token_ids": list(self.context), "target_token_ids": list(self.target)}

    def __len__(self) -> int:
        return len(self.context) + len(self.target)


def text_to_records(token_ids: Sequence[int], bos_id: int, window_tokens: int, max_windows: int | None = None
                    ) -> list[PplRecord]:
    """Plain text, the usual way: consecutive windows of `window_tokens` = [BOS] + next window_tokens-1
    tokens; every token after BOS is scored."""
    step = window_tokens - 1
    records = []
    for start in range(0, len(token_ids) - step + 1, step):
        records.append(PplRecord((bos_id,), tuple(token_ids[start:start + step])))
        if max_windows is not None and len(records) >= max_windows:
            break
    if not records:
        raise UserError(f"text too short: {len(token_ids)} tokens, need at least {step} for one window")
    return records


def _batches(records: list[PplRecord], batch_tokens: int) -> list[list[int]]:
    order = sorted(range(len(records)), key=lambda i: len(records[i]))
    batches, cur, cur_max = [], [], 0
    for i in order:
        n = len(records[i])
        if cur and max(cur_max, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    return batches


@torch.inference_mode()
def score_records(loaded: Any, records: Sequence[PplRecord], knobs: Knobs, batch_tokens: int = 8192
                  ) -> list[float]:
    """Summed NLL of each record's target tokens (fp32)."""
    model, arch = loaded.model, loaded.arch
    window = knobs.sliding_window or arch.sliding_window
    dev = model.device
    nll = [0.0] * len(records)
    for batch in _batches(list(records), batch_tokens):
        L = max(len(records[i]) for i in batch)
        if L > arch.max_position_embeddings:
            raise UserError(f"PPL record of {L} tokens exceeds the model's {arch.max_position_embeddings} positions")
        tokens = torch.full((len(batch), L), arch.pad_token_id, dtype=torch.long)
        positions = torch.full((len(batch), L), -1, dtype=torch.long)
        for j, i in enumerate(batch):
            ids = records[i].context + records[i].target
            if max(ids) >= arch.vocab_size or min(ids) < 0:
                raise UserError(f"PPL record {i}: token ids must be in [0, {arch.vocab_size})")
            tokens[j, :len(ids)] = torch.tensor(ids)
            positions[j, :len(ids)] = torch.arange(len(ids))
        hidden = model.forward_fresh(tokens.to(dev), positions.to(dev), window)
        for j, i in enumerate(batch):
            c, t = len(records[i].context), len(records[i].target)
            # position p predicts token p+1: target tokens are predicted by positions c-1 .. c+t-2
            logits = model.logits(hidden[j, c - 1:c + t - 1])
            target = torch.tensor(records[i].target, device=dev)
            nll[i] = float(F.cross_entropy(logits, target, reduction="sum"))
    return nll


def measure_ppl_records(loaded: Any, records: Sequence[PplRecord], knobs: Knobs, batch_tokens: int = 8192
                        ) -> dict[str, Any]:
    if not records:
        raise UserError("no PPL records to score")
    t0 = time.perf_counter()
    nll = score_records(loaded, records, knobs, batch_tokens)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.target) for r in records)
    total = sum(nll)
    return {"ppl": math.exp(total / tokens), "nll_sum": total, "tokens": tokens, "records": len(records),
            "seconds": seconds}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def measure_tps(generator: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, repeats: int = 3,
                warmup: int = 1) -> dict[str, Any]:
    if not prompts:
        raise UserError("no prompts to measure")
    if repeats < 1:
        raise UserError(f"repeats={repeats}: must be at least 1")
    dev = generator.device
    batch = generator.knobs.batch_size
    if warmup:
        # untimed warm-up requests: enough to fill one wave, so every graph width is captured, and the
        # prefill graph of every prompt-length bucket the set needs
        generator.generate(list(prompts)[:max(warmup, batch)], max_new_tokens)
        generator.capture_prefills([len(p) for p in prompts])
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    runs = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = generator.generate(prompts, max_new_tokens)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
        n_out = sum(len(t) for t in out.tokens)
        runs.append({"wall": wall, "tokens": n_out, "tps": n_out / wall,
                     "tps_decode": out.decode_tokens / out.decode_seconds if out.decode_seconds else float("nan"),
                     "prefill_seconds": out.prefill_seconds, "mean_accepted": out.mean_accepted,
                     "acceptance_by_position": out.acceptance_by_position, "draft_seconds": out.draft_seconds})
    tps = [r["tps"] for r in runs]
    med = statistics.median(tps)
    streams = min(batch, len(prompts))
    mid = sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]
    return {
        "tps": med, "tps_min": min(tps), "tps_max": max(tps),
        "tps_decode": statistics.median(r["tps_decode"] for r in runs),
        "tps_per_stream": med / streams, "streams": streams,
        "output_tokens": runs[0]["tokens"], "prompts": len(prompts), "max_new_tokens": max_new_tokens,
        "repeats": repeats, "seconds": sum(r["wall"] for r in runs),
        "prefill_seconds": statistics.median(r["prefill_seconds"] for r in runs),
        "mean_accepted": statistics.median(r["mean_accepted"] for r in runs),
        "acceptance_by_position": mid["acceptance_by_position"],
        "drafter_time_share": statistics.median(r["draft_seconds"] / r["wall"] for r in runs),
        "peak_memory_bytes": peak_memory_bytes(dev), "batch_size": batch, "runs": runs,
    }
