"""The servable names: the base model, its ReFT adapters and the steering vectors, and who is using them.

Decisions:
- **Folders are fixed by the operator.** Adapters and vectors named on the command line are loaded at start.
  At runtime (only with `allow_updates`), an adapter is loaded from a path *relative to* the one allow-listed
  folder `adapter_dir`; the path is resolved (symlinks included) and refused unless it stays inside that folder,
  so no request can make the server read anything else. The server never writes into adapter folders.
- **Persisted registry.** Runtime loads and unloads are recorded in `adapter_dir/.reftkit-serve-registry.json`,
  written atomically (`reftkit.atomic.write_file`), so a server killed at any moment (even `kill -9` in the
  middle of a load) restarts with every registered adapter: the record is the old one or the new one, never half.
  Adapters given on the command line are not recorded (the command line brings them back).
- **In use means referenced.** Admission takes a reference on the request's adapter (`acquire`) and the request
  releases it when its last row ends; `unload` refuses (409 `adapter_busy`) while any request holds one, so an
  adapter can never be pulled from under a running or queued request.
- **The model is changed only under the engine lock**, the lock the engine thread holds while it generates, so
  a load or unload happens between batches.
- Names: 1-64 characters of letters, digits, `_`, `-`; the base model's name and existing names are refused.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

from ..errors import ReftkitError
from .protocol import ApiError, bad

log = logging.getLogger(__name__)
REGISTRY_FILE = ".reftkit-serve-registry.json"
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Registry:
    def __init__(self, base_name: str, reft, *, adapter_dir: str | None = None, allow_updates: bool = False):
        self.base_name = base_name
        self.reft = reft
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        self.allow_updates = allow_updates
        self.engine_lock = threading.Lock()
        self._lock = threading.Lock()
        self.adapters: dict[str, dict] = {}   # name -> {"path", "created", "runtime"}
        self.vectors: dict = {}               # name -> SteeringVector
        self._refs: dict[str, int] = {}
        self.created = int(time.time())

    # ---- start-up -------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, folder, *, runtime: bool = False) -> None:
        self._check_name(name, "adapter")
        with self.engine_lock:
            self.reft.load_adapter(Path(folder), name)
        with self._lock:
            self.adapters[name] = {"path": str(folder), "created": int(time.time()), "runtime": runtime}
        log.info("adapter %s loaded from %s", name, folder)

    def add_vector(self, name: str, folder) -> None:
        from ..steer.vector import SteeringVector

        self._check_name(name, "steering vector")
        vector = SteeringVector.load(folder)
        vector.check_model(self.reft.model)
        self.vectors[name] = vector
        log.info("steering vector %s loaded from %s", name, folder)

    def restore(self) -> list[str]:
        """Load the adapters recorded by earlier runtime loads (see the module docstring)."""
        if self.adapter_dir is None:
            return []
        path = self.adapter_dir / REGISTRY_FILE
        if not path.is_file():
            return []
        try:
            entries = json.loads(path.read_text("utf-8"))["adapters"]
            assert isinstance(entries, dict)
        except (ValueError, KeyError, TypeError, AssertionError, OSError) as e:
            raise ReftkitError(f"{path} is not a registry this server wrote ({type(e).__name__}: {e}); move it "
                               "away to start with the command-line adapters only") from None
        restored = []
        for name, rel in entries.items():
            if name in self.adapters:
                continue
            self.add_adapter(name, self._inside(rel), runtime=True)
            restored.append(name)
        return restored

    def _check_name(self, name, what: str) -> None:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise bad(f"Invalid {what} name {name!r}: use 1-64 letters, digits, '_' or '-'", "name")
        if name == self.base_name or name in self.adapters or name in self.vectors:
            raise ApiError(409, f"the name {name!r} is already in use", param="name", code="name_in_use")

    # ---- requests -------------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def acquire(self, model: str, vectors: list[str]) -> str | None:
        """-> the adapter name (None for the base) with a reference taken; `ApiError` for unknown names."""
        from .protocol import model_not_found

        with self._lock:
            if model != self.base_name and model not in self.adapters:
                raise model_not_found(model, self.model_names())
            for i, name in enumerate(vectors):
                if name not in self.vectors:
                    known = ", ".join(self.vectors) or "none"
                    raise bad(f"Unknown steering vector {name!r}; this server has: {known}",
                              f"reftkit.steer[{i}].name", "steering_vector_not_found")
            adapter = None if model == self.base_name else model
            if adapter is not None:
                self._refs[adapter] = self._refs.get(adapter, 0) + 1
            return adapter

    def release(self, adapter: str | None) -> None:
        if adapter is None:
            return
        with self._lock:
            self._refs[adapter] -= 1
            if not self._refs[adapter]:
                del self._refs[adapter]

    def in_use(self, adapter: str) -> int:
        with self._lock:
            return self._refs.get(adapter, 0)

    # ---- runtime updates ------------------------------------------------------------------------------------
    def require_updates(self) -> None:
        if not self.allow_updates:
            raise ApiError(403, "runtime adapter updates are disabled; start the server with "
                                "--allow-adapter-updates --adapter-dir DIR", type="permission_error",
                           code="updates_disabled")

    def _inside(self, rel) -> Path:
        if not isinstance(rel, str) or not rel or "\0" in rel:
            raise bad("'path' must be a non-empty path relative to the server's adapter folder", "path",
                      "invalid_type")
        if Path(rel).is_absolute():
            raise bad("'path' must be relative to the server's adapter folder, not absolute", "path",
                      "path_not_allowed")
        target = (self.adapter_dir / rel).resolve()
        if target != self.adapter_dir and self.adapter_dir not in target.parents:
            raise bad("'path' leads outside the server's adapter folder", "path", "path_not_allowed")
        return target

    def load(self, name, rel) -> dict:
        self.require_updates()
        self._check_name(name, "adapter")
        folder = self._inside(rel)
        from ..adapters import read_adapter

        try:
            read_adapter(folder)  # files only, no torch: refuse a non-adapter before touching the model
            self.add_adapter(name, folder, runtime=True)
        except ReftkitError as e:
            message = str(e).replace(str(self.adapter_dir), "<adapter-dir>")
            raise bad(f"cannot load adapter {name!r} from {rel!r}: {message}", "path", "invalid_adapter") from None
        self._persist()
        return self.describe(name)

    def unload(self, name: str) -> None:
        self.require_updates()
        with self._lock:
            if name not in self.adapters:
                raise ApiError(404, f"no adapter named {name!r}", param="name", code="model_not_found")
            if not self.adapters[name]["runtime"]:
                raise ApiError(409, f"adapter {name!r} was given on the command line and cannot be unloaded",
                               param="name", code="adapter_pinned")
            if self._refs.get(name):
                raise ApiError(409, f"adapter {name!r} is in use by {self._refs[name]} request(s); retry when "
                                    "they have finished", param="name", code="adapter_busy")
            del self.adapters[name]  # no new request can acquire it from here on
        with self.engine_lock:
            self.reft.delete_adapter(name)
        self._persist()
        log.info("adapter %s unloaded", name)

    def _persist(self) -> None:
        from ..atomic import write_file

        with self._lock:
            entries = {n: str(Path(a["path"]).relative_to(self.adapter_dir)) for n, a in self.adapters.items()
                       if a["runtime"]}
        write_file(self.adapter_dir / REGISTRY_FILE, json.dumps({"format_version": 1, "adapters": entries},
                                                                indent=2))

    # ---- listing --------------------------------------------------------------------------------------------
    def describe(self, name: str) -> dict:
        if name == self.base_name:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "reftkit", "root": name,
                    "parent": None}
        a = self.adapters[name]
        return {"id": name, "object": "model", "created": a["created"], "owned_by": "reftkit", "root": name,
                "parent": self.base_name}

    def models(self) -> dict:
        with self._lock:
            names = self.model_names()
        data = [self.describe(n) for n in names]
        return {"object": "list", "data": data,
                "reftkit": {"steering_vectors": [{"name": n, "method": v.method, "unit": v.unit, "scope": v.scope,
                                                  "sites": v.sites} for n, v in self.vectors.items()]}}
