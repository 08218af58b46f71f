"""Shared by the server tests: one tuner-made recipe per test session, and a live `vkae-tune serve` on loopback."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from tuner_helpers import ROOT, cli_cmd, tiny_space

# A recipe the tuner itself writes: tiny-gemma4, a window below the trained 16 (so the knob must reach the
# server) and 4 batch rows (so continuous batching has rows to share). The limit is loose: random weights.
KNOBS = {"sliding_window": [8], "batch_size": [4], "drafter": ["none"]}
_made: dict[str, Path] = {}


def tiny_recipe(tmp_path_factory) -> Path:
    """Run a 2-trial study once per session (about 30 s) and return its recipe path."""
    if "recipe" not in _made:
        tmp = tmp_path_factory.mktemp("served-recipe")
        space = tiny_space(tmp, knobs=KNOBS)
        recipe = tmp / "recipe.yaml"
        log = tmp / "study.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with log.open("w") as out:
            proc = subprocess.Popen(cli_cmd("tiny-gemma4", "--gpu", "cpu", "--trials", "2", "--ppl-max", "1000000",
                                            "--search-space", str(space), "--study-dir", str(tmp / "study"),
                                            "--study-name", "served", "--out", str(recipe)),
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=240)
            finally:
                _kill_group(proc)
        assert code == 0 and recipe.is_file(), log.read_text()[-3000:]
        _made["recipe"] = recipe
    return _made["recipe"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)


def start_server(recipe: Path, log: Path, *extra: str, timeout_s: float = 90) -> tuple[subprocess.Popen, str]:
    """`vkae-tune serve RECIPE` on a free loopback port; returns once /health answers 200."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cli_cmd("serve", str(recipe), "--host", "127.0.0.1", "--port", str(port),
                                    "--log-level", "warning", *extra),
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.2)
    _kill_group(proc)
    raise AssertionError(f"serve did not come up in {timeout_s} s:\n{log.read_text()[-3000:]}")


def serving(recipe: Path, log: Path, *extra: str) -> Iterator[str]:
    """Generator body for a fixture: yields the base URL and always stops the server."""
    proc, base = start_server(recipe, log, *extra)
    try:
        yield base
    finally:
        _kill_group(proc)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cli_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(base: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def metric(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k.split("{")[0] == name)


def last_json_line(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])

