"""Load a Gemma 4 MTP assistant: alias, local folder or HF-cache repo id, or random weights at its geometry."""
from __future__ import annotations

import json
from typing import Any

import torch

from .assistant import Gemma4Assistant
from .config import ArchConfig, arch_from_dict
from .errors import ModelRefError
from .loader import _weight_files, file_sha256, read_safetensors, resolve


def _parse(raw: dict[str, Any], where: str) -> tuple[ArchConfig, dict[str, Any]]:
    if raw.get("model_type") != "gemma4_assistant":
        raise ModelRefError(f"{where}: model_type '{raw.get('model_type')}' is not a Gemma 4 assistant (gemma4_assistant)")
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ModelRefError(f"{where}: missing field 'text_config'")
    text = {**text, "model_type": "gemma4_text"}
    if text.get("hidden_size_per_layer_input"):
        raise ModelRefError(f"{where}: text_config.hidden_size_per_layer_input must be 0 for an assistant")
    arch = arch_from_dict(text, where)
    meta = {"backbone_hidden_size": int(raw.get("backbone_hidden_size", 1536)),
            "num_centroids": int(raw.get("num_centroids", 2048)),
            "top_k": int(raw.get("centroid_intermediate_top_k", 32)),
            "ordered": bool(raw.get("use_ordered_embeddings", False))}
    return arch, meta


def _check_compatible(arch: ArchConfig, meta: dict[str, Any], target: ArchConfig, where: str) -> None:
    if meta["backbone_hidden_size"] != target.hidden_size:
        raise ModelRefError(f"{where}: backbone_hidden_size {meta['backbone_hidden_size']} != the target's hidden_size "
                            f"{target.hidden_size}")
    if arch.vocab_size != target.vocab_size:
        raise ModelRefError(f"{where}: vocab_size {arch.vocab_size} != the target's {target.vocab_size}")
    for t in set(arch.layer_types):
        mine = [i for i in range(arch.num_layers) if arch.layer_types[i] == t][0]
        src = [i for i in target.cache_layers if target.layer_types[i] == t]
        if not src:
            raise ModelRefError(f"{where}: the target has no {t} cache layer to share")
        if (arch.head_dims[mine], arch.kv_heads[mine]) != (target.head_dims[src[-1]], target.kv_heads[src[-1]]):
            raise ModelRefError(f"{where}: {t} heads ({arch.kv_heads[mine]} x {arch.head_dims[mine]}) do not match "
                                f"the target's shared cache ({target.kv_heads[src[-1]]} x {target.head_dims[src[-1]]})")
    if meta["ordered"] and arch.vocab_size % meta["num_centroids"]:
        raise ModelRefError(f"{where}: vocab_size {arch.vocab_size} is not a multiple of num_centroids")


def _random(arch: ArchConfig, meta: dict[str, Any], device: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    from .loader import make_random_weights

    own = make_random_weights(arch, device, dtype, seed)
    keep = {k: v for k, v in own.items() if "k_proj" not in k and "v_proj" not in k and "k_norm" not in k}
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    H, Hb = arch.hidden_size, meta["backbone_hidden_size"]
    keep["pre_projection.weight"] = torch.randn(H, 2 * Hb, generator=gen, device=device, dtype=dtype).mul_(0.02)
    keep["post_projection.weight"] = torch.randn(Hb, H, generator=gen, device=device, dtype=dtype).mul_(0.02)
    if meta["ordered"]:
        keep["masked_embedding.centroids.weight"] = torch.randn(meta["num_centroids"], H, generator=gen,
                                                                device=device, dtype=dtype).mul_(0.02)
        keep["masked_embedding.token_ordering"] = torch.randperm(arch.vocab_size, generator=gen, device=device)
    return keep


def _assistant_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def load_assistant(ref: str, target: Any, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   random_weights: bool = False, seed: int = 1) -> Gemma4Assistant:
    resolved = resolve(ref, random_weights)
    if resolved.raw_config is not None:
        raw, where = resolved.raw_config, f"{resolved.name} geometry"
    else:
        path = resolved.folder / "config.json"
        try:
            raw, where = json.loads(path.read_text()), str(path)
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelRefError(f"{path}: cannot read config.json ({exc})") from None
    arch, meta = _parse(raw, where)
    _check_compatible(arch, meta, target.arch, where)
    files = [] if random_weights else _weight_files(resolved.folder)
    weights = (_random(arch, meta, device, dtype, seed) if random_weights
               else read_safetensors(files, device, dtype, rename=_assistant_name))
    for name in ("pre_projection.weight", "post_projection.weight", "embed_tokens.weight", "norm.weight"):
        if name not in weights:
            raise ModelRefError(f"{resolved.folder or resolved.name}: assistant tensor '{name}' is missing")
    model = Gemma4Assistant(arch, weights, meta["num_centroids"], meta["top_k"], meta["ordered"]).eval()
    model._describe = {"name": resolved.name,
                       "weights": "random" if random_weights else {p.name: file_sha256(p) for p in files},
                       "num_centroids": meta["num_centroids"], "default_top_k": meta["top_k"]}
    return model
