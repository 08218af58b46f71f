"""Bar 3 and export: `vkae-tune verify` passes on a fresh recipe and fails on an edited one (hash), on one measured
on another GPU, and on one whose (validly sealed) TPS claim is out of reach; `export` for vLLM and SGLang."""
from __future__ import annotations

import json
import shlex

import pytest

from server_helpers import tiny_recipe
from tuner.cli import main
from tuner.recipe import Recipe, load_recipe, write_recipe


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    return tiny_recipe(tmp_path_factory)


def _resealed(recipe: Recipe, path, **updates) -> str:
    """A recipe written through the tuner's own writer (valid hash) with some sections replaced."""
    write_recipe(recipe.model_copy(update=updates), path)
    return str(path)


def _verify(capsys, *args: str) -> tuple[int, dict, str]:
    code = main(["verify", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1]), out


# TPS of a 0.4M-parameter model on a 2-core CPU shared with other jobs swings several-fold between runs (seen:
# claims of 40 and 422 tok/s, re-measured 117 to 475), so CI checks the TPS comparison at 10 % of the claim;
# the 95 % default is for GPUs (bar 3 on GPU is the device owner's run). test_verify_fails_when_the_tps_claim_is_out_of_reach shows the check can fail.
CPU_TPS_RATIO = "0.1"


def test_verify_passes_on_a_fresh_recipe(recipe_path, capsys):
    for _ in range(3):  # a burst of load from other jobs can still sink one TPS run: up to 3 attempts
        code, report, out = _verify(capsys, str(recipe_path), "--min-tps-ratio", CPU_TPS_RATIO)
        if code == 0:
            break
    assert code == 0, out
    checks = {c["check"]: c for c in report["checks"]}
    assert list(checks) == ["recipe", "gpu", "weights", "workload", "ppl", "tps"]
    recipe = load_recipe(recipe_path)
    assert checks["ppl"]["measured"] == pytest.approx(recipe.metrics.ppl, rel=1e-6)  # same tokens, same knobs
    assert checks["tps"]["measured"] >= float(CPU_TPS_RATIO) * recipe.metrics.tps.value
    assert "VERIFIED" in out


def test_verify_fails_on_a_hand_edited_tps_claim(recipe_path, tmp_path, capsys):
    recipe = load_recipe(recipe_path)
    text = recipe_path.read_text()
    claim = f"value: {recipe.metrics.tps.value!r}"
    assert claim in text
    edited = tmp_path / "edited.yaml"
    edited.write_text(text.replace(claim, f"value: {recipe.metrics.tps.value * 3!r}"))
    code, report, out = _verify(capsys, str(edited))
    assert code == 1 and not report["ok"]
    assert report["checks"][0]["check"] == "recipe" and "content hash mismatch" in report["checks"][0]["note"]


def test_verify_fails_on_a_recipe_from_a_faster_gpu(recipe_path, tmp_path, capsys):
    recipe = load_recipe(recipe_path)
    hw = recipe.hardware.model_copy(update={"gpu_profile": "h100", "gpu_name": "NVIDIA H100 80GB HBM3",
                                            "device": "cuda", "dtype": "bfloat16"})
    path = _resealed(recipe, tmp_path / "h100.yaml", hardware=hw)
    code, report, out = _verify(capsys, path)
    assert code == 1
    gpu = [c for c in report["checks"] if c["check"] == "gpu"][0]
    assert not gpu["ok"] and "NVIDIA H100" in gpu["note"] and "GPU mismatch" in gpu["note"]


def test_verify_fails_when_the_tps_claim_is_out_of_reach(recipe_path, tmp_path, capsys):
    """A validly sealed recipe whose claim is 100x what this machine does: the TPS comparison itself fails."""
    recipe = load_recipe(recipe_path)
    metrics = recipe.metrics.model_copy(update={"tps": recipe.metrics.tps.model_copy(
        update={"value": recipe.metrics.tps.value * 1000})})
    code, report, out = _verify(capsys, _resealed(recipe, tmp_path / "inflated.yaml", metrics=metrics),
                                "--repeats", "1", "--min-tps-ratio", CPU_TPS_RATIO)
    assert code == 1
    checks = {c["check"]: c["ok"] for c in report["checks"]}
    assert checks == {"recipe": True, "gpu": True, "weights": True, "workload": True, "ppl": True, "tps": False}


