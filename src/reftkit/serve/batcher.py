"""The admission queue, the dynamic batcher and the one engine thread.

Decisions:
- **One engine thread** runs every `generate` (torch releases the GIL, so the event loop keeps serving HTTP
  meanwhile). Requests arrive as groups of rows (a request's `n` choices) in one FIFO queue guarded by a
  condition variable; the handlers get their events back through the rows' `emit`.
- **Dynamic batching**: when the engine is free it waits for the first request, then up to `max_wait_ms` more
  (measured from that request's arrival) or until `max_batch_size` rows are waiting, and takes requests in
  arrival order. A request that would bring the batch over `max_batch_size` rows, or over `max_distinct`
  distinct (adapter, steering) settings, is left in the queue for a later batch (the `max_loras` rule), and
  younger requests that fit go ahead of it. Batches are static: a batch runs until all of its rows finish, and new
  requests wait for the next one (iteration-level admission is not built).
- **Shedding**: admission refuses at once (503 `queue_full` + `Retry-After`) when `max_queue` requests are
  waiting, so overload costs a queue-length check, not a timeout.
- **Cancellation**: a cancelled row that is still queued is dropped when batches are formed; a running one
  finishes at the engine's next step (`streaming.BatchStreamer`).
- **Shutdown** (`close`): admission stops (503 `shutting_down`); queued and running requests get `grace` seconds
  to finish; after that the queued ones get a 503 error event and the running ones are cancelled with one.
- **Engine failure**: an exception in `generate` ends that batch's unfinished rows with a 500 error event; the
  thread goes on with the next batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .protocol import ApiError, overloaded

log = logging.getLogger(__name__)


def shutting_down() -> ApiError:
    return ApiError(503, "The server is shutting down; retry on another instance or later", type="server_overloaded",
                    code="shutting_down", headers={"Retry-After": "1"})


class Batcher:
    def __init__(self, engine, lock: threading.Lock, config, metrics):
        self.engine = engine
        self.lock = lock                # the registry's engine lock: adapters change only between batches
        self.config = config
        self.metrics = metrics
        self.queue: deque[list] = deque()
        self.cond = threading.Condition()
        self.accepting = True
        self.stopping = False
        self.running: list = []
        self.thread = threading.Thread(target=self._loop, name="reftkit-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # ---- admission (event loop) ---------------------------------------------------------------------------
    def submit(self, rows: list) -> None:
        with self.cond:
            if not self.accepting:
                raise shutting_down()
            if len(self.queue) >= self.config.max_queue:
                raise overloaded()
            now = time.monotonic()
            for r in rows:
                r.enqueued_at = now
            self.queue.append(rows)
            self.metrics.queue_depth = len(self.queue)
            self.cond.notify_all()

    def depth(self) -> int:
        with self.cond:
            return len(self.queue)

    def idle(self) -> bool:
        with self.cond:
            return not self.queue and not self.running

    # ---- the engine thread --------------------------------------------------------------------------------
    def _rows_waiting(self) -> int:
        return sum(len(g) for g in self.queue)

    def _take(self) -> list:
        batch, keys, kept = [], set(), deque()
        while self.queue:
            group = self.queue.popleft()
            if all(r.cancelled for r in group):
                for r in group:
                    r.finished = True
                    r.emit(("done", r, "cancelled", 0))
                continue
            new_keys = {r.key for r in group} - keys
            if len(batch) + len(group) <= self.config.max_batch_size and \
                    len(keys) + len(new_keys) <= self.config.max_distinct:
                batch += group
                keys |= new_keys
            else:
                kept.append(group)
        self.queue = kept
        self.metrics.queue_depth = len(self.queue)
        return batch

    def _loop(self) -> None:
        wait = self.config.max_wait_ms / 1000.0
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.queue:
                    return
                deadline = self.queue[0][0].enqueued_at + wait
                while not self.stopping and self._rows_waiting() < self.config.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
                batch = self._take()
                self.running = batch
            if batch:
                self._run(batch)
            with self.cond:
                self.running = []
                self.metrics.running_rows = 0
                self.cond.notify_all()

    def _run(self, batch: list) -> None:
        now = time.monotonic()
        self.metrics.batch(len(batch), [now - r.enqueued_at for r in batch])
        self.metrics.running_rows = len(batch)
        try:
            with self.lock:
                self.engine.run(batch, on_token=self.metrics.generated)
        except Exception as e:  # one failed batch must not stop the server
            log.exception("generation failed for a batch of %d rows", len(batch))
            error = ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error",
                             code="generation_failed")
            for r in batch:
                if not r.finished:
                    r.finished = True
                    r.emit(("error", r, error))

    # ---- shutdown -----------------------------------------------------------------------------------------
    def close(self, grace: float) -> None:
        with self.cond:
            self.accepting = False
            end = time.monotonic() + grace
            while (self.queue or self.running) and time.monotonic() < end:
                self.cond.wait(min(0.05, max(0.0, end - time.monotonic())))
            error = shutting_down()
            for group in self.queue:
                for r in group:
                    r.finished = True
                    r.emit(("error", r, error))
            self.queue.clear()
            for r in self.running:
                if not r.finished:
                    r.cancelled = True
                    r.emit(("error", r, error))
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=max(1.0, grace))
