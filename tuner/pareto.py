"""The Pareto front over finished trials (maximise TPS, minimise PPL, feasible only) and its plot."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrialPoint:
    number: int
    state: str  # "complete" | "failed"
    feasible: bool
    tps: float | None  # None when no speed run happened (stopped early or failed)
    ppl: float | None
    reason: str | None = None  # why infeasible / failed
    knobs: dict[str, Any] = field(default_factory=dict)
    tps_per_stream: float | None = None


def dominates(a: TrialPoint, b: TrialPoint) -> bool:
    return a.tps >= b.tps and a.ppl <= b.ppl and (a.tps > b.tps or a.ppl < b.ppl)


def pareto_front(points: list[TrialPoint]) -> list[TrialPoint]:
    """Feasible, measured points that no other feasible point dominates; fastest first. A trial that repeats
    an earlier trial's knobs (its measurement reused) appears once, as the earlier trial."""
    candidates, seen = [], set()
    for p in sorted(points, key=lambda p: p.number):
        key = json.dumps(p.knobs, sort_keys=True)
        if p.feasible and p.tps is not None and p.ppl is not None and key not in seen:
            seen.add(key)
            candidates.append(p)
    front = [p for p in candidates if not any(dominates(q, p) for q in candidates)]
    return sorted(front, key=lambda p: (-p.tps, p.ppl, p.number))


def choose(front: list[TrialPoint]) -> TrialPoint | None:
    """The recipe's point: the fastest feasible Pareto point (ties: lower PPL, then earlier trial)."""
    return front[0] if front else None


def least_violating(points: list[TrialPoint]) -> TrialPoint | None:
    """For the 'no feasible trial' report: the measured trial closest to the quality limit."""
    measured = [p for p in points if p.ppl is not None and p.state == "complete"]
    return min(measured, key=lambda p: (p.ppl, -(p.tps or 0.0))) if measured else None


def plot_pareto(points: list[TrialPoint], ppl_limit: float, path: str | Path, title: str,
                chosen: TrialPoint | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    path = Path(path)
    front = pareto_front(points)
    front_ids = {p.number for p in front}
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    groups = {
        "feasible": [p for p in points if p.feasible and p.tps is not None and p.number not in front_ids],
        "infeasible": [p for p in points if not p.feasible and p.tps is not None and p.ppl is not None],
    }
    ax.scatter([p.ppl for p in groups["feasible"]], [p.tps for p in groups["feasible"]], c="tab:blue",
               label="feasible", alpha=0.8)
    ax.scatter([p.ppl for p in groups["infeasible"]], [p.tps for p in groups["infeasible"]], c="tab:red",
               marker="x", label="infeasible", alpha=0.8)
    early = [p for p in points if p.tps is None and p.ppl is not None]
    if early:  # stopped before any speed run: drawn on the x axis
        ax.scatter([p.ppl for p in early], [0.0] * len(early), c="tab:red", marker="|", s=200,
                   label="stopped before speed run")
    if front:
        ax.plot([p.ppl for p in front], [p.tps for p in front], "-o", c="tab:green", label="Pareto front")
    if chosen is not None and chosen.tps is not None:
        ax.scatter([chosen.ppl], [chosen.tps], s=260, facecolors="none", edgecolors="black", linewidths=2,
                   label=f"recipe (trial {chosen.number})")
    ax.axvline(ppl_limit, color="tab:red", linestyle="--", label=f"PPL limit {ppl_limit:.4g}")
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_ylabel("tokens/s (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
