"""The replay evaluator of a sweep: rerun only the part of a causal decoder that a replacement can change.

In a causal decoder, replacing an activation at layer `l` and position `t` changes nothing below layer `l` and
nothing before position `t`. A row that replaces (from) layer `l` at position `t` therefore only needs the blocks
`l..L-1` on the tokens `t..T-1`; everything else is the base run's. `Replay` keeps, from one base forward, the
input of every block and the key/value cache, and for each row runs the blocks from its first replaced layer on
the suffix `t:` of the prompt, attending to the cached keys/values of the prefix. Rows with the same position
are stacked by first layer, so the batch grows as the layers go up: work is proportional to the layers and
tokens a row can change, not to the whole model.

Decisions:
- The blocks are called as the model calls them: the arguments each block receives (attention mask, rotary
  embeddings, position ids) are captured from one real forward of the suffix (batch 1, they broadcast), and the
  model's cache object is swapped for one holding the selected rows' prefix keys/values. The modules the model
  calls after the last block (the final norm) and the output embeddings give the logits.
- Replacements are forward hooks on the replaced modules that edit position `t` (the suffix's first token) of
  the rows that replace there; the hooks are installed for one `run` and removed after it.
- Before use, a replay of an unmodified base row must reproduce the model's own logits; if it does not (an
  architecture that post-processes logits, a cache layout it does not know), `Replay.build` returns None and the
  engine evaluator is used, or, with `required=True`, raises.
- Only full-width components read at a module's output (block, attention and MLP outputs, ...) are replayed.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from ..engine import Binding, IntervenableModel
from ..errors import ReftkitError
from ..interventions.basic import CollectIntervention
from ..sites import Site, find_blocks, resolve_site
from .rows import EmbeddingNoise, SweepRows, forward_kwargs, last_logits, noise_binding, noise_kwargs, with_progress

log = logging.getLogger(__name__)


class _Unsupported(Exception):
    pass


class Replay:
    def __init__(self, model, input_ids, components, blocks, after, head, hidden, keys, values, base_logits):
        self.model, self.input_ids, self.components = model, input_ids, components
        self.blocks, self.after, self.head = blocks, after, head
        self.hidden, self.keys, self.values = hidden, keys, values  # per layer: [B, T, d], [B, h, T, hd] x 2
        self.base_logits = base_logits
        self._captured: dict[int, list] = {}
        self._shared: bool | None = None  # every block is called with the same arguments (known after one capture)
        self._plan: dict[int, tuple] = {}

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(cls, model, input_ids: torch.Tensor, components, noise: EmbeddingNoise | None = None,
              required: bool = False) -> "Replay | None":
        try:
            replay = cls._build(model, input_ids, components, noise)
            replay._verify()
            return replay
        except _Unsupported as exc:
            if required:
                raise ReftkitError(f"the replay evaluator does not apply here ({exc}); use method='engine'") from None
            log.info("replay evaluator not used (%s); using the engine", exc)
            return None

    @classmethod
    def _build(cls, model, input_ids, components, noise):
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
            raise _Unsupported("not a decoder-only causal language model")
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(text, name, None) not in (None, 1, 1.0):
                raise _Unsupported(f"the model post-processes its logits ({name})")
        for c in components:
            rs = resolve_site(model, Site(layer=0, component=c))
            if rs.side != "output" or rs.dims is not None or rs.flat_tokens:
                raise _Unsupported(f"component {c} is not a full-width module output")
        path, blocks = find_blocks(model)
        decoder = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        calls: list[nn.Module] = []
        handles = [child.register_forward_hook(lambda mod, a, o: calls.append(mod))
                   for child in decoder.children() if child is not blocks]
        handles.append(blocks[-1].register_forward_hook(lambda mod, a, o: calls.append(blocks)))
        bindings = [Binding(Site(layer=l, component="block_input"), CollectIntervention(), name=f"in@{l}")
                    for l in range(len(blocks))] + noise_binding(noise)
        try:
            with IntervenableModel(model, bindings) as im:
                kw = noise_kwargs(noise, torch.arange(input_ids.shape[0]))
                result = im.run({"input_ids": input_ids}, use_cache=True, **kw, **forward_kwargs(model))
        finally:
            for h in handles:
                h.remove()
        if blocks not in calls:
            raise _Unsupported("the block list was not run")
        after = calls[len(calls) - calls[::-1].index(blocks):]
        if not after:
            raise _Unsupported("no final module after the last block")
        cache = _output_cache(result.output)
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(blocks) or getattr(layers[0], "keys", None) is None:
            raise _Unsupported("the model's cache has no per-layer keys/values")
        keys = [layer.keys for layer in layers]
        values = [layer.values for layer in layers]
        if any(k.shape[-2] != input_ids.shape[1] for k in keys):
            raise _Unsupported("the cache does not hold every position (sliding window)")
        hidden = [result.collected[f"in@{l}"] for l in range(len(blocks))]
        return cls(model, input_ids, list(components), blocks, after, model.get_output_embeddings(), hidden, keys,
                   values, last_logits(result.output))

    def _verify(self) -> None:
        t = self.input_ids.shape[1] // 2
        rows = SweepRows(*(torch.zeros(1, dtype=torch.long) for _ in range(3)), torch.zeros(1, dtype=torch.long),
                         torch.full((1,), -1, dtype=torch.long))
        rows.position.fill_(t)
        got = self._chunk(rows, {})
        want = self.base_logits[:1]
        err = float((got - want).abs().max())
        if not err <= 1e-5 * max(1.0, float(want.abs().max())):
            raise _Unsupported(f"a replayed base run differs from the model's forward by {err:.2e}")

    # ---- running --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, rows: SweepRows, values: dict, score, *, chunk_size: int = 128, progress: bool = False):
        n_layers = len(self.blocks)
        order = torch.argsort(rows.position * (n_layers + 1) + rows.first_layer, stable=True)
        ordered = rows.take(order)
        chunks = []
        for t in torch.unique(ordered.position).tolist():
            where = torch.nonzero(ordered.position == t).flatten()
            chunks += [where[i: i + chunk_size] for i in range(0, len(where), chunk_size)]
        handles = self._install()
        out = torch.empty(len(rows))
        try:
            for index in with_progress(chunks, progress, "replay"):
                chunk = ordered.take(index)
                logits = self._chunk(chunk, values)
                out[order[index]] = score(logits, chunk.base).float().cpu()
        finally:
            for h in handles:
                h.remove()
            self._plan = {}
        return out

    def _install(self) -> list:
        handles = []
        for ci, c in enumerate(self.components):
            for layer in range(len(self.blocks)):
                rs = resolve_site(self.model, Site(layer=layer, component=c))
                handles.append(rs.module.register_forward_hook(self._hook(ci, rs.index)))
        return handles

    def _hook(self, ci: int, index: int):
        def hook(module, args, output):
            plan = self._plan.get(ci)
            if plan is None:
                return None
            on, vals = plan
            tensor = output[index] if isinstance(output, tuple) else output
            first = torch.where(on[:, None], vals.to(tensor.dtype), tensor[:, 0])
            new = torch.cat([first[:, None], tensor[:, 1:]], dim=1)
            return output[:index] + (new,) + output[index + 1:] if isinstance(output, tuple) else new

        return hook

    def _chunk(self, rows: SweepRows, values: dict) -> torch.Tensor:
        """Logits [n, V] of rows that share one position and are sorted by first layer."""
        from transformers import DynamicCache

        t = int(rows.position[0])
        n_layers = len(self.blocks)
        counts = torch.searchsorted(rows.first_layer.contiguous(), torch.arange(n_layers), right=True).tolist()
        base = rows.base
        cache = DynamicCache(ddp_cache_data=[(self.keys[j][base[: counts[j]], :, :t],
                                              self.values[j][base[: counts[j]], :, :t]) for j in range(n_layers)])
        captured = self._capture(t)
        h = None
        start = int(rows.first_layer[0])
        for j in range(start, n_layers):
            before, now = (counts[j - 1] if j else 0), counts[j]
            if now > before:
                new = self.hidden[j][base[before:now], t:]
                h = new if h is None else torch.cat([h, new], dim=0)
            self._plan = {}
            for ci, c in enumerate(self.components):
                on = (rows.component[:now] == ci) & (rows.first_layer[:now] <= j) & (rows.last_layer[:now] >= j)
                if bool(on.any()):
                    self._plan[ci] = (on, values[c][j, base[:now], t])
            args, kwargs = captured[j]
            args = tuple(cache if _is_cache(a) else a for a in args)
            kwargs = {k: (cache if _is_cache(v) else v) for k, v in kwargs.items()}
            if args:
                args = (h,) + args[1:]
            else:
                kwargs["hidden_states"] = h
            output = self.blocks[j](*args, **kwargs)
            h = output[0] if isinstance(output, tuple) else output
        self._plan = {}
        h = h[:, -1:]
        for module in self.after:
            h = module(h)
        return self.head(h)[:, -1].float()

    def _capture(self, t: int) -> list:
        """The (args, kwargs) each block gets when the model runs the suffix `t:` after a cached prefix. When every
        block gets the same arguments (checked once on a full run), the forward stops at the first block."""
        found = self._captured.get(t)
        if found is not None:
            return found
        from transformers import DynamicCache

        n = len(self.blocks)
        captured: list = [None] * n
        shared = self._shared

        def grab(j):
            def pre(module, args, kwargs):
                captured[j] = (args, kwargs)
                if shared:
                    raise _Captured
            return pre

        watched = self.blocks[:1] if shared else self.blocks
        handles = [b.register_forward_pre_hook(grab(j), with_kwargs=True) for j, b in enumerate(watched)]
        plan, self._plan = self._plan, {}
        try:
            cache = DynamicCache(ddp_cache_data=[(k[:1, :, :t], v[:1, :, :t]) for k, v in zip(self.keys, self.values)])
            self.model(input_ids=self.input_ids[:1, t:], **{cache_argument(self.model): cache}, use_cache=True,
                       **forward_kwargs(self.model))
        except _Captured:
            captured = captured[:1] * n
        finally:
            for h in handles:
                h.remove()
            self._plan = plan
        if any(c is None for c in captured):
            raise _Unsupported("not every block was called on the suffix")
        if self._shared is None:
            self._shared = all(_same_call(captured[0], c) for c in captured[1:])
        self._captured[t] = captured
        return captured


class _Captured(Exception):
    pass


def cache_argument(model: nn.Module) -> str:
    """The name under which `model.forward` takes a key/value cache: `cache` in current transformers (which
    deprecates `past_key_values`), `past_key_values` in older ones. Read from the signature, not the version."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(output):
    """The cache a forward returned, under its current name (`cache`) or its older one (`past_key_values`)."""
    keys = list(output.keys()) if hasattr(output, "keys") else []  # the real keys: no deprecated-name lookups
    for name in ("cache", "past_key_values"):
        if name in keys:
            return output[name]
    return None


def _same_call(a, b) -> bool:
    (args_a, kw_a), (args_b, kw_b) = a, b
    return (len(args_a) == len(args_b) and all(x is y for x, y in zip(args_a[1:], args_b[1:]))
            and kw_a.keys() == kw_b.keys() and all(kw_a[k] is kw_b[k] for k in kw_a if k != "hidden_states"))


def _is_cache(value) -> bool:
    return type(value).__name__.endswith("Cache") and hasattr(value, "update")
