"""`ServerConfig`: the server's limits and batching knobs, checked once when the server is built.

Decisions:
- Every limit has a finite default, so a server started with no options cannot be made to queue, read or
  generate without bound: the queue depth, the body size, prompt tokens, `max_tokens`, `n`, steering vectors per
  request and the request timeout.
- `max_distinct` caps the distinct (adapter, steering) settings in one batch, as vLLM's `max_loras` caps LoRAs:
  requests over the cap wait for a later batch instead of failing.
- API keys are kept only as SHA-256 digests (see `security.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class ServerConfig:
    model_name: str = "base"
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_distinct: int = 8
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_n: int = 8
    max_stop: int = 4
    max_steer: int = 4
    max_coefficient: float = 1000.0
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 600.0
    shutdown_grace_s: float = 10.0
    api_keys: list[str] = field(default_factory=list)
    adapter_dir: str | None = None
    allow_adapter_updates: bool = False

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "max_distinct", "max_prompt_tokens", "max_new_tokens", "max_n",
                     "max_stop", "max_steer", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_wait_ms", "request_timeout_s", "shutdown_grace_s", "max_coefficient"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_n > self.max_batch_size:
            self.max_n = self.max_batch_size  # the n rows of a request always share one batch
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError(f"model_name must be a non-empty string, got {self.model_name!r}")
        for key in self.api_keys:
            if not isinstance(key, str) or len(key) < 8:
                raise ConfigError("API keys must be strings of at least 8 characters")
        if self.allow_adapter_updates and not self.adapter_dir:
            raise ConfigError("runtime adapter updates need an allow-listed folder: pass --adapter-dir DIR")
