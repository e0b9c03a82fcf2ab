"""The state of one engine call, and how per-call arguments become tensors before the forward runs.

`IntervenableModel` (engine.py) owns the hooks; this module owns what they read. Everything a hook needs is
prepared here, once per call, so the hooks only gather, call the intervention and scatter:
- positions become `Located` index tensors per binding (one resolution per distinct selector; for unpadded
  batches the result depends only on the batch shape and is reused across calls, in a small bounded cache);
- `active` routing masks become `[batch]` bool tensors per binding, combined with the rows that have any
  selected token into `row_mask` (None when every row takes the edit, so the common case costs nothing);
- parametrized weights (the orthogonal factors of LoReFT and DAS) are computed once per forward; in calls
  without gradients, `ParametrizationReuse` also carries them over to the next call while the tensors they are
  computed from are unchanged (same objects, storage, device and autograd version counters). Optimizer steps,
  `load_state_dict`, in-place updates under `torch.no_grad()` and `.to()` all change one of those; writes through
  `.data`, which autograd does not track, do not: after such a write, call `IntervenableModel.refresh()`;
- in generation, `generation_step` re-targets the prompt's locations at each forward of `generate`: prompt
  scope edits the prompt once (its keys and values then sit in the cache), generated scope edits each new
  token; beam search and sampling repeat each prompt row, so locations, masks and source vectors are repeated
  the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from .errors import PositionError, ReftkitError
from .positions import Located, Positions

_LOC_CACHE_SIZE = 64


class StopForward(Exception):
    """Raised inside a source run once every needed vector was gathered."""


@dataclass
class CallState:
    phase: str  # "base" | "source"
    locs: dict  # binding index -> Located, or None (not applied in this forward)
    active: dict  # binding index -> [B] bool routing mask (absent = every row)
    src_vals: dict  # binding index -> [B, K, d]
    subspaces: dict
    batch: int
    seq_len: int
    row_mask: dict = field(default_factory=dict)  # binding index -> [B] bool, None = every row
    collected: dict = field(default_factory=dict)  # name -> list of [B, K, d]
    source_index: int | None = None
    pending: set = field(default_factory=set)  # source phase: bindings still to gather
    apply: set = field(default_factory=set)  # source phase (serial): bindings applied to this source run
    gen: dict | None = None  # generation state
    cache: dict = field(default_factory=dict)  # per-forward index tensors
    checked: set = field(default_factory=set)  # bindings whose inputs were checked in this call
    done: bool = False  # the call returned; hooks firing now are autograd recomputing it


class CallArguments:
    """Normalises per-call arguments for a fixed list of bindings."""

    def __init__(self, bindings: list, default_positions: Positions):
        self.bindings = bindings
        self.default_positions = default_positions
        self.by_name = {b.name: i for i, b in enumerate(bindings)}
        self._loc_cache: dict = {}

    def ids(self, names, error=ReftkitError) -> list[int]:
        missing = [n for n in names if n not in self.by_name]
        if missing:
            raise error(f"no binding named {missing[0]!r}; bindings are {list(self.by_name)}")
        return [self.by_name[n] for n in names]

    def per_binding(self, value, error=ReftkitError, listed: type | None = None) -> dict:
        """A value given once for all bindings, as {name: value}, or (for `listed` values) as a list with one
        entry per binding, in binding order."""
        if value is None:
            return {}
        if isinstance(value, dict):
            return dict(zip(self.ids(list(value), error), value.values()))
        listed_values = isinstance(value, (list, tuple)) and value and all(isinstance(v, listed or ()) for v in value)
        if listed is not None and listed_values:
            if len(value) != len(self.bindings):
                raise error(f"got {len(value)} per-binding values for {len(self.bindings)} bindings")
            return dict(enumerate(value))
        return {i: value for i in range(len(self.bindings))}

    def locations(self, positions, region, unpadded: bool, source_positions=None, source: bool = False):
        """-> ({binding: Located}, {binding: scope}). Base positions: per call > binding > default. Source
        positions: per-call source positions > the binding's source positions > the base positions."""
        if positions is None and not source and unpadded:  # bound positions on an unpadded batch: shape only
            key = ("bound", tuple(region.shape), region.device, torch.is_inference_mode_enabled())
            found = self._loc_cache.get(key)
            if found is None:
                found = self._loc_cache[key] = self._locations(None, region, True, None, False)
            return dict(found[0]), found[1]
        return self._locations(positions, region, unpadded, source_positions, source)

    def _locations(self, positions, region, unpadded: bool, source_positions, source: bool):
        given = self.per_binding(positions, PositionError, listed=Positions)
        given_src = self.per_binding(source_positions, PositionError, listed=Positions) if source else {}
        locs, scopes, seen = {}, {}, {}
        for i, b in enumerate(self.bindings):
            spec = given_src.get(i, b.source_positions) if source else None
            if spec is None:
                spec = given.get(i)
            if spec is None:
                spec = b.positions or self.default_positions
            p = Positions.parse(spec)
            key = p.cache_key()
            loc = seen.get(key)
            if loc is None:
                if unpadded and not p.depends_on_content:
                    # tensors made under inference_mode cannot enter autograd later: keep them apart
                    ck = (key, tuple(region.shape), region.device, torch.is_inference_mode_enabled())
                    loc = self._loc_cache.get(ck)
                    if loc is None:
                        if len(self._loc_cache) >= _LOC_CACHE_SIZE:
                            self._loc_cache.clear()
                        loc = self._loc_cache[ck] = p.resolve(region, unpadded=True)
                else:
                    loc = p.resolve(region, unpadded)
                seen[key] = loc
            locs[i], scopes[i] = loc, p.scope
        return locs, scopes

    def active(self, active, batch: int, device) -> dict:
        if active is None:
            return {}
        n = len(self.bindings)
        if isinstance(active, torch.Tensor) and active.dim() == 2:
            if active.shape != (batch, n) or active.dtype != torch.bool:
                raise ReftkitError(f"active must be a bool tensor [batch={batch}, bindings={n}] (columns in the "
                                   f"order {list(self.by_name)}), got {active.dtype} {tuple(active.shape)}")
            return {i: active[:, i].to(device) for i in range(n)}
        out = {}
        for i, a in self.per_binding(active).items():
            a = torch.as_tensor(a, device=device)
            if a.shape != (batch,) or a.dtype != torch.bool:
                raise ReftkitError(f"active mask for {self.bindings[i].name} must be a bool tensor [{batch}], "
                                   f"got {a.dtype} {tuple(a.shape)}")
            out[i] = a
        return out


