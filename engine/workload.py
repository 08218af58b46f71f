"""Workload files: PPL records (JSONL) and prompt sets (ShareGPT JSON, JSONL, or plain text).

Prompt formats accepted by `load_prompts`:
- ShareGPT JSON (the challenge's `eval_prompts_sharegpt.json`): a list of {"conversations": [...]};
  the first human turn goes through the model's chat template;
- JSONL: one object per line with "prompt_token_ids" (used as is), or "prompt" (text, raw), or
  "messages" (chat template);
- any other file: plain text, one prompt per non-empty line (raw, with BOS).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError
from .measure import PplRecord


def load_ppl_records(path: str | Path, limit: int | None = None) -> list[PplRecord]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: PPL records file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(PplRecord.from_dict(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            except UserError as exc:
                raise UserError(f"{path}:{lineno}: {exc}") from None
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise UserError(f"{path}: no PPL records")
    return records


def _need_tokenizer(tokenizer: Any, path: Path) -> Any:
    if tokenizer is None:
        raise UserError(f"{path}: text prompts need a tokenizer, and this model has none (use prompt_token_ids)")
    return tokenizer


def _sharegpt_messages(item: dict[str, Any], where: str) -> list[dict[str, str]]:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    conv = item.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise UserError(f"{where}: expected a non-empty 'conversations' list")
    first_user = next((t for t in conv if roles.get(t.get("from")) == "user"), None)
    if first_user is None or not isinstance(first_user.get("value"), str):
        raise UserError(f"{where}: no human turn with a text 'value'")
    return [{"role": "user", "content": first_user["value"]}]


def load_prompts(path: str | Path, tokenizer: Any, limit: int | None = None) -> list[list[int]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found")
    text = path.read_text(encoding="utf-8")
    prompts: list[list[int]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of ShareGPT items")
        tok = _need_tokenizer(tokenizer, path)
        for n, item in enumerate(data):
            prompts.append(tok.apply_chat_template(_sharegpt_messages(item, f"{path}[{n}]")))
            if limit is not None and len(prompts) >= limit:
                break
    elif path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
            if "prompt_token_ids" in item:
                ids = item["prompt_token_ids"]
                if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
                    raise UserError(f"{where}: prompt_token_ids must be a non-empty list of integers")
                prompts.append(ids)
            elif "messages" in item:
                prompts.append(_need_tokenizer(tokenizer, path).apply_chat_template(item["messages"]))
            elif isinstance(item.get("prompt"), str):
                prompts.append(_need_tokenizer(tokenizer, path).encode(item["prompt"]))
            else:
                raise UserError(f"{where}: needs 'prompt_token_ids', 'prompt' or 'messages'")
            if limit is not None and len(prompts) >= limit:
                break
    else:
        tok = _need_tokenizer(tokenizer, path)
        for line in text.splitlines():
            if line.strip():
                prompts.append(tok.encode(line.strip()))
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts
