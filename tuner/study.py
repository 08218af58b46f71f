"""The study driver: Optuna ask/tell in this process, trials on the Ray pool, MLflow logging, the recipe.

Storage is SQLite in the study dir; Optuna commits each `tell` before the next trial is asked, so a
driver stopped by Ctrl-C or `kill -9` loses nothing that finished. Trials left RUNNING by a dead driver
are marked failed (cause "interrupted") on `--resume` and their knobs are queued to run again.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.trial import TrialState

from .errors import StudyError
from .finalize import StudyOutcome, finalize_study
from .knob_sampling import default_params, sample_knobs
from .options import StudyOptions
from .profiles import check_device, get_profile
from .progress import Progress
from .results import compact_result, counts_toward_budget, finished, point_from_trial, points
from .pareto import pareto_front
from .search_space import SearchSpace, find_search_space, load_search_space
from .session import RaySession
from .tracking import Tracker, default_tracking_uri
from .workload import describe_packed, pack_workload

LOSSLESS_PENALTY = 1.0  # constraint value of a trial whose greedy output changed


def resolve_space(opts: StudyOptions) -> SearchSpace:
    space = load_search_space(opts.search_space or find_search_space(opts.model))
    update: dict[str, Any] = {}
    if opts.ppl_max is not None or opts.ppl_max_ratio is not None:
        if opts.ppl_max is not None and opts.ppl_max_ratio is not None:
            raise StudyError("give only one of --ppl-max and --ppl-max-ratio")
        if opts.ppl_max_ratio is not None and opts.ppl_max_ratio < 1.0:
            raise StudyError(f"--ppl-max-ratio {opts.ppl_max_ratio}: must be at least 1.0")
        update["quality"] = space.quality.model_copy(update={"ppl_max": opts.ppl_max, "ppl_max_ratio": opts.ppl_max_ratio})
    if opts.assistant:
        update["assistant"] = opts.assistant
    if opts.random_weights:
        update["random_weights"] = True
    if opts.trial_timeout_s:
        update["trial_timeout_s"] = float(opts.trial_timeout_s)
    assistant = update.get("assistant", space.assistant)
    if assistant is None and "mtp" in space.knobs.drafter:
        # the MTP drafter needs an assistant model; without one it is not part of this study
        drafters = [d for d in space.knobs.drafter if d != "mtp"] or ["none"]
        update["knobs"] = space.knobs.model_copy(update={"drafter": drafters})
    return space.model_copy(update=update)


class StudyLock:
    """One driver per study dir. flock is released by the kernel when the driver dies, even by kill -9."""

    def __init__(self, study_dir: Path) -> None:
        self.path = study_dir / ".driver.lock"
        self.fh = self.path.open("a+")

    def acquire(self) -> None:
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            raise StudyError(f"{self.path.parent}: another driver is running this study"
                             f" (pid {self.fh.read().strip() or '?'})") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()


@dataclass
class _Context:
    opts: StudyOptions
    space: SearchSpace
    study: optuna.Study
    study_dir: Path
    events: TextIO
    progress: Progress
    tracker: Tracker
    plan: dict[str, Any]


def open_study(opts: StudyOptions, space: SearchSpace, study_dir: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir / 'optuna.db'}")
    name = opts.resolved_name()
    exists = name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if exists and not opts.resume:
        raise StudyError(f"study '{name}' already exists in {study_dir}; pass --resume to continue it,"
                         " or --study-name/--study-dir for a new one")
    if opts.resume and not exists:
        raise StudyError(f"--resume: no study '{name}' in {study_dir}")
    previous = len(optuna.load_study(study_name=name, storage=storage).trials) if exists else 0
    # A resumed study gets a new seed offset, or TPE's random start-up trials would repeat themselves.
    sampler = optuna.samplers.TPESampler(seed=space.sampler.seed + previous, multivariate=True, group=True,
                                         n_startup_trials=space.sampler.startup_trials, constant_liar=True)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, load_if_exists=True,
                                directions=["maximize", "minimize"])
    identity = {"model": opts.model, "search_space_sha256": space.source_sha256, "gpu_profile": opts.gpu.lower(),
                "quality": space.quality.model_dump(), "random_weights": space.random_weights,
                "assistant": space.assistant}
    if not exists:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        study.set_user_attr("search_space", space.source_path)
        study.set_user_attr("created_utc", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        study.enqueue_trial(default_params(space.knobs), user_attrs={"queued": "default knobs"})
    else:
        for key, value in identity.items():
            if study.user_attrs.get(key) != value:
                raise StudyError(f"--resume: {key} is {value!r} now but the study was started with"
                                 f" {study.user_attrs.get(key)!r}; start a new study (--study-name)")
    return study


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Trials a dead driver left RUNNING: mark them failed ("interrupted") and queue their knobs again."""
    numbers = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial = optuna.trial.Trial(study, frozen._trial_id)
        trial.set_user_attr("cause", "interrupted")
        trial.set_user_attr("error", "the driver stopped while this trial ran; re-queued on resume")
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(frozen.params, user_attrs={"requeued_from": frozen.number}, skip_if_exists=False)
        numbers.append(frozen.number)
    return numbers


