"""Turn a search space's knob ranges into Optuna suggestions (inside the driver, on an asked trial)."""
from __future__ import annotations

from typing import Any

import optuna

from .search_space import IntRange, Knobs


def _suggest(trial: optuna.Trial, name: str, spec: Any) -> Any:
    if isinstance(spec, IntRange):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if len(spec) == 1:
        return spec[0]  # fixed: not a dimension of the search
    return trial.suggest_categorical(name, list(spec))


def sample_knobs(trial: optuna.Trial, space: Knobs) -> dict[str, Any]:
    """Conditional space: draft_tokens only with a drafter, centroid_top_k only with the MTP drafter."""
    drafter = _suggest(trial, "drafter", space.drafter)
    knobs: dict[str, Any] = {
        "sliding_window": _suggest(trial, "sliding_window", space.sliding_window),
        "batch_size": _suggest(trial, "batch_size", space.batch_size),
        "drafter": drafter,
        "draft_tokens": 0,
        "centroid_top_k": None,
    }
    if drafter != "none":
        knobs["draft_tokens"] = _suggest(trial, "draft_tokens", space.draft_tokens)
    if drafter == "mtp":
        knobs["centroid_top_k"] = _suggest(trial, "centroid_top_k", space.centroid_top_k)
    return knobs


def default_params(space: Knobs) -> dict[str, Any]:
    """Optuna params of the plain setting (trained window, smallest batch, no drafter), for the dimensions
    that are searched. Queued as a new study's first trial: the baseline is always measured and, under a
    ratio limit, always feasible, so a study never ends without a recipe at least as good as the default."""
    params: dict[str, Any] = {}
    window = space.sliding_window
    if isinstance(window, IntRange):
        params["sliding_window"] = window.high
    elif len(window) > 1:
        params["sliding_window"] = None if None in window else max(window)
    batch = space.batch_size
    if isinstance(batch, IntRange):
        params["batch_size"] = batch.low
    elif len(batch) > 1:
        params["batch_size"] = min(batch)
    if len(space.drafter) > 1 and "none" in space.drafter:
        params["drafter"] = "none"
    return params
