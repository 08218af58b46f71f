"""Server counters, rendered as Prometheus text exposition (format 0.0.4) for GET /metrics."""
from __future__ import annotations

import collections
import threading
import time

RATE_WINDOW_S = 10.0  # tokens/s gauge: tokens produced over the last 10 s


class Metrics:
    """Thread-safe: the engine thread adds tokens and steps, HTTP handlers add requests."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.finished: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.queue = 0
        self.running = 0
        self.steps = 0
        self.row_steps = 0  # sum over steps of busy rows: tokens per stream per target forward
        self.decode_tokens = 0
        self.queue_seconds = 0.0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.started = time.time()

    def add_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def add_prompt(self, tokens: int, waited_s: float) -> None:
        with self._lock:
            self.prompt_tokens += tokens
            self.queue_seconds += waited_s

    def add_tokens(self, n: int) -> None:
        now = time.perf_counter()
        with self._lock:
            self.generation_tokens += n
            self._recent.append((now, n))

    def add_step(self, busy_rows: int) -> None:
        """One plain decode step: each busy row gets one token from one target forward."""
        with self._lock:
            self.steps += 1
            self.row_steps += busy_rows
            self.decode_tokens += busy_rows

    def add_accepted(self, decode_tokens: int, verify_steps: int) -> None:
        """A speculative wave: decode tokens committed over per-stream target forwards."""
        with self._lock:
            self.steps += 1
            self.row_steps += verify_steps
            self.decode_tokens += decode_tokens

    def add_finished(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] += 1

    def set_queue(self, waiting: int, running: int) -> None:
        with self._lock:
            self.queue, self.running = waiting, running

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        with self._lock:
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()
            total = sum(n for _, n in self._recent)
        return total / RATE_WINDOW_S

    def render(self) -> str:
        tps = self.tokens_per_second()
        with self._lock:
            mean_accepted = self.decode_tokens / self.row_steps if self.row_steps else 1.0
            lab = f'model="{self.model}"'
            lines = [
                "# HELP vkae_requests_total HTTP requests by endpoint and status code.",
                "# TYPE vkae_requests_total counter",
                *(f'vkae_requests_total{{{lab},endpoint="{e}",code="{c}"}} {n}'
                  for (e, c), n in sorted(self.requests.items())),
                "# HELP vkae_finished_total Generation streams finished, by reason.",
                "# TYPE vkae_finished_total counter",
                *(f'vkae_finished_total{{{lab},reason="{r}"}} {n}' for r, n in sorted(self.finished.items())),
                "# HELP vkae_prompt_tokens_total Prompt tokens prefilled.",
                "# TYPE vkae_prompt_tokens_total counter",
                f"vkae_prompt_tokens_total{{{lab}}} {self.prompt_tokens}",
                "# HELP vkae_generation_tokens_total Output tokens produced.",
                "# TYPE vkae_generation_tokens_total counter",
                f"vkae_generation_tokens_total{{{lab}}} {self.generation_tokens}",
                f"# HELP vkae_tokens_per_second Output tokens per second over the last {RATE_WINDOW_S:.0f} s.",
                "# TYPE vkae_tokens_per_second gauge",
                f"vkae_tokens_per_second{{{lab}}} {tps:.6g}",
                "# HELP vkae_mean_accepted_tokens Decode tokens committed per stream per target forward"
                " (1 without speculative decoding).",
                "# TYPE vkae_mean_accepted_tokens gauge",
                f"vkae_mean_accepted_tokens{{{lab}}} {mean_accepted:.6g}",
                "# HELP vkae_queue_length Requests waiting for a free batch row.",
                "# TYPE vkae_queue_length gauge",
                f"vkae_queue_length{{{lab}}} {self.queue}",
                "# HELP vkae_running_requests Requests holding a batch row.",
                "# TYPE vkae_running_requests gauge",
                f"vkae_running_requests{{{lab}}} {self.running}",
                "# HELP vkae_engine_steps_total Batched target forwards (decode steps or speculative waves).",
                "# TYPE vkae_engine_steps_total counter",
                f"vkae_engine_steps_total{{{lab}}} {self.steps}",
                "# HELP vkae_queue_seconds_total Seconds requests waited before their prefill.",
                "# TYPE vkae_queue_seconds_total counter",
                f"vkae_queue_seconds_total{{{lab}}} {self.queue_seconds:.6g}",
            ]
        return "\n".join(lines) + "\n"
