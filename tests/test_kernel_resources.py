"""The decode-path kernels compiled for sm_90 on the CPU, specialised as the JIT specialises a launch
(`scripts/kernel_resources.py`): the GEMV streams its weights with 16-byte cp.async loads and no spills,
and the single-row norm kernel's loads are 16-byte vectors too. A change that breaks vectorisation (a
stride the compiler can no longer prove is 1, a misaligned tile) halves the bandwidth long before anyone
runs a GPU benchmark. Runs in a child process without TRITON_INTERPRET."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "kernel_resources.py")


def _rows(only: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VKAE_TRITON_INTERPRET_TESTS")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, SCRIPT, "--only", only], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and ("No module named 'triton'" in proc.stderr or "cuobjdump" in proc.stderr):
        pytest.skip("this install has no triton NVIDIA backend")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["kernels"]


def test_gemv_streams_weights_with_16_byte_async_copies():
    rows = _rows("_gemv_kernel down")
    assert len(rows) == 1
    r = rows[0]
    assert r["global_loads"].get("LDGSTS.E.BYPASS.128", 0) >= 8, r
    assert not any(k.startswith("LDG") and k.endswith(("U16", "U8")) for k in r["global_loads"]), r
    assert r["spill_stores"] == r["spill_loads"] == 0
    # the down grid fits in one wave on an H100's 132 SMs
    import kernels.gemv as gv
    from kernels._common import cdiv

    cfg = gv.gemv_config(1, 2560, 10240, 2, 132)
    programs = cdiv(2560, cfg["BLOCK_N"]) * cfg["SPLIT_K"]
    assert programs <= r["programs_per_sm"] * 132, (programs, r)


def test_norm_kernel_loads_are_vectorised():
    (r,) = _rows("_splitk_sandwich_kernel")
    assert r["global_loads"].get("LDG.E.128", 0) >= 8, r
    assert r["spill_stores"] == 0