def run_study(opts: StudyOptions, stream: TextIO | None = None) -> StudyOutcome:
    stream = stream or sys.stderr
    space = resolve_space(opts)
    profile = get_profile(opts.gpu)
    if opts.trials < 1:
        raise StudyError(f"--trials {opts.trials}: must be at least 1")
    study_dir = opts.resolved_dir()
    study_dir.mkdir(parents=True, exist_ok=True)
    lock = StudyLock(study_dir)
    lock.acquire()
    study = open_study(opts, space, study_dir)
    packed = pack_workload(space)
    mlflow_uri = opts.mlflow_uri or study.user_attrs.get("mlflow_uri") or default_tracking_uri(study_dir)
    tracker = Tracker(mlflow_uri, study_dir / "mlartifacts")
    say = lambda text: print(text, file=stream, flush=True)  # noqa: E731
    say(f"study '{study.study_name}' in {study_dir} ({len(finished(study.get_trials(deepcopy=False)))} trials so far)")

    with RaySession(opts, profile, space, packed, say) as session:
        infos = session.infos
        for info in infos:
            warning = check_device(profile, info["describe"], opts.allow_gpu_mismatch)
            if warning:
                say("warning: " + warning)
        hardware = infos[0]["describe"]
        token_sha = infos[0]["workload"]["token_sha256"]
        if "token_sha256" in study.user_attrs and study.user_attrs["token_sha256"] != token_sha:
            raise StudyError("--resume: the tokenized workload differs from the one the study started with")
        if "hardware" not in study.user_attrs:
            study.set_user_attr("hardware", hardware)
            study.set_user_attr("token_sha256", token_sha)
            study.set_user_attr("workload", describe_packed(packed))
            study.set_user_attr("workload_summary", infos[0]["workload"])
        elif study.user_attrs["hardware"].get("gpu_name") != hardware.get("gpu_name") and not opts.allow_gpu_mismatch:
            raise StudyError(f"--resume: the study ran on {study.user_attrs['hardware'].get('gpu_name')},"
                             f" the workers now run on {hardware.get('gpu_name')} (--allow-gpu-mismatch to go on)")
        reference = _quality_limit(study, space, session, say)
        ppl_limit = reference["ppl_limit"]

        requeued = requeue_interrupted(study)
        if requeued:
            say(f"resume: trial(s) {requeued} were running when the driver stopped; marked failed and re-queued")
        parent = tracker.start_parent(study.user_attrs.get("mlflow_parent_run_id"), study.study_name,
                                      params={"model": opts.model, "gpu_profile": profile.name,
                                              "trials": opts.trials, "ppl_limit": ppl_limit,
                                              "search_space": space.source_path},
                                      tags=_run_tags(hardware, profile.name))
        if study.user_attrs.get("mlflow_parent_run_id") != parent:
            study.set_user_attr("mlflow_parent_run_id", parent)
            study.set_user_attr("mlflow_uri", mlflow_uri)
        _log_missing_trials(study, tracker, hardware, profile.name)

        w = space.workload
        plan = {**reference, "first_chunk_records": w.first_chunk_records, "output_tokens": w.output_tokens,
                "repeats": w.repeats, "warmup": w.warmup, "lossless_prompts": w.lossless.prompts,
                "lossless_tokens": w.lossless.output_tokens}
        done = sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))
        with (study_dir / "events.jsonl").open("a") as events:
            ctx = _Context(opts, space, study, study_dir, events, Progress(opts.trials, done, stream), tracker, plan)
            _event(ctx, "driver_started", pid=os.getpid(), workers=[i["pid"] for i in infos])
            _drive(ctx, session, hardware, profile.name)
        return finalize_study(study, space, opts, profile.name, ppl_limit, tracker, study_dir, session.pool.events, say)


