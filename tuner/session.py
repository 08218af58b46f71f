"""Ray for one study: start (or join) the cluster, size the pool to its GPUs, and tear it all down."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import ray

from .errors import StudyError
from .options import StudyOptions
from .profiles import GpuProfile
from .search_space import SearchSpace
from .workers import WorkerPool

REPO_ROOT = Path(__file__).resolve().parent.parent


class RaySession:
    def __init__(self, opts: StudyOptions, profile: GpuProfile, space: SearchSpace, packed: dict[str, Any],
                 say: Callable[[str], None]) -> None:
        self.opts, self.profile, self.space, self.packed, self.say = opts, profile, space, packed, say
        self.pool: WorkerPool | None = None
        self.infos: list[dict[str, Any]] = []
        self._started_ray = False

    def __enter__(self) -> "RaySession":
        # Workers on this machine (or on nodes sharing its filesystem) import engine/ and tuner/ from here.
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                  "runtime_env": {"env_vars": env}, "logging_level": "WARNING"}
        if self.opts.ray_address:
            kwargs["address"] = self.opts.ray_address
        else:
            kwargs.update(address="local", num_cpus=os.cpu_count() or 1)
        if not ray.is_initialized():
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise StudyError(f"--ray-address {self.opts.ray_address}: cannot join the cluster ({exc})") from None
            self._started_ray = True
        try:
            self._start_pool()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_pool(self) -> None:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if self.profile.is_gpu:
            if gpus == 0:
                raise StudyError(f"--gpu {self.profile.name}: the Ray cluster has no GPUs (use --gpu cpu for the CPU demo)")
            workers = self.opts.workers or gpus
            if workers > gpus:
                raise StudyError(f"--workers {workers}: the Ray cluster has only {gpus} GPU(s)")
            cpus_per_worker = 1.0
        else:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            workers = self.opts.workers or (nodes if self.opts.ray_address else 1)
            if workers > cpus:
                raise StudyError(f"--workers {workers}: the Ray cluster has only {cpus} CPU(s)")
            cpus_per_worker = float(max(1, cpus // workers))
        config = {"model": self.opts.model, "device": "cuda" if self.profile.is_gpu else "cpu",
                  "random_weights": self.space.random_weights, "assistant": self.space.assistant,
                  "seed": self.space.sampler.seed, "workload": self.packed}
        self.pool = WorkerPool(config, workers, self.profile.is_gpu, cpus_per_worker, self.space.load_timeout_s,
                               self.opts.max_worker_failures)
        self.say(f"starting {workers} worker(s) on {self.profile.name} ({cpus} CPU, {gpus} GPU in the cluster);"
                 " each loads the model once...")
        self.pool.start()
        try:
            alive = self.pool.wait_ready()
        except RuntimeError as exc:
            raise StudyError(str(exc)) from None
        for line in self.pool.events:
            self.say("worker pool: " + line)
        self.infos = [s.info for s in alive]
        shas = {i["workload"]["token_sha256"] for i in self.infos}
        if len(shas) > 1:
            raise StudyError("workers tokenized the workload differently (different tokenizers or files?)")
        loads = ", ".join(f"{i['load_seconds']:.1f}s" for i in self.infos)
        self.say(f"{len(alive)} worker(s) ready (model load {loads}); workload {self.infos[0]['workload']}")

    def call_one(self, method: str, args: tuple, timeout_s: float) -> dict[str, Any]:
        """Run one non-trial call (the baseline PPL) on the first ready worker."""
        slot = self.pool.idle()[0]
        self.pool.submit(slot, method, args, payload=method, timeout_s=timeout_s)
        while True:
            for fin in self.pool.poll(1.0):
                if fin.result.get("status") == "failed":
                    raise StudyError(f"{method} failed on {fin.result.get('worker')}: {fin.result.get('error')}")
                return fin.result

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
