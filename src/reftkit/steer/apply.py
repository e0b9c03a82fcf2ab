"""Applying steering vectors: `steer(model, [(vector, coefficient), ...])` and `vector.apply(model, ...)`.

A steered model is an `IntervenableModel` whose bindings are the vectors' sites (`SteeringVector.to_bindings`),
so steering shares the engine's hooks, gather/scatter and generation scopes; nothing here hooks the model.

Decisions:
- **Scopes are positions on absolute positions.** The engine resolves a scope on the prompt's attention mask and,
  in `generate`, re-targets it at every forward from the cache length (without a cache each forward re-feeds the
  whole sequence, so the same absolute positions are edited again). `SCOPES` names the usual ones
  (`scope_positions` builds them): `all` (prompt and generated tokens), `prompt`, `generated`,
  `from_instruction_end` (CAA: from a real-token offset `start`, an absolute position of the padded prompt, or
  the last `k` prompt tokens, through every generated token), `last_prompt_token_then_generated` (ITI), `front` (ActAdd: the first T real prompt tokens,
  prefill only) and `last_k` (the last k prompt tokens). Any `Positions` (string or object, `@scope` included)
  is accepted as well; the bare name `all` means prompt and generated tokens here (`all@all`), as a steering
  scope should, where the positions grammar reads `all` as the prompt only. A prompt-only scope that selects no token of some row is a `PositionError`.
- **Several vectors compose in one model**: their bindings are applied in the order given; two vectors at one site
  edit it one after the other.
- **With a ReFT adapter**: `steer(reft_model, ...)` (a `ReftModel`) steers its base model with the active adapter
  and the vectors in one `IntervenableModel`: the adapter's interventions (the same modules, at their own
  positions) come first, the vectors after them, so at a site both edit the adapter's output is what the vector
  is added to. A `ReftModel` with its adapters disabled, or without an active adapter, is steered as its base
  model. (Two engines on one model cannot both edit in one `generate`: each edits only during its own call.)
- **Per-row coefficients**: a coefficient may be a list or tensor with one value per batch row (`None` in a list:
  that row is not steered by that vector). Each distinct value becomes its own set of bindings, routed to its
  rows through the engine's `active` masks, so every row is computed exactly as if it were steered alone; rows
  a vector does not reach are written back bit for bit. Such a model serves batches of that size only.
- **Coefficients** are converted from the vector's unit (or `unit=`) to raw multipliers (see `vector.py`);
  NaN or infinite coefficients are a `ConfigError`.
- **Trace**: with `trace=True`, `steered.trace` gets one entry per forward: for each binding, the sorted absolute
  positions (in the padded sequence: prompt, then generated tokens) it edited in each row. It is read from the
  locations the engine gathered and scattered in that forward, by a hook on the steering interventions (modules
  that reftkit owns), never on the model.
"""

from __future__ import annotations

import logging

import torch

from ..engine import IntervenableModel
from ..errors import ConfigError, PositionError
from ..positions import Positions
from .coefficients import check_coefficient, is_vector

log = logging.getLogger(__name__)

SCOPES = ("all", "prompt", "generated", "from_instruction_end", "last_prompt_token_then_generated", "front",
          "last_k")


def scope_positions(name: str, *, start=None, k: int | None = None, absolute=None, attention_mask=None,
                    length: int | None = None) -> Positions:
    """The `Positions` of a named steering scope (see the module docstring).

    `from_instruction_end` takes one of `start` (a real-token offset, or a `[batch]` tensor of offsets: the last
    token of the instruction template), `k` (the last k prompt tokens) or `absolute` (an absolute position in the
    padded prompt, or a `[batch]` tensor of them, with the prompt's `attention_mask`); `front` takes `length` (T);
    `last_k` takes `k`."""
    if name == "all":
        return Positions.all(scope="all")
    if name == "prompt":
        return Positions.all(scope="prompt")
    if name == "generated":
        return Positions.generated()
    if name == "last_prompt_token_then_generated":
        return Positions.first_last(0, 1, scope="all")
    if name == "from_instruction_end":
        if sum(x is not None for x in (start, k, absolute)) != 1:
            raise PositionError("from_instruction_end takes start= (a real-token offset), k= (the last k prompt "
                                "tokens) or absolute= (a position in the padded prompt), exactly one of them")
        if absolute is not None:
            return _from_absolute(absolute, attention_mask)
        if k is not None:
            return Positions.first_last(0, _count(k, "k"), scope="all")
        if isinstance(start, torch.Tensor):
            if start.dim() != 1 or start.dtype.is_floating_point or start.dtype == torch.bool:
                raise PositionError(f"start must be an integer offset or a [batch] integer tensor, got {start!r}")
            if bool((start < 0).any()):
                raise PositionError("start offsets must be >= 0")
            return Positions.span(start.long(), None, scope="all")
        return Positions.span(_count(start, "start", minimum=0), None, scope="all")
    if name == "front":
        return Positions.first_last(_count(length, "length"), 0, scope="prompt")
    if name == "last_k":
        return Positions.first_last(0, _count(k, "k"), scope="prompt")
    raise PositionError(f"unknown steering scope {name!r}; expected one of {', '.join(SCOPES)} or a positions string "
                        "('l1@all', 'f4@prompt', 'generated')")


