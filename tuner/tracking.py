"""MLflow tracking: one parent run per study, one nested run per trial, artifacts on the parent.

All logging happens in the driver through `MlflowClient` with explicit run ids (no global "active run"),
so parallel trials never race (optuna/optuna#4088). Logging a trial is idempotent: on `--resume` every
finished trial that has no child run yet (the driver died between `tell` and logging) is logged then.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

EXPERIMENT = "vkae-tune"
TRIAL_TAG = "vkae.trial_number"


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


def weights_fingerprint(weights: Any) -> str:
    """One tag-sized value for a model's weight files: 'random', or sha256 over the sorted file hashes."""
    if weights == "random" or not weights:
        return "random"
    joined = "\n".join(f"{name}:{digest}" for name, digest in sorted(dict(weights).items()))
    return hashlib.sha256(joined.encode()).hexdigest()


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


class Tracker:
    def __init__(self, uri: str, artifact_dir: Path) -> None:
        from mlflow.tracking import MlflowClient

        # after the import: mlflow configures its loggers on import; schema set-up prints INFO lines
        for name in ("alembic", "mlflow", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            location = Path(artifact_dir).resolve().as_uri() if uri.startswith("sqlite:") else None
            self.experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self.parent_run_id: str | None = None

    def start_parent(self, existing_run_id: str | None, study_name: str, params: dict[str, Any],
                     tags: dict[str, str]) -> str:
        from mlflow.entities import RunStatus

        if existing_run_id:
            try:
                run = self.client.get_run(existing_run_id)
                self.parent_run_id = run.info.run_id
                self.client.update_run(self.parent_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                return self.parent_run_id
            except Exception:  # noqa: BLE001 - a different/new tracking store: start a fresh parent run
                pass
        run = self.client.create_run(self.experiment_id, run_name=study_name,
                                     tags={"vkae.study": study_name, "vkae.role": "study", **tags})
        self.parent_run_id = run.info.run_id
        self.client.log_batch(self.parent_run_id, params=_params(params))
        return self.parent_run_id

    def logged_trials(self) -> set[int]:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
                                       max_results=10000)
        return {int(r.data.tags[TRIAL_TAG]) for r in runs if TRIAL_TAG in r.data.tags}

    def log_trial(self, number: int, state: str, params: dict[str, Any], metrics: dict[str, float],
                  tags: dict[str, str], start_ms: int | None, end_ms: int | None) -> str:
        from mlflow.entities import Metric, RunStatus

        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number:03d}", start_time=start_ms,
                                     tags={"mlflow.parentRunId": self.parent_run_id, TRIAL_TAG: str(number),
                                           "vkae.role": "trial", "vkae.state": state, **tags})
        now = end_ms or int(time.time() * 1000)
        clean = [Metric(k, float(v), now, 0) for k, v in metrics.items()
                 if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))]
        self.client.log_batch(run.info.run_id, metrics=clean, params=_params(params))
        status = RunStatus.FINISHED if state == "complete" else RunStatus.FAILED
        self.client.set_terminated(run.info.run_id, status=RunStatus.to_string(status), end_time=now)
        return run.info.run_id

    def log_parent(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, tags=[_tag(k, v) for k, v in tags.items()],
                              metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                       if v is not None and math.isfinite(float(v))])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.parent_run_id, str(path))

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.parent_run_id, status="FINISHED" if ok else "FAILED")


def _params(params: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, "null" if v is None else str(v)[:6000]) for k, v in params.items()]


def _tag(key: str, value: Any):
    from mlflow.entities import RunTag

    return RunTag(key, str(value))
