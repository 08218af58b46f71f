"""The Ray worker pool: one actor per GPU (or `--workers N` CPU actors), each holding one loaded model.

Every actor builds one `EngineWorker` (the model is loaded once) and then runs trials by changing knobs.
The pool classifies failures (oom / crash / timeout / invalid_knobs), kills and replaces an actor after an
oom, crash or timeout, and retires a slot (a GPU) that fails `max_failures` times in a row.
"""
from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import ray

from .trial import run_trial_on_worker

FAILURE_CAUSES = ("oom", "crash", "timeout", "invalid_knobs", "load_failed")


def classify_exception(exc: BaseException) -> str:
    """OOM is told apart from other crashes: it says 'this config does not fit', not 'this GPU is bad'."""
    from engine.errors import KnobError

    if isinstance(exc, KnobError):
        return "invalid_knobs"
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    text = str(exc).lower()
    if names & {"OutOfMemoryError", "MemoryError"} or "out of memory" in text:
        return "oom"
    return "crash"


def _tokenizer_of(worker: Any) -> Any:
    """The loaded model's tokenizer (None for geometry-only random-weight models)."""
    return worker.tokenizer


def _error_line(exc: BaseException) -> str:
    """The most telling line of a (possibly Ray-wrapped, traceback-carrying) error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return (named or lines or [type(exc).__name__])[-1][:500]


class TrialActor:
    """Runs inside a Ray worker process. Methods return plain dicts (Ray ships them to the driver)."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from engine.worker import EngineWorker

        from .workload import build_workload

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if config["device"] == "cpu" and cpus:
            torch.set_num_threads(max(1, int(cpus)))  # share the machine's cores between CPU actors
        t0 = time.perf_counter()
        self.worker = EngineWorker(config["model"], device=config["device"], random_weights=config["random_weights"],
                                   assistant=config.get("assistant"), seed=config.get("seed", 0))
        self.load_seconds = time.perf_counter() - t0
        self.workload = build_workload(config["workload"], _tokenizer_of(self.worker))

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"describe": self.worker.describe(), "workload": self.workload.summary(), "pid": os.getpid(),
                "node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "load_seconds": round(self.load_seconds, 3)}

    def baseline_ppl(self, first_chunk_records: int) -> dict[str, Any]:
        """Default knobs (trained window, plain decode): PPL over every record and over the first chunk.
        The reference for `ppl_max_ratio`, and for judging a trial from its first chunk alone."""
        def measure() -> dict[str, Any]:
            self.worker.set_knobs({})
            records = self.workload.records
            first = self.worker.measure_ppl(records[:first_chunk_records])
            rest = self.worker.measure_ppl(records[first_chunk_records:]) if len(records) > first_chunk_records \
                else {"nll_sum": 0.0, "tokens": 0}
            tokens = first["tokens"] + rest["tokens"]
            return {"status": "ok", "ppl": math.exp((first["nll_sum"] + rest["nll_sum"]) / tokens),
                    "ppl_first_chunk": math.exp(first["nll_sum"] / first["tokens"]), "tokens": tokens}
        return self._guarded(measure)

    def run_trial(self, knobs: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
        return self._guarded(lambda: run_trial_on_worker(self.worker, self.workload, knobs, plan))

    @staticmethod
    def _guarded(fn) -> dict[str, Any]:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded cause
            return {"status": "failed", "cause": classify_exception(exc),
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "traceback": traceback.format_exc()[-4000:]}


@dataclass
class Slot:
    """One place in the pool (one GPU, or one share of the CPU). Its actor may be replaced."""

    index: int
    actor: Any = None
    ready_ref: Any = None  # set while the actor is loading
    info: dict[str, Any] | None = None
    consecutive_failures: int = 0
    restarts: int = 0
    retired: bool = False
    retire_reason: str | None = None
    busy: Any = None  # the in-flight trial's payload
    task_ref: Any = None
    deadline: float = 0.0
    load_deadline: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.retired and self.info is not None and self.busy is None

    def where(self) -> str:
        if not self.info:
            return f"slot {self.index}"
        gpus = ",".join(self.info.get("gpu_ids") or []) or "-"
        return f"slot {self.index} (node {self.info['node_id'][:8]}, gpu {gpus}, pid {self.info['pid']})"


@dataclass
class Finished:
    slot: Slot
    payload: Any
    result: dict[str, Any]


class WorkerPool:
    def __init__(self, actor_config: dict[str, Any], workers: int, use_gpu: bool, cpus_per_worker: float,
                 load_timeout_s: float, max_failures: int = 3) -> None:
        self.actor_config = actor_config
        self.use_gpu = use_gpu
        self.cpus_per_worker = cpus_per_worker
        self.load_timeout_s = load_timeout_s
        self.max_failures = max_failures
        self.slots = [Slot(i) for i in range(workers)]
        self.events: list[str] = []  # human-readable lines about restarts and retirements
        options: dict[str, Any] = {"num_cpus": cpus_per_worker, "max_restarts": 0, "max_concurrency": 1}
        if use_gpu:
            options["num_gpus"] = 1
        self._actor_cls = ray.remote(**options)(TrialActor)

    # ---- lifecycle -------------------------------------------------------------------------
    def _spawn(self, slot: Slot) -> None:
        slot.actor = self._actor_cls.remote(self.actor_config)
        slot.ready_ref = slot.actor.info.remote()
        slot.info = None
        slot.load_deadline = time.monotonic() + self.load_timeout_s

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def wait_ready(self) -> list[Slot]:
        """Block until every slot has loaded or been retired; raises the first load error if none loaded."""
        while any(s.ready_ref is not None for s in self.slots):
            self.poll(1.0)
        alive = [s for s in self.slots if not s.retired]
        if not alive:
            reasons = "; ".join(f"{s.where()}: {s.retire_reason}" for s in self.slots)
            raise RuntimeError(f"no worker could load the model: {reasons}")
        return alive

    def _kill(self, slot: Slot) -> None:
        if slot.actor is not None:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - the actor may already be gone
                pass
        slot.actor = None

    def _failed(self, slot: Slot, cause: str, restart: bool) -> None:
        slot.consecutive_failures += 1
        slot.failures.append(cause)
        if slot.consecutive_failures >= self.max_failures:
            self._kill(slot)
            slot.retired = True
            slot.retire_reason = f"{slot.consecutive_failures} failures in a row ({', '.join(slot.failures[-3:])})"
            self.events.append(f"retired {slot.where()}: {slot.retire_reason}")
        elif restart:
            where = slot.where()
            self._kill(slot)
            slot.restarts += 1
            self.events.append(f"restarting {where} after {cause}")
            self._spawn(slot)

    def shutdown(self) -> None:
        for slot in self.slots:
            self._kill(slot)

    # ---- trials ---------------------------------------------------------------------------
    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.ready]

    def alive(self) -> list[Slot]:
        return [s for s in self.slots if not s.retired]

    def in_flight(self) -> int:
        return sum(s.busy is not None for s in self.slots)

    def submit(self, slot: Slot, method: str, args: tuple, payload: Any, timeout_s: float) -> None:
        slot.task_ref = getattr(slot.actor, method).remote(*args)
        slot.busy = payload
        slot.deadline = time.monotonic() + timeout_s

    def poll(self, max_wait_s: float) -> list[Finished]:
        """Wait up to `max_wait_s` for trial results, loads and deadlines; returns finished trials."""
        refs = [s.task_ref for s in self.slots if s.busy is not None] + \
               [s.ready_ref for s in self.slots if s.ready_ref is not None]
        now = time.monotonic()
        deadlines = [s.deadline for s in self.slots if s.busy is not None] + \
                    [s.load_deadline for s in self.slots if s.ready_ref is not None]
        wait = max(0.0, min([max_wait_s] + [d - now for d in deadlines]))
        done: set = set()
        if refs:
            # return as soon as ANY trial or load finishes (waiting for all of them would leave a
            # finished worker idle until the slowest one is done), plus whatever else is ready now
            first, rest = ray.wait(refs, num_returns=1, timeout=wait)
            done = set(first)
            if first and rest:
                done |= set(ray.wait(rest, num_returns=len(rest), timeout=0)[0])
        if not refs:
            time.sleep(min(wait, 0.05))
        finished: list[Finished] = []
        now = time.monotonic()
        for slot in self.slots:
            if slot.ready_ref is not None and (slot.ready_ref in done or now > slot.load_deadline):
                self._finish_load(slot, slot.ready_ref in done)
            if slot.busy is None:
                continue
            if slot.task_ref in done:
                result = self._result(slot)
            elif now > slot.deadline:
                result = {"status": "failed", "cause": "timeout",
                          "error": f"no result within the trial time limit on {slot.where()}"}
            else:
                continue
            finished.append(Finished(slot, slot.busy, result))
            slot.busy, slot.task_ref = None, None
            if result["status"] == "failed":
                result.setdefault("worker", slot.where())
                restart = result["cause"] in ("oom", "crash", "timeout")
                if result["cause"] == "invalid_knobs":
                    slot.consecutive_failures -= 1  # a bad combination is not the GPU's fault
                self._failed(slot, result["cause"], restart)
            else:
                slot.consecutive_failures = 0
        return finished

    def _result(self, slot: Slot) -> dict[str, Any]:
        try:
            return ray.get(slot.task_ref)
        except ray.exceptions.RayActorError as exc:
            cause = "oom" if "memory" in str(exc).lower() and "out of memory" in str(exc).lower() else "crash"
            return {"status": "failed", "cause": cause,
                    "error": f"worker process died during the trial on {slot.where()}: {str(exc).splitlines()[0]}"}
        except ray.exceptions.RayError as exc:
            return {"status": "failed", "cause": "crash", "error": f"{type(exc).__name__}: {exc}"[:2000]}

    def _finish_load(self, slot: Slot, done: bool) -> None:
        ref, slot.ready_ref = slot.ready_ref, None
        try:
            if not done:
                raise TimeoutError(f"model not loaded within {self.load_timeout_s:.0f} s")
            slot.info = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a load failure retires the slot after max_failures
            cause = _error_line(exc)
            self.events.append(f"{slot.where()} failed to load: {cause}")
            slot.failures.append("load_failed")
            slot.consecutive_failures += 1
            self._kill(slot)
            # a first load that fails is a property of the model/flags, not of the GPU: no retries
            if slot.consecutive_failures >= self.max_failures or slot.restarts == 0:
                slot.retired = True
                slot.retire_reason = f"load failed: {cause}"
                self.events.append(f"retired {slot.where()}: {slot.retire_reason}")
            else:
                slot.restarts += 1
                self._spawn(slot)
