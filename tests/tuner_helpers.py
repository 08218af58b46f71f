"""Shared helpers for the tuner tests: a tiny search space and reading a study back from its storage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "search_spaces" / "tiny-gemma4.yaml"


def tiny_space(tmp: Path, name: str = "space.yaml", **overrides) -> Path:
    """The shipped CI search space with absolute data paths and some fields replaced."""
    data = yaml.safe_load(TINY.read_text())
    data["workload"]["prompts"]["path"] = str(ROOT / "search_spaces" / "data" / "tinystories_prompts.txt")
    data["workload"]["ppl_records"]["text"] = str(ROOT / "engine" / "assets" / "wikitext2_test_slice.txt")
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_study(study_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'optuna.db'}")


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuner.cli", *args]


def start_driver(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # own session: the driver and the Ray processes it starts can be cleaned up as one group
    return subprocess.Popen(cli_cmd(*args), cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def read_events(study_dir: Path) -> list[dict]:
    path = study_dir / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


def kill_group(proc: subprocess.Popen) -> None:
    """Kill what this test started: the driver's process group (driver, Ray head, workers)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
