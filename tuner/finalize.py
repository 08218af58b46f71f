"""End of a study: the front, the Pareto PNG, the trials CSV, the frozen recipe, MLflow artifacts."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from . import recipe as R
from .options import StudyOptions
from .pareto import TrialPoint, choose, least_violating, pareto_front, plot_pareto
from .progress import front_table
from .results import finished, points, write_trials_csv
from .search_space import SearchSpace
from .tracking import Tracker, ui_command

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StudyOutcome:
    study_name: str
    study_dir: Path
    trials: int
    feasible: int
    front: list[TrialPoint]
    chosen: TrialPoint | None
    recipe_path: Path | None
    pareto_png: Path
    trials_csv: Path
    mlflow_uri: str
    pool_events: list[str] = field(default_factory=list)


def git_state() -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def _model_ref(reference: str, described: dict[str, Any] | None) -> R.ModelRef | None:
    if described is None:
        return None
    weights = described.get("weights", "random")
    return R.ModelRef(reference=reference, name=str(described.get("name", reference)),
                      weights=weights if weights == "random" else dict(weights),
                      details={k: v for k, v in described.items() if k != "weights"})


def build_recipe(study: optuna.Study, space: SearchSpace, opts: StudyOptions, profile: str, ppl_limit: float,
                 chosen: TrialPoint, front: list[TrialPoint], n_trials: int, n_feasible: int) -> R.Recipe:
    hw = study.user_attrs["hardware"]
    metrics = study.trials[chosen.number].user_attrs["metrics"]
    commit, dirty = git_state()
    quality = space.quality
    w = space.workload
    desc = study.user_attrs["workload"]
    from .profiles import PROFILES

    return R.Recipe(
        model=_model_ref(opts.model, hw["model"]),
        assistant=_model_ref(space.assistant, hw.get("assistant")) if space.assistant else None,
        engine=R.EngineRef(version=str(hw["engine_version"]), git_commit=commit, git_dirty=dirty),
        hardware=R.Hardware(gpu_profile=profile, gpu_profile_matched=PROFILES[profile].matches(str(hw.get("gpu_name"))),
                            gpu_name=str(hw.get("gpu_name")), gpu_memory_bytes=hw.get("gpu_memory_bytes"),
                            device=str(hw.get("device")), driver=hw.get("driver"), cuda=hw.get("cuda"),
                            torch=str(hw.get("torch")), triton=hw.get("triton"), dtype=hw.get("dtype")),
        knobs=chosen.knobs,
        metrics=R.Metrics(tps=R.Metric(value=metrics["tps"], min=metrics.get("tps_min"), max=metrics.get("tps_max")),
                          tps_per_stream=metrics["tps_per_stream"], tps_decode=metrics.get("tps_decode"),
                          ppl=metrics["ppl"], ppl_tokens=int(metrics["ppl_tokens"]),
                          mean_accepted=metrics.get("mean_accepted"), peak_memory_bytes=metrics.get("peak_memory_bytes")),
        workload=R.WorkloadRef(prompts=desc["prompts"], ppl_records=desc["records"],
                               token_sha256=study.user_attrs["token_sha256"], output_tokens=w.output_tokens,
                               batch_size=int(chosen.knobs.get("batch_size", 1)), repeats=w.repeats, warmup=w.warmup),
        quality_limit=R.QualityLimit(kind="ppl_max" if quality.ppl_max is not None else "ppl_max_ratio",
                                     value=float(quality.ppl_max if quality.ppl_max is not None else quality.ppl_max_ratio),
                                     baseline_ppl=study.user_attrs.get("baseline_ppl"), ppl_limit=ppl_limit),
        pareto_front=[R.FrontPoint(trial_number=p.number, knobs=p.knobs, tps=p.tps, tps_per_stream=p.tps_per_stream or 0.0,
                                   ppl=p.ppl) for p in front],
        study=R.StudyRef(name=study.study_name, trial_number=chosen.number, trials_total=n_trials,
                         trials_feasible=n_feasible, search_space=space.source_path,
                         search_space_sha256=space.source_sha256,
                         created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
    )


def finalize_study(study: optuna.Study, space: SearchSpace, opts: StudyOptions, profile: str, ppl_limit: float,
                   tracker: Tracker, study_dir: Path, pool_events: list[str],
                   say: Callable[[str], None]) -> StudyOutcome:
    pts = points(study)
    front = pareto_front(pts)
    chosen = choose(front)
    n_feasible = sum(p.feasible for p in pts)
    png = plot_pareto(pts, ppl_limit, study_dir / "pareto.png",
                      f"{study.study_name}: {len(pts)} trials, {n_feasible} feasible", chosen)
    csv_path = write_trials_csv(finished(study.get_trials(deepcopy=False)), study_dir / "trials.csv")
    recipe_path = None
    if chosen is not None:
        recipe = build_recipe(study, space, opts, profile, ppl_limit, chosen, front, len(pts), n_feasible)
        recipe_path = R.write_recipe(recipe, opts.out or Path("artifacts") / f"{study.study_name}.recipe.yaml").resolve()
        R.load_recipe(recipe_path)  # what we wrote must pass the same check every reader applies
        tracker.log_artifact(recipe_path)
    tracker.log_artifact(png)
    tracker.log_artifact(csv_path)
    tracker.log_parent({"trials": len(pts), "trials_feasible": n_feasible, "front_size": len(front),
                        "best_tps": chosen.tps if chosen else float("nan"),
                        "best_ppl": chosen.ppl if chosen else float("nan"), "ppl_limit": ppl_limit},
                       {"recipe": str(recipe_path) if recipe_path else "none (no feasible trial)"})
    tracker.finish(ok=chosen is not None)

    failed = [p for p in pts if p.state == "failed"]
    say(f"\n{len(pts)} trials finished: {n_feasible} feasible, {len(pts) - n_feasible - len(failed)} infeasible,"
        f" {len(failed)} failed" + (f" ({', '.join(f'#{p.number} {p.reason}' for p in failed)})" if failed else ""))
    for line in pool_events:
        if line.startswith("retired"):  # restarts were reported as they happened; retirements bear repeating
            say("worker pool: " + line)
    if chosen is None:
        worst = least_violating(pts)
        hint = (f" closest: trial {worst.number} with PPL {worst.ppl:.4f} ({worst.knobs})" if worst else "")
        say(f"NO FEASIBLE TRIAL: no setting met PPL <= {ppl_limit:.4f};{hint}. No recipe written."
            " Loosen the limit (--ppl-max / --ppl-max-ratio), widen the search space or add trials.")
    else:
        say("Pareto front (* = the recipe):\n" + front_table(front, chosen))
        say(f"recipe:      {recipe_path}")
    say(f"pareto plot: {png}\ntrials csv:  {csv_path}")
    say(f"tracking:    {ui_command(tracker.uri)}")
    return StudyOutcome(study.study_name, study_dir, len(pts), n_feasible, front, chosen, recipe_path, png, csv_path,
                        tracker.uri, list(pool_events))
