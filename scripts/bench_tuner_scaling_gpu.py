"""Trials per hour with 1 worker vs N workers (issue 4, multi-GPU bar), measured fairly in one run.

Each configuration runs the same `vkae-tune` study (same search space, same trial count, fresh study
dir) with its OWN fresh torch.compile / Triton caches, so neither run inherits the other's compiled
kernels; the workers of one run share that run's cache, as workers on one host do. Trials per hour
= finished trials / (last trial end - first trial start), read from the study's Optuna storage, so Ray
start-up and model loading are left out of both.

    python scripts/bench_tuner_scaling_gpu.py --gpu h200 --workers 2 --trials 24 \
        --model gemma-4-mini --search-space search_spaces/gemma-4-mini.yaml
Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_study(n_workers: int, args: argparse.Namespace, base: Path) -> dict:
    import optuna

    study_dir = base / f"study-w{n_workers}"
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(base / f"inductor-w{n_workers}")
    env["TRITON_CACHE_DIR"] = str(base / f"triton-w{n_workers}")
    cmd = [sys.executable, "-m", "tuner.cli", args.model, "--gpu", args.gpu,
           "--workers", str(n_workers), "--trials", str(args.trials), "--search-space", str(args.search_space),
           "--study-dir", str(study_dir), "--study-name", f"scaling-w{n_workers}",
           "--out", str(base / f"w{n_workers}.recipe.yaml")]
    if args.random_weights:
        cmd += ["--random-weights", "--ppl-max-ratio", "1.05"]
    if args.assistant:
        cmd += ["--assistant", args.assistant]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{n_workers}-worker study failed (exit {proc.returncode})")
    storage = f"sqlite:///{study_dir / 'optuna.db'}"
    trials = optuna.load_study(study_name=f"scaling-w{n_workers}", storage=storage).trials
    done = [t for t in trials if t.datetime_complete is not None]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    overlap = sum(1 for a in done for b in done if a.number < b.number
                  and a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete)
    return {"workers": n_workers, "trials": len(done), "span_s": span, "trials_per_hour": len(done) / span * 3600,
            "command_wall_s": wall, "overlapping_trial_pairs": overlap,
            "states": sorted({t.state.name for t in done})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-4-e4b")
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--search-space", type=Path, default=ROOT / "search_spaces/gemma-4-e4b-random.yaml")
    ap.add_argument("--assistant", default=None)
    ap.add_argument("--random-weights", action="store_true", help="random weights (speed only), ratio limit 1.05")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vkae-scaling-"))
    one = run_study(1, a, base)  # the single worker first: it can inherit nothing
    many = run_study(a.workers, a, base)
    ratio = many["trials_per_hour"] / one["trials_per_hour"]
    print("| workers | trials | span (s) | trials/hour | overlapping trial pairs |\n|---:|---:|---:|---:|---:|")
    for r in (one, many):
        print(f"| {r['workers']} | {r['trials']} | {r['span_s']:.1f} | {r['trials_per_hour']:.1f} | "
              f"{r['overlapping_trial_pairs']} |")
    print(f"ratio {ratio:.2f}x")
    print(json.dumps({"model": a.model, "weights": "random" if a.random_weights else "real", "gpu_profile": a.gpu, "one": one, "many": many,
                      "trials_per_hour_ratio": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
