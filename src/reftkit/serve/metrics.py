"""Server metrics in Prometheus' text exposition format (version 0.0.4), without a client library.

Counters: requests by endpoint and status, generated tokens, batches. Gauges: queue depth (requests waiting),
running rows, output tokens/s over the last 10 s. Histograms: time to first token, end-to-end latency, queue
wait and batch size. Everything is guarded by one lock: the engine thread and the event loop both record.
"""

from __future__ import annotations

import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.total}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = 0
        self.batches = 0
        self.queue_depth = 0
        self.running_rows = 0
        self._recent: deque = deque()  # (time, tokens)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue_wait = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def generated(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens += n
            self._recent.append((now, n))

    def batch(self, rows: int, waits: list[float]) -> None:
        with self._lock:
            self.batches += 1
            self.batch_size.observe(rows)
            for w in waits:
                self.queue_wait.observe(w)

    def latency(self, ttft: float | None, e2e: float) -> None:
        with self._lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            self.e2e.observe(e2e)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / window

    def render(self) -> str:
        tps = self.tokens_per_second()
        with self._lock:
            lines = ["# HELP reftkit_requests_total HTTP requests by endpoint and status.",
                     "# TYPE reftkit_requests_total counter"]
            lines += [f'reftkit_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP reftkit_generated_tokens_total Tokens generated.",
                      "# TYPE reftkit_generated_tokens_total counter", f"reftkit_generated_tokens_total {self.tokens}",
                      "# HELP reftkit_batches_total Batches run by the engine.",
                      "# TYPE reftkit_batches_total counter", f"reftkit_batches_total {self.batches}",
                      "# HELP reftkit_queue_depth Requests waiting for a batch.",
                      "# TYPE reftkit_queue_depth gauge", f"reftkit_queue_depth {self.queue_depth}",
                      "# HELP reftkit_running_rows Rows in the running batch.",
                      "# TYPE reftkit_running_rows gauge", f"reftkit_running_rows {self.running_rows}",
                      "# HELP reftkit_output_tokens_per_second Output tokens per second over the last 10 s.",
                      "# TYPE reftkit_output_tokens_per_second gauge", f"reftkit_output_tokens_per_second {tps:.3f}"]
            for name, h, what in (("reftkit_time_to_first_token_seconds", self.ttft, "Time to first token."),
                                  ("reftkit_e2e_latency_seconds", self.e2e, "End-to-end request latency."),
                                  ("reftkit_queue_wait_seconds", self.queue_wait, "Time rows waited for a batch."),
                                  ("reftkit_batch_size_rows", self.batch_size, "Rows per batch.")):
                lines += [f"# HELP {name} {what}", f"# TYPE {name} histogram"] + h.lines(name)
        return "\n".join(lines) + "\n"
