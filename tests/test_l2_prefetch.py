"""The weight-stream plan of `kernels.l2_prefetch`: which bytes each GEMV launch asks the L2 for.
(That the kernels emit the bulk prefetch is checked by the sm_90 compile test; that it changes no result,
and what it buys, by scripts/bench_l2_prefetch_gpu.py on a GPU.)"""
from __future__ import annotations

import gc

import torch

import kernels.l2_prefetch as lp

ROWS = (64, 512, 32, 32, 1024, 8, 256)  # weights of [rows, 256] bf16: 32 KiB ... 512 KiB


def _stream() -> list[torch.Tensor]:
    ws = [torch.empty(n, 256, dtype=torch.bfloat16) for n in ROWS]
    lp.register_stream(ws)
    return ws


def _starts(ws: list[torch.Tensor]) -> list[int]:
    out, off = [], 0
    for w in ws:
        out.append(off)
        off += w.numel() * w.element_size()
    return out


def _to_stream(ws: list[torch.Tensor], addr: int, n: int) -> tuple[int, int]:
    """(address, bytes) -> [start, end) in stream coordinates (the weights are separate allocations)."""
    off = 0
    for w in ws:
        size = w.numel() * w.element_size()
        if w.data_ptr() <= addr < w.data_ptr() + size:
            assert addr + n <= w.data_ptr() + size, "a segment crosses a weight boundary"
            return off + addr - w.data_ptr(), off + addr - w.data_ptr() + n
        off += size
    raise AssertionError("segment outside the stream")


def test_launches_tile_the_stream_once_and_ahead():
    ws = _stream()
    total = sum(w.numel() * w.element_size() for w in ws)
    for lead in (16 * 1024, 64 * 1024, 200 * 1024, 10 * 2**20):
        covered: list[tuple[int, int]] = []
        start = 0
        for w in ws:
            end = start + w.numel() * w.element_size()
            for addr, n in lp.segments(w, lead):
                assert addr % 16 == 0 and n % 128 == 0 and n > 0
                a, b = _to_stream(ws, addr, n)
                assert a % 128 == 0 or any(a == s for s in _starts(ws)), "not on a whole line of its weight"
                assert end <= a and b <= end + lead, "prefetch behind the launch or beyond its lead"
                covered.append((a, b))
            start = end
        covered.sort()
        for (a0, b0), (a1, b1) in zip(covered, covered[1:]):
            assert b0 <= a1, "a byte requested twice"
        # the spec, line by line: every line within `lead` after the end of some weight (the GEMV before it
        # streams its own weight; nothing asks for the first weight, which no GEMV precedes)
        ends = [s + w.numel() * w.element_size() for s, w in zip(_starts(ws), ws)]
        want = {x for x in range(0, total, 128) if any(e <= x < e + lead for e in ends)}
        got = {x for a, b in covered for x in range(a, b, 128)}
        if lead <= 64 * 1024:  # exact while one launch's lead spans at most four weights
            assert got == want, lead
        else:  # the four-segment cap of a launch may leave gaps, never extra lines
            assert got <= want and (got or not want)


def test_segments_for_known_offsets():
    ws = _stream()
    base = [w.data_ptr() for w in ws]
    # lead 64 KiB: the 32 KiB first weight asks for the second's first 64 KiB
    assert lp.segments(ws[0], 64 * 1024) == [(base[1], 64 * 1024)]
    # the 256 KiB second weight asks for the next 64 KiB: all of w2 and w3 (16 KiB each), 32 KiB of w4
    assert lp.segments(ws[1], 64 * 1024) == [(base[2], 16384), (base[3], 16384), (base[4], 32768)]
    assert lp.segments(ws[-1], 64 * 1024) == []  # nothing after the last weight
    assert lp.segments(ws[1], 0) == []
    # only weights of at most 32 KiB prefetch: the 256 KiB w1 asks for nothing, so w2 (16 KiB) takes the
    # stream right after its own end (w3 and 48 KiB of w4); w3 continues from there
    assert lp.segments(ws[1], 64 * 1024, 32 * 1024) == []
    assert lp.segments(ws[2], 64 * 1024, 32 * 1024) == [(base[3], 16384), (base[4], 49152)]
    assert lp.segments(ws[3], 64 * 1024, 32 * 1024) == [(base[4] + 49152, 16384)]


def test_unknown_and_dead_weights_get_nothing():
    ws = _stream()
    assert lp.segments(torch.empty(8, 256, dtype=torch.bfloat16), 1 << 20) == []
    ptr = ws[0].data_ptr()
    stranger = ws[0].clone()
    assert lp.segments(stranger, 1 << 20) == []  # same bytes, another tensor
    del ws, stranger
    gc.collect()
    again = torch.empty(ROWS[0], 256, dtype=torch.bfloat16)
    if again.data_ptr() == ptr:  # the allocator reused the address: the old plan must not apply
        assert lp.segments(again, 1 << 20) == []


def test_launch_args_off_on_cpu():
    ws = _stream()
    old = lp.LEAD_BYTES
    try:
        lp.LEAD_BYTES = 1 << 20
        args = lp.launch_args(ws[0])
    finally:
        lp.LEAD_BYTES = old
    assert args["PF_SEGS"] == 0 and args["pf_n0"] == 0  # bulk prefetch needs sm_90; never on the CPU
    assert set(args) == {"PF_SEGS", "PF_AT_END"} | {f"pf_{x}{k}" for k in range(4) for x in "an"}


def test_model_lists_every_projection_once_in_read_order():
    from engine.linear import Linear
    from engine.loader import load_model

    model = load_model("tiny-gemma4", device="cpu", dtype=torch.float32, random_weights=True).model
    order = model.decode_weight_order()
    assert len({t.data_ptr() for t in order}) == len(order)
    linears = [m.weight for m in model.modules() if isinstance(m, Linear)]
    assert {t.data_ptr() for t in linears} | {model.lm_head.data_ptr()} == {t.data_ptr() for t in order}
    assert order[1] is model.layers[0].qkv.weight and order[-1] is model.lm_head


def test_env_lead_must_be_a_size(monkeypatch):
    for bad in ("12MB", "-1", "nan"):
        monkeypatch.setenv("VKAE_L2_LEAD_MB", bad)
        try:
            lp._env_mb("VKAE_L2_LEAD_MB")
        except ValueError as e:
            assert "VKAE_L2_LEAD_MB" in str(e) and repr(bad) in str(e)
        else:
            raise AssertionError(f"{bad!r} accepted")
    monkeypatch.setenv("VKAE_L2_LEAD_MB", "1.5")
    assert lp._env_mb("VKAE_L2_LEAD_MB") == 3 * 2**19
    monkeypatch.delenv("VKAE_L2_LEAD_MB")
    assert lp._env_mb("VKAE_L2_LEAD_MB") == 0
