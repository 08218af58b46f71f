"""Log-probabilities of tokens: the chosen one, its rank and the top-N alternatives.

`prompt_logprobs` is the teacher-forced scoring of `engine.measure.score_records` (forward_fresh over
positions 0..L-1 with the recipe's window, `model.logits` = fp32 softcapped full-vocabulary logits, fp32
log-softmax), kept per position instead of summed: score_records returns one summed NLL per record, and the
API needs each token's value and its top alternatives. The sum of these values over a record's target
tokens is that record's NLL, which the tests check against the engine's own PPL.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

CHUNK = 256  # positions per logits block: V=262144 fp32 logits are 1 MiB per position


def token_logprobs(logits: torch.Tensor, token: int, top_n: int | None) -> tuple[float, list[tuple[int, float]]]:
    """logits [V] fp32 -> (logprob of `token`, [(id, logprob)] of the top_n most likely tokens)."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if top_n:
        values, ids = lsm.topk(top_n)
        top = list(zip(ids.tolist(), values.tolist()))
    return float(lsm[token]), top


@torch.inference_mode()
def prompt_logprobs(model: Any, ids: Sequence[int], window: int | None, top_n: int) -> list[dict[int, dict] | None]:
    """vLLM's prompt_logprobs layout: entry 0 is None (nothing predicts the first token); entry p maps the
    prompt's token p, and the top_n most likely tokens at p, to {"logprob", "rank"}."""
    dev = model.device
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=dev)
    positions = torch.arange(len(ids), device=dev)[None]
    hidden = model.forward_fresh(tokens, positions, window)[0]  # [L, H]
    out: list[dict[int, dict] | None] = [None]
    for start in range(0, len(ids) - 1, CHUNK):
        stop = min(start + CHUNK, len(ids) - 1)
        lsm = torch.log_softmax(model.logits(hidden[start:stop]), dim=-1)  # position p predicts token p+1
        target = tokens[0, start + 1:stop + 1]
        chosen = lsm.gather(1, target[:, None])[:, 0]
        ranks = (lsm > chosen[:, None]).sum(dim=1) + 1
        if top_n:
            top_v, top_i = lsm.topk(top_n, dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, (tok, lp, rank) in enumerate(zip(target.tolist(), chosen.tolist(), ranks.tolist())):
            entry = {tok: {"logprob": lp, "rank": rank}}
            if top_n:
                for r, (t, v) in enumerate(zip(top_i[j], top_v[j]), 1):
                    entry.setdefault(t, {"logprob": v, "rank": r})
            out.append(entry)
    return out
