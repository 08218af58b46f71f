"""`search_spaces/<model>.yaml`: knob ranges, evaluation workload and quality limit, validated with pydantic.

A file that does not validate raises SearchSpaceError naming the field and its line, e.g.
`search_spaces/x.yaml:14: knobs.batch_size.low: Input should be greater than or equal to 1`.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SearchSpaceError

SEARCH_SPACE_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntRange(_Strict):
    """An integer range sampled by Optuna (`suggest_int`)."""

    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        if self.log and self.step != 1:
            raise ValueError("log=true needs step=1")
        return self


IntKnob = IntRange | list[int | None]


class Knobs(_Strict):
    """What the study may vary. A list is a categorical choice; `null` in sliding_window/centroid_top_k
    means the model's own value (trained window / all centroids)."""

    sliding_window: IntKnob = Field(default_factory=lambda: [None])
    batch_size: IntKnob = Field(default_factory=lambda: [1])
    drafter: list[Literal["none", "ngram", "mtp"]] = Field(default_factory=lambda: ["none"], min_length=1)
    draft_tokens: IntKnob = Field(default_factory=lambda: [0])  # only sampled when the drafter is not "none"
    centroid_top_k: IntKnob = Field(default_factory=lambda: [None])  # only sampled with drafter "mtp"

    @model_validator(mode="after")
    def _non_empty(self) -> "Knobs":
        for name in ("sliding_window", "batch_size", "draft_tokens", "centroid_top_k"):
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                raise ValueError(f"{name}: needs at least one choice")
        if isinstance(self.batch_size, list) and any(v is None or v < 1 for v in self.batch_size):
            raise ValueError("batch_size: every choice must be an integer >= 1")
        return self


class SyntheticPrompts(_Strict):
    """Random token ids: for random-weight speed runs, where text content is meaningless anyway."""

    count: int = Field(ge=1)
    length: int = Field(ge=1)
    seed: int = 0


class PromptSource(_Strict):
    path: str | None = None  # relative to the search-space file; ${ENV} references allowed
    synthetic: SyntheticPrompts | None = None
    count: int | None = Field(None, ge=1)  # use the first `count` prompts

    @model_validator(mode="after")
    def _one_source(self) -> "PromptSource":
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of 'path' or 'synthetic'")
        return self


class SyntheticRecords(_Strict):
    count: int = Field(ge=1)
    context_tokens: int = Field(ge=1)
    target_tokens: int = Field(ge=1)
    seed: int = 0


class PplSource(_Strict):
    """PPL records: a JSONL of `{context_token_ids, target_token_ids}`, or a text file cut into records."""

    path: str | None = None  # JSONL records
    text: str | None = None  # plain text, tokenized by the model's tokenizer
    synthetic: SyntheticRecords | None = None
    context_tokens: int = Field(128, ge=1)  # for `text`: tokens of context per record
    target_tokens: int = Field(128, ge=1)  # for `text`: scored tokens per record
    count: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "PplSource":
        if sum(x is not None for x in (self.path, self.text, self.synthetic)) != 1:
            raise ValueError("give exactly one of 'path', 'text' or 'synthetic'")
        return self


class Lossless(_Strict):
    prompts: int = Field(2, ge=1)
    output_tokens: int = Field(16, ge=1)


class Workload(_Strict):
    prompts: PromptSource
    output_tokens: int = Field(ge=1)
    ppl_records: PplSource
    first_chunk_records: int = Field(4, ge=1)  # the cheap PPL check before the rest
    repeats: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)
    lossless: Lossless = Field(default_factory=Lossless)


class Quality(_Strict):
    ppl_max: float | None = Field(None, gt=0)
    ppl_max_ratio: float | None = Field(None, ge=1.0)

    @model_validator(mode="after")
    def _one_limit(self) -> "Quality":
        if (self.ppl_max is None) == (self.ppl_max_ratio is None):
            raise ValueError("give exactly one of 'ppl_max' or 'ppl_max_ratio'")
        return self


