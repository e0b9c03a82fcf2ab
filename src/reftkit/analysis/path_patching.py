"""Path patching: the effect of a sender on a receiver through the residual stream only.

For each (sender, receiver) pair and prompt pair (Wang et al. 2022, Goldowsky-Dill et al. 2023):
1. Run the clean prompt with the sender's output taken from the corrupted run and every residual writer
   (attention and MLP outputs) strictly between sender and receiver frozen at its clean value; record the
   receiver's activation. Only the sender's change reaches the receiver, and only directly.
2. Run the clean prompt again with the receiver's activation replaced by the recorded one, and score it.
With `receivers=None` the receiver is the output itself: every writer after the sender is frozen and step 1 is
scored directly (the sender's direct effect on the logits).

Decisions:
- Order along the residual stream is (layer, stage) with stage 0 for attention-side components (attention,
  heads, query/key/value), 1 for MLP-side ones, 2 for the block output. A receiver must come strictly after its
  sender; a writer is frozen when it lies strictly between them, so a head's own attention output is never
  frozen against it.
- Senders and receivers act at every position (or the given `positions`); freezing acts at every position.
- Batched: one row per (prompt, sender, receiver); every binding is routed per row with `active` masks and per
  row source vectors, so each step is a few forwards whatever the number of pairs.
- Direction is noising (clean base, corrupted sender), as in the IOI paper; results are the metric per pair with
  the clean and corrupted baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import Binding, IntervenableModel
from ..errors import SiteError
from ..interventions.basic import CollectIntervention, ReplaceIntervention
from ..positions import Positions
from ..sites import Site, model_dims
from .patching import as_metric
from .sweep import check_eval, forward_kwargs, last_logits
from .text import as_input_ids, same_shape

STAGES = {"block_input": -1, "mlp_input": 1, "mlp_output": 1, "mlp_activation": 1, "moe_router": 1,
          "moe_experts_output": 1, "block_output": 2}
WRITERS = ("attention_output", "mlp_output")


def _key(site: Site) -> tuple:
    if site.module is not None or site.component == "embedding":
        raise SiteError(f"path patching orders sites along the residual stream; {site.name} has no layer. Use "
                        "layer components such as 'L3.attention_output' or 'L3.H1.head_attention_value_output'")
    return site.layer, STAGES.get(site.component, 0)


@dataclass
class PathPatchingResult:
    """`effects [prompt, sender, receiver]`: the metric after patching each path; `clean` / `corrupted`
    `[prompt]`: the unpatched baselines."""

    effects: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor
    senders: list
    receivers: list

    def normalized(self) -> torch.Tensor:
        span = (self.corrupted - self.clean)[:, None, None]
        return (self.effects - self.clean[:, None, None]) / torch.where(span.abs() > 1e-12, span,
                                                                       torch.full_like(span, float("nan")))

    def to_dict(self) -> dict:
        return {"senders": self.senders, "receivers": self.receivers, "clean": self.clean.tolist(),
                "corrupted": self.corrupted.tolist(), "effects": self.effects.tolist()}


@torch.no_grad()
def path_patching(model, clean, corrupted, metric, senders, receivers=None, *, tokenizer=None, positions=None,
                  chunk_size: int = 64) -> PathPatchingResult:
    """Metric after patching sender -> receiver paths (see the module docstring). `senders` / `receivers`
    are sites (`"L2.mlp_output"`, `"L1.H0.head_attention_value_output"`, ...); `receivers=None` scores the
    direct path to the logits."""
    check_eval(model)
    clean_ids = as_input_ids(clean, tokenizer, "clean prompts")
    corrupted_ids = as_input_ids(corrupted, tokenizer, "corrupted prompts")
    same_shape(clean_ids, corrupted_ids)
    metric = as_metric(metric)
    senders = [Site.parse(s) for s in ([senders] if isinstance(senders, (str, Site)) else senders)]
    direct = receivers is None
    receivers = [] if direct else [Site.parse(r) for r in ([receivers] if isinstance(receivers, (str, Site))
                                                             else receivers)]
    n_layers = model_dims(model).n_layers
    writers = [Site(layer=l, component=c) for l in range(n_layers) for c in WRITERS]
    pairs = [(s, r) for s in senders for r in (receivers or [None])]
    for s, r in pairs:
        if r is not None and not _key(r) > _key(s):
            raise SiteError(f"receiver {r.name} does not come after sender {s.name} in the residual stream; "
                            "pick a receiver at a later layer (or the MLP after an attention sender)")
        _key(s)
    P, T = clean_ids.shape
    sel = list(range(T)) if positions is None else [int(t) for t in positions]
    if any(not 0 <= t < T for t in sel):
        raise SiteError(f"positions {sel} fall outside the prompts' {T} tokens")
    at = Positions.indices(sel)

    # activations of every site involved, on both prompts, at every position
    sites = {s.name: s for s in writers + senders + receivers}
    collect = [Binding(site, CollectIntervention(), name=name) for name, site in sites.items()]
    with IntervenableModel(model, collect, default_positions="all") as im:
        clean_run = im.run({"input_ids": clean_ids}, **forward_kwargs(model))
        corrupted_run = im.run({"input_ids": corrupted_ids}, **forward_kwargs(model))
    clean_acts, corrupted_acts = clean_run.collected, corrupted_run.collected
    clean_logits, corrupted_logits = last_logits(clean_run.output), last_logits(corrupted_run.output)
    metric.prepare(clean_logits, corrupted_logits)

    # rows: (prompt, pair); writers are frozen at every position, senders and receivers act at `positions`
    prompt = torch.arange(P).repeat_interleave(len(pairs))
    pair = torch.arange(len(pairs)).repeat(P)
    step1 = [Binding(w, ReplaceIntervention(), name=w.name, positions="all") for w in writers]
    step1 += [Binding(s, ReplaceIntervention(), name=f"sender {s.name}", positions=at) for s in senders]
    step1 += [Binding(r, CollectIntervention(), name=f"receiver {r.name}", positions=at) for r in receivers]
    effects = torch.empty(P * len(pairs))
    recorded = {}
    with IntervenableModel(model, step1) as im:
        for idx, p, k in _chunks(prompt, pair, chunk_size):
            active, reps = {}, {}
            for w in writers:
                active[w.name] = torch.tensor([_between(w, *pairs[i]) for i in k.tolist()])
                reps[w.name] = clean_acts[w.name][p]
            for s in senders:
                active[f"sender {s.name}"] = torch.tensor([pairs[i][0].name == s.name for i in k.tolist()])
                reps[f"sender {s.name}"] = corrupted_acts[s.name][p][:, sel]
            out = im.run({"input_ids": clean_ids[p]}, active=active, source_representations=reps,
                         **forward_kwargs(model))
            if direct:
                effects[idx] = metric(last_logits(out.output), p).float().cpu()
            for j, i in enumerate(k.tolist()):
                if pairs[i][1] is not None:
                    recorded[(int(p[j]), i)] = out.collected[f"receiver {pairs[i][1].name}"][j]
    if not direct:
        step2 = [Binding(r, ReplaceIntervention(), name=r.name, positions=at) for r in receivers]
        with IntervenableModel(model, step2) as im:
            for idx, p, k in _chunks(prompt, pair, chunk_size):
                active, reps = {}, {}
                for r in receivers:
                    mine = [pairs[i][1].name == r.name for i in k.tolist()]
                    active[r.name] = torch.tensor(mine)
                    reps[r.name] = torch.stack([recorded[(pp, i)] if m else clean_acts[r.name][pp][sel]
                                                for pp, i, m in zip(p.tolist(), k.tolist(), mine)])
                out = im.run({"input_ids": clean_ids[p]}, active=active, source_representations=reps,
                             **forward_kwargs(model))
                effects[idx] = metric(last_logits(out.output), p).float().cpu()
    prompts = torch.arange(P)
    return PathPatchingResult(effects.reshape(P, len(senders), max(len(receivers), 1)),
                              metric(clean_logits, prompts).float().cpu(),
                              metric(corrupted_logits, prompts).float().cpu(),
                              [s.name for s in senders], [r.name for r in receivers] or ["logits"])


def _chunks(prompt, pair, size):
    for start in range(0, len(prompt), size):
        idx = torch.arange(start, min(start + size, len(prompt)))
        yield idx, prompt[idx], pair[idx]


def _between(site: Site, sender: Site, receiver: "Site | None") -> bool:
    """A residual writer frozen for this pair: strictly after the sender and strictly before the receiver."""
    if site.name == sender.name:
        return False
    key = _key(site)
    return key > _key(sender) and (receiver is None or key < _key(receiver))
