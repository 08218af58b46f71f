"""From a recipe file to a loaded engine worker, with the checks that the recipe applies here.

Three checks, each with one clear line: the content hash (the recipe was not edited), the GPU (the recipe
was measured on the device present), the weights (the files found have the sha256 the recipe recorded).
`serve --force` turns each failure into a logged warning; `verify` treats each as a failure.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from engine.errors import UserError
from tuner.errors import RecipeError
from tuner.recipe import Recipe, load_recipe

log = logging.getLogger("vkae.server")


class RecipeCheckError(UserError):
    """A recipe that does not apply to this machine (hash, GPU or weights); `--force` downgrades it."""


@dataclass
class LoadedRecipe:
    recipe: Recipe
    worker: Any  # engine.worker.EngineWorker with the recipe's knobs set
    warnings: list[str]


def read_recipe(path: str | Path, force: bool) -> tuple[Recipe, list[str]]:
    """`load_recipe` (schema + content hash). With `force`, a hash mismatch is a warning and the content
    is still schema-validated; any other problem is an error either way."""
    try:
        return load_recipe(path), []
    except RecipeError as exc:
        if not force or "content hash mismatch" not in str(exc):
            raise
        warning = f"{exc} -- serving anyway because of --force"
    data = yaml.safe_load(Path(path).read_text())
    try:
        return Recipe.model_validate(data), [warning]
    except ValidationError as exc:  # load_recipe validated before hashing, so this cannot normally happen
        raise RecipeError(f"{path}: {exc.errors()[0]['msg']}") from None


def present_gpu_name(device: str) -> str:
    """What the engine would record for this device: the CUDA device name, or "cpu"."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return "none (no CUDA device available)"
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def check_gpu(recipe: Recipe) -> str | None:
    device = recipe.hardware.device
    present = present_gpu_name(device)
    if present == recipe.hardware.gpu_name:
        return None
    return (f"GPU mismatch: the recipe was measured on '{recipe.hardware.gpu_name}' ({recipe.hardware.device}),"
            f" this machine has '{present}'; its TPS claim does not apply here")


def check_weights(claimed: Any, found: Any, label: str) -> str | None:
    """Compare the recipe's `weights` (file name -> sha256, or "random") with the loaded model's."""
    if claimed == found:
        return None
    if claimed == "random" or found == "random":
        return (f"{label} weights mismatch: the recipe has {'random' if claimed == 'random' else 'real'} weights,"
                f" the model found has {'random' if found == 'random' else 'real'} weights")
    claimed, found = dict(claimed), dict(found)
    diffs = [f"{n}: recipe {claimed.get(n, 'missing')[:12]}, found {found.get(n, 'missing')[:12]}"
             for n in sorted(set(claimed) | set(found)) if claimed.get(n) != found.get(n)]
    return f"{label} weights mismatch (sha256): " + "; ".join(diffs)


def load_worker(recipe: Recipe, *, max_context: int = 4096, device: str | None = None) -> Any:
    """An EngineWorker for the recipe's model, assistant, dtype and knobs (the tuner's construction)."""
    from engine.worker import EngineWorker

    random_weights = recipe.model.weights == "random"
    worker = EngineWorker(recipe.model.reference, device=device or recipe.hardware.device,
                          dtype=recipe.hardware.dtype, random_weights=random_weights,
                          assistant=recipe.assistant.reference if recipe.assistant else None,
                          max_context=max_context)
    worker.set_knobs(dict(recipe.knobs))
    return worker


def weight_problems(recipe: Recipe, worker: Any) -> list[str]:
    described = worker.describe()
    problems = [check_weights(recipe.model.weights, described["model"]["weights"], "model")]
    if recipe.assistant is not None and described.get("assistant"):
        problems.append(check_weights(recipe.assistant.weights, described["assistant"].get("weights"), "assistant"))
    return [p for p in problems if p]


def open_recipe(path: str | Path, *, force: bool, max_context: int = 4096) -> LoadedRecipe:
    """Read, check and load for serving. Raises RecipeCheckError (or RecipeError) unless `force`."""
    recipe, warnings = read_recipe(path, force)
    gpu = check_gpu(recipe)
    device = None
    if gpu:
        if not force:
            raise RecipeCheckError(gpu + " (pass --force to serve anyway)")
        warnings.append(gpu + " -- serving anyway because of --force")
        device = "cuda" if torch.cuda.is_available() else "cpu"  # the recipe's device may be absent
    worker = load_worker(recipe, max_context=max_context, device=device)
    for problem in weight_problems(recipe, worker):
        if not force:
            raise RecipeCheckError(problem + " (pass --force to serve anyway)")
        warnings.append(problem + " -- serving anyway because of --force")
    for w in warnings:
        log.warning(w)
    return LoadedRecipe(recipe, worker, warnings)
