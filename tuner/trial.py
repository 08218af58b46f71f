"""One trial on one loaded worker: cheap PPL first, then the lossless check, then the speed run.

Runs inside a Ray actor. The order is the point: a setting that already breaks the quality limit on its
first chunk of records, or that changes greedy output, never pays for a speed run.
"""
from __future__ import annotations

import math
import time
from typing import Any


def _ppl_from(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("inf")


def run_trial_on_worker(worker: Any, workload: Any, knobs: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """`worker` is an engine.worker.EngineWorker, `workload` a tuner.workload.BuiltWorkload."""
    t_start = time.perf_counter()
    limit = float(plan["ppl_limit"])
    worker.set_knobs(knobs)
    out: dict[str, Any] = {"status": "ok", "knobs": knobs, "seconds": {}}

    records = workload.records
    n_first = min(plan["first_chunk_records"], len(records))
    first = worker.measure_ppl(records[:n_first])
    out["seconds"]["ppl_first_chunk"] = first["seconds"]
    nll, tokens = float(first["nll_sum"]), int(first["tokens"])
    out["ppl_first_chunk"] = _ppl_from(nll, tokens)
    # Chunks differ in difficulty, so the first chunk is judged against the default knobs' PPL on the
    # same chunk: its relative degradation, applied to the default's full-set PPL, estimates the full PPL.
    estimate = plan["baseline_ppl"] * out["ppl_first_chunk"] / plan["baseline_ppl_first_chunk"]
    if estimate > limit:
        out.update(status="infeasible", reason="ppl_first_chunk", ppl=estimate, ppl_estimated=True,
                   ppl_tokens=tokens, ppl_records=n_first)
        out["seconds"]["total"] = time.perf_counter() - t_start
        return out
    if len(records) > n_first:
        rest = worker.measure_ppl(records[n_first:])
        out["seconds"]["ppl_rest"] = rest["seconds"]
        nll += float(rest["nll_sum"])
        tokens += int(rest["tokens"])
    out.update(ppl=_ppl_from(nll, tokens), ppl_tokens=tokens, ppl_records=len(records))

    if int(knobs.get("draft_tokens") or 0) > 0:
        prompts = workload.prompts[:plan["lossless_prompts"]]
        t0 = time.perf_counter()
        lossless = worker.check_lossless(prompts, plan["lossless_tokens"])
        out["seconds"]["lossless"] = time.perf_counter() - t0
        out["lossless"] = lossless
        if not lossless["identical"]:
            out.update(status="infeasible", reason="lossless_mismatch")
            out["seconds"]["total"] = time.perf_counter() - t_start
            return out

    speed = worker.measure_tps(workload.prompts, plan["output_tokens"], repeats=plan["repeats"],
                               warmup=plan["warmup"])
    out["seconds"]["tps"] = speed.get("seconds")
    out["speed"] = speed
    if out["ppl"] > limit:
        out.update(status="infeasible", reason="ppl")
    out["seconds"]["total"] = time.perf_counter() - t_start
    return out
