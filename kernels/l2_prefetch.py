"""Keep HBM busy through a decode step's bubbles: each GEMV asks the L2 cache for the weights the
next launches will read.

A batch-1 decode step reads every weight once, one GEMV after another, and between the GEMVs runs short
dependent kernels (split-K reductions, norms, RoPE and the cache write, attention) that read almost
nothing from HBM. Those stretches, and every GEMV's ramp-up and drain, leave HBM idle: on an H100 the
E4B step takes 4.76 ms against a 3.10 ms floor. Here the weights a step reads are listed in the order
it reads them (a *weight stream*, registered by the model) and every GEMV launch is given the stretch of
that stream from where the launches before it stopped asking (never before its own weight's end) to
`LEAD_BYTES` past its end (`_plan`). Launch by launch the stretches tile the stream, so each weight byte is
requested once, up to `LEAD_BYTES` before the GEMV that needs it, and lands in L2 while the short kernels run.

The request is a Hopper bulk prefetch (`cp.async.bulk.prefetch.L2.global`, one instruction per lane
for a whole range, fire and forget): no registers, no shared memory, no result to wait for, and no
change to any arithmetic (results stay bitwise equal). It needs compute capability 9.0; elsewhere,
under the interpreter, and with `LEAD_BYTES == 0` the kernels compile without it.

Measured, and OFF by default: on an H100 (E4B geometry, random bf16 weights, `scripts/bench_l2_prefetch_gpu.py`)
every variant made the graphed decode step slower, bitwise equal results throughout: base 4.794 ms; leads of
8 / 16 / 32 MB 5.068 / 5.269 / 5.504 ms; issued after the K loop (16 MB) 5.134; with evict-first weight loads
(16 MB) 5.241; only from the small GEMVs (12 / 24 MB) 4.990 / 5.083, after the K loop 4.891. A single
o_proj-sized GEMV (with its split-K reduction, event-timed, L2 flushed) goes 12.2 -> 9.4 us when its weight
was bulk-prefetched, and 8.7 us when it was just read: the L2 does serve the prefetch, but what the step
loses is fixed per-kernel cost, not HBM idle time the prefetch could fill. Kept as an A/B switch for
other cards.

`LEAD_BYTES` (env VKAE_L2_LEAD_MB) and `AT_END` (env VKAE_L2_PREFETCH_AT_END: issue after the GEMV's own
K loop instead of before its PDL wait) are read at launch, so a benchmark can A/B them in one process
(CUDA graphs keep what they captured).
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch

from ._common import HAS_TRITON, INTERPRET, _cuda_props, num_sms, tl, triton

def _env_mb(name: str) -> int:
    """An environment variable in MB (unset: 0) as bytes; a clear error for anything but a number >= 0."""
    raw = os.environ.get(name, "0")
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"{name} must be a number of MB >= 0, got {raw!r}")
    return int(mb * 2**20)


LEAD_BYTES: int = _env_mb("VKAE_L2_LEAD_MB")
AT_END: bool = os.environ.get("VKAE_L2_PREFETCH_AT_END", "0") == "1"
# Only launches whose own weight is at most this many bytes prefetch (0: all). A long GEMV's early request
# would be evicted by its own stream before the next GEMV reads it.
MAX_SOURCE_BYTES: int = _env_mb("VKAE_L2_MAX_SOURCE_MB")
MAX_SEGMENTS = 4  # a launch's stretch may cross this many weights (PLE gate, PLE proj, next qkv, next o)
_ALIGN = 128  # bytes: stretches start and end on L2 lines (the bulk prefetch needs multiples of 16)


@dataclass
class _Stream:
    refs: list  # weakrefs to the weights, in read order
    addrs: list[int]
    starts: list[int]  # stream offset (bytes) of each weight
    ends: list[int]

    def alive(self, idx: list[int]) -> bool:
        return all(self.refs[i]() is not None for i in idx)


_BY_PTR: dict[int, tuple[_Stream, int]] = {}  # weight data_ptr -> (its stream, its index there)
# (id(stream), lead, max source) -> per launch, its segments as (weight index, address, bytes)
_PLANS: dict[tuple[int, int, int], list[list[tuple[int, int, int]]]] = {}


def register_stream(weights: list[torch.Tensor]) -> None:
    """Declare the order in which a decode step reads these weights (each read once, by one GEMV launch).
    Replaces any earlier entry for the same addresses (a reloaded model)."""
    refs, addrs, starts, ends, off = [], [], [], [], 0
    for w in weights:
        refs.append(weakref.ref(w))
        addrs.append(w.data_ptr())
        starts.append(off)
        off += w.numel() * w.element_size()
        ends.append(off)
    stream = _Stream(refs, addrs, starts, ends)
    for i, a in enumerate(addrs):
        _BY_PTR[a] = (stream, i)
    _PLANS.clear()


def _plan(s: _Stream, lead: int, max_source: int) -> list[list[tuple[int, int, int]]]:
    """Per launch, its (weight index, address, bytes) segments. Launch k (weight [start, end)) may prefetch when its own
    weight is at most `max_source` bytes (0: any size); it takes the stream from where earlier launches
    stopped (never before its own end) up to end + lead, cut at weight boundaries and whole L2 lines."""
    plan: list[list[tuple[int, int, int]]] = []
    upto = 0  # stream offset up to which earlier launches have asked
    for i in range(len(s.addrs)):
        segs: list[tuple[int, int, int]] = []
        if not max_source or s.ends[i] - s.starts[i] <= max_source:
            lo, hi = max(s.ends[i], upto), s.ends[i] + lead
            for j in range(i + 1, len(s.addrs)):
                if s.starts[j] >= hi or len(segs) == MAX_SEGMENTS:
                    break
                a = -(-(max(lo, s.starts[j]) - s.starts[j]) // _ALIGN) * _ALIGN  # offsets within weight j
                b = (min(hi, s.ends[j]) - s.starts[j]) // _ALIGN * _ALIGN
                if b > a and s.addrs[j] % 16 == 0:  # the bulk prefetch needs 16-byte aligned addresses
                    segs.append((j, s.addrs[j] + a, b - a))
                    upto = s.starts[j] + b
        plan.append(segs)
    return plan


def segments(w: torch.Tensor, lead: int, max_source: int = 0) -> list[tuple[int, int]]:
    """(address, bytes) ranges the GEMV launch reading `w` should prefetch (see `_plan`). Empty when w is in
    no registered stream (or its model is gone) or lead is 0."""
    if lead <= 0:
        return []
    entry = _BY_PTR.get(w.data_ptr())
    if entry is None or entry[0].refs[entry[1]]() is not w:
        return []
    s, i = entry
    key = (id(s), lead, max_source)
    if key not in _PLANS:
        _PLANS[key] = _plan(s, lead, max_source)
    segs = _PLANS[key][i]
    return [(a, n) for _, a, n in segs] if s.alive([j for j, _, _ in segs]) else []


def supported(t: torch.Tensor) -> bool:
    """Bulk L2 prefetch is a compute capability 9.0 instruction; never under the interpreter."""
    if not (HAS_TRITON and t.is_cuda and not INTERPRET):
        return False
    props = _cuda_props(t.device)
    return (props.major, props.minor) >= (9, 0)


def launch_args(w: torch.Tensor) -> dict[str, int | bool]:
    """The prefetch arguments of a GEMV kernel launch reading weight `w` (see `prefetch_segments`)."""
    segs = segments(w, LEAD_BYTES, MAX_SOURCE_BYTES) if LEAD_BYTES > 0 and supported(w) else []
    args: dict[str, int | bool] = {"PF_SEGS": len(segs), "PF_AT_END": AT_END}
    for k in range(MAX_SEGMENTS):
        a, n = segs[k] if k < len(segs) else (0, 0)
        args[f"pf_a{k}"], args[f"pf_n{k}"] = a, n
    return args


if HAS_TRITON:

    @triton.jit
    def _prefetch_span(addr, nbytes, pid, nprog, LANES: tl.constexpr):
        """This program's share of [addr, addr + nbytes): one bulk prefetch per lane, whole L2 lines."""
        per_prog = tl.cdiv(tl.cdiv(nbytes, nprog), 128) * 128
        per_lane = tl.cdiv(tl.cdiv(per_prog, LANES), 128) * 128
        lo = pid * per_prog
        start = lo + tl.arange(0, LANES) * per_lane
        end = tl.minimum(tl.minimum(start + per_lane, lo + per_prog), nbytes)
        size = tl.maximum(end - start, 0)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r", [addr + start.to(tl.int64), size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def prefetch_segments(pf_a0, pf_n0, pf_a1, pf_n1, pf_a2, pf_n2, pf_a3, pf_n3, PF_SEGS: tl.constexpr):
        """Spread up to four (address, bytes) ranges over every program of a 2-D grid. PF_SEGS == 0: nothing."""
        if PF_SEGS > 0:
            pid = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
            nprog = tl.num_programs(0) * tl.num_programs(1)
            _prefetch_span(pf_a0, pf_n0, pid, nprog, 128)
            if PF_SEGS > 1:
                _prefetch_span(pf_a1, pf_n1, pid, nprog, 128)
            if PF_SEGS > 2:
                _prefetch_span(pf_a2, pf_n2, pid, nprog, 128)
            if PF_SEGS > 3:
                _prefetch_span(pf_a3, pf_n3, pid, nprog, 128)

    @triton.jit
    def _prefetch_kernel(pf_a0, pf_n0, pf_a1, pf_n1, pf_a2, pf_n2, pf_a3, pf_n3, PF_SEGS: tl.constexpr):
        prefetch_segments(pf_a0, pf_n0, pf_a1, pf_n1, pf_a2, pf_n2, pf_a3, pf_n3, PF_SEGS)


def prefetch_to_l2(t: torch.Tensor) -> None:
    """Ask the L2 for all of a contiguous CUDA tensor, fire and forget, one program per SM (benchmarks; sm_90)."""
    n = t.numel() * t.element_size() // _ALIGN * _ALIGN
    _prefetch_kernel[(num_sms(t.device),)](t.data_ptr(), n, 0, 0, 0, 0, 0, 0, PF_SEGS=1, num_warps=4)