def region_of(inputs: dict, region_mask) -> tuple[torch.Tensor, bool]:
    """The [batch, seq] mask positions count over, and whether it is all True (one check, before the forward)."""
    ref = inputs.get("input_ids")
    if ref is None:
        ref = inputs.get("inputs_embeds")
    if ref is None:
        raise ReftkitError("inputs need input_ids or inputs_embeds")
    mask = region_mask if region_mask is not None else inputs.get("attention_mask")
    if mask is None:
        return torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device), True
    if mask.shape[:2] != ref.shape[:2] or mask.dim() != 2:
        raise PositionError(f"the attention/region mask has shape {tuple(mask.shape)} but the inputs are "
                            f"{tuple(ref.shape[:2])}")
    if bool(mask.all()):
        return mask, True  # only its shape and device are used
    return mask.bool(), False


def row_mask(loc: Located, active: torch.Tensor | None):
    if active is None:
        return None if loc.all_rows else loc.row_valid
    return active if loc.all_rows else loc.row_valid & active


def start_generation(call: CallState, scopes: dict, prompt_len: int) -> None:
    call.gen = {"batch": call.batch, "prompt_len": prompt_len, "seen": 0, "active": dict(call.active),
                "prompt": {i: (call.locs[i], scopes[i]) for i in call.locs}, "src_vals": dict(call.src_vals)}


