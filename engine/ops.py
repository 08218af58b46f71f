"""The decoder's elementwise pieces as pure functions of tensors, so each can be fused into one kernel.

On CUDA, inside a decode / verify step (`step_scope`), every function here runs through `torch.compile` (one fused Triton kernel per call site and
shape: a norm, a residual add and the next norm in one pass over the hidden state instead of ~10
kernels); on CPU, and in tests, the same Python function runs eagerly and is the reference.

Row-invariant mode (`kernels.invariance.ROW_INVARIANT`, on by default, CUDA only): inductor picks a
reduction's config (XBLOCK, warps, split reductions) from the row count, so a 1-token decode step and
a K+1 verify step normalise the same position in different orders and speculative decoding stops
being token-identical in bf16. There every op that reduces over the hidden or head dim runs our
one-row-per-program Triton kernels instead (`kernels.rmsnorm`, `kernels.head_norm`; same launch
count per call site); purely elementwise ops stay torch.compile'd (elementwise code is row-invariant).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from kernels import invariance  # triton-free: the kernels themselves are imported on first CUDA use

_COMPILE = os.environ.get("VKAE_COMPILE_OPS", "1") != "0"
# None: torch.compile's default (static first, then one dynamic-shape recompile); False: one static
# kernel per shape (a 1-token decode and a K+1 verify then each get their own exactly-shaped kernel).
COMPILE_DYNAMIC: bool | None = False
_COMPILED: list[list[Callable]] = []


def reset_compiled() -> None:
    """Forget compiled kernels (a benchmark switching COMPILE_DYNAMIC in one process)."""
    for holder in _COMPILED:
        holder.clear()


_SCOPE = threading.local()


@contextlib.contextmanager
def step_scope() -> Iterator[None]:
    """Marks a decode / verify / draft step: only inside it do the `_fused` ops run torch.compile'd.

    Compiled kernels are static-shape (COMPILE_DYNAMIC), which suits the step: its shapes are bounded
    (cache rows x verify width) and it is captured in a CUDA graph, where fewer kernels matter. Prefill
    and PPL scoring meet a new shape with every prompt length; compiled there, each new length would
    stall the request on a recompile of every op (seconds), and past dynamo's cache limit fall back to
    eager anyway. Outside the scope the same function runs eagerly: a few extra elementwise kernels,
    noise next to a prefill's matmuls."""
    prev = getattr(_SCOPE, "in_step", False)
    _SCOPE.in_step = True
    try:
        yield
    finally:
        _SCOPE.in_step = prev


def _fused(fn: Callable) -> Callable:
    compiled: list[Callable] = []
    _COMPILED.append(compiled)

    def run(*args, **kwargs):
        if _COMPILE and args[0].is_cuda and getattr(_SCOPE, "in_step", False):
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


def _row_invariant(kernel_path: Callable) -> Callable[[Callable], Callable]:
    """Decorator over a `_fused` op: on CUDA with the row-invariance switch on, `kernel_path` (same
    signature, Triton norms whose launch config depends only on the normalised width) runs instead.
    Read per call, so a benchmark can flip the switch in one process."""
    def wrap(run: Callable) -> Callable:
        def dispatch(*args, **kwargs):
            if invariance.ROW_INVARIANT and args[0].is_cuda:
                return kernel_path(*args, **kwargs)
            return run(*args, **kwargs)

        dispatch.reference = run.reference  # type: ignore[attr-defined]
        dispatch.row_invariant = kernel_path  # type: ignore[attr-defined]  (tests call it on CPU)
        dispatch.__name__ = run.__name__
        dispatch.__doc__ = run.__doc__
        return dispatch

    return wrap


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


# ---- row-invariant kernel paths (imported lazily: importing triton with the engine would fix
# interpreter-vs-GPU mode for the whole process before the kernel tests can choose) -----------
def _norm_rope_rows(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                    plus_one: bool) -> torch.Tensor:
    from kernels.head_norm import head_norm_triton

    return head_norm_triton(x, weight, eps, plus_one, cos, sin)


