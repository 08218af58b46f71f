"""Bar 1, end to end on CPU: a 4-trial study of tiny-gemma4 with real Ray, Optuna SQLite storage and MLflow
SQLite; the recipe validates and a tampered one is rejected; the MLflow UI serves the study over REST."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from optuna.trial import TrialState

from tuner.cli import main
from tuner.errors import RecipeError
from tuner.recipe import load_recipe
from tuner_helpers import load_study, tiny_space

TRIALS = 4


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    space = tiny_space(tmp)
    study_dir, recipe = tmp / "run", tmp / "recipe.yaml"
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    t0 = time.monotonic()
    with redirect_stderr(err):
        code = main(["tiny-gemma4", "--gpu", "cpu", "--trials", str(TRIALS), "--search-space", str(space),
                     "--study-dir", str(study_dir), "--study-name", "ci", "--out", str(recipe)])
    return {"code": code, "log": err.getvalue(), "dir": study_dir, "recipe": recipe, "seconds": time.monotonic() - t0}


def test_study_runs_end_to_end(study_run):
    log = study_run["log"]
    assert study_run["code"] == 0, log
    study = load_study(study_run["dir"], "ci")
    trials = study.get_trials()
    # every trial completes: the drafters exist, so a failure here is a bug (faults are tested elsewhere)
    assert len(trials) == TRIALS and all(t.state == TrialState.COMPLETE for t in trials), log
    assert trials[0].user_attrs["knobs"] == {"sliding_window": None, "batch_size": 1, "drafter": "none",
                                             "draft_tokens": 0, "centroid_top_k": None}  # the queued default
    assert f"trial {TRIALS}/{TRIALS}" in log and "Pareto front" in log
    uri = f"sqlite:///{study_run['dir'].resolve() / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in log
    assert (study_run["dir"] / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((study_run["dir"] / "trials.csv").read_text().strip().splitlines()) == TRIALS + 1


def test_recipe_is_the_fastest_feasible_point_of_optunas_front(study_run):
    recipe = load_recipe(study_run["recipe"])
    study = load_study(study_run["dir"], "ci")
    # Optuna's own constrained Pareto front, less trials that repeat earlier knobs (measurement reused)
    front = {t.number for t in study.best_trials if "repeat_of" not in t.user_attrs}
    assert front and {p.trial_number for p in recipe.pareto_front} == front
    fastest = max((t for t in study.best_trials), key=lambda t: t.values[0])
    assert recipe.study.trial_number == fastest.number
    chosen = study.trials[fastest.number]
    assert recipe.knobs == chosen.user_attrs["knobs"]
    assert recipe.metrics.tps.value == pytest.approx(chosen.values[0]) and recipe.metrics.tps.value > 0
    assert recipe.metrics.ppl == pytest.approx(chosen.values[1])
    assert recipe.metrics.ppl <= recipe.quality_limit.ppl_limit
    assert recipe.quality_limit.ppl_limit == pytest.approx(recipe.quality_limit.baseline_ppl * 1.02)
    assert recipe.model.weights == "random" and recipe.hardware.gpu_name == "cpu"
    assert len(recipe.workload.prompts["sha256"]) == 64 and recipe.study.trials_total == TRIALS
    for t in study.trials:  # every infeasible trial really broke a constraint
        if t.state == TrialState.COMPLETE and t.number not in front:
            assert t.constraints["ppl"] > 0 or t.constraints["lossless"] > 0 or any(
                b.values[0] >= t.values[0] and b.values[1] <= t.values[1] for b in study.best_trials)


def test_tampered_recipe_is_rejected(study_run, tmp_path):
    text = study_run["recipe"].read_text()
    assert "batch_size: 1" in text
    tampered = tmp_path / "tampered.yaml"
    tampered.write_text(text.replace("  output_tokens: 8", "  output_tokens: 9"))
    with pytest.raises(RecipeError, match="content hash mismatch"):
        load_recipe(tampered)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    with urllib.request.urlopen(url, timeout=20) as resp:
        return json.loads(resp.read())


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        return json.loads(resp.read())


def test_mlflow_ui_serves_parent_trials_metrics_and_artifacts(study_run, tmp_path):
    uri = f"sqlite:///{study_run['dir'].resolve() / 'mlflow.db'}"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "mlflow.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "mlflow.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow ui did not come up in 90 s"
            time.sleep(0.5)
        exp = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="vkae-tune")["experiment"]
        runs = _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                           "max_results": 100})["runs"]
        tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}  # noqa: E731
        parents = [r for r in runs if tags(r).get("vkae.role") == "study"]
        assert len(parents) == 1 and tags(parents[0])["vkae.study"] == "ci"
        parent_id = parents[0]["info"]["run_id"]
        assert parents[0]["info"]["status"] == "FINISHED"
        children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent_id]
        assert sorted(int(tags(r)["vkae.trial_number"]) for r in children) == list(range(TRIALS))
        for child in children:
            t = tags(child)
            assert t["gpu"] == "cpu" and t["model"] == "tiny-gemma4" and t["weights_sha256"] == "random"
            assert t["engine_version"]
            metrics = {m["key"]: m["value"] for m in child["data"].get("metrics", [])}
            params = {p["key"]: p["value"] for p in child["data"].get("params", [])}
            assert "sliding_window" in params and "feasible" in metrics
            if t["vkae.state"] == "failed":
                assert t["cause"] in ("oom", "crash", "timeout", "invalid_knobs") and t["error"]
                assert child["info"]["status"] == "FAILED"
                continue
            assert "ppl" in metrics
            if metrics["feasible"] == 1.0:
                for key in ("tps", "tps_per_stream", "tps_min", "tps_max", "tps_spread", "mean_accepted",
                            "peak_memory_bytes"):
                    assert key in metrics, (key, metrics)
        listed = _get(base, "/api/2.0/mlflow/artifacts/list", run_id=parent_id).get("files", [])
        names = {f["path"] for f in listed}
        assert {"recipe.yaml", "pareto.png", "trials.csv"} <= names, names
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        log.close()
