"""Rebuild a recipe's workload (prompts and PPL records) exactly as the tuner built it.

The recipe records each input file's path and sha256 (`tuner.workload.describe_packed`), not its bytes. We
read the files again, check their sha256, repack them in the tuner's packed format and tokenize with
`tuner.workload.build_workload`, then compare the token hash with the recipe's `token_sha256`: the verify
run measures the very token ids the study measured, or it says why not.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

from engine.errors import UserError
from tuner.recipe import Recipe
from tuner.workload import BuiltWorkload, build_workload

FILE_KINDS = ("file", "jsonl", "text")


class WorkloadMismatch(UserError):
    """The recipe's workload files are missing, changed, or tokenize differently here."""


def _find(source: str, search_dirs: Sequence[Path]) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    for d in search_dirs:  # the recipe moved to another machine: look for the file by name
        candidate = Path(d) / path.name
        if candidate.is_file():
            return candidate
    where = ", ".join(str(d) for d in search_dirs) or "no --data-dir given"
    raise WorkloadMismatch(f"workload file {source} not found (also looked in: {where})")


def _repack(part: dict[str, Any], search_dirs: Sequence[Path]) -> dict[str, Any]:
    kind = part.get("kind")
    out = {k: v for k, v in part.items() if k not in ("kind", "source", "sha256")}
    if kind in FILE_KINDS:
        path = _find(part["source"], search_dirs)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != part["sha256"]:
            raise WorkloadMismatch(f"workload file {path} changed since the study: sha256 {digest[:12]}…,"
                                   f" the recipe recorded {part['sha256'][:12]}…")
        out[kind] = {"name": path.name, "source": str(path), "data": data, "sha256": digest}
    elif kind != "synthetic":
        raise WorkloadMismatch(f"workload entry of unknown kind {kind!r}")
    return out


def rebuild_workload(recipe: Recipe, tokenizer: Any, search_dirs: Sequence[Path] = ()) -> BuiltWorkload:
    packed = {"prompts": _repack(recipe.workload.prompts, search_dirs),
              "records": _repack(recipe.workload.ppl_records, search_dirs)}
    built = build_workload(packed, tokenizer)
    if built.token_sha256 != recipe.workload.token_sha256:
        raise WorkloadMismatch(f"the workload tokenizes to {built.token_sha256[:12]}… here, the study measured"
                               f" {recipe.workload.token_sha256[:12]}… (a different tokenizer?)")
    return built