def test_verify_fails_when_ppl_exceeds_the_limit(recipe_path, tmp_path, capsys):
    recipe = load_recipe(recipe_path)
    limit = recipe.quality_limit.model_copy(update={"ppl_limit": recipe.metrics.ppl * 0.5})
    code, report, _ = _verify(capsys, _resealed(recipe, tmp_path / "strict.yaml", quality_limit=limit),
                              "--repeats", "1", "--min-tps-ratio", CPU_TPS_RATIO)
    assert code == 1 and not [c for c in report["checks"] if c["check"] == "ppl"][0]["ok"]


def _export(capsys, path: str, target: str) -> dict:
    assert main(["export", path, "--to", target, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_plain_recipe(recipe_path, capsys):
    v = _export(capsys, str(recipe_path), "vllm")
    argv = v["argv"]
    assert argv[:2] == ["vllm", "serve"] and shlex.split(v["command"]) == argv
    flag = lambda a, f: a[a.index(f) + 1]  # noqa: E731
    assert flag(argv, "--max-num-seqs") == "4" and flag(argv, "--dtype") == "float32"
    assert flag(argv, "--max-model-len") == "4096" and flag(argv, "--load-format") == "dummy"
    assert "--speculative-config" not in argv
    lost = dict(v["no_equivalent"])
    assert "sliding_window" in lost and "8 (trained 16)" in lost["sliding_window"]
    s = _export(capsys, str(recipe_path), "sglang")
    assert s["argv"][:3] == ["python", "-m", "sglang.launch_server"]
    assert flag(s["argv"], "--max-running-requests") == "4" and flag(s["argv"], "--context-length") == "4096"
    assert "sliding_window" in dict(s["no_equivalent"])
    assert main(["export", str(recipe_path), "--to", "sglang"]) == 0
    text = capsys.readouterr().out
    assert "flags checked against" in text and "no equivalent" in text


def test_export_speculative_recipes(recipe_path, tmp_path, capsys):
    recipe = load_recipe(recipe_path)
    ngram = _resealed(recipe, tmp_path / "ngram.yaml",
                      knobs={**recipe.knobs, "sliding_window": None, "drafter": "ngram", "draft_tokens": 3})
    v = _export(capsys, ngram, "vllm")
    cfg = json.loads(v["argv"][v["argv"].index("--speculative-config") + 1])
    assert cfg == {"method": "ngram", "num_speculative_tokens": 3}
    assert "sliding_window" not in dict(v["no_equivalent"])
    s = _export(capsys, ngram, "sglang")
    assert s["argv"][s["argv"].index("--speculative-algorithm") + 1] == "NGRAM"
    assert s["argv"][s["argv"].index("--speculative-num-draft-tokens") + 1] == "4"

    model = recipe.model.model_copy(update={"reference": "gemma-4-e4b", "name": "gemma-4-e4b"})
    # a folder reference exports as that folder (an alias would export as its HF repo id)
    assistant = recipe.model.model_copy(update={"reference": "my-assistant", "name": "assistant",
                                                "details": {"folder": "/models/gemma-4-E4B-it-assistant"}})
    mtp = _resealed(recipe, tmp_path / "mtp.yaml", model=model, assistant=assistant,
                    knobs={"sliding_window": None, "batch_size": 16, "drafter": "mtp", "draft_tokens": 2,
                           "centroid_top_k": 32})
    v = _export(capsys, mtp, "vllm")
    assert v["argv"][2] == "google/gemma-4-E4B-it"
    cfg = json.loads(v["argv"][v["argv"].index("--speculative-config") + 1])
    assert cfg == {"method": "mtp", "num_speculative_tokens": 2, "model": "/models/gemma-4-E4B-it-assistant"}
    assert "centroid_top_k" in dict(v["no_equivalent"])
    s = _export(capsys, mtp, "sglang")
    assert "--speculative-algorithm" not in s["argv"]
    lost = dict(s["no_equivalent"])
    assert "drafter=mtp, draft_tokens=2" in lost and "centroid_top_k" in lost