def _from_absolute(absolute, attention_mask) -> Positions:
    """Real prompt tokens at or after an absolute position (per row), then every generated token."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise PositionError("from_instruction_end with absolute= needs the prompt's attention_mask [batch, seq]")
    B, T = attention_mask.shape
    if isinstance(absolute, torch.Tensor):
        if absolute.shape != (B,) or absolute.dtype.is_floating_point or absolute.dtype == torch.bool:
            raise PositionError(f"absolute positions must be an integer or a [batch={B}] integer tensor, "
                                f"got {absolute!r}")
        at = absolute.long().to(attention_mask.device)
    else:
        at = torch.full((B,), _count(absolute, "absolute", minimum=0), device=attention_mask.device)
    if bool(((at < 0) | (at >= T)).any()):
        raise PositionError(f"absolute positions must lie in 0..{T - 1} for a prompt of {T} tokens, got {at.tolist()}")
    selected = (torch.arange(T, device=attention_mask.device) >= at[:, None]) & attention_mask.bool()
    return Positions.mask(selected, scope="all")


def _count(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PositionError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _as_positions(scope):
    if scope is None or isinstance(scope, Positions):
        return scope
    if isinstance(scope, str) and scope in SCOPES and scope not in ("all", "generated"):
        if scope in ("prompt", "last_prompt_token_then_generated"):
            return scope_positions(scope)
        raise PositionError(f"scope {scope!r} needs arguments: use scope_positions({scope!r}, ...)")
    if scope == "all":
        return scope_positions("all")
    if scope == "generated":
        return scope_positions("generated")
    return Positions.parse(scope)


def _row_coefficients(value, what: str):
    """-> (None, float) for one coefficient, or ([batch] list of float | None) for per-row coefficients."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        if not value.is_floating_point() and value.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"{what}: per-row coefficients must be numbers, got {value.dtype}")
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{what}: per-row coefficients need one value per batch row, got an empty list")
        rows = []
        for j, c in enumerate(value):
            if c is None:
                rows.append(None)
                continue
            try:
                rows.append(check_coefficient(c))
            except ConfigError as e:
                raise ConfigError(f"{what}, row {j}: {e}") from None
        return rows
    try:
        return check_coefficient(value)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None


