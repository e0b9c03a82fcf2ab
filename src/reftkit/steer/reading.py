"""Reading activations for steering extractors: the sites to read, one forward per batch for all of them, and the
vectors at the read positions of contrast pairs (`read_pairs`), shared by `extract.py`, `refusal.py`, `iti.py`
and `lape.py`.

Reading:
- One forward per batch reads **all** sites at once (a `collect` binding per site), without gradients, cast to
  float32 on the CPU. Default sites: `L{l}.block_output` for every layer (HF `hidden_states[l + 1]`; for the last
  layer, the state *before* the final norm, which is what a residual write there edits).
- Sides are batched as [p0, n0, p1, n1, ...]. Positions come from the attention mask and padded batches get
  `position_ids` from it, so left and right padding read the same vectors. Where the read position selects
  several tokens (`completion_mean`, a multi-token selector) their vectors are averaged.
- A site that reads the hidden state after the final norm (a raw module site on the final norm's output or on
  the LM head's input) gets a warning: its scale is not the residual stream's that a write would edit.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import torch

from ..engine import Binding, IntervenableModel
from ..errors import ConfigError, SiteError
from ..interventions.basic import CollectIntervention
from ..positions import Positions
from ..sites import Site, decoder_root, find_blocks, model_dims, resolve_site
from .data import Sequence, check_read, make_pairs, padded_batch, read_description, tokenise_pairs

log = logging.getLogger(__name__)


@dataclass
class ContrastActivations:
    """Pooled vectors per site: `positive[site]`, `negative[site]` `[N, d]` float32 (row i = pair i), and
    `hidden_norm[site]`, the mean token norm at the read tokens; `read` describes the read position, `seconds`
    the reading time, `warnings` what the sites deserve a warning for."""

    positive: dict
    negative: dict
    hidden_norm: dict
    read: str
    seconds: float
    warnings: list = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        return list(self.positive)


def read_sites(model, sites=None, layers=None) -> list[Site]:
    """Sites to read: `sites` as given, else `L{l}.block_output` for `layers` (default: every layer)."""
    if sites is not None and layers is not None:
        raise ConfigError("give sites=... or layers=..., not both")
    if sites is None:
        n = model_dims(model).n_layers
        layers = range(n) if layers is None else layers
        if isinstance(layers, int):
            layers = [layers]
        bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n]
        if bad:
            raise SiteError(f"layers {bad} are out of range; valid layers are 0..{n - 1}")
        sites = [Site(layer=l, component="block_output") for l in layers]
    elif isinstance(sites, (str, Site, dict)):
        sites = [sites]
    out = list(dict.fromkeys(Site.parse(s) for s in sites))
    if not out:
        raise ConfigError("no sites to read; give at least one site or layer")
    return out


def after_final_norm(model, site: Site) -> bool:
    """True when `site` reads the hidden state after the final norm (its output, or the LM head's input)."""
    rs = resolve_site(model, site)
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is not None and rs.module is head and rs.side == "input":
        return True
    if rs.side != "output":
        return False
    try:
        blocks = find_blocks(model)[1]
    except SiteError:
        return False
    root = decoder_root(model)
    norms = [m for m in root.children() if m is not blocks and "norm" in type(m).__name__.lower()]
    return any(rs.module is m for m in norms)


def _model_device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def accepts(model, argument: str) -> bool:
    """Whether the model's forward takes `argument` (`position_ids`, `logits_to_keep`)."""
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _reads_head(model, sites: list[Site]) -> bool:
    """Whether a site is the LM head (whose input `logits_to_keep` cuts to the last position) or inside it."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return False
    inside = {id(m) for m in head.modules()}
    return any(id(resolve_site(model, s).module) in inside for s in sites)


def iter_batches(model, batches, sites: list[Site], *, progress: bool = False, desc: str = "read activations"):
    """One forward per `(inputs, read_mask)` batch (without gradients, positions from the attention mask), reading
    every site at the `read_mask` tokens; yields `(counts, {site name: [B, K, d] float32 CPU})` where row b's first
    `counts[b]` slots are its read tokens in order (the rest padding). The model is in eval mode meanwhile. A causal
    LM computes the logits of the last position only (`logits_to_keep=1`): nothing here reads them, and the LM head
    over every token is a large share of a small model's forward."""
    device = _model_device(model)
    names = [s.name for s in sites]
    bindings = [Binding(s, CollectIntervention(), name=s.name) for s in sites]
    with_positions = accepts(model, "position_ids")
    head = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") and not _reads_head(model, sites) else {}
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), IntervenableModel(model, bindings) as im:
            for inputs, read_mask in batches:
                mask = inputs["attention_mask"]
                kwargs = {k: v.to(device) for k, v in inputs.items()}
                if with_positions and not bool(mask.all()):
                    kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0).to(device)
                out = im.run(kwargs, positions=Positions.mask(read_mask.to(device)), use_cache=False, **head)
                # the mask selector lists each row's tokens first, in order
                yield read_mask.sum(1), {n: out.collected[n].float().cpu() for n in names}
    finally:
        model.train(was_training)


