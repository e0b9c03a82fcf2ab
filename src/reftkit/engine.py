"""The engine: `IntervenableModel` binds interventions to sites and runs them.

Design decisions:
- **Hooks are installed once**, when the model is built: one forward (pre-)hook per hooked module, plus one
  pre-hook on the top model that tracks generation steps. `remove()` (or leaving a `with` block) removes exactly
  those handles; hooks that anyone else registered are never touched. Between calls a hook costs one attribute
  read and returns, so the wrapped model behaves as the plain model when called directly.
- **Per-call state** (resolved positions, source vectors, routing masks, collected tensors) lives in a `_Call`
  object set for the duration of a call, never in module-level globals. It is kept after the call while autograd
  may still recompute the forward (gradient checkpointing), so recomputed forwards are intervened identically.
- **Gather and scatter** are one `gather` and one out-of-place `scatter` per binding on the activation's device;
  positions are `[batch, K]` index tensors (see `positions.py`), never Python lists. Out of place keeps autograd
  correct and never mutates tensors that the model or the caller still holds.
- **Sources -> base**: source inputs are run first (without grad), the vectors at each binding's source site and
  positions are gathered, and the run stops as soon as the last needed site was seen. Precomputed vectors can be
  passed instead (`source_representations`). Several sources, grouping, cross-site patching and weight tying
  (one intervention object in several bindings) all follow from `Binding` fields.
- **Per-example routing**: `active` masks say which examples each binding applies to, so one batch can mix
  adapters (or none) per example.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import InterventionError, PositionError, ReftkitError, SourceError
from .interventions.base import Intervention
from .positions import Located, Positions
from .sites import ResolvedSite, Site, resolve_site

log = logging.getLogger(__name__)


@dataclass
class Binding:
    """One intervention at one site. `positions` default to the call's (or every real token); `source` names
    which source input feeds it (for interchange types), `source_site` allows cross-site patching."""

    site: "Site | str"
    intervention: Intervention
    name: str | None = None
    positions: "Positions | str | None" = None
    source: int = 0
    source_site: "Site | str | None" = None
    source_positions: "Positions | str | None" = None


@dataclass
class RunResult:
    output: object
    collected: dict = field(default_factory=dict)


class _StopForward(Exception):
    """Raised inside a source run once every needed vector was gathered."""


@dataclass
class _Call:
    phase: str  # "base" | "source"
    locs: dict  # binding idx -> Located | None (None = not applied in this forward)
    row_mask: dict  # binding idx -> [B] bool or None (all rows)
    src_vals: dict  # binding idx -> [B, K, d]
    subspaces: dict
    collected: dict  # name -> list of tensors
    batch: int
    source_index: int | None = None
    pending: set | None = None  # source phase: bindings still to gather
    gen: dict | None = None  # generation state
    scopes: dict = field(default_factory=dict)  # binding idx -> generation scope
    checked: set = field(default_factory=set)
    cache: dict = field(default_factory=dict)


class IntervenableModel(nn.Module):
    """A model with interventions bound to sites. Call it like the model (plus intervention arguments)."""

    def __init__(self, model: nn.Module, bindings: "list[Binding] | Binding", *, default_positions="all"):
        super().__init__()
        self.model = model
        bindings = [bindings] if isinstance(bindings, Binding) else list(bindings)
        if not bindings:
            raise ReftkitError("an IntervenableModel needs at least one Binding")
        self.default_positions = Positions.parse(default_positions)
        self.bindings: list[Binding] = []
        self.resolved: list[ResolvedSite] = []
        self.source_resolved: list[ResolvedSite] = []
        unique: list[Intervention] = []
        self._iv_index: list[int] = []
        names = set()
        for i, b in enumerate(bindings):
            if not isinstance(b.intervention, Intervention):
                raise InterventionError(f"binding {i}: intervention must be a reftkit Intervention, got {type(b.intervention).__name__}")
            site = Site.parse(b.site)
            rs = resolve_site(model, site)
            ss = resolve_site(model, Site.parse(b.source_site)) if b.source_site is not None else rs
            name = b.name or site.name
            if name in names:
                k = 1
                while f"{name}#{k}" in names:
                    k += 1
                name = f"{name}#{k}"
            names.add(name)
            d = b.intervention.embed_dim
            if d is not None and d != rs.width:
                raise InterventionError(
                    f"binding {name!r}: the intervention expects width {d} but site {site.name} has width {rs.width}"
                )
            pos = None if b.positions is None else Positions.parse(b.positions)
            spos = None if b.source_positions is None else Positions.parse(b.source_positions)
            self.bindings.append(Binding(site, b.intervention, name, pos, b.source, ss.site, spos))
            self.resolved.append(rs)
            self.source_resolved.append(ss)
            for j, u in enumerate(unique):
                if u is b.intervention:
                    self._iv_index.append(j)
                    break
            else:
                unique.append(b.intervention)
                self._iv_index.append(len(unique) - 1)
        self.interventions = nn.ModuleList(unique)
        self._call: _Call | None = None
        self._last_call: _Call | None = None
        self._handles: list = []
        self._install()

    # ---- hooks ------------------------------------------------------------------------------------------
    def _install(self) -> None:
        groups: dict = {}
        for i, rs in enumerate(self.resolved):
            groups.setdefault((id(rs.module), rs.side, rs.index), (rs, [], []))[1].append(i)
        for i, ss in enumerate(self.source_resolved):
            groups.setdefault((id(ss.module), ss.side, ss.index), (ss, [], []))[2].append(i)
        for rs, base_ids, src_ids in groups.values():
            if rs.side == "output":
                h = rs.module.register_forward_hook(self._make_output_hook(rs, base_ids, src_ids), with_kwargs=True)
            else:
                h = rs.module.register_forward_pre_hook(self._make_input_hook(rs, base_ids, src_ids), with_kwargs=True)
            self._handles.append(h)
        self._handles.append(self.model.register_forward_pre_hook(self._step_hook, with_kwargs=True))

    def remove(self) -> None:
        """Remove exactly the hooks this object installed; the model is then untouched."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._call = self._last_call = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def _current(self) -> _Call | None:
        if self._call is not None:
            return self._call
        # autograd recomputing a checkpointed forward after the call returned
        if self._last_call is not None and torch._C._current_graph_task_id() != -1:
            return self._last_call
        return None

    def _make_output_hook(self, rs: ResolvedSite, base_ids, src_ids):
        def hook(module, args, kwargs, output):
            call = self._current()
            if call is None:
                return None
            is_tuple = isinstance(output, tuple)
            tensor = output[rs.index] if is_tuple else output
            module_input = _find_tensor(args, kwargs, 0)
            new = self._apply(call, rs, base_ids, src_ids, tensor, module_input)
            if new is tensor:
                return None
            if is_tuple:
                return output[: rs.index] + (new,) + output[rs.index + 1:]
            return new

        return hook

    def _make_input_hook(self, rs: ResolvedSite, base_ids, src_ids):
        def hook(module, args, kwargs):
            call = self._current()
            if call is None:
                return None
            if len(args) > rs.index:
                tensor = args[rs.index]
            else:
                key = "hidden_states" if "hidden_states" in kwargs else next(
                    (k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
                if key is None:
                    raise InterventionError(f"cannot find the input tensor of {rs.path}")
                tensor = kwargs[key]
            new = self._apply(call, rs, base_ids, src_ids, tensor, None)
            if new is tensor:
                return None
            if len(args) > rs.index:
                return args[: rs.index] + (new,) + args[rs.index + 1:], kwargs
            return args, {**kwargs, key: new}

        return hook

    def _step_hook(self, module, args, kwargs):
        call = self._current()
        if call is None or call.gen is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache_pos = kwargs.get("cache_position")
        if cache_pos is not None and cache_pos.numel():
            past = int(cache_pos[0])
        else:
            pkv = kwargs.get("past_key_values")
            past = int(pkv.get_seq_length()) if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        B, T = ids.shape[0], ids.shape[1]
        g = call.gen
        factor = B // g["batch"]
        call.batch = B
        for i, (loc, scope) in g["prompt_locs"].items():
            parts = []
            if scope in ("prompt", "all") and past == 0 and loc is not None:
                parts.append(loc.expand_batch(factor))
            start = max(g["prompt_len"] - past, 0)
            if scope in ("generated", "all") and start < T:
                idx = torch.arange(start, T, device=ids.device).expand(B, -1)
                parts.append(Located(idx, torch.ones_like(idx, dtype=torch.bool), torch.ones(B, dtype=torch.bool, device=ids.device), None))
            call.locs[i] = None if not parts else parts[0] if len(parts) == 1 else _cat_located(parts)
            rm = g["row_mask"].get(i)
            call.row_mask[i] = None if rm is None else rm.repeat_interleave(factor)
        call.cache.clear()
        return None

    # ---- gather / intervene / scatter ---------------------------------------------------------------------
    def _apply(self, call: _Call, rs: ResolvedSite, base_ids, src_ids, tensor, module_input):
        shape = tensor.shape
        if rs.flat_tokens:
            tensor = tensor.reshape(call.batch, -1, shape[-1])
            if module_input is not None:
                module_input = module_input.reshape(call.batch, -1, module_input.shape[-1])
        if call.phase == "source":
            for i in src_ids:
                if i in call.pending and self.bindings[i].source == call.source_index:
                    loc = call.locs[i]
                    call.src_vals[i] = self._gather(call, i, rs, tensor, loc)[0]
                    call.pending.discard(i)
            if not call.pending:
                raise _StopForward
            return tensor.reshape(shape) if rs.flat_tokens else tensor
        out = tensor
        for i in base_ids:
            loc = call.locs.get(i)
            if loc is None:
                continue
            b = self.bindings[i]
            iv = b.intervention
            sel, full, idx3 = self._gather(call, i, rs, out, loc)
            if iv.collects:
                call.collected.setdefault(b.name, []).append(sel)
                continue
            src = call.src_vals.get(i)
            if iv.source == "module_input":
                if module_input is None or module_input.shape != out.shape:
                    raise InterventionError(f"{iv.type_name} at {b.name}: the module's input and output differ in shape")
                src = self._gather(call, i, rs, module_input, loc)[0]
            if i not in call.checked:
                if iv.source == "required" and src is None:
                    raise SourceError(f"{iv.type_name} at {b.name} needs a source: pass sources=[...] or source_representations")
                iv.check_input(sel, src, b.name)
                call.checked.add(i)
            try:
                new = iv(sel, src, call.subspaces.get(i)) if call.subspaces.get(i) is not None else iv(sel, src)
            except RuntimeError as e:
                raise InterventionError(f"{iv.type_name} at {b.name} failed on vectors {tuple(sel.shape)}: {e}") from e
            if new.dtype != sel.dtype:
                new = new.to(sel.dtype)
            if loc.canon is not None:
                new = new.gather(1, loc.canon.unsqueeze(-1).expand(-1, -1, new.shape[-1]))
            rm = call.row_mask.get(i)
            if rm is not None:
                new = torch.where(rm[:, None, None], new, sel)
            if rs.dims is not None:
                new = torch.cat([full[..., : rs.dims.start], new, full[..., rs.dims.stop:]], dim=-1)
            out = out.scatter(1, idx3, new)
        if out is tensor:
            return tensor.reshape(shape) if rs.flat_tokens else tensor
        return out.reshape(shape) if rs.flat_tokens else out

    def _gather(self, call: _Call, i: int, rs: ResolvedSite, tensor, loc: Located):
        key = (i, tensor.shape[-1], tensor.shape[0])
        idx3 = call.cache.get(key)
        if idx3 is None:
            index = loc.index
            if index.shape[0] != tensor.shape[0]:
                raise PositionError(
                    f"{self.bindings[i].name}: positions are for batch {index.shape[0]} but the activations have "
                    f"batch {tensor.shape[0]}"
                )
            if index.device != tensor.device:
                index = index.to(tensor.device)
            idx3 = index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1])
            call.cache[key] = idx3
        full = tensor.gather(1, idx3)
        sel = full if rs.dims is None else full[..., rs.dims]
        return sel, full, idx3

    # ---- calls ------------------------------------------------------------------------------------------
    def _binding_ids(self, names) -> list[int]:
        by_name = {b.name: i for i, b in enumerate(self.bindings)}
        out = []
        for n in names:
            if n not in by_name:
                raise ReftkitError(f"no binding named {n!r}; bindings are {list(by_name)}")
            out.append(by_name[n])
        return out

    def _per_binding(self, value, what: str) -> dict:
        """Normalise a per-call argument given once for all bindings or as {name: value}."""
        if value is None:
            return {}
        if isinstance(value, dict):
            return dict(zip(self._binding_ids(value), value.values()))
        return {i: value for i in range(len(self.bindings))}

    def _resolve_locs(self, positions, region: torch.Tensor, source: bool = False) -> dict:
        given = self._per_binding(positions, "positions")
        locs, seen = {}, {}
        for i, b in enumerate(self.bindings):
            spec = given.get(i)
            if spec is None:
                spec = (b.source_positions if source else None) or b.positions or self.default_positions
            key = id(spec)
            if key not in seen:  # one resolution per distinct selector and call
                p = Positions.parse(spec)
                seen[key] = (p.resolve(region), p.scope, spec)
            locs[i] = seen[key][:2]
        return locs

    def _row_masks(self, active, locs, batch: int, device) -> dict:
        act = {}
        if isinstance(active, torch.Tensor):
            if active.dim() != 2 or active.shape != (batch, len(self.bindings)):
                raise ReftkitError(f"active must be a bool tensor [batch={batch}, bindings={len(self.bindings)}]")
            act = {i: active[:, i] for i in range(len(self.bindings))}
        elif active is not None:
            act = self._per_binding(active, "active")
        masks = {}
        for i, (loc, _) in locs.items():
            m = loc.row_valid
            if i in act:
                a = torch.as_tensor(act[i], dtype=torch.bool, device=m.device)
                if a.shape != (batch,):
                    raise ReftkitError(f"active mask for {self.bindings[i].name} must have shape [{batch}]")
                m = m & a
            masks[i] = None if bool(m.all()) else m.to(device)
        return masks

    @staticmethod
    def _region(inputs: dict, region_mask) -> torch.Tensor:
        ref = inputs.get("input_ids")
        if ref is None:
            ref = inputs.get("inputs_embeds")
        if ref is None:
            raise ReftkitError("inputs need input_ids or inputs_embeds")
        if region_mask is not None:
            return region_mask.bool()
        am = inputs.get("attention_mask")
        return am.bool() if am is not None else torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)

    def _prepare(self, inputs, positions, sources, source_positions, source_representations, active, subspaces,
                 region_mask) -> _Call:
        region = self._region(inputs, region_mask)
        batch = region.shape[0]
        locs = self._resolve_locs(positions, region)
        call = _Call("base", {i: l for i, (l, _) in locs.items()}, self._row_masks(active, locs, batch, region.device),
                     {}, self._per_binding(subspaces, "subspaces"), {}, batch)
        call.src_vals.update(self._per_binding(source_representations, "source_representations"))
        if sources is not None:
            self._run_sources(call, sources, source_positions, batch)
        call.scopes = {i: scope for i, (_, scope) in locs.items()}
        return call

    def _run_sources(self, call: _Call, sources, source_positions, batch: int) -> None:
        if isinstance(sources, dict):
            sources = [sources]
        needs = {}
        for i, b in enumerate(self.bindings):
            if b.intervention.source in ("required", "optional") and i not in call.src_vals:
                needs.setdefault(b.source, []).append(i)
        for s, ids in needs.items():
            if s >= len(sources) or sources[s] is None:
                if any(self.bindings[i].intervention.source == "required" for i in ids):
                    raise SourceError(f"bindings {[self.bindings[i].name for i in ids]} read source {s}, but only "
                                      f"{len(sources)} source input(s) were given")
                continue
            src = sources[s]
            sregion = self._region(src, None)
            if sregion.shape[0] != batch:
                raise SourceError(f"source {s} has batch {sregion.shape[0]} but the base has batch {batch}")
            slocs = self._resolve_locs(source_positions, sregion, source=True)
            scall = _Call("source", {i: l for i, (l, _) in slocs.items()}, {}, call.src_vals, {}, {}, batch,
                          source_index=s, pending=set(ids))
            self._call = scall
            try:
                with torch.no_grad():
                    self.model(**src)
            except _StopForward:
                pass
            finally:
                self._call = None
            if scall.pending:
                raise SourceError(f"source run {s} never reached the sites of {[self.bindings[i].name for i in scall.pending]}")

    def run(self, inputs: dict | None = None, *, positions=None, sources=None, source_positions=None,
            source_representations=None, active=None, subspaces=None, region_mask=None, **model_kwargs) -> RunResult:
        """Run the base model with interventions. Returns the model output and the collected vectors."""
        inputs = {**(inputs or {}), **model_kwargs}
        call = self._prepare(inputs, positions, sources, source_positions, source_representations, active,
                             subspaces, region_mask)
        self._call = call
        try:
            with parametrize.cached():  # orthogonal factors are computed once per forward
                out = self.model(**inputs)
        finally:
            self._call = None
            self._last_call = call if torch.is_grad_enabled() else None
        return RunResult(out, {k: (v[0] if len(v) == 1 else torch.cat(v, 1)) for k, v in call.collected.items()})

    def forward(self, *args, **kwargs):
        if args:
            if len(args) == 1 and isinstance(args[0], dict):
                return self.run(args[0], **kwargs).output
            kwargs["input_ids"] = args[0]
        return self.run(None, **kwargs).output

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, *, positions=None, active=None, sources=None,
                 source_positions=None, source_representations=None, subspaces=None, return_collected=False,
                 **generate_kwargs):
        """`model.generate` with interventions. Positions are resolved on the prompt; their `scope` decides
        whether they edit the prompt once (baked into the KV cache), each generated token, or both."""
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        call = self._prepare(inputs, positions, sources, source_positions, source_representations, active,
                             subspaces, None)
        call.gen = {"batch": call.batch, "prompt_len": input_ids.shape[1],
                    "prompt_locs": {i: (call.locs[i], call.scopes[i]) for i in call.locs},
                    "row_mask": dict(call.row_mask)}
        self._call = call
        try:
            with parametrize.cached():
                out = self.model.generate(**inputs, **generate_kwargs)
        finally:
            self._call = None
        if return_collected:
            return out, {k: v for k, v in call.collected.items()}
        return out

    @contextmanager
    def disabled(self):
        """Inside this block the hooks pass everything through (e.g. a DPO reference forward)."""
        saved, self._call = self._call, None
        saved_last, self._last_call = self._last_call, None
        try:
            yield self.model
        finally:
            self._call, self._last_call = saved, saved_last

    def binding_names(self) -> list[str]:
        return [b.name for b in self.bindings]


def _find_tensor(args, kwargs, index):
    if len(args) > index and isinstance(args[index], torch.Tensor):
        return args[index]
    v = kwargs.get("hidden_states")
    return v if isinstance(v, torch.Tensor) else None


def _cat_located(parts: list[Located]) -> Located:
    index = torch.cat([p.index for p in parts], 1)
    valid = torch.cat([p.valid for p in parts], 1)
    row_valid = torch.stack([p.row_valid for p in parts]).any(0)
    canons, off = [], 0
    for p in parts:
        k = p.index.shape[1]
        canons.append(p.canon + off if p.canon is not None else torch.arange(off, off + k, device=index.device).expand(index.shape[0], -1))
        off += k
    canon = torch.cat(canons, 1) if any(p.canon is not None for p in parts) else None
    return Located(index, valid, row_valid, canon)
