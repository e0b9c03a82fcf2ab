"""`Row`: one sequence to generate, routed to its adapter and steering settings; a request with `n` choices is
`n` rows that always share a batch. Rows are what the batcher queues, the engine batches and the streamer fans
tokens out to; events go back to the request's handler through `emit` (thread-safe, set by the batcher)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Row:
    ids: list[int]
    adapter: str | None = None
    steer: tuple = ()                 # ((vector name, coefficient), ...), coefficient 0 entries removed
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    index: int = 0                    # the choice index within its request
    emit: Callable = lambda event: None
    cancelled: bool = False           # set by the handler when its client goes away or times out
    finished: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        """The routing setting: rows with equal keys share one slot of a batch's distinct-settings cap."""
        return (self.adapter, self.steer)
