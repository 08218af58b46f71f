"""The evaluation workload: prompts for speed runs and PPL records, built identically on every worker.

The driver reads the referenced files once (`pack_workload`), hashes them for the recipe, and ships
their bytes to the actors, so a worker on another Ray node needs no copy of the files. Each actor then
tokenizes with its own loaded model's tokenizer (`build_workload`) and reports a hash of the token ids,
which the driver compares across workers.
"""
from __future__ import annotations

import hashlib
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from .errors import WorkloadError
from .search_space import SearchSpace


class Tokenizer(Protocol):
    bos_id: int
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...


@dataclass
class BuiltWorkload:
    prompts: list[list[int]]
    records: list[dict[str, list[int]]]  # {"context_token_ids", "target_token_ids"}
    token_sha256: str  # over prompts and records, to prove every worker measures the same thing

    def summary(self) -> dict[str, Any]:
        return {"prompts": len(self.prompts), "records": len(self.records),
                "target_tokens": sum(len(r["target_token_ids"]) for r in self.records),
                "prompt_tokens_mean": round(sum(map(len, self.prompts)) / max(1, len(self.prompts)), 1),
                "token_sha256": self.token_sha256}


def _file_entry(space: SearchSpace, ref: str, field: str) -> dict[str, Any]:
    path = space.resolve_path(ref, field)
    data = path.read_bytes()
    return {"name": path.name, "source": str(path), "data": data, "sha256": hashlib.sha256(data).hexdigest()}


def pack_workload(space: SearchSpace) -> dict[str, Any]:
    """Read and hash every file the workload names. Plain data, so Ray can ship it to any node."""
    w = space.workload
    prompts: dict[str, Any] = {"count": w.prompts.count}
    if w.prompts.path is not None:
        prompts["file"] = _file_entry(space, w.prompts.path, "workload.prompts.path")
    else:
        prompts["synthetic"] = w.prompts.synthetic.model_dump()
    records: dict[str, Any] = {"count": w.ppl_records.count}
    if w.ppl_records.path is not None:
        records["jsonl"] = _file_entry(space, w.ppl_records.path, "workload.ppl_records.path")
    elif w.ppl_records.text is not None:
        records["text"] = _file_entry(space, w.ppl_records.text, "workload.ppl_records.text")
        records["context_tokens"] = w.ppl_records.context_tokens
        records["target_tokens"] = w.ppl_records.target_tokens
    else:
        records["synthetic"] = w.ppl_records.synthetic.model_dump()
    return {"prompts": prompts, "records": records}


def describe_packed(packed: dict[str, Any]) -> dict[str, Any]:
    """What the recipe records about the workload's inputs (sources and sha256, never the bytes)."""
    def entry(part: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in part.items() if k not in ("file", "jsonl", "text")}
        for kind in ("file", "jsonl", "text"):
            if kind in part:
                out.update(kind=kind, source=part[kind]["source"], sha256=part[kind]["sha256"])
        if "synthetic" in part:
            out["kind"] = "synthetic"
        return out
    return {"prompts": entry(packed["prompts"]), "records": entry(packed["records"])}


def text_to_records(token_ids: Sequence[int], context_tokens: int, target_tokens: int, bos_id: int,
                    count: int | None = None) -> list[dict[str, list[int]]]:
    """Cut a tokenized corpus into consecutive, non-overlapping records: `<bos>` + `context_tokens`
    tokens of context, then `target_tokens` scored tokens. The tail that does not fill a record is
    dropped, so every record scores the same number of tokens."""
    span = context_tokens + target_tokens
    records = []
    for start in range(0, len(token_ids) - span + 1, span):
        chunk = list(token_ids[start:start + span])
        records.append({"context_token_ids": [bos_id, *chunk[:context_tokens]],
                        "target_token_ids": chunk[context_tokens:]})
        if count is not None and len(records) >= count:
            break
    return records


def _synthetic_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    # ids 0-2 are pad/eos/bos in every Gemma vocabulary; keep them out of random text
    return [rng.randrange(3, vocab_size) for _ in range(n)]


def _materialize(entry: dict[str, Any], folder: Path) -> Path:
    path = folder / entry["name"]
    path.write_bytes(entry["data"])
    return path


def build_workload(packed: dict[str, Any], tokenizer: Tokenizer) -> BuiltWorkload:
    """Turn the packed workload into token ids with this model's tokenizer (runs inside an actor)."""
    from engine import workload as engine_workload  # the engine's file-format readers

    vocab = int(tokenizer.vocab_size)
    with tempfile.TemporaryDirectory(prefix="vkae-workload-") as tmp:
        folder = Path(tmp)
        p = packed["prompts"]
        if "file" in p:
            prompts = [list(map(int, x)) for x in engine_workload.load_prompts(_materialize(p["file"], folder), tokenizer)]
        else:
            s = p["synthetic"]
            rng = random.Random(s["seed"])
            prompts = [[tokenizer.bos_id, *_synthetic_ids(rng, s["length"] - 1, vocab)] for _ in range(s["count"])]
        if p.get("count"):
            prompts = prompts[:p["count"]]

        r = packed["records"]
        if "jsonl" in r:
            loaded = engine_workload.load_ppl_records(_materialize(r["jsonl"], folder))
            records = [{"context_token_ids": list(map(int, x.context_token_ids)),
                        "target_token_ids": list(map(int, x.target_token_ids))} for x in loaded]
        elif "text" in r:
            text = r["text"]["data"].decode("utf-8")
            records = text_to_records(tokenizer.encode(text, add_bos=False), r["context_tokens"],
                                      r["target_tokens"], tokenizer.bos_id, r.get("count"))
        else:
            s = r["synthetic"]
            rng = random.Random(s["seed"])
            records = [{"context_token_ids": [tokenizer.bos_id, *_synthetic_ids(rng, s["context_tokens"], vocab)],
                        "target_token_ids": _synthetic_ids(rng, s["target_tokens"], vocab)} for _ in range(s["count"])]
        if r.get("count"):
            records = records[:r["count"]]
    if not prompts:
        raise WorkloadError("workload.prompts: no prompts were read")
    if not records:
        raise WorkloadError("workload.ppl_records: no PPL records were built (text too short for one record?)")
    too_big = [i for i, x in enumerate(prompts) if max(x) >= vocab]
    if too_big:
        raise WorkloadError(f"workload.prompts: prompt {too_big[0]} has token ids beyond the vocabulary ({vocab})")
    digest = hashlib.sha256(json.dumps([prompts, records], separators=(",", ":")).encode()).hexdigest()
    return BuiltWorkload(prompts=prompts, records=records, token_sha256=digest)
