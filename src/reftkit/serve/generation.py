"""One batch of routed rows through the engine: left-padded, one `generate` call, tokens streamed per row.

Decisions:
- **Adapters only**: `ReftModel.generate(adapter_names=[per-row name or None])`, the library's own per-example
  routing (a batch with no adapter in use is the plain model's `generate`, bit for bit).
- **Steering vectors**: a `ReftModel` and a `Steered` model are two engines with their own call state, and one
  `generate` runs only one of them. A batch with steered rows therefore runs ONE `IntervenableModel` holding the
  bindings of the adapters its rows use (the very intervention modules and positions of the `ReftModel`) and,
  for each distinct (vector, coefficient) of the batch, the vector's bindings (`SteeringVector.to_bindings`).
  A `[rows, bindings]` `active` mask routes each binding to the rows that asked for it, so every row is computed
  as if served alone; the temporary engine's hooks are removed when the batch ends. At a site with both, the
  adapter edits first and the vector second. A coefficient of 0 is dropped at admission: that row is unsteered.
- **Sampling** per row (`sampling.RowSampler`); `generate` itself always runs greedy.
- `max_new_tokens` is the batch's largest `max_tokens`; each row stops at its own (`streaming.BatchStreamer`).
"""

from __future__ import annotations

import logging

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from .sampling import RowSampler
from .streaming import BatchStreamer

log = logging.getLogger(__name__)


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]) + [tokenizer.eos_token_id]:
        if e is not None:
            ids.add(int(e))
    return ids


class BatchEngine:
    """Runs batches of `Row`s on a `ReftModel` (whose adapters are the servable ones) and steering vectors."""

    def __init__(self, reft, tokenizer, vectors: dict):
        self.reft = reft
        self.model = reft.model
        self.tokenizer = tokenizer
        self.vectors = vectors  # name -> SteeringVector, checked against the model when registered
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = 0 if pad is None else int(pad)
        self.eos = eos_ids(self.model, tokenizer)
        self.device = next(self.model.parameters()).device

    def left_padded(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, T - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, T - len(r.ids):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def run(self, rows, on_token=None) -> None:
        ids, mask = self.left_padded(rows)
        streamer = BatchStreamer(self.tokenizer, rows, self.eos, on_token)
        kwargs = dict(max_new_tokens=max(r.max_tokens for r in rows), do_sample=False, pad_token_id=self.pad,
                      eos_token_id=sorted(self.eos) or None, stopping_criteria=StoppingCriteriaList([streamer]),
                      temperature=None, top_p=None, top_k=None)
        sampler = RowSampler(rows)
        if sampler:
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        if any(r.steer for r in rows):
            self._steered(rows, ids, mask, kwargs)
        else:
            self.reft.generate(ids, mask, adapter_names=[r.adapter for r in rows], **kwargs)
        streamer.close()  # not after a failure: the batcher ends those rows with an error instead

    def _steered(self, rows, ids, mask, kwargs):
        from ..engine import Binding, IntervenableModel

        bindings, owners = [], []
        used = {r.adapter for r in rows if r.adapter is not None}
        for name, slots in self.reft._slots.items():  # the ReftModel's own bindings (see the module docstring)
            if name in used:
                for (site, positions, tag), iv in zip(slots, self.reft.adapters[name]):
                    bindings.append(Binding(site, iv, tag, positions))
                    owners.append(("adapter", name))
        for name, c in dict.fromkeys(entry for r in rows for entry in r.steer):
            made = self.vectors[name].to_bindings(self.model, c, None, name=f"{name}[{c:g}]", check_weights=False)
            bindings += made
            owners += [("steer", (name, c))] * len(made)
        active = torch.tensor([[r.adapter == what if kind == "adapter" else what in r.steer for kind, what in owners]
                               for r in rows], dtype=torch.bool, device=ids.device)
        im = IntervenableModel(self.model, bindings, default_positions="all")
        try:
            return im.generate(ids, mask, active=active, **kwargs)
        finally:
            im.remove()
