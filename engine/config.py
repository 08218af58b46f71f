"""Frozen architecture config, read once from a checkpoint's `config.json`.

One dataclass covers `gemma4_text` (E2B/E4B: per-layer embeddings, KV sharing, 512-dim global
heads, proportional RoPE) and `gemma3_text`. Multimodal Gemma 4 configs are read through their
`text_config`; the vision and audio towers are never built.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelRefError

SUPPORTED_MODEL_TYPES = ("gemma4_text", "gemma3_text")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer type. `rotary_dims` pairs rotate; the rest are position-free."""

    theta: float
    head_dim: int
    rotary_pairs: int  # number of non-zero frequency pairs (head_dim // 2 unless partial)
    linear_factor: float = 1.0  # Gemma 3 "linear" scaling divides the frequencies


@dataclass(frozen=True)
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]  # per layer
    kv_heads: tuple[int, ...]  # per layer
    intermediate_sizes: tuple[int, ...]  # per layer
    kv_source: tuple[int, ...]  # per layer: the layer whose K/V it reads (itself when not shared)
    k_eq_v: tuple[bool, ...]  # per layer: V is the raw K projection (Gemma 4 attention_k_eq_v)
    sliding_window: int | None
    rope: dict[str, RopeSpec] = field(hash=False, compare=False)
    rms_norm_eps: float = 1e-6
    norm_plus_one: bool = False  # Gemma 3 norms scale by (1 + w); Gemma 4 by w
    has_v_norm: bool = False  # Gemma 4: scale-free RMSNorm on V
    attn_scale: float = 1.0  # Gemma 4: 1.0 (QK-norm); Gemma 3: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    ple_dim: int = 0  # Gemma 4 per-layer-embedding width (0: none)
    ple_vocab: int = 0
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0
    max_position_embeddings: int = 131072
    hidden_activation: str = "gelu_pytorch_tanh"

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """Layers that own a K/V cache (the others read their source layer's)."""
        return tuple(i for i in range(self.num_layers) if self.kv_source[i] == i)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def param_count(self) -> int:
        """Parameters of the text model (tied head counted once)."""
        n = self.vocab_size * self.hidden_size
        if self.ple_dim:
            n += self.ple_vocab * self.num_layers * self.ple_dim + self.hidden_size * self.num_layers * self.ple_dim
            n += self.ple_dim
        for i in range(self.num_layers):
            d, h, kv = self.head_dims[i], self.num_heads, self.kv_heads[i]
            n += 2 * self.hidden_size * h * d  # q, o
            n += d  # q_norm
            if self.kv_source[i] == i:
                n += self.hidden_size * kv * d * (1 if self.k_eq_v[i] else 2) + d
            n += 3 * self.hidden_size * self.intermediate_sizes[i]
            n += 4 * self.hidden_size
            if self.ple_dim:
                n += 2 * self.hidden_size * self.ple_dim + self.hidden_size + 1
        n += self.hidden_size
        if not self.tie_word_embeddings:
            n += self.vocab_size * self.hidden_size
        return n

    def bytes_touched_per_token(self, dtype_bytes: int = 2) -> int:
        """Weight bytes a single-stream decode step reads: every matrix once, the tables only as gathers."""
        n = self.param_count() - self.vocab_size * self.hidden_size  # the embedding is a gather...
        n += self.vocab_size * self.hidden_size  # ...but the tied head reads all of it
        if self.ple_dim:
            n -= self.ple_vocab * self.num_layers * self.ple_dim  # PLE table: one row gathered
        return n * dtype_bytes


def _text_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    if raw.get("model_type") in ("gemma4", "gemma3") and isinstance(raw.get("text_config"), dict):
        text = dict(raw["text_config"])
        text.setdefault("model_type", raw["model_type"] + "_text")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
            if key not in text and key in raw:
                text[key] = raw[key]
        return text
    return raw