@torch.no_grad()
def read_sequences(model, tokenizer, seqs: list[Sequence], sites: list[Site], read, *, batch_size: int = 16,
                   padding_side: str = "right", progress: bool = False) -> tuple[dict, dict]:
    """Pooled vectors per site `[len(seqs), d]` and the mean token norm per site. Every batch is built (and its
    read positions checked) before the first forward."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    # batches of similar lengths waste less compute on padding; the results are put back in the caller's order
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    ordered = [seqs[i] for i in order]
    batches = [padded_batch(ordered[i:i + batch_size], read, pad, padding_side)
               for i in range(0, len(ordered), batch_size)]
    names = [s.name for s in sites]
    pooled = {n: [] for n in names}
    norm_sum = {n: 0.0 for n in names}
    tokens = 0
    for counts, collected in iter_batches(model, batches, sites, progress=progress):
        tokens += int(counts.sum())
        for n in names:
            v = collected[n]  # [B, K, d]
            valid = (torch.arange(v.shape[1])[None, :] < counts[:, None]).float()
            pooled[n].append((v * valid[..., None]).sum(1) / counts[:, None])
            norm_sum[n] += float((v.norm(dim=-1) * valid).double().sum())
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    vectors = {n: torch.cat(pooled[n])[back] for n in names}
    return vectors, {n: norm_sum[n] / max(tokens, 1) for n in names}


def read_pairs(model, tokenizer, pairs, *, sites=None, layers=None, read="last", chat: bool = False,
               batch_size: int = 16, padding_side: str = "right", progress: bool = False) -> ContrastActivations:
    """Read every site for both sides of every pair (see the module docstring)."""
    start = time.perf_counter()
    pairs = make_pairs(pairs=pairs)
    read = check_read(read, pairs)
    site_list = read_sites(model, sites, layers)
    warnings = [f"site {s.name} reads the hidden state after the final norm; a residual-stream write (e.g. at "
                f"L{model_dims(model).n_layers - 1}.block_output) sees a different scale"
                for s in site_list if after_final_norm(model, s)]
    seqs = tokenise_pairs(tokenizer, pairs, chat=chat)
    vectors, norms = read_sequences(model, tokenizer, seqs, site_list, read, batch_size=batch_size,
                                    padding_side=padding_side, progress=progress)
    positive = {n: v[0::2].contiguous() for n, v in vectors.items()}
    negative = {n: v[1::2].contiguous() for n, v in vectors.items()}
    seconds = time.perf_counter() - start
    log.info("read %d pairs at %d sites (%s) in %.2f s", len(pairs), len(site_list), read_description(read), seconds)
    return ContrastActivations(positive, negative, norms, read_description(read), seconds, warnings)


__all__ = ["ContrastActivations", "after_final_norm", "iter_batches", "read_pairs", "read_sequences", "read_sites"]