class Steered:
    """A model steered by one or more vectors: call it, `generate` with it, and leave the `with` block (or call
    `remove()`) to restore the model exactly. `intervenable` is the underlying `IntervenableModel`."""

    def __init__(self, model, entries, *, scope=None, unit: str | None = None, trace: bool = False,
                 check_weights: bool = True):
        if isinstance(entries, tuple) and len(entries) == 2 and is_vector(entries[0]):
            entries = [entries]
        entries = list(entries)
        if not entries:
            raise ConfigError("steer() needs at least one (SteeringVector, coefficient) pair")
        positions = _as_positions(scope)
        model, adapter = _adapter_bindings(model)
        bindings, routes = [], []  # routes: per binding, the [batch] bool rows it reaches, or None (all rows)
        self.batch: int | None = None
        for n, entry in enumerate(entries):
            if is_vector(entry):
                vector, coefficient, own_scope = entry, 1.0, None
            elif isinstance(entry, (tuple, list)) and len(entry) in (2, 3) and is_vector(entry[0]):
                vector, coefficient = entry[0], entry[1]
                own_scope = _as_positions(entry[2]) if len(entry) == 3 else None
            else:
                raise ConfigError(f"steer() entry {n}: expected (SteeringVector, coefficient[, scope]), got "
                                  f"{type(entry).__name__}")
            what = f"vector {n} ({vector.method})"
            rows = _row_coefficients(coefficient, what)
            where = own_scope if own_scope is not None else positions
            if isinstance(rows, float):
                bindings += vector.to_bindings(model, rows, where, unit=unit, name=f"v{n}",
                                               check_weights=check_weights)
                routes += [None] * len(vector.directions)
                continue
            if self.batch is not None and len(rows) != self.batch:
                raise ConfigError(f"{what}: {len(rows)} per-row coefficients, but another vector has {self.batch}")
            self.batch = len(rows)
            for value in dict.fromkeys(c for c in rows if c is not None):
                mask = torch.tensor([c is not None and c == value for c in rows])
                made = vector.to_bindings(model, value, where, unit=unit, name=f"v{n}[{value:g}]",
                                          check_weights=check_weights)
                bindings += made
                routes += [mask] * len(made)
        if not bindings:
            raise ConfigError("no row is steered: every per-row coefficient is None")
        bindings, routes = adapter + bindings, [None] * len(adapter) + routes
        self.intervenable = IntervenableModel(model, bindings, default_positions="all")
        self.model = model
        self._active = None
        if any(r is not None for r in routes):
            self._active = torch.stack([torch.ones(self.batch, dtype=torch.bool) if r is None else r
                                        for r in routes], dim=1)
        self.trace: list[dict] | None = [] if trace else None
        self._trace_handles = []
        self._trace_key = None  # (the engine call, its generation length) of the last traced forward
        if trace:
            self._install_trace()

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook this object installed; the model is then exactly the plain model."""
        for h in self._trace_handles:
            h.remove()
        self._trace_handles.clear()
        self.intervenable.remove()

    def __enter__(self) -> "Steered":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def binding_names(self) -> list[str]:
        return self.intervenable.binding_names()

    # ---- calls --------------------------------------------------------------------------------------------
    def _active_for(self, batch: int, device):
        if self._active is None:
            return None
        if batch != self.batch:
            raise ConfigError(f"this steered model has per-row coefficients for {self.batch} rows but got a batch of "
                              f"{batch}; build it again for this batch")
        return self._active.to(device)

    def _check_selects(self, region: torch.Tensor, active, generating: bool) -> None:
        """A prompt-only scope (or any scope in a plain forward) that edits nothing in a row it should steer is an
        error: the coefficient would silently do nothing there."""
        for i, b in enumerate(self.intervenable.bindings):
            p = b.positions
            if generating and p.scope != "prompt":
                continue  # generated tokens are edited whatever the prompt selects
            loc = p.resolve(region)
            wanted = torch.ones(region.shape[0], dtype=torch.bool) if active is None else active[:, i].cpu()
            empty = wanted & ~loc.row_valid.cpu()
            if bool(empty.any()):
                rows = [int(j) for j in torch.nonzero(empty).flatten()]
                raise PositionError(f"steering scope {p!r} of {b.name} selects no token in row(s) {rows} of this "
                                    "batch; choose a scope that reaches every steered row")

    def run(self, inputs: dict | None = None, **kwargs):
        """One forward with the vectors applied (the engine's `run`; returns its `RunResult`)."""
        inputs = {**(inputs or {}), **{k: kwargs.pop(k) for k in ("input_ids", "attention_mask") if k in kwargs}}
        region = _region(inputs)
        active = self._active_for(region.shape[0], region.device)
        self._check_selects(region, active, generating=False)
        return self.intervenable.run(inputs, active=active, **kwargs)

    def __call__(self, *args, **kwargs):
        if args:
            kwargs["input_ids"] = args[0]
        return self.run(None, **kwargs).output

    def generate(self, input_ids=None, attention_mask=None, **generate_kwargs):
        """`model.generate` with the vectors applied at their scopes (prompt once, generated tokens as they are fed)."""
        if input_ids is None:
            raise ConfigError("generate needs input_ids")
        region = attention_mask.bool() if attention_mask is not None else torch.ones(input_ids.shape[:2],
                                                                                       dtype=torch.bool)
        active = self._active_for(input_ids.shape[0], input_ids.device)
        self._check_selects(region, active, generating=True)
        return self.intervenable.generate(input_ids, attention_mask, active=active, **generate_kwargs)

    # ---- trace --------------------------------------------------------------------------------------------
    def _install_trace(self) -> None:
        im = self.intervenable
        owner = {}
        for i, b in enumerate(im.bindings):
            owner.setdefault(id(b.intervention), []).append(i)

        def hook(module, args, output):
            call = im._now.call
            if call is None or call.phase != "base":
                return
            past = 0 if call.gen is None else call.gen["seen"] - call.seq_len
            entry = self._trace_entry(past)
            for i in owner[id(module)]:
                loc = call.locs.get(i)
                if loc is None:
                    continue
                valid = loc.valid
                rm = call.row_mask.get(i) if call.row_mask else None
                if rm is not None:
                    valid = valid & rm[:, None].to(valid.device)
                rows = []
                for r in range(loc.index.shape[0]):
                    picked = loc.index[r][valid[r]].tolist()
                    rows.append(sorted({past + int(j) for j in picked}))
                entry["edits"][im.bindings[i].name] = rows

        for iv in im.interventions:
            self._trace_handles.append(iv.register_forward_hook(hook))

    def _trace_entry(self, past: int) -> dict:
        """The trace entry of the current forward (one per forward, shared by the bindings that fire in it)."""
        call = self.intervenable._now.call
        key = (call, -1 if call.gen is None else call.gen["seen"])
        if self.trace and self._trace_key is not None and self._trace_key[0] is key[0] \
                and self._trace_key[1] == key[1]:
            return self.trace[-1]
        self._trace_key = key
        entry = {"past": past, "length": call.seq_len, "edits": {}}
        self.trace.append(entry)
        return entry

    def edited_positions(self) -> dict[str, list[list[int]]]:
        """Per binding, per row, the sorted absolute positions edited over all traced forwards."""
        if self.trace is None:
            raise ConfigError("this steered model was built without trace=True")
        out: dict = {}
        for entry in self.trace:
            for name, rows in entry["edits"].items():
                merged = out.setdefault(name, [set() for _ in rows])
                for r, positions in enumerate(rows):
                    merged[r].update(positions)
        return {name: [sorted(s) for s in rows] for name, rows in out.items()}

    def clear_trace(self) -> None:
        if self.trace is not None:
            self.trace.clear()
        self._trace_key = None


def _adapter_bindings(model):
    """-> (the model to hook, bindings of its active ReFT adapter). A `ReftModel` (recognised by its parts, so
    this module does not import reft) gives its base model and its active adapter's interventions at their own
    positions; any other model gives itself and no bindings."""
    slots, adapters = getattr(model, "_slots", None), getattr(model, "adapters", None)
    base = getattr(model, "model", None)
    if not isinstance(slots, dict) or adapters is None or not isinstance(base, torch.nn.Module) \
            or not hasattr(model, "active_adapter"):
        return model, []
    name = model.active_adapter
    if not getattr(model, "_enabled", True) or name is None:
        return base, []
    from ..binding import Binding

    return base, [Binding(site, iv, f"adapter:{tag}", positions)
                  for (site, positions, tag), iv in zip(slots[name], adapters[name])]


def _region(inputs: dict) -> torch.Tensor:
    ref = inputs.get("input_ids")
    if ref is None:
        ref = inputs.get("inputs_embeds")
    if ref is None:
        raise ConfigError("a steered forward needs input_ids or inputs_embeds")
    mask = inputs.get("attention_mask")
    return torch.ones(ref.shape[:2], dtype=torch.bool) if mask is None else mask.bool()


def steer(model, vectors_and_coefficients, *, scope=None, unit: str | None = None, trace: bool = False,
          check_weights: bool = True) -> Steered:
    """Steer `model` with `[(vector, coefficient[, scope]), ...]` (or one vector, or one pair) in one
    `IntervenableModel`. `scope` (a name of `SCOPES`, a positions string or a `Positions`) overrides each vector's
    own scope unless an entry gives its own; `unit` overrides the vectors' coefficient unit. Use it as a context
    manager, or call `remove()`."""
    if is_vector(vectors_and_coefficients):
        vectors_and_coefficients = [(vectors_and_coefficients, 1.0)]
    return Steered(model, vectors_and_coefficients, scope=scope, unit=unit, trace=trace, check_weights=check_weights)


__all__ = ["SCOPES", "Steered", "scope_positions", "steer"]