def _req(cfg: dict[str, Any], key: str, source: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ModelRefError(f"{source}: missing field '{key}'")
    return cfg[key]


def _rope_spec(params: dict[str, Any] | None, head_dim: int, default_theta: float) -> RopeSpec:
    params = params or {}
    rope_type = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", default_theta))
    if rope_type == "proportional":
        pairs = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        return RopeSpec(theta=theta, head_dim=head_dim, rotary_pairs=pairs)
    if rope_type == "linear":
        return RopeSpec(theta=theta, head_dim=head_dim, rotary_pairs=head_dim // 2,
                        linear_factor=float(params.get("factor", 1.0)))
    if rope_type == "default":
        return RopeSpec(theta=theta, head_dim=head_dim, rotary_pairs=head_dim // 2)
    raise ModelRefError(f"config.json: rope_type '{rope_type}' is not supported (default, linear, proportional)")


def _layer_types(cfg: dict[str, Any], n: int, source: str) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:
        pattern = int(cfg.get("sliding_window_pattern", 6))
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    types = list(types)
    if len(types) != n:
        raise ModelRefError(f"{source}: layer_types has {len(types)} entries, num_hidden_layers is {n}")
    bad = sorted(set(types) - {SLIDING, FULL})
    if bad:
        raise ModelRefError(f"{source}: unsupported layer type(s) {bad}")
    return types


def arch_from_dict(raw: dict[str, Any], source: str = "config.json") -> ArchConfig:
    """Build the frozen architecture config. Raises ModelRefError naming the field at fault."""
    cfg = _text_config(raw, source)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelRefError(
            f"{source}: model_type '{model_type}' is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    n = int(_req(cfg, "num_hidden_layers", source))
    hidden = int(_req(cfg, "hidden_size", source))
    heads = int(_req(cfg, "num_attention_heads", source))
    kv = int(_req(cfg, "num_key_value_heads", source))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    types = _layer_types(cfg, n, source)
    eos = cfg.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    common: dict[str, Any] = dict(
        model_type=model_type, vocab_size=int(_req(cfg, "vocab_size", source)), hidden_size=hidden,
        num_layers=n, num_heads=heads, layer_types=tuple(types),
        sliding_window=cfg.get("sliding_window"), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        final_softcap=cfg.get("final_logit_softcapping"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=int(cfg.get("bos_token_id", 2) or 2), eos_token_ids=eos_ids,
        pad_token_id=int(cfg.get("pad_token_id", 0) or 0),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
        hidden_activation=str(cfg.get("hidden_activation", "gelu_pytorch_tanh")),
    )
    if common["hidden_activation"] != "gelu_pytorch_tanh":
        raise ModelRefError(f"{source}: hidden_activation '{common['hidden_activation']}' is not supported")
    rope_params = cfg.get("rope_parameters") or {}
    inter = int(_req(cfg, "intermediate_size", source))

    if model_type == "gemma3_text":
        if rope_params and SLIDING not in rope_params and "rope_type" in rope_params:
            rope_params = {FULL: rope_params}  # an old flat rope dict applies to the global layers
        full = dict(rope_params.get(FULL) or {})
        full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        if cfg.get("rope_scaling"):
            full.update(cfg["rope_scaling"])
        local = dict(rope_params.get(SLIDING) or {})
        local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
        return ArchConfig(
            **common, head_dims=(head_dim,) * n, kv_heads=(kv,) * n, intermediate_sizes=(inter,) * n,
            kv_source=tuple(range(n)), k_eq_v=(False,) * n,
            rope={FULL: _rope_spec(full, head_dim, 1e6), SLIDING: _rope_spec(local, head_dim, 1e4)},
            norm_plus_one=True, has_v_norm=False,
            attn_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5,
            # Gemma 3 replaced attention soft-capping with QK-norm: the reference ignores the field.
            attn_softcap=None,
        )

    # gemma4_text
    if cfg.get("enable_moe_block"):
        raise ModelRefError(f"{source}: enable_moe_block=true (26B-A4B MoE) is not supported by this engine")
    if cfg.get("use_bidirectional_attention") == "all":
        raise ModelRefError(f"{source}: use_bidirectional_attention='all' is not supported")
    global_dim = int(cfg.get("global_head_dim") or head_dim)
    k_eq_v_flag = bool(cfg.get("attention_k_eq_v", False))
    global_kv = cfg.get("num_global_key_value_heads")
    shared = int(cfg.get("num_kv_shared_layers", 0) or 0)
    first_shared = n - shared
    head_dims, kv_heads, k_eq_v, sources, inters = [], [], [], [], []
    # transformers >= 5.17 serialises the global-layer overrides as `per_layer_config` {index: {...}}
    # instead of `global_head_dim`; Google's checkpoints use the latter. Accept both.
    overrides: dict[int, dict[str, Any]] = {}
    for key, value in (cfg.get("per_layer_config") or {}).items():
        if str(key).isdigit() and isinstance(value, dict):
            overrides[int(key)] = value
    if overrides and "global_head_dim" not in cfg:
        global_dim = next((int(v["head_dim"]) for i, v in overrides.items() if types[i] == FULL and "head_dim" in v),
                          head_dim)
    for i, t in enumerate(types):
        is_full = t == FULL
        head_dims.append(int(overrides.get(i, {}).get("head_dim", global_dim if is_full else head_dim)))
        default_kv = int(global_kv) if (is_full and k_eq_v_flag and global_kv) else kv
        kv_heads.append(int(overrides.get(i, {}).get("num_key_value_heads", default_kv)))
        k_eq_v.append(is_full and k_eq_v_flag)
        if shared and i >= first_shared > 0:
            earlier = [j for j in range(first_shared) if types[j] == t]
            if not earlier:
                raise ModelRefError(f"{source}: KV-shared layer {i} ({t}) has no earlier layer of its type")
            sources.append(earlier[-1])
        else:
            sources.append(i)
        double = bool(cfg.get("use_double_wide_mlp")) and shared and i >= first_shared > 0
        inters.append(inter * (2 if double else 1))
    return ArchConfig(
        **common, head_dims=tuple(head_dims), kv_heads=tuple(kv_heads), intermediate_sizes=tuple(inters),
        kv_source=tuple(sources), k_eq_v=tuple(k_eq_v),
        rope={SLIDING: _rope_spec(rope_params.get(SLIDING), head_dim, 1e4),
              FULL: _rope_spec(rope_params.get(FULL), global_dim, 1e6)},
        norm_plus_one=False, has_v_norm=True, attn_scale=1.0, attn_softcap=None,
        ple_dim=int(cfg.get("hidden_size_per_layer_input", 0) or 0),
        ple_vocab=int(cfg.get("vocab_size_per_layer_input", 0) or 0),
    )


def load_arch(path: Path) -> ArchConfig:
    """Read `config.json` from a file or a model folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelRefError(f"{path}: config.json not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelRefError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise ModelRefError(f"{path}: expected a JSON object")
    return arch_from_dict(raw, str(path))