def _write_kv_rows(k_raw: torch.Tensor, v_raw: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                   rows: torch.Tensor, slots: torch.Tensor, pos32: torch.Tensor, eps: float, plus_one: bool,
                   v_norm: bool) -> None:
    from kernels.head_norm import write_kv_triton

    write_kv_triton(k_raw, v_raw, k_weight, cos, sin, k_cache, v_cache, slot_pos, rows, slots, pos32, eps,
                    plus_one, v_norm)


def _scale_free_norm_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    from kernels.head_norm import head_norm_triton

    return head_norm_triton(x, None, eps, False)


def _norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool) -> torch.Tensor:
    from kernels.rmsnorm import rmsnorm_triton

    return rmsnorm_triton(x, weight, eps, plus_one)


def _promoted(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The residual in the dtype `residual + norm(x)` has in the reference (the kernel writes h in
    the residual's dtype); a no-op in the engine, where both are the model dtype."""
    dt = torch.promote_types(x.dtype, residual.dtype)
    return residual if residual.dtype == dt else residual.to(dt)


def _add_norm_rows(x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, eps: float, plus_one: bool
                   ) -> torch.Tensor:
    from kernels.rmsnorm import residual_rmsnorm_triton

    return residual_rmsnorm_triton(x, _promoted(x, residual), w_post, eps, plus_one)


def _sandwich_rows(x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, w_next: torch.Tensor,
                   scalar: torch.Tensor | None, eps: float, plus_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.rmsnorm import post_norm_residual_pre_norm_triton

    return post_norm_residual_pre_norm_triton(x, _promoted(x, residual), w_post, w_next, eps, plus_one,
                                              scalar=scalar)


@_fused
def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x * scale


@_fused
def _ple_mix(ctx_normed: torch.Tensor, tok: torch.Tensor, tok_scale: float) -> torch.Tensor:
    return (ctx_normed + tok * tok_scale) * (2.0 ** -0.5)


def _ple_combine_rows(ctx: torch.Tensor, tok: torch.Tensor, w: torch.Tensor, ctx_scale: float, tok_scale: float,
                      eps: float) -> torch.Tensor:
    """Once per step, not per layer: three launches (scale, norm, mix) instead of one is cheap."""
    from kernels.rmsnorm import rmsnorm_triton

    return _ple_mix(rmsnorm_triton(_scaled(ctx, ctx_scale), w, eps, False), tok, tok_scale)


# ---- the ops ---------------------------------------------------------------------------------
@_row_invariant(_norm_rope_rows)
@_fused
def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
              plus_one: bool) -> torch.Tensor:
    """q or k: per-head RMSNorm then RoPE. x [B, T, H, D], cos/sin [B, T, 1, D]."""
    return apply_rope(rms_norm(x, weight, eps, plus_one), cos, sin)


@_row_invariant(_write_kv_rows)
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


@_row_invariant(_scale_free_norm_rows)
@_fused
def scale_free_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 4's v-norm."""
    return rms_norm(x, None, eps, False)


@_row_invariant(_norm_rows)
@_fused
def norm(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool) -> torch.Tensor:
    return rms_norm(x, weight, eps, plus_one)


@_row_invariant(_add_norm_rows)
@_fused
def add_norm(x: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, eps: float, plus_one: bool
             ) -> torch.Tensor:
    """residual + norm(x)."""
    return residual + rms_norm(x, w_post, eps, plus_one)


@_row_invariant(_sandwich_rows)
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


@_row_invariant(_ple_combine_rows)
@_fused
def ple_combine(ctx: torch.Tensor, tok: torch.Tensor, w: torch.Tensor, ctx_scale: float, tok_scale: float,
                eps: float) -> torch.Tensor:
    """(norm(ctx * H^-0.5) + tok * sqrt(P)) / sqrt(2): the two halves of the per-layer inputs."""
    ctx = rms_norm(ctx * ctx_scale, w, eps, False)
    return (ctx + tok * tok_scale) * (2.0 ** -0.5)
