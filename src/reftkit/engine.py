"""The engine: `IntervenableModel` binds interventions to sites and runs them.

Design decisions:
- **Hooks are installed once**, when the object is built: one forward (pre-)hook per hooked module. `remove()`
  (or leaving a `with` block) removes exactly those handles; hooks that anyone else registered are never
  touched. Between calls a hook costs one attribute read and returns, so the model behaves as the plain model
  when it is called directly. The one exception is `generate()`: for its duration a pre-hook on the decoder
  (the module that owns the block list) tracks the steps; plain forwards never pay for it.
- **Per-call state** (resolved positions, source vectors, routing masks, collected tensors) lives in a `CallState`
  object (calls.py) set for the duration of a call, never in module-level globals. After a call with gradients
  it is kept while autograd may recompute the forward (gradient checkpointing), so recomputed forwards are
  intervened identically and collect nothing twice. A plain forward whose checkpointed layers are recomputed in
  the same backward as an intervened one cannot be told apart from it; run such forwards without gradients.
- **Gather and scatter** are one gather and one out-of-place scatter per binding on the activation's device
  (`index_select` / `index_copy` when every row selects the same positions). Positions are `[batch, K]` index
  tensors (see `positions.py`), never Python lists. Out of place keeps autograd correct and never mutates
  tensors that the model or the caller still holds. The hooks check shapes only: they never read a value back
  from the device.
- **Work is done before the forward, once**: positions are resolved once per call and distinct selector (for
  unpadded batches once per batch shape, across calls); parametrized weights (orthogonal rotations) once per
  forward, and without gradients once for as long as their parameters are unchanged (see `calls.py`).
- **Sources -> base**: source inputs are run first (without grad), the vectors at each binding's source site and
  positions are gathered, and the run stops as soon as the last needed vector was seen. Precomputed vectors can
  be passed instead (`source_representations`). Several sources, grouping, cross-site patching and weight tying
  (one intervention object in several bindings) all follow from `Binding` fields. `serial=True` chains the
  sources: bindings reading source s are applied to the run of source s + 1, the last ones to the base.
- **Per-example routing**: `active` masks say which examples each binding applies to, so one batch can mix
  adapters (or none) per example; inactive rows are written back unchanged, bit for bit.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .calls import (CallArguments, CallState, Now, ParametrizationReuse, StopForward, generation_step, region_of,
                    row_mask, start_generation, unique_name)
from .errors import IncompatibleModelError, InterventionError, PositionError, ReftkitError, SiteError, SourceError
from .binding import Binding
from .interventions.base import Intervention
from .positions import Positions
from .sites import ResolvedSite, Site, decoder_root, resolve_site

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: object
    collected: dict = field(default_factory=dict)


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
        for i, b in enumerate(bindings):
            if not isinstance(b, Binding) or not isinstance(b.intervention, Intervention):
                what = type(b.intervention if isinstance(b, Binding) else b).__name__
                raise InterventionError(f"binding {i}: expected Binding(site, <reftkit Intervention>), got {what}")
            site = Site.parse(b.site)
            rs = resolve_site(model, site)
            ss = resolve_site(model, Site.parse(b.source_site)) if b.source_site is not None else rs
            name = unique_name(b.name or site.name, {x.name for x in self.bindings})
            d = b.intervention.embed_dim
            if d is not None and rs.width is not None and d != rs.width:  # unknown widths: checked at first use
                raise InterventionError(
                    f"binding {name!r}: the intervention expects width {d} but site {site.name} has width {rs.width}"
                )
            if ss is not rs and None not in (ss.width, rs.width) and ss.width != rs.width:
                raise SiteError(f"binding {name!r}: source site {ss.site.name} has width {ss.width} but site "
                                f"{site.name} has width {rs.width}; cross-site patching needs equal widths")
            if not isinstance(b.source, int) or b.source < 0:
                raise SourceError(f"binding {name!r}: source must be a source index >= 0, got {b.source!r}")
            pos = None if b.positions is None else Positions.parse(b.positions)
            spos = None if b.source_positions is None else Positions.parse(b.source_positions)
            self.bindings.append(Binding(site, b.intervention, name, pos, b.source, ss.site, spos))
            self.resolved.append(rs)
            self.source_resolved.append(ss)
            j = next((j for j, u in enumerate(unique) if u is b.intervention), None)
            if j is None:
                unique.append(b.intervention)
                j = len(unique) - 1
            self._iv_index.append(j)
        self.interventions = nn.ModuleList(unique)
        self.interventions.train(model.training)  # dropout in an edit follows the model's mode until told otherwise
        self._first_param = [next(iter(iv.parameters()), None) for iv in unique]  # its device is checked per call
        self._checked: dict = {}
        self._now = Now(model)
        self._args = CallArguments(self.bindings, self.default_positions)
        self._reuse = ParametrizationReuse(unique)
        self._ckpt_modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        self._decoder = decoder_root(model)
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

    @property
    def hook_handles(self) -> list:
        return list(self._handles)

    def remove(self) -> None:
        """Remove exactly the hooks this object installed; the model is then untouched."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._now.call = self._now.last = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def _current(self) -> CallState | None:
        now = self._now
        if now.call is not None:
            return now.call
        # autograd recomputing a checkpointed forward after the call returned
        if now.last is not None and torch._C._current_graph_task_id() != -1:
            return now.last
        return None

    def _make_output_hook(self, rs: ResolvedSite, base_ids, src_ids):
        now, index, apply = self._now, rs.index, self._apply
        wants_input = any(self.bindings[i].intervention.source == "module_input" for i in base_ids)

        def hook(module, args, kwargs, output):
            call = now.call
            if call is None:
                call = self._current()
                if call is None:
                    return None
            is_tuple = isinstance(output, tuple)
            tensor = output[index] if is_tuple else output
            if not isinstance(tensor, torch.Tensor):
                raise SiteError(f"{rs.site.name}: module {rs.path} returns {type(output).__name__}; hook a module "
                                "whose output is a tensor or a tuple of tensors")
            module_input = None
            if wants_input:
                module_input = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            new = apply(call, rs, base_ids, src_ids, tensor, module_input)
            if new is tensor:
                return None
            return output[:index] + (new,) + output[index + 1:] if is_tuple else new

        return hook

    def _make_input_hook(self, rs: ResolvedSite, base_ids, src_ids):
        now = self._now

        def hook(module, args, kwargs):
            call = now.call
            if call is None:
                call = self._current()
                if call is None:
                    return None
            key = None
            if len(args) > rs.index:
                tensor = args[rs.index]
            else:
                key = "hidden_states" if "hidden_states" in kwargs else next(
                    (k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
                if key is None:
                    raise SiteError(f"{rs.site.name}: cannot find the input tensor of module {rs.path}")
                tensor = kwargs[key]
            new = self._apply(call, rs, base_ids, src_ids, tensor, None)
            if new is tensor:
                return None
            if key is None:
                return args[: rs.index] + (new,) + args[rs.index + 1:], kwargs
            return args, {**kwargs, key: new}

        return hook

    def _step_hook(self, module, args, kwargs):
        call = self._now.call
        if call is None or call.gen is None:
            return None
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("inputs_embeds")
        # the cache is `cache` in current transformers, `past_key_values` in older ones; it reports its length.
        # No cache at all (`use_cache=False`): the step re-feeds the whole sequence from absolute position 0
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")
        if cache is None:
            past = 0
        else:
            past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else None
        generation_step(call, ids, past)
        return None

    # ---- gather / intervene / scatter ---------------------------------------------------------------------
    def _apply(self, call: CallState, rs: ResolvedSite, base_ids, src_ids, tensor, module_input):
        shape = tensor.shape
        if rs.flat_tokens:  # [batch * seq, d] -> [batch, seq, d]
            if tensor.dim() != 2 or shape[0] % call.batch:
                raise SiteError(f"{rs.site.name}: expected flat token vectors [batch*seq, d], got {tuple(shape)}")
            tensor = tensor.reshape(call.batch, -1, shape[-1])
            if module_input is not None:
                module_input = module_input.reshape(call.batch, -1, module_input.shape[-1])
        elif tensor.dim() != 3:
            raise SiteError(f"{rs.site.name}: expected activations [batch, seq, d] at {rs.path}, got {tuple(shape)}")
        out = tensor  # every binding in the group hooks this module; each addresses its own part of it
        locs = call.locs
        if call.phase == "base":
            resolved, edit = self.resolved, self._edit
            for i in base_ids:
                if locs.get(i) is not None:
                    out = edit(call, i, resolved[i], out, module_input)
        else:
            for i in base_ids:
                if i in call.apply and locs.get(i) is not None:
                    out = self._edit(call, i, self.resolved[i], out, module_input)
            for i in src_ids:
                if i in call.pending:
                    call.src_vals[i] = self._gather(call, i, self.source_resolved[i], out)[0]
                    call.pending.discard(i)
            if not call.pending:
                raise StopForward
        if out is tensor:
            return tensor.reshape(shape) if rs.flat_tokens else tensor
        return out.reshape(shape) if rs.flat_tokens else out

    def _edit(self, call: CallState, i: int, rs: ResolvedSite, out, module_input):
        b = self.bindings[i]
        iv = b.intervention
        sel, full, where = self._gather(call, i, rs, out)
        if iv.collects:
            if not call.done:
                call.collected.setdefault(b.name, []).append(sel)
            return out
        src = call.src_vals.get(i) if call.src_vals else None
        if iv.source == "module_input":
            if module_input is None or module_input.shape != out.shape:
                raise InterventionError(f"{iv.type_name} at {b.name}: the module's input and output differ in shape, "
                                        "so the module cannot be skipped there")
            src = self._gather(call, i, rs, module_input)[0]
        if iv.source == "required" and src is None:
            raise SourceError(f"{iv.type_name} at {b.name} needs a source: pass sources=[...] (source {b.source}) "
                              "or source_representations={name: [batch, K, d]}")
        if src is not None:
            if src.shape != sel.shape:
                raise InterventionError(f"{iv.type_name} at {b.name}: source vectors {tuple(src.shape)} do not match "
                                        f"the base vectors {tuple(sel.shape)} [batch, positions, width]")
            if src.device != sel.device:
                src = src.to(sel.device)
        if i not in call.checked:  # the intervention's own checks, repeated only when what they read changes
            first = self._first_param[self._iv_index[i]]
            signature = (sel.shape[-1], sel.dtype, sel.device, src is None, None if first is None else first.device)
            if self._checked.get(i) != signature:
                iv.check_input(sel, src, b.name)
                self._checked[i] = signature
            call.checked.add(i)
        sub = call.subspaces.get(i) if call.subspaces else None
        try:
            new = iv(sel, src) if sub is None else iv(sel, src, sub)
        except RuntimeError as e:
            raise InterventionError(f"{iv.type_name} at {b.name} failed on vectors {tuple(sel.shape)} "
                                    f"({sel.dtype}, {sel.device}): {e}") from e
        if not isinstance(new, torch.Tensor) or new.shape != sel.shape:
            raise InterventionError(f"{iv.type_name} at {b.name} returned {tuple(getattr(new, 'shape', ()))}; "
                                    f"expected {tuple(sel.shape)}")
        if new.dtype != sel.dtype:
            new = new.to(sel.dtype)
        loc = call.locs[i]
        if loc.canon is not None:
            new = new.gather(1, loc.canon.unsqueeze(-1).expand(-1, -1, new.shape[-1]))
        rm = call.row_mask.get(i) if call.row_mask else None
        if rm is not None:
            new = torch.where(rm[:, None, None], new, sel)
        if rs.dims is not None:
            if isinstance(rs.dims, slice):
                new = torch.cat([full[..., : rs.dims.start], new, full[..., rs.dims.stop:]], dim=-1)
            else:
                new = full.index_copy(-1, self._dims_on(rs, full.device), new)
        return out.index_copy(1, where, new) if where.dim() == 1 else out.scatter(1, where, new)

    def _gather(self, call: CallState, i: int, rs: ResolvedSite, tensor):
        """-> (selected vectors, full-width vectors, where to write back). Rows that all select the same distinct
        positions use `index_select` / `index_copy`; otherwise one `gather` / `scatter` with a [B, K, d] index."""
        key = i  # one site per binding and forward: the width is fixed
        where = call.cache.get(key)
        if where is None:
            loc = call.locs[i]
            if loc.index.shape[0] != tensor.shape[0] or tensor.shape[1] != call.seq_len:
                raise PositionError(
                    f"{self.bindings[i].name}: positions were resolved for [batch={loc.index.shape[0]}, "
                    f"seq={call.seq_len}] but the activations at {rs.site.name} are {tuple(tensor.shape)}"
                )
            if loc.shared is not None:
                where = loc.shared if loc.shared.device == tensor.device else loc.shared.to(tensor.device)
            else:
                index = loc.index if loc.index.device == tensor.device else loc.index.to(tensor.device)
                where = index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1])
            call.cache[key] = where
        full = tensor.index_select(1, where) if where.dim() == 1 else tensor.gather(1, where)
        if rs.dims is None:
            return full, full, where
        if isinstance(rs.dims, slice):
            return full[..., rs.dims], full, where
        return full.index_select(-1, self._dims_on(rs, full.device)), full, where

    @staticmethod
    def _dims_on(rs: ResolvedSite, device) -> torch.Tensor:
        if rs.dims.device != device:
            rs.dims = rs.dims.to(device)
        return rs.dims

    def _prepare(self, inputs, positions, sources, source_positions, source_representations, active, subspaces,
                 region_mask, serial=False) -> tuple[CallState, dict]:
        region, unpadded = region_of(inputs, region_mask)
        batch = region.shape[0]
        locs, scopes = self._args.locations(positions, region, unpadded)
        call = CallState("base", locs, self._args.active(active, batch, region.device), {},
                         self._args.per_binding(subspaces), batch, region.shape[1])
        given = self._args.per_binding(source_representations, SourceError, listed=torch.Tensor)
        for i, v in given.items():
            if not isinstance(v, torch.Tensor):
                raise SourceError(f"source_representations for {self.bindings[i].name} must be a tensor "
                                  f"[batch, K, d], got {type(v).__name__}")
            if self._needs_source(i):
                call.src_vals[i] = v
            elif isinstance(source_representations, dict):
                iv = self.bindings[i].intervention
                raise SourceError(f"{iv.type_name} at {self.bindings[i].name} takes no source, but "
                                  "source_representations were given for it")
        if sources is not None:
            self._run_sources(call, [sources] if isinstance(sources, dict) else list(sources), positions,
                              source_positions, batch, serial)
        masks = ((i, row_mask(loc, call.active.get(i))) for i, loc in locs.items() if loc is not None)
        call.row_mask = {i: m for i, m in masks if m is not None}  # empty when every row takes every edit
        return call, scopes

    def _needs_source(self, i: int) -> bool:
        return self.bindings[i].intervention.source in ("required", "optional")

    def _run_sources(self, call: CallState, sources: list, positions, source_positions, batch: int,
                     serial: bool) -> None:
        needs: dict = {}
        for i, b in enumerate(self.bindings):
            if self._needs_source(i) and i not in call.src_vals:
                needs.setdefault(b.source, []).append(i)
        for s, ids in needs.items():
            if s >= len(sources) or sources[s] is None:
                required = [self.bindings[i].name for i in ids if self.bindings[i].intervention.source == "required"]
                if required:
                    raise SourceError(f"bindings {required} read source {s}, but only {len(sources)} source "
                                      "input(s) were given")
        given = [s for s in sorted(needs) if s < len(sources) and sources[s] is not None]
        stages = range(len(sources)) if serial else given
        for s in stages:
            src = sources[s]
            gather = needs.get(s, [])
            apply = [i for i in range(len(self.bindings)) if serial and self._needs_source(i)
                     and self.bindings[i].source == s - 1 and i in call.src_vals]
            if src is None or not gather:
                continue
            sregion, sunpadded = region_of(src, None)
            if sregion.shape[0] != batch:
                raise SourceError(f"source {s} has batch {sregion.shape[0]} but the base has batch {batch}")
            slocs, _ = self._args.locations(positions, sregion, sunpadded, source_positions, source=True)
            if apply:
                blocs, _ = self._args.locations(positions, sregion, sunpadded)
                slocs.update({i: blocs[i] for i in apply})
            scall = CallState("source", slocs, {}, call.src_vals, {}, batch, sregion.shape[1], source_index=s,
                              pending=set(gather), apply=set(apply))
            scall.row_mask = {i: m for i in apply if (m := row_mask(slocs[i], None)) is not None}
            self._now.call = scall
            try:
                with torch.no_grad():
                    self.model(**src)
            except StopForward:
                pass
            finally:
                self._now.call = None
            if scall.pending:
                raise SourceError(f"source run {s} never reached the source sites of "
                                  f"{[self.bindings[i].name for i in scall.pending]}")
        if serial:  # only the bindings reading the last source reach the base
            for i, b in enumerate(self.bindings):
                if self._needs_source(i) and b.source != len(sources) - 1:
                    call.locs[i] = None

    def _param_cache(self):
        """Parametrizations (orthogonal factors) are computed once per forward, except under gradient
        checkpointing, where a value cached inside a checkpointed region could lose its gradient."""
        if self._now.model.training and any(m.gradient_checkpointing for m in self._ckpt_modules):
            return nullcontext()
        return parametrize.cached()

    # ---- calls ------------------------------------------------------------------------------------------
    def run(self, inputs: dict | None = None, *, positions=None, sources=None, source_positions=None,
            source_representations=None, active=None, subspaces=None, region_mask=None, serial: bool = False,
            **model_kwargs) -> RunResult:
        """Run the base model with interventions. Returns the model output and the collected vectors."""
        inputs = {**(inputs or {}), **model_kwargs}
        call, _ = self._prepare(inputs, positions, sources, source_positions, source_representations, active,
                                subspaces, region_mask, serial)
        self._now.call = call
        reuse = not torch.is_grad_enabled()
        try:
            with self._param_cache():
                if reuse:
                    self._reuse.restore()
                out = self._now.model(**inputs)
                if reuse:
                    self._reuse.keep()
        finally:
            self._now.call = None
            call.done = True
            self._now.last = call if torch.is_grad_enabled() else None
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
        call, scopes = self._prepare(inputs, positions, sources, source_positions, source_representations, active,
                                     subspaces, None)
        start_generation(call, scopes, input_ids.shape[1])
        step_handle = self._decoder.register_forward_pre_hook(self._step_hook, with_kwargs=True)
        self._now.call = call
        try:
            with parametrize.cached():
                self._reuse.restore()
                out = self.model.generate(**inputs, **generate_kwargs)
                self._reuse.keep()
        finally:
            step_handle.remove()
            self._now.call = None
            call.done = True
        if return_collected:
            return out, dict(call.collected)
        return out

    @contextmanager
    def disabled(self):
        """Inside this block the hooks pass everything through (e.g. a DPO reference forward)."""
        now = self._now
        saved, saved_last = now.call, now.last
        now.call = now.last = None
        try:
            yield self.model
        finally:
            now.call, now.last = saved, saved_last

    def refresh(self) -> None:
        """Forget parametrized weights carried over between calls (needed only after writes through `.data`)."""
        self._reuse.clear()

    def binding_names(self) -> list[str]:
        return [b.name for b in self.bindings]

    # ---- save / load (see io.py; io knows bindings, not this class) --------------------------------------------------------------------------
    def save(self, directory) -> None:
        """Write `config.json` and `interventions.safetensors` to `directory` (atomically)."""
        from .io import save_intervenable

        save_intervenable(self, directory)

    @classmethod
    def load(cls, model: nn.Module, directory) -> "IntervenableModel":
        """Rebuild saved bindings and interventions on `model` (which must match the saved fingerprint)."""
        from .io import read_bindings

        bindings, default, where = read_bindings(model, directory)
        try:
            return cls(model, bindings, default_positions=default)
        except (SiteError, InterventionError) as e:
            raise IncompatibleModelError(f"{where} does not fit this model: {e}") from e
