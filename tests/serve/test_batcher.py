"""The dynamic batcher without a model: batches respect the row and distinct-settings caps, keep arrival order
(younger requests that fit go ahead of one that does not), never split a request's rows, drop cancelled rows,
shed load at the queue limit, and end everything cleanly on shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from reftkit.serve.batcher import Batcher
from reftkit.serve.config import ServerConfig
from reftkit.serve.metrics import Metrics
from reftkit.serve.protocol import ApiError
from reftkit.serve.row import Row


class FakeEngine:
    def __init__(self, hold=None):
        self.batches = []
        self.hold = hold

    def run(self, rows, on_token=None):
        self.batches.append([(r.adapter, r.index) for r in rows])
        if self.hold is not None:
            self.hold.wait(5)
        for r in rows:
            r.finished = True
            r.emit(("done", r, "length", 1))


def group(adapter, n=1, events=None):
    return [Row(ids=[1], adapter=adapter, index=i, emit=(events.append if events is not None else lambda e: None))
            for i in range(n)]


def batcher(engine, **config):
    return Batcher(engine, threading.Lock(), ServerConfig(**config), Metrics())


def test_batches_respect_the_caps_and_keep_order():
    b = batcher(FakeEngine(), max_batch_size=4, max_distinct=2, max_wait_ms=0)
    for g in [group("a"), group("b"), group("c"), group("a", 2), group(None, 2), group("b")]:
        b.queue.append(g)
    first = b._take()
    assert [(r.adapter, r.index) for r in first] == [("a", 0), ("b", 0), ("a", 0), ("a", 1)]
    second = b._take()
    assert [(r.adapter, r.index) for r in second] == [("c", 0), (None, 0), (None, 1)]
    assert [(r.adapter, r.index) for r in b._take()] == [("b", 0)]
    assert not b.queue


def test_cancelled_requests_are_dropped_before_they_run():
    events = []
    b = batcher(FakeEngine(), max_batch_size=4, max_wait_ms=0)
    dropped = group("a", 2, events)
    for r in dropped:
        r.cancelled = True
    b.queue.extend([dropped, group("b")])
    assert [r.adapter for r in b._take()] == ["b"]
    assert [e[2] for e in events] == ["cancelled", "cancelled"]


def test_queue_limit_sheds_at_once_and_shutdown_ends_everything():
    hold = threading.Event()
    engine = FakeEngine(hold)
    b = batcher(engine, max_batch_size=1, max_queue=2, max_wait_ms=0)
    b.start()
    events = []
    b.submit(group("a", events=events))
    deadline = time.monotonic() + 5
    while not engine.batches and time.monotonic() < deadline:
        time.sleep(0.005)
    b.submit(group("b", events=events))
    b.submit(group("c", events=events))
    start = time.monotonic()
    with pytest.raises(ApiError) as e:
        b.submit(group("d"))
    assert time.monotonic() - start < 0.05
    assert (e.value.status, e.value.code, e.value.headers) == (503, "queue_full", {"Retry-After": "1"})
    closing = threading.Thread(target=b.close, args=(0.2,))
    closing.start()
    time.sleep(0.05)
    with pytest.raises(ApiError) as e:
        b.submit(group("e"))
    assert (e.value.status, e.value.code) == (503, "shutting_down")
    hold.set()
    closing.join(5)
    assert not b.thread.is_alive()
    kinds = sorted((e[1].adapter, e[0]) for e in events)
    # a finished; b and c either ran within the grace period or got the shutdown error: never silence
    assert kinds[0] == ("a", "done") and len(kinds) == 3
