"""The recipe: a frozen, validated YAML contract for serving one model on one GPU profile.

`content_sha256` is the sha256 of the canonical JSON of every other field (keys sorted, no spaces), so any
hand edit is caught by `load_recipe`. The serve / verify / export commands read recipes only through
`load_recipe`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RecipeError

SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Frozen):
    reference: str  # what the user typed: alias or path
    name: str
    weights: Literal["random"] | dict[str, str]  # file name -> sha256
    details: dict[str, Any] = Field(default_factory=dict)  # the engine's describe()["model"], verbatim


class EngineRef(_Frozen):
    version: str
    git_commit: str | None
    git_dirty: bool | None


class Hardware(_Frozen):
    gpu_profile: str
    gpu_profile_matched: bool
    gpu_name: str
    gpu_memory_bytes: int | None = None
    device: str
    driver: str | None = None
    cuda: str | None = None
    torch: str
    triton: str | None = None
    dtype: str | None = None


class Metric(_Frozen):
    value: float
    min: float | None = None
    max: float | None = None


class Metrics(_Frozen):
    tps: Metric  # tokens/s over the whole batch
    tps_per_stream: float
    tps_decode: float | None = None
    ppl: float
    ppl_tokens: int
    mean_accepted: float | None = None
    peak_memory_bytes: int | None = None


class WorkloadRef(_Frozen):
    prompts: dict[str, Any]  # kind, source, sha256, count
    ppl_records: dict[str, Any]
    token_sha256: str  # of the tokenized prompts and records, identical on every worker
    output_tokens: int
    batch_size: int
    repeats: int
    warmup: int


class QualityLimit(_Frozen):
    kind: Literal["ppl_max", "ppl_max_ratio"]
    value: float
    baseline_ppl: float | None  # full-window plain-decode PPL of the model (for ppl_max_ratio)
    ppl_limit: float  # the limit actually enforced


class FrontPoint(_Frozen):
    trial_number: int
    knobs: dict[str, Any]
    tps: float
    tps_per_stream: float
    ppl: float


class StudyRef(_Frozen):
    name: str
    trial_number: int
    trials_total: int
    trials_feasible: int
    search_space: str | None
    search_space_sha256: str | None
    created_utc: str


class Recipe(_Frozen):
    schema_version: int = SCHEMA_VERSION
    kind: Literal["vkae-tune/recipe"] = "vkae-tune/recipe"
    model: ModelRef
    assistant: ModelRef | None
    engine: EngineRef
    hardware: Hardware
    knobs: dict[str, Any]
    metrics: Metrics
    workload: WorkloadRef
    quality_limit: QualityLimit
    pareto_front: list[FrontPoint]  # every point of the front, the chosen one included
    study: StudyRef
    content_sha256: str = ""

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"content_sha256"})

    def compute_hash(self) -> str:
        canonical = json.dumps(self.body(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def sealed(self) -> "Recipe":
        return self.model_copy(update={"content_sha256": self.compute_hash()})


def dump_recipe(recipe: Recipe) -> str:
    header = ("# vkae-tune recipe: frozen. Do not edit by hand; content_sha256 covers every other field.\n"
              f"# model {recipe.model.name} on {recipe.hardware.gpu_name}: {recipe.metrics.tps.value:.1f} tok/s,"
              f" PPL {recipe.metrics.ppl:.4f} (limit {recipe.quality_limit.ppl_limit:.4f})\n")
    data = recipe.sealed().model_dump(mode="json")
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)


def write_recipe(recipe: Recipe, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_recipe(recipe))
    tmp.replace(path)  # never leave a half-written recipe
    return path


def load_recipe(path: str | Path) -> Recipe:
    """Read, validate and hash-check a recipe. Raises RecipeError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: not a recipe (expected a mapping)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise RecipeError(f"{path}: schema_version {data.get('schema_version')!r} is not supported"
                          f" (this vkae-tune reads {SCHEMA_VERSION})")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(k) for k in err["loc"])
        raise RecipeError(f"{path}: {field}: {err['msg']}") from None
    expected = recipe.compute_hash()
    if recipe.content_sha256 != expected:
        raise RecipeError(f"{path}: content hash mismatch: the recipe was modified after it was written"
                          f" (content_sha256 says {recipe.content_sha256[:12] or 'nothing'}…, the content hashes to"
                          f" {expected[:12]}…); re-run the tuner instead of editing a recipe")
    return recipe
