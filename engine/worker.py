"""The worker API: the whole boundary between the tuner (or server, or CLI) and the engine.

A worker loads one model once (and optionally an MTP assistant), then measures it under any
number of knob settings without reloading:

    w = EngineWorker("gemma-3-270m", device="cpu")
    w.set_knobs(Knobs(sliding_window=128, batch_size=2))
    w.measure_ppl(records)            -> {"ppl", "nll_sum", "tokens", "seconds", ...}
    w.measure_tps(prompts, 64)        -> {"tps", "tps_decode", "tps_per_stream", ...}
    w.generate(prompts, 32)           -> list of output token-id lists (greedy by default)
    w.check_lossless(prompts, 32)     -> {"identical": bool, ...}
    w.describe()                      -> provenance: model, weights sha256 or "random", device, versions

Everything it returns is plain JSON-able data, so Ray can ship it between processes.
"""
from __future__ import annotations

import platform
import time
from typing import Any, Sequence

import torch

from . import ENGINE_VERSION
from .errors import KnobError, UserError
from .generate import Generator, SamplingParams
from .knobs import Knobs
from .loader import load_model
from .measure import PplRecord, measure_ppl_records, measure_tps


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"--device {device}: must be cpu, cuda or auto")
    return device


def device_info(device: str) -> dict[str, Any]:
    """What really ran: GPU name, memory, driver/CUDA, torch and triton versions."""
    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton  # noqa: F401

        info["triton"] = triton.__version__
    except Exception:  # triton is optional on CPU
        info["triton"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            gpu_name=props.name, gpu_memory_bytes=int(props.total_memory), cuda=torch.version.cuda,
            sm_count=props.multi_processor_count,
        )
        try:
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
        except Exception:
            info["driver"] = None
    else:
        info.update(gpu_name="cpu", cpu=platform.processor() or platform.machine(), cuda=None, driver=None)
    return info


class EngineWorker:
    """One loaded model (plus optional assistant) on one device; knobs change between measurements."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str | None = None,
        random_weights: bool = False,
        assistant: str | None = None,
        max_context: int = 4096,
        seed: int = 0,
        use_cuda_graphs: bool = True,
    ) -> None:
        self.device = pick_device(device)
        if dtype is None:
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"dtype {dtype!r}: must be float32, bfloat16 or float16")
        self.dtype = getattr(torch, dtype)
        t0 = time.perf_counter()
        self.loaded = load_model(model, device=self.device, dtype=self.dtype, random_weights=random_weights, seed=seed)
        self.assistant = None
        if assistant is not None:
            from .assistant_loader import load_assistant  # speculative decoding module

            self.assistant = load_assistant(assistant, target=self.loaded, device=self.device, dtype=self.dtype,
                                            random_weights=random_weights, seed=seed + 1)
        self.load_seconds = time.perf_counter() - t0
        self.max_context = max_context
        self.use_cuda_graphs = use_cuda_graphs and self.device.startswith("cuda")
        self.knobs = Knobs()
        self._generator: Generator | None = None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (encode, decode, bos_id, eos_ids, vocab_size, apply_chat_template). For
        geometry-only random-weight runs of real models: an ids-only stand-in whose text methods raise."""
        if self.loaded.tokenizer is not None:
            return self.loaded.tokenizer
        from .byte_tokenizer import IdsOnlyTokenizer

        a = self.loaded.arch
        return IdsOnlyTokenizer(a.vocab_size, a.bos_token_id, a.eos_token_ids, self.loaded.name)

    @property
    def text_tokenizer(self) -> Any:
        """The real tokenizer, or None when the model has no text vocabulary (geometry-only random runs)."""
        return self.loaded.tokenizer

    # ---- knobs -------------------------------------------------------------------------
    def set_knobs(self, knobs: Knobs | dict[str, Any]) -> None:
        if isinstance(knobs, dict):
            unknown = set(knobs) - set(Knobs.__dataclass_fields__)
            if unknown:
                raise KnobError(f"unknown knob(s): {', '.join(sorted(unknown))}")
            knobs = Knobs(**knobs)
        num_centroids = self.assistant.num_centroids if self.assistant is not None else None
        knobs.validate(self.loaded.arch.sliding_window, num_centroids)
        if knobs.drafter == "mtp" and self.assistant is None:
            raise KnobError("drafter=mtp needs an assistant (--assistant REF)")
        self.knobs = knobs
        self._generator = None  # rebuilt lazily: caches are sized by the knobs

    def generator(self) -> Generator:
        if self._generator is None:
            self._generator = Generator(self.loaded, self.knobs, max_context=self.max_context,
                                        use_cuda_graphs=self.use_cuda_graphs, assistant=self.assistant)
        return self._generator

    # ---- measurements -------------------------------------------------------------------
    def measure_ppl(self, records: Sequence[PplRecord | dict], max_records: int | None = None,
                    batch_tokens: int = 8192) -> dict[str, Any]:
        recs = [r if isinstance(r, PplRecord) else PplRecord.from_dict(r) for r in records]
        if max_records is not None:
            recs = recs[:max_records]
        return measure_ppl_records(self.loaded, recs, self.knobs, batch_tokens=batch_tokens)

    def measure_tps(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, repeats: int = 3,
                    warmup: int = 1) -> dict[str, Any]:
        return measure_tps(self.generator(), prompts, max_new_tokens, repeats=repeats, warmup=warmup)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams | dict | None = None, stop_at_eos: bool = False) -> list[list[int]]:
        if isinstance(sampling, dict):
            sampling = SamplingParams(**sampling)
        out = self.generator().generate(prompts, max_new_tokens, sampling or SamplingParams(), stop_at_eos=stop_at_eos)
        return out.tokens

    def check_lossless(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> dict[str, Any]:
        """Greedy output under the current knobs vs plain greedy decoding (same window and batch)."""
        spec = self.generate(prompts, max_new_tokens)
        plain_knobs = Knobs(sliding_window=self.knobs.sliding_window, batch_size=self.knobs.batch_size)
        plain = Generator(self.loaded, plain_knobs, max_context=self.max_context,
                          use_cuda_graphs=self.use_cuda_graphs).generate(prompts, max_new_tokens, SamplingParams()).tokens
        mismatches = [i for i, (a, b) in enumerate(zip(spec, plain)) if a != b]
        first = None
        if mismatches:
            a, b = spec[mismatches[0]], plain[mismatches[0]]
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return {"identical": not mismatches, "mismatched_prompts": mismatches, "first_mismatch_index": first,
                "prompts": len(prompts), "max_new_tokens": max_new_tokens}

    def describe(self) -> dict[str, Any]:
        d = {
            "engine_version": ENGINE_VERSION,
            "model": self.loaded.describe(),
            "assistant": self.assistant.describe() if self.assistant is not None else None,
            "dtype": str(self.dtype).replace("torch.", ""),
            "load_seconds": round(self.load_seconds, 3),
            "knobs": self.knobs.to_dict(),
        }
        d.update(device_info(self.device))
        return d
