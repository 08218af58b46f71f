"""`vkae-tune verify RECIPE`: re-measure a recipe on the hardware present with the recipe's own workload.

Checks, in order (the first that cannot hold ends the run): the content hash, the GPU, the weights, the
workload's token hash; then it measures PPL (must be within the recipe's limit), the lossless property for
speculative recipes (greedy output identical to plain decoding), and TPS (median over repeats, must reach
--min-tps-ratio of the claim). Exit 0 when everything holds, 1 otherwise; usage errors exit 2.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from engine.errors import UserError
from tuner.errors import RecipeError
from tuner.recipe import load_recipe

EXIT_FAILED = 1


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vkae-tune verify",
                                description="Re-measure a recipe here; exit 0 if its claims hold, 1 if not.")
    p.add_argument("recipe")
    p.add_argument("--repeats", type=int, default=None, help="TPS repeats (default: the recipe's)")
    p.add_argument("--min-tps-ratio", type=float, default=0.95,
                   help="pass when measured TPS >= this x the claimed TPS (default 0.95)")
    p.add_argument("--data-dir", type=Path, action="append", default=[],
                   help="where to look for the workload files by name if their recorded paths are gone")
    p.add_argument("--allow-gpu-mismatch", action="store_true",
                   help="measure even on a different device (the TPS comparison still applies)")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    return p


class Report:
    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, claimed: Any = None, measured: Any = None, note: str = "") -> bool:
        self.checks.append({"check": name, "ok": ok, "claimed": claimed, "measured": measured, "note": note})
        print(f"{'PASS' if ok else 'FAIL'}  {name:<10} {_fmt(claimed):>14} {_fmt(measured):>14}  {note}")
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c["ok"] for c in self.checks)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)[:14]


def run_verify(a: argparse.Namespace) -> Report:
    from .recipe_runtime import check_gpu, load_worker, present_gpu_name, weight_problems
    from .workload_replay import WorkloadMismatch, rebuild_workload

    report = Report()
    print(f"{'':4}  {'check':<10} {'claimed':>14} {'measured':>14}")
    try:
        recipe = load_recipe(a.recipe)
    except RecipeError as exc:
        report.add("recipe", False, note=str(exc))
        return report
    report.add("recipe", True, note=f"content hash {recipe.content_sha256[:12]}… ok")
    gpu = check_gpu(recipe)
    present = present_gpu_name(recipe.hardware.device)
    if gpu and not a.allow_gpu_mismatch:
        report.add("gpu", False, recipe.hardware.gpu_name, present, gpu)
        return report
    report.add("gpu", gpu is None, recipe.hardware.gpu_name, present, gpu or "same device")
    import torch

    device = None if gpu is None else ("cuda" if torch.cuda.is_available() else "cpu")
    worker = load_worker(recipe, device=device)
    problems = weight_problems(recipe, worker)
    if problems:
        report.add("weights", False, note="; ".join(problems))
        return report
    report.add("weights", True, note="random" if recipe.model.weights == "random" else "sha256 of every file matches")
    try:
        work = rebuild_workload(recipe, worker.tokenizer, a.data_dir)
    except WorkloadMismatch as exc:
        report.add("workload", False, note=str(exc))
        return report
    report.add("workload", True, note=f"{len(work.prompts)} prompts, {len(work.records)} PPL records, same token ids")

    ppl = worker.measure_ppl(work.records)
    limit = recipe.quality_limit.ppl_limit
    report.add("ppl", ppl["ppl"] <= limit, recipe.metrics.ppl, ppl["ppl"],
               f"limit {limit:.4f}; {ppl['tokens']} tokens (claimed {recipe.metrics.ppl_tokens})")
    if worker.knobs.draft_tokens > 0:
        lossless = worker.check_lossless(work.prompts, recipe.workload.output_tokens)
        report.add("lossless", lossless["identical"], note="greedy output identical to plain decoding"
                   if lossless["identical"] else f"prompts {lossless['mismatched_prompts']} differ from plain decoding"
                   f" at token {lossless['first_mismatch_index']}")
    repeats = a.repeats or recipe.workload.repeats
    tps = worker.measure_tps(work.prompts, recipe.workload.output_tokens, repeats=repeats,
                             warmup=recipe.workload.warmup)
    claim = recipe.metrics.tps.value
    report.add("tps", tps["tps"] >= a.min_tps_ratio * claim, claim, tps["tps"],
               f"median of {repeats}; {tps['tps'] / claim:.1%} of the claim (need {a.min_tps_ratio:.0%});"
               f" min {tps['tps_min']:.2f} max {tps['tps_max']:.2f}")
    if recipe.metrics.mean_accepted is not None and worker.knobs.draft_tokens > 0:
        report.add("accepted", True, recipe.metrics.mean_accepted, tps["mean_accepted"], "informational")
    return report


def verify_main(argv: Sequence[str]) -> int:
    a = verify_parser().parse_args(argv)
    if a.repeats is not None and a.repeats < 1:
        raise UserError(f"--repeats {a.repeats}: must be at least 1")
    if not 0 < a.min_tps_ratio <= 10:
        raise UserError(f"--min-tps-ratio {a.min_tps_ratio}: must be in (0, 10]")
    report = run_verify(a)
    print("VERIFIED: the recipe's claims hold here" if report.ok else "NOT VERIFIED: see the FAIL lines above")
    if a.json:
        print(json.dumps({"ok": report.ok, "checks": report.checks}))
    return 0 if report.ok else EXIT_FAILED