class Sampler(_Strict):
    seed: int = 0
    startup_trials: int = Field(4, ge=1)  # random trials before TPE models the space


class SearchSpace(_Strict):
    model: str
    random_weights: bool = False
    assistant: str | None = None
    knobs: Knobs = Field(default_factory=Knobs)
    workload: Workload
    quality: Quality
    trial_timeout_s: float = Field(600, gt=0)
    load_timeout_s: float = Field(900, gt=0)
    sampler: Sampler = Field(default_factory=Sampler)

    # set by load_search_space, not by the file
    source_path: str | None = Field(None, exclude=True)
    source_sha256: str | None = Field(None, exclude=True)

    def resolve_path(self, ref: str, field: str) -> Path:
        """A workload path: ${ENV} expanded, relative to the search-space file's folder."""
        def env(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise SearchSpaceError(
                    f"{self.source_path}: {field}: '{ref}' needs the environment variable {name}; set it"
                    " (or pass --search-space with your own file)")
            return os.environ[name]

        expanded = Path(_ENV_REF.sub(env, ref)).expanduser()
        base = Path(self.source_path).parent if self.source_path else Path.cwd()
        path = expanded if expanded.is_absolute() else (base / expanded)
        if not path.is_file():
            raise SearchSpaceError(f"{self.source_path}: {field}: file not found: {path}")
        return path.resolve()


def _line_index(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each key path (as pydantic reports it in `loc`) to its 1-based line in the file."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = path + (key_node.value,)
            out[key] = key_node.start_mark.line + 1
            _line_index(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, path + (i,), out)
    return out


def _clean_loc(loc: tuple) -> tuple:
    """Drop the union-branch names pydantic inserts into `loc` ("IntRange", "list[...]")."""
    return tuple(k for k in loc if isinstance(k, int) or not re.match(r"^[A-Z]|^list\[|^function-", str(k)))


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    keys = _clean_loc(loc)
    for n in range(len(keys), -1, -1):
        if keys[:n] in lines:
            return lines[keys[:n]]
    return None


def _most_useful(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Of pydantic's errors, the one a person should read first: a misspelt key, then anything but a
    'wrong type for this union branch' error, then the deepest location."""
    def rank(err: dict[str, Any]) -> tuple:
        branch_type_miss = err["type"] in ("model_type", "list_type", "dict_type", "model_attributes_type")
        return (err["type"] != "extra_forbidden", branch_type_miss and len(err["loc"]) > 1, -len(err["loc"]))
    return min(errors, key=rank)


def parse_search_space(text: str, source: str) -> SearchSpace:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise SearchSpaceError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict) or root is None:
        raise SearchSpaceError(f"{source}:1: expected a mapping with model, knobs, workload, quality")
    lines = _line_index(root)
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as exc:
        err = _most_useful(exc.errors())
        line = _line_for(tuple(err["loc"]), lines)
        field = ".".join(str(k) for k in _clean_loc(tuple(err["loc"]))) or "(top level)"
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise SearchSpaceError(f"{source}:{line or '?'}: {field}: {err['msg']}{more}") from None
    digest = hashlib.sha256(text.encode()).hexdigest()
    return space.model_copy(update={"source_path": source, "source_sha256": digest})


def find_search_space(model: str) -> Path:
    """The shipped search space for a model alias (or a path's folder name)."""
    name = Path(model.rstrip("/")).name.lower()
    candidate = SEARCH_SPACE_DIR / f"{name}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in SEARCH_SPACE_DIR.glob("*.yaml"))) or "none"
        raise SearchSpaceError(f"no search space for '{model}' in {SEARCH_SPACE_DIR} (shipped: {known});"
                               " pass --search-space FILE")
    return candidate


def load_search_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"{path}: search-space file not found")
    return parse_search_space(path.read_text(), str(path))


def shipped_search_spaces() -> list[Path]:
    return sorted(SEARCH_SPACE_DIR.glob("*.yaml"))
