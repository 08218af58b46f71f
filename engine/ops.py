"""The decoder's elementwise pieces as pure functions of tensors, so each can be fused into one kernel.

On CUDA every function here runs through `torch.compile` (one fused Triton kernel per call site and
shape: a norm, a residual add and the next norm in one pass over the hidden state instead of ~10
kernels); on CPU, and in tests, the same Python function runs eagerly and is the reference.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

_COMPILE = os.environ.get("VKAE_COMPILE_OPS", "1") != "0"
# None: torch.compile's default (static first, then one dynamic-shape recompile); False: one static
# kernel per shape (a 1-token decode and a K+1 verify then each get their own exactly-shaped kernel).
COMPILE_DYNAMIC: bool | None = False
_COMPILED: list[list[Callable]] = []


def reset_compiled() -> None:
    """Forget compiled kernels (a benchmark switching COMPILE_DYNAMIC in one process)."""
    for holder in _COMPILED:
        holder.clear()


def _fused(fn: Callable) -> Callable:
    compiled: list[Callable] = []
    _COMPILED.append(compiled)

    def run(*args, **kwargs):
        if _COMPILE and args[0].is_cuda:
            if not compiled:
                import torch._dynamo

                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                compiled.append(torch.compile(fn, fullgraph=True, dynamic=COMPILE_DYNAMIC))
            return compiled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    run.reference = fn  # type: ignore[attr-defined]
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, plus_one: bool) -> torch.Tensor:
    """Gemma RMSNorm in fp32, cast back (Gemma 4: x*w, Gemma 3: x*(1+w), weight None: scale-free)."""
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * (1.0 + weight.float() if plus_one else weight.float())
    return out.type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


@_fused
def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
              plus_one: bool) -> torch.Tensor:
    """q or k: per-head RMSNorm then RoPE. x [B, T, H, D], cos/sin [B, T, 1, D]."""
    return apply_rope(rms_norm(x, weight, eps, plus_one), cos, sin)


@_fused
def write_kv(k_raw: torch.Tensor, v_raw: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor, rows: torch.Tensor,
             slots: torch.Tensor, pos32: torch.Tensor, eps: float, plus_one: bool, v_norm: bool) -> None:
    """Decode/verify K/V: k-norm + RoPE, v-norm, and the scatter into the cache slots in one fused pass.
    k_raw/v_raw [B, T, Hkv, D]; rows/slots [B, T]; caches [B, Hkv, S, D]; slot_pos [B, S]."""
    k = apply_rope(rms_norm(k_raw, k_weight, eps, plus_one), cos, sin)
    v = rms_norm(v_raw, None, eps, False) if v_norm else v_raw
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v
    slot_pos[rows, slots] = pos32


@_fused
def scale_free_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 4's v-norm."""
    return rms_norm(x, None, eps, False)


@_fused
def norm(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool) -> torch.Tensor:
    return rms_norm(x, weight, eps, plus_one)


@_fused
def add_norm(x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, eps: float, plus_one: bool
             ) -> torch.Tensor:
    """residual + norm(x)."""
    return residual + rms_norm(x, w_post, eps, plus_one)


@_fused
def sandwich(x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, w_next: torch.Tensor,
             scalar: torch.Tensor | None, eps: float, plus_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma's post-norm residual add, optional layer scalar, then the next pre-norm:
    h = (residual + norm(x, w_post)) * scalar;  y = norm(h, w_next)."""
    h = residual + rms_norm(x, w_post, eps, plus_one)
    if scalar is not None:
        h = h * scalar
    return h, rms_norm(h, w_next, eps, plus_one)


@_fused
def gelu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU: gelu_tanh(gate) * up from the fused gate+up projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


@_fused
def gelu_gate(gate: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
    """PLE injection: gelu_tanh(gate) * the layer's per-layer input."""
    return F.gelu(gate, approximate="tanh") * per_layer_input


@_fused
def ple_combine(ctx: torch.Tensor, tok: torch.Tensor, w: torch.Tensor, ctx_scale: float, tok_scale: float,
                eps: float) -> torch.Tensor:
    """(norm(ctx * H^-0.5) + tok * sqrt(P)) / sqrt(2): the two halves of the per-layer inputs."""
    ctx = rms_norm(ctx * ctx_scale, w, eps, False)
    return (ctx + tok * tok_scale) * (2.0 ** -0.5)
