"""Test plumbing: run kernel tests under TRITON_INTERPRET=1 without poisoning other tests.

Triton decides interpreter-vs-GPU when a function is decorated with `@triton.jit`, and that
includes its own library helpers (`tl.sum`, `tl.max`, ...), decorated when `triton` is first
imported. So a process can run the interpreter only if TRITON_INTERPRET=1 was set before the
first `import triton`; setting it later gives "Cannot call @triton.jit'd outside of the scope of
a kernel". Conversely, importing triton in interpreter mode would break GPU kernels that other
tests in the same process compile. Hence, at the top of a kernel test module:

    RUN_HERE = _testutil.enter_interpreter()   # before importing kernels.*

returns True when this process can (or now will) interpret: CPU-only and triton not yet
imported, or already started with TRITON_INTERPRET=1. Otherwise the module's tests are skipped
and one test, `rerun_in_fresh_process(__file__)`, runs the file in a child process.
"""
from __future__ import annotations

import os
import subprocess
import sys


def _triton_interpreting() -> bool:
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


def enter_interpreter() -> bool:
    if "triton" in sys.modules:
        return _triton_interpreting()
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    if torch.cuda.is_available():  # keep this process's triton compiling for the GPU
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def rerun_in_fresh_process(path: str, timeout_s: float = 300.0) -> None:
    """Run the test file `path` in a child pytest with TRITON_INTERPRET=1; raise on failure."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                          env=env, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise AssertionError(f"interpreter run of {path} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")


def interpreter_guards(run_here: bool, path: str):
    """The two pieces every kernel test module needs, bound to that module:
    an autouse fixture that skips its tests when this process cannot interpret, and the test that
    then reruns the whole file in a child process. Use:
        _needs_interpreter, test_interpreter_in_fresh_process = _testutil.interpreter_guards(RUN_HERE, __file__)
    """
    import pytest

    @pytest.fixture(autouse=True)
    def _needs_interpreter(request):
        if not run_here and request.node.name != "test_interpreter_in_fresh_process":
            pytest.skip("triton in this process compiles for the GPU; see test_interpreter_in_fresh_process")

    def test_interpreter_in_fresh_process():
        """When this process cannot interpret (triton imported earlier, or a GPU present), run the
        whole file again in a child process under TRITON_INTERPRET=1."""
        if run_here:
            pytest.skip("already running under the interpreter")
        rerun_in_fresh_process(path)

    return _needs_interpreter, test_interpreter_in_fresh_process


def gemv_mode_fixture():
    """A parametrized pytest fixture for the GEMV-family kernel tests: the row-invariance switch on, and
    `kernels.gemv.BATCH_INVARIANT` None (follows that switch: every M on the 16-row tensor-core tile) or
    False (the M-dependent configs, including the M == 1 CUDA-core path). Use, after `enter_interpreter()`:
        gemv_mode = _testutil.gemv_mode_fixture()
    """
    import pytest

    @pytest.fixture(params=[None, False], ids=["follow-switch", "forced-off"])
    def gemv_mode(request, monkeypatch):
        import kernels.gemv as gv
        import kernels.invariance as invariance

        monkeypatch.setattr(invariance, "ROW_INVARIANT", True)
        monkeypatch.setattr(gv, "BATCH_INVARIANT", request.param)
        return request.param

    return gemv_mode


def assert_close_scaled(out, ref, rel: dict) -> None:
    """out equals ref (same dtype and shape) within rel[dtype] times the output scale, max |ref| but at
    least 1 (kernel outputs against their fp32-accumulating references)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = rel[ref.dtype] * max(ref.float().abs().max().item(), 1.0)
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol, f"max abs err {err:.3e} > {tol:.3e} ({ref.dtype})"


# The ops of engine.ops that reduce over a row and so have a row-invariant Triton path.
ROW_INVARIANT_OPS = ("norm", "add_norm", "sandwich", "norm_rope", "write_kv", "scale_free_norm", "ple_combine")


def route_decode_as_cuda(monkeypatch) -> None:
    """Route a CPU decode/verify step through the kernels CUDA runs in row-invariant mode (here under the
    interpreter): the Triton norms, the Triton GEMV for <= MAX_GEMV_ROWS rows (policy "all") and the
    Triton decode attention. Import only after `enter_interpreter()`."""
    import torch

    import engine.linear as linear_mod
    import engine.model as model_mod
    import engine.ops as ops
    import kernels.decode_attention as da
    import kernels.gemv as gv

    def gemv_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.numel() <= linear_mod.MAX_GEMV_ROWS * x.shape[-1]:
            return gv.linear_small_m_triton(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], -1)
        return torch.nn.functional.linear(x, w)

    def attend_cache_triton(q, cache, positions, window, scale, softcap, defer_merge_max_splits=0):
        # the arguments `engine.attention.attend_cache` passes on CUDA
        return da.decode_attention_triton(q, *cache.logical(), positions, window or 0, scale, softcap,
                                          finite_cache=cache.ring, defer_merge_max_splits=defer_merge_max_splits)

    for name in ROW_INVARIANT_OPS:
        monkeypatch.setattr(ops, name, getattr(ops, name).row_invariant)
    monkeypatch.setattr(linear_mod, "matmul", gemv_matmul)
    monkeypatch.setattr(model_mod, "matmul", gemv_matmul)
    monkeypatch.setattr(model_mod, "attend_cache", attend_cache_triton)


def tiny_decode_setup(alias: str, seeds: tuple[int, int]):
    """A random-weight tiny model on the CPU in fp32, a 20-token prompt and 9 draft tokens (seeded with
    `seeds`), and two closures over them: `fresh_cache()` prefills the prompt into a new 64-slot cache,
    `step(T, cache)` runs a T-position `forward_step` of the first T drafts right after the prompt.
    Returns (model, arch, step, fresh_cache)."""
    import torch

    from engine.cache import KVCache
    from engine.loader import load_model

    lm = load_model(alias, device="cpu", dtype=torch.float32, random_weights=True)
    model, arch = lm.model, lm.arch
    window = arch.sliding_window
    prompt = torch.randint(3, arch.vocab_size, (1, 20), generator=torch.Generator().manual_seed(seeds[0]))
    drafts = torch.randint(3, arch.vocab_size, (1, 9), generator=torch.Generator().manual_seed(seeds[1]))
    n = prompt.shape[1]

    def step(T: int, cache: KVCache) -> torch.Tensor:
        return model.forward_step(drafts[:, :T], (n + torch.arange(T))[None], cache, window)

    def fresh_cache() -> KVCache:
        cache = KVCache(arch, 1, 64, window, "cpu", torch.float32)
        with torch.no_grad():
            model.forward_fresh(prompt, torch.arange(n)[None], window, cache=cache, rows=torch.tensor([0]))
        return cache

    return model, arch, step, fresh_cache
