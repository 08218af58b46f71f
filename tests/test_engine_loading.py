"""Loading checkpoints the way users have them, and clear errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.errors import KnobError, ModelRefError
from engine.knobs import Knobs
from engine.loader import load_model
from engine.registry import TINY_GEMMA4
from hf_reference import hf_causal_lm

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("tiny-gemma4")
    ref = hf_causal_lm(TINY_GEMMA4, seed=5)
    ref.save_pretrained(folder, max_shard_size="200KB")  # sharded: exercises the index file
    return folder, ref


def _logits(loaded, ids):
    with torch.no_grad():
        pos = torch.arange(ids.shape[1])[None]
        return loaded.model.logits(loaded.model.forward_fresh(ids, pos, loaded.arch.sliding_window))


def test_local_folder_sharded_safetensors(saved_model) -> None:
    folder, ref = saved_model
    assert (folder / "model.safetensors.index.json").is_file()
    loaded = load_model(str(folder))
    ids = torch.randint(3, 500, (1, 30))
    with torch.no_grad():
        want = ref(ids).logits
    assert (_logits(loaded, ids) - want).abs().max().item() <= 1e-4
    sha = loaded.weights_sha256()
    assert isinstance(sha, dict) and len(sha) >= 2 and all(len(v) == 64 for v in sha.values())


def test_multimodal_config_and_names_and_hf_cache(saved_model, tmp_path, monkeypatch) -> None:
    """A Gemma 4 multimodal checkpoint (text_config, model.language_model.* names, towers) in the HF cache."""
    folder, ref = saved_model
    from safetensors.torch import save_file

    snap = tmp_path / "hub" / "models--acme--tiny-mm" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--acme--tiny-mm" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-mm" / "refs" / "main").write_text("abc123")
    text_cfg = json.loads((folder / "config.json").read_text())
    (snap / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": text_cfg,
                                                  "vision_config": {"hidden_size": 8}}))
    tensors = {k.replace("model.", "model.language_model.", 1): v.contiguous() for k, v in ref.state_dict().items()
               if k.startswith("model.")}
    tensors["model.vision_tower.encoder.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("acme/tiny-mm")
    ids = torch.randint(3, 500, (1, 25))
    with torch.no_grad():
        want = ref(ids).logits
    assert (_logits(loaded, ids) - want).abs().max().item() <= 1e-4


def test_random_weights_say_so() -> None:
    loaded = load_model("tiny-gemma4", random_weights=True)
    assert loaded.describe()["weights"] == "random"
    assert loaded.arch.kv_source == (0, 1, 2, 3, 4, 4, 4, 3)


@pytest.mark.parametrize("mutate, message", [
    (lambda f: (f / "config.json").unlink(), "config.json not found"),
    (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "model_type": "llama"})), "model_type 'llama'"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "hidden_size": 96})), "has shape"),
    (lambda f: next(f.glob("model-0000*.safetensors")).unlink(), "is missing"),
    (lambda f: [p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]) for p in f.glob("model-00001*")],
     "truncated or corrupt"),
])
def test_bad_checkpoints_give_one_clear_error(saved_model, tmp_path, mutate, message) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(saved_model[0], folder)
    mutate(folder)
    with pytest.raises(ModelRefError, match=message):
        load_model(str(folder))


def test_knob_errors() -> None:
    Knobs(sliding_window=16).validate(16)
    with pytest.raises(KnobError, match="trained window 16"):
        Knobs(sliding_window=17).validate(16)
    with pytest.raises(KnobError, match="between 1"):
        Knobs(sliding_window=0).validate(16)
    with pytest.raises(KnobError, match="cache headroom"):
        Knobs(draft_tokens=9, drafter="ngram").validate(16)
    with pytest.raises(KnobError, match="centroids"):
        Knobs(drafter="mtp", draft_tokens=2, centroid_top_k=0).validate(16, 2048)


@pytest.mark.parametrize("argv, message", [
    (["generate", "no-such-model", "--prompt", "x"], "unknown model"),
    (["generate", "tiny-gemma4", "--prompt", "x"], "add --random-weights"),
    (["bench", "tiny-gemma4", "--random-weights", "--sliding-window", "99"], "trained window 16"),
    (["bench", "tiny-gemma4", "--random-weights", "--prompts", "/nonexistent.jsonl"], "not found"),
    (["generate", "tiny-gemma4", "--random-weights", "--prompt-ids", "1,x"], "comma-separated"),
])
def test_cli_user_errors_have_no_traceback(argv, message) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "tuner.cli", *argv], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_geometry_only_models_have_an_ids_only_tokenizer() -> None:
    """Random weights at a real model's geometry have no tokenizer: token-id workloads work, text fails clearly."""
    from engine.byte_tokenizer import IdsOnlyTokenizer
    from engine.errors import UserError

    tok = IdsOnlyTokenizer(262144, 2, (1, 106), "gemma-4-e4b")
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (262144, 2, (1, 106))
    for call in (lambda: tok.encode("hi"), lambda: tok.decode([5]), lambda: tok.apply_chat_template([])):
        with pytest.raises(UserError, match="without a tokenizer"):
            call()
