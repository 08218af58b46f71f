"""What a person sees while the study runs: one live progress line, then a table of the front."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from .pareto import TrialPoint


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Rewrites one line on a terminal; prints one line per update elsewhere (logs, CI)."""

    def __init__(self, total: int, already_done: int = 0, stream: TextIO | None = None) -> None:
        self.total = total
        self.start_done = already_done
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.tty = self.stream.isatty()
        self._last_len = 0
        self._last_state: tuple | None = None

    def line(self, done: int, running: int, best_tps: float | None, front_size: int) -> str:
        elapsed = time.monotonic() - self.started
        new = done - self.start_done
        eta = elapsed / new * (self.total - done) if new > 0 else None
        best = f"{best_tps:.1f} tok/s" if best_tps is not None else "none yet"
        return (f"trial {done}/{self.total} ({running} running) | elapsed {_fmt_duration(elapsed)}"
                f" | ETA {_fmt_duration(eta)} | best feasible {best} | front {front_size}")

    def update(self, done: int, running: int, best_tps: float | None, front_size: int) -> None:
        text = self.line(done, running, best_tps, front_size)
        if self.tty:
            pad = " " * max(0, self._last_len - len(text))
            self.stream.write("\r" + text + pad)
            self._last_len = len(text)
        elif (done, running, best_tps, front_size) != self._last_state:  # logs: one line per change
            self.stream.write(text + "\n")
        self._last_state = (done, running, best_tps, front_size)
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that must not be overwritten (failures, lossless mismatches)."""
        if self.tty and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self._last_len = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()


def front_table(front: list[TrialPoint], chosen: TrialPoint | None) -> str:
    if not front:
        return "(empty front)"
    knob_names = sorted({k for p in front for k in p.knobs})
    head = ["", "trial", "tok/s", "tok/s/stream", "ppl", *knob_names]
    rows = [head]
    for p in front:
        rows.append(["*" if chosen is not None and p.number == chosen.number else "", str(p.number),
                     f"{p.tps:.1f}", f"{p.tps_per_stream or 0:.1f}", f"{p.ppl:.4f}",
                     *[str(p.knobs.get(k)) for k in knob_names]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
