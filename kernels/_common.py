"""Shared plumbing for the Triton kernels: optional import, dispatch rule, small heuristics.

Dispatch rule (house style): a kernel's public function runs Triton on CUDA tensors and the
pure-PyTorch reference everywhere else. CI can force the Triton path onto CPU tensors under
the interpreter by setting both `TRITON_INTERPRET=1` and `VKAE_TRITON_INTERPRET_TESTS=1`
*before* `kernels` is imported: `@triton.jit` decides interpreter-vs-compiled at decoration
time, so flipping the variable later has no effect on already-imported kernels.
The flags are read once at import so the dispatchers stay free of `os.environ` lookups
(cheap, and nothing for `torch.compile` to guard on).
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU-only installs still get the reference paths.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Programmatic dependent launch (PDL, Hopper and newer). A decode step is ~700 short kernels, and each
# used to start only after the previous one had drained. With PDL a kernel is launched while its
# predecessor still runs; it does what needs no earlier result (a GEMV requests its first weight tiles),
# then waits (`pdl_wait`: the predecessor has completed and its writes are visible) before it reads or
# writes any activation, and only then lets the next kernel launch (letting it launch before waiting
# parks more CTAs on the SMs and was slower: H100 E4B step 5.20 ms vs 4.80 ms). VKAE_PDL=0 turns it
# off. Read at launch, so a benchmark can A/B it in one process (CUDA graphs keep what they captured).
PDL: bool = os.environ.get("VKAE_PDL", "1") != "0"
# Early trigger for the short dependent kernels only (norm sandwiches, split-K reductions, the q/k/v epilogue,
# decode attention; `pdl_flags(t, short=True)`): they let the next kernel launch *before* their own wait. A
# kernel's dependents launch only once every one of its CTAs has triggered, so the GEMV after a short kernel
# then parks its CTAs on the SMs the previous GEMV drains and requests its first weight tiles while that GEMV
# and the short kernel finish, instead of after. GEMVs keep the trigger after the wait: the global early trigger
# above was measured slower, our guess being that it let whole chains of GEMVs park (not measured). VKAE_PDL_EARLY=1 turns it on; read at launch.
PDL_EARLY_SHORT: bool = os.environ.get("VKAE_PDL_EARLY", "0") == "1"
# Triton gained the grid-dependency ops and the `launch_pdl` launch option in 3.4; older ones launch plainly.
_TRITON_HAS_PDL: bool = HAS_TRITON and hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")
FORCE_TRITON_ON_CPU: bool = INTERPRET and os.environ.get("VKAE_TRITON_INTERPRET_TESTS", "0") == "1"

# H100 SXM has 132 SMs; used when no CUDA device is visible (interpreter) so that the
# heuristics, and therefore the code paths the tests exercise, match the GPU.
_DEFAULT_SMS = 132
_PROPS_CACHE: dict[int, object] = {}  # CUDA device index -> torch.cuda.get_device_properties


def use_triton(t: torch.Tensor) -> bool:
    """True when this tensor should go to the Triton kernel rather than the reference."""
    if not HAS_TRITON:
        return False
    return t.is_cuda or FORCE_TRITON_ON_CPU


def pdl_flags(t: torch.Tensor, short: bool = False) -> dict[str, bool | int]:
    """Launch kwargs of a PDL-aware kernel for operands on t's device: the kernel's `PDL` constexpr
    and Triton's `launch_pdl` option, both on for CUDA devices of compute capability >= 9.0. `short`: the
    kernel is a short dependent one; with PDL_EARLY_SHORT its `PDL` is 2 (trigger before the wait)."""
    on = PDL and _TRITON_HAS_PDL and t.is_cuda and not INTERPRET
    if on:
        props = _cuda_props(t.device)
        on = (props.major, props.minor) >= (9, 0)
    return {"PDL": 2 if on and short and PDL_EARLY_SHORT else on, "launch_pdl": on}


def _cuda_props(device: torch.device):
    """torch.cuda.get_device_properties of a CUDA device (cached: launches ask on every call)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PROPS_CACHE:
        _PROPS_CACHE[idx] = torch.cuda.get_device_properties(idx)
    return _PROPS_CACHE[idx]


def num_sms(device: torch.device) -> int:
    """Streaming-multiprocessor count of `device` (cached; a constant under the interpreter)."""
    if device.type != "cuda":
        return _DEFAULT_SMS
    return _cuda_props(device).multi_processor_count


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tl_dtype(dtype: torch.dtype) -> object:
    """The triton dtype of a torch float dtype (a kernel's rounding target passed as a constexpr)."""
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def interpreted(kernel: object) -> bool:
    """Whether a `@triton.jit` object was built for the interpreter (tests use this to detect a
    module that was imported before `TRITON_INTERPRET=1` was set, and reload it)."""
    return type(kernel).__name__ == "InterpretedFunction"


def dot_fp32_operands(dtype: torch.dtype) -> bool:
    """bf16 `tl.dot` is silently wrong under the interpreter (anchors-engines.md §5.2): there the
    kernels cast bf16 tiles to fp32 before the dot. On the GPU bf16 goes to the tensor cores."""
    return INTERPRET and dtype == torch.bfloat16


if HAS_TRITON:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Under PDL: wait until the previous kernel has completed (its writes visible), then let the next
        kernel launch (PDL == 2: let it launch first, see PDL_EARLY_SHORT). A no-op without PDL. Every
        PDL-launched kernel calls this before touching activations; only reads of weights (never written
        during a step) may come before it."""
        if PDL == 2:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        elif PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