def _quality_limit(study: optuna.Study, space: SearchSpace, session: "RaySession", say) -> dict[str, float]:
    """The default knobs' PPL (full set and first chunk), measured once per study, and the limit."""
    if "ppl_limit" in study.user_attrs:
        return {k: float(study.user_attrs[k]) for k in ("ppl_limit", "baseline_ppl", "baseline_ppl_first_chunk")}
    say("measuring the default knobs' PPL (full window, plain decode): the quality reference...")
    base = session.call_one("baseline_ppl", (space.workload.first_chunk_records,), timeout_s=space.load_timeout_s)  # setup, not a trial
    baseline = float(base["ppl"])
    if space.quality.ppl_max is not None:
        limit = float(space.quality.ppl_max)
        say(f"default PPL {baseline:.4f}; limit {limit:.4f} (--ppl-max)")
    else:
        limit = baseline * float(space.quality.ppl_max_ratio)
        say(f"default PPL {baseline:.4f} x {space.quality.ppl_max_ratio} -> limit {limit:.4f}")
    values = {"ppl_limit": limit, "baseline_ppl": baseline, "baseline_ppl_first_chunk": float(base["ppl_first_chunk"])}
    for key, value in values.items():
        study.set_user_attr(key, value)
    return values


def _run_tags(hardware: dict[str, Any], profile: str) -> dict[str, str]:
    from .tracking import weights_fingerprint

    model = hardware.get("model") or {}
    return {"gpu": str(hardware.get("gpu_name")), "gpu_profile": profile, "model": str(model.get("name")),
            "weights_sha256": weights_fingerprint(model.get("weights")), "engine_version": str(hardware.get("engine_version")),
            "device": str(hardware.get("device")), "torch": str(hardware.get("torch"))}


def _log_trial(study: optuna.Study, tracker: Tracker, number: int, hardware: dict[str, Any], profile: str) -> None:
    t = study.get_trials(deepcopy=False)[number]
    p = point_from_trial(t)
    metrics = dict(t.user_attrs.get("metrics") or {})
    metrics["feasible"] = 1.0 if p.feasible else 0.0
    tags = _run_tags(hardware, profile)
    tags.update({k: str(t.user_attrs[k])[:5000] for k in ("reason", "cause", "error", "worker") if t.user_attrs.get(k)})
    if t.user_attrs.get("lossless") is not None:
        tags["lossless_identical"] = str(t.user_attrs["lossless"].get("identical"))
    to_ms = lambda d: int(d.timestamp() * 1000) if d else None  # noqa: E731
    tracker.log_trial(number, p.state, {"trial_number": number, **(t.user_attrs.get("knobs") or {})}, metrics, tags,
                      to_ms(t.datetime_start), to_ms(t.datetime_complete))


def _log_missing_trials(study: optuna.Study, tracker: Tracker, hardware: dict[str, Any], profile: str) -> None:
    logged = tracker.logged_trials()
    for t in finished(study.get_trials(deepcopy=False)):
        if t.number not in logged:
            _log_trial(study, tracker, t.number, hardware, profile)


def _event(ctx: _Context, event: str, **fields: Any) -> None:
    ctx.events.write(json.dumps({"time": time.time(), "event": event, **fields}) + "\n")
    ctx.events.flush()