def generation_step(call: CallState, ids: torch.Tensor, past: int | None) -> None:
    """Point the call at one forward of `generate`: `ids` are this step's tokens, `past` the cached length."""
    g = call.gen
    past = g["seen"] if past is None else past
    B, T = ids.shape[0], ids.shape[1]
    g["seen"] = past + T
    if B % g["batch"]:
        raise ReftkitError(f"generation batch {B} is not a multiple of the prompt batch {g['batch']}")
    factor = B // g["batch"]
    call.batch, call.seq_len = B, T
    start = max(g["prompt_len"] - past, 0)  # first generated token within this step's input
    for i, (loc, scope) in g["prompt"].items():
        parts = []
        if scope in ("prompt", "all") and past == 0 and loc is not None:
            parts.append(loc.expand_batch(factor))
        if scope in ("generated", "all") and start < T:
            shared = torch.arange(start, T, device=ids.device)
            ones = torch.ones(B, T - start, dtype=torch.bool, device=ids.device)
            parts.append(Located(shared.expand(B, -1), ones, ones[:, 0], None, True, shared))
        step_loc = Located.cat(parts) if parts else None
        call.locs[i] = step_loc
        a = g["active"].get(i)
        a = None if a is None else a.repeat_interleave(factor)
        call.row_mask[i] = None if step_loc is None else row_mask(step_loc, a)
        if i in g["src_vals"]:
            v = g["src_vals"][i]
            call.src_vals[i] = v if factor == 1 else v.repeat_interleave(factor, dim=0)
    call.cache.clear()


def unique_name(name: str, taken: set) -> str:
    if name not in taken:
        return name
    k = 1
    while f"{name}#{k}" in taken:
        k += 1
    return f"{name}#{k}"


class ParametrizationReuse:
    """Carries parametrized weights over from one gradient-free call to the next (see the module docstring).

    Works through `torch.nn.utils.parametrize.cached()`: its cache is filled inside a call and read back before
    the context closes; at the next call, entries whose source tensors are unchanged are put back. Only the
    interventions' own parametrizations are touched. If torch's cache is not where it is expected, nothing is
    reused and every call computes its weights, as without this class."""

    def __init__(self, modules):
        # (cache key, the parametrization list, the parameter/buffer dicts its value is computed from); reading the
        # dicts each call sees tensors that were reassigned since, without walking the module tree
        self.entries = []
        for root in modules:
            for m in root.modules():
                if parametrize.is_parametrized(m):
                    for name, plist in m.parametrizations.items():
                        stores = [d for sub in plist.modules() for d in (sub._parameters, sub._buffers) if d]
                        self.entries.append(((id(m), name), plist, stores))
        self.saved: dict = {}
        self.signatures: dict = {}
        self.enabled = bool(self.entries) and isinstance(getattr(parametrize, "_cache", None), dict)

    @staticmethod
    def _signature(plist, stores):
        # a moved or cast tensor gets new storage, so (object, storage address, version) covers .to() as well
        return plist.training, [(id(t), t._version, t.data_ptr()) for d in stores for t in d.values() if t is not None]

    def restore(self) -> None:
        """Inside `parametrize.cached()`: put back the weights whose sources did not change."""
        if not self.enabled:
            return
        for key, plist, stores in self.entries:
            signature = self.signatures[key] = self._signature(plist, stores)
            saved = self.saved.get(key)
            if saved is not None and saved[1] == signature:
                parametrize._cache[key] = saved[0]

    def keep(self) -> None:
        """Inside `parametrize.cached()`, after a forward without gradients: remember what it computed."""
        if not self.enabled:
            return
        for key, _, _ in self.entries:
            value = parametrize._cache.get(key)
            if value is not None and not value.requires_grad and key in self.signatures:
                self.saved[key] = (value, self.signatures[key])

    def clear(self) -> None:
        self.saved.clear()


class Now:
    """The call in progress and the last call with gradients. A plain object: setting attributes on an
    `nn.Module` goes through its `__setattr__`, which costs microseconds on every call."""

    __slots__ = ("call", "last", "model")

    def __init__(self, model):
        self.call = self.last = None
        self.model = model
