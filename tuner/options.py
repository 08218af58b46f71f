"""The tuning command's options, shared by the CLI parser and the study driver."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class StudyOptions:
    model: str
    gpu: str
    trials: int = 16
    timeout_min: float | None = None  # stop asking for new trials after this
    ppl_max: float | None = None
    ppl_max_ratio: float | None = None
    workers: int | None = None  # default: one per GPU in the cluster; 1 on --gpu cpu
    ray_address: str | None = None  # join an existing cluster; default: start a local one
    study_dir: Path | None = None  # default: study/<study name>
    study_name: str | None = None  # default: <model>-<gpu>
    resume: bool = False
    mlflow_uri: str | None = None  # default: SQLite in the study dir
    search_space: Path | None = None  # default: search_spaces/<model>.yaml
    assistant: str | None = None
    random_weights: bool = False
    out: Path | None = None  # default: artifacts/<study name>.recipe.yaml
    allow_gpu_mismatch: bool = False
    trial_timeout_s: float | None = None  # default: the search space's trial_timeout_s
    max_worker_failures: int = 3

    def resolved_name(self) -> str:
        model = Path(self.model.rstrip("/")).name.lower()
        return self.study_name or f"{model}-{self.gpu.lower()}"

    def resolved_dir(self) -> Path:
        return (self.study_dir or Path("study") / self.resolved_name()).resolve()