def _drive(ctx: _Context, session: "RaySession", hardware: dict[str, Any], profile: str) -> None:
    study, pool = ctx.study, session.pool
    deadline = time.monotonic() + ctx.opts.timeout_min * 60 if ctx.opts.timeout_min else None
    target = ctx.opts.trials
    best_tps, front_size = _front_summary(study)
    to_log: list[int] = []  # finished trials, logged to MLflow after idle workers got new trials
    while True:
        done = sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))
        may_ask = deadline is None or time.monotonic() < deadline
        for slot in pool.idle():
            if not may_ask or done + pool.in_flight() >= target:
                break
            trial = study.ask()
            knobs = sample_knobs(trial, ctx.space.knobs)
            trial.set_user_attr("knobs", knobs)
            if _reuse_measurement(ctx, trial, knobs):
                _log_trial(study, ctx.tracker, trial.number, hardware, profile)
                done += 1
                continue
            trial.set_user_attr("worker", slot.where())
            pool.submit(slot, "run_trial", (knobs, ctx.plan), payload=trial, timeout_s=ctx.space.trial_timeout_s)
            _event(ctx, "trial_started", trial=trial.number, pid=slot.info["pid"], slot=slot.index, knobs=knobs)
        for number in to_log:
            _log_trial(study, ctx.tracker, number, hardware, profile)
        to_log.clear()
        ctx.progress.update(done, pool.in_flight(), best_tps, front_size)
        if pool.in_flight() == 0 and (not may_ask or done >= target):
            break
        if not pool.alive():
            raise StudyError("every worker was taken out of the pool: " + "; ".join(pool.events[-3:]))
        for fin in pool.poll(1.0):
            _tell(ctx, fin.payload, fin.result)
            to_log.append(fin.payload.number)
            best_tps, front_size = _front_summary(study)
        for line in pool.events[len(getattr(ctx, "_seen_events", [])):]:
            ctx.progress.message("worker pool: " + line)
        ctx._seen_events = list(pool.events)  # type: ignore[attr-defined]
    ctx.progress.close()


def _reuse_measurement(ctx: _Context, trial: optuna.Trial, knobs: dict[str, Any]) -> bool:
    """TPE may propose knobs that already ran (small discrete spaces). Re-running them would spend the
    budget on a known point, so the earlier measurement is told again, marked as a repeat."""
    for earlier in ctx.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if earlier.user_attrs.get("knobs") == knobs and "repeat_of" not in earlier.user_attrs:
            for key in ("status", "reason", "metrics", "lossless", "worker"):
                if key in earlier.user_attrs:
                    trial.set_user_attr(key, earlier.user_attrs[key])
            trial.set_user_attr("repeat_of", earlier.number)
            for name, value in earlier.constraints.items():
                trial.set_constraint(name, value)
            ctx.study.tell(trial, list(earlier.values))
            _event(ctx, "trial_repeated", trial=trial.number, repeat_of=earlier.number)
            ctx.progress.message(f"trial {trial.number} repeats the knobs of trial {earlier.number}: measurement reused")
            return True
    return False


def _front_summary(study: optuna.Study) -> tuple[float | None, int]:
    front = pareto_front(points(study))
    return (front[0].tps if front else None), len(front)


def _tell(ctx: _Context, trial: optuna.Trial, result: dict[str, Any]) -> None:
    summary = compact_result(result)
    for key, value in summary.items():
        trial.set_user_attr(key, value)
    _event(ctx, "trial_finished", trial=trial.number, status=result["status"],
           cause=result.get("cause"), reason=result.get("reason"))
    if result["status"] == "failed":
        ctx.progress.message(f"trial {trial.number} failed ({result['cause']}): {result.get('error', '')[:300]}")
        ctx.study.tell(trial, state=TrialState.FAIL)
        return
    metrics = summary["metrics"]
    lossless_bad = result.get("reason") == "lossless_mismatch"
    if lossless_bad:
        info = result.get("lossless") or {}
        ctx.progress.message(
            f"!!! LOSSLESS MISMATCH in trial {trial.number}: knobs {trial.user_attrs.get('knobs')} changed greedy"
            f" output (prompts {info.get('mismatched_prompts')}, first differing token {info.get('first_mismatch_index')})."
            " The trial is infeasible; this is an engine bug in the speculative path.")
    trial.set_constraint("ppl", float(metrics["ppl"]) - ctx.plan["ppl_limit"])  # feasible when <= 0
    trial.set_constraint("lossless", LOSSLESS_PENALTY if lossless_bad else 0.0)
    # Stopped before the speed run: no speed was measured. 0 tok/s keeps the trial in the study (the sampler
    # learns the infeasible region from it) and the constraint keeps it off the front.
    ctx.study.tell(trial, [float(metrics.get("tps") or 0.0), float(metrics["ppl"])])
