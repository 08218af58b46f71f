"""Reading trial outcomes back from Optuna's storage: points for the front, metrics for MLflow, the CSV."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .pareto import TrialPoint

METRIC_KEYS = ("tps", "tps_decode", "tps_per_stream", "tps_min", "tps_max", "tps_spread", "ppl", "ppl_first_chunk",
               "ppl_tokens", "mean_accepted", "peak_memory_bytes", "trial_seconds", "speed_seconds")


def compact_result(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able summary of a worker's trial result that is stored on the Optuna trial."""
    speed = result.get("speed") or {}
    metrics: dict[str, Any] = {
        "ppl": result.get("ppl"), "ppl_first_chunk": result.get("ppl_first_chunk"),
        "ppl_tokens": result.get("ppl_tokens"), "ppl_estimated": 1 if result.get("ppl_estimated") else None,
        "tps": speed.get("tps"), "tps_decode": speed.get("tps_decode"),
        "tps_per_stream": speed.get("tps_per_stream"), "tps_min": speed.get("tps_min"),
        "tps_max": speed.get("tps_max"), "mean_accepted": speed.get("mean_accepted"),
        "peak_memory_bytes": speed.get("peak_memory_bytes"), "speed_seconds": speed.get("seconds"),
        "trial_seconds": (result.get("seconds") or {}).get("total"),
    }
    if metrics["tps_min"] is not None and metrics["tps_max"] is not None:
        metrics["tps_spread"] = metrics["tps_max"] - metrics["tps_min"]
    out = {"status": result["status"], "metrics": {k: v for k, v in metrics.items() if v is not None}}
    for key in ("reason", "cause", "error", "worker"):
        if result.get(key):
            out[key] = result[key]
    if result.get("lossless") is not None:
        out["lossless"] = {k: v for k, v in result["lossless"].items() if k != "outputs"}
    return out


def finished(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]


def counts_toward_budget(t: FrozenTrial) -> bool:
    """Trials cut short by a driver stop are re-run on resume; they do not use up the trial budget."""
    return t.state in (TrialState.COMPLETE, TrialState.FAIL) and t.user_attrs.get("cause") != "interrupted"


def is_feasible(t: FrozenTrial) -> bool:
    constraints = t.constraints or {"missing": 1.0}  # a complete trial without constraints is not trusted
    values = constraints.values() if isinstance(constraints, dict) else constraints
    return t.state == TrialState.COMPLETE and all(c <= 0 for c in values)


def point_from_trial(t: FrozenTrial) -> TrialPoint:
    metrics = t.user_attrs.get("metrics") or {}
    state = "complete" if t.state == TrialState.COMPLETE else "failed"
    reason = t.user_attrs.get("reason") or t.user_attrs.get("cause")
    return TrialPoint(number=t.number, state=state, feasible=is_feasible(t), tps=metrics.get("tps"),
                      ppl=metrics.get("ppl"), reason=reason, knobs=t.user_attrs.get("knobs") or {},
                      tps_per_stream=metrics.get("tps_per_stream"))


def points(study: optuna.Study) -> list[TrialPoint]:
    return [point_from_trial(t) for t in finished(study.get_trials(deepcopy=False))]


def write_trials_csv(trials: list[FrozenTrial], path: Path) -> Path:
    knob_names = sorted({k for t in trials for k in (t.user_attrs.get("knobs") or {})})
    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", "state", "feasible", "reason", *knob_names, *METRIC_KEYS, "worker", "error"])
        for t in trials:
            p = point_from_trial(t)
            metrics = t.user_attrs.get("metrics") or {}
            knobs = t.user_attrs.get("knobs") or {}
            writer.writerow([t.number, p.state, int(p.feasible), p.reason or "",
                             *[v if isinstance(v := knobs.get(k), str) else json.dumps(v) for k in knob_names],
                             *["" if metrics.get(k) is None else metrics[k] for k in METRIC_KEYS],
                             t.user_attrs.get("worker", ""), (t.user_attrs.get("error") or "")[:300]])
    return Path(path)
