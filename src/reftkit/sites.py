"""Sites: *where* an intervention acts.

A `Site` is data (layer + canonical component, optionally a head; or a raw module path with `input`/`output`)
and round-trips through a short string (`"L3.block_output"`, `"L2.H1.head_query_output"`,
`"module:model.layers.3.mlp.down_proj:input"`). `resolve_site(model, site)` turns it into a `ResolvedSite`:
the module to hook, which side (input or output), which tuple element carries the tensor, and which slice of the
last dimension is addressed (fused QKV projections and attention heads are slices of a wider tensor; the query,
key or value of GPT-NeoX's per-head fused projection is an index set). The architecture knowledge lives in
`archs.py`; this module only walks the model.

Decisions:
- Head components count key/value heads for keys and values (grouped-query attention: `num_key_value_heads`).
- Widths come from the hooked module (`in_features`/`out_features`, also on PEFT and quantised wrappers), so a
  mismatched intervention is caught when it is bound, not in the forward.
- MoE sites see flat token tensors `[batch * seq, d]`, which the engine views as `[batch, seq, d]`.
  `moe_router` is what the block routes with: the routing weights of the chosen experts for a top-k router
  (its output element 1, width = experts per token), the logits for a plain linear gate; editing a top-k
  router's logits would change nothing downstream. `moe_experts_output` is the experts' combined output.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import archs
from .errors import SiteError

_SITE_RE = re.compile(r"^L(?P<layer>\d+)\.(?:H(?P<head>\d+)\.)?(?P<component>[a-z_]+)$")


@dataclass(frozen=True)
class Site:
    layer: int | None = None
    component: str = "block_output"
    head: int | None = None
    module: str | None = None
    side: str = "output"

    def __post_init__(self):
        if self.module is None:
            if self.component not in archs.CANONICAL_COMPONENTS:
                raise SiteError(
                    f"unknown component {self.component!r}; expected one of {', '.join(archs.CANONICAL_COMPONENTS)}"
                    " or a raw module path (Site(module='model.layers.3.mlp', side='output'))"
                )
            if self.component != "embedding" and self.layer is None:
                raise SiteError(f"component {self.component!r} needs a layer index (Site(layer=3, component=...))")
            if (self.head is not None) != (self.component in archs.HEAD_COMPONENTS):
                raise SiteError(
                    f"component {self.component!r}: a head index goes with, and only with, the head_* components "
                    f"({', '.join(archs.HEAD_COMPONENTS)})"
                )
        elif self.side not in ("input", "output"):
            raise SiteError(f"side must be 'input' or 'output', got {self.side!r}")

    @classmethod
    def parse(cls, text: "str | Site | dict") -> "Site":
        if isinstance(text, Site):
            return text
        if isinstance(text, dict):
            fields = {"layer", "component", "head", "module", "side"}
            unknown = set(text) - fields
            if unknown:
                raise SiteError(f"unknown site fields {sorted(unknown)}; expected some of {sorted(fields)}")
            for key in ("layer", "head"):
                value = text.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise SiteError(f"site field {key!r} must be an integer, got {value!r}")
            return cls(**text)
        if not isinstance(text, str):
            raise SiteError(f"cannot use {type(text).__name__} as a site; expected a string like 'L3.block_output'")
        if text == "embedding":
            return cls(component="embedding")
        if text.startswith("module:"):
            body = text[len("module:"):]
            path, _, side = body.rpartition(":")
            if not path:
                path, side = body, "output"
            return cls(module=path, side=side)
        m = _SITE_RE.match(text)
        if not m:
            raise SiteError(
                f"cannot parse site {text!r}; expected 'L<layer>.<component>', 'L<layer>.H<head>.<head component>', "
                "'embedding' or 'module:<path>:<input|output>'"
            )
        head = m.group("head")
        return cls(layer=int(m.group("layer")), component=m.group("component"),
                   head=None if head is None else int(head))

    @property
    def name(self) -> str:
        if self.module is not None:
            return f"module:{self.module}:{self.side}"
        if self.component == "embedding":
            return "embedding"
        head = "" if self.head is None else f"H{self.head}."
        return f"L{self.layer}.{head}{self.component}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResolvedSite:
    site: Site
    module: nn.Module
    path: str
    side: str  # "input" | "output"
    index: int  # tuple element (output) or positional argument (input) that carries the tensor
    dims: "slice | torch.Tensor | None"  # part of the last dimension addressed: a slice, an index tensor, None = all
    width: int | None  # size of the addressed vectors; None: a raw module that does not declare it (read at its first activation)
    flat_tokens: bool = False  # the tensor is [batch * seq, width] (MoE routers) rather than [batch, seq, width]


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    model_type: str | None
    experts_per_token: int | None = None


def model_dims(model: nn.Module) -> ModelDims:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise SiteError("the model has no `config`; pass a Hugging Face model or use raw module sites")
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()

    def first(*names, default=None):
        for n in names:
            v = getattr(cfg, n, None)
            if v is not None:
                return v
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", default=1)
    kv = first("num_key_value_heads", default=heads)
    head_dim = first("head_dim", default=hidden // heads if hidden else None)
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    top_k = first("num_experts_per_tok", "moe_top_k")
    return ModelDims(layers, hidden, heads, kv, head_dim, getattr(cfg, "model_type", None), top_k)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the shallowest ModuleList whose length is the configured layer count."""
    n = model_dims(model).n_layers
    best = None
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and len(mod) > 0:
            if best is None or path.count(".") < best[0].count("."):
                best = (path, mod)
    if best is None:
        raise SiteError(f"cannot find the list of {n} transformer blocks in {type(model).__name__}")
    return best


def _get(root: nn.Module, rel: str) -> nn.Module | None:
    mod = root
    for part in rel.split("."):
        if part.isdigit():
            mod = mod[int(part)] if isinstance(mod, nn.ModuleList) and int(part) < len(mod) else None
        else:
            mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _first(block: nn.Module, candidates, under: str = "") -> tuple[str, nn.Module] | None:
    for c in candidates:
        rel = f"{under}.{c}" if under else c
        mod = _get(block, rel)
        if isinstance(mod, nn.Module):
            return rel, mod
    return None


def _width(mod: nn.Module, side: str, default: "int | None") -> "int | None":
    """Width of a projection's output or input. Linear layers and their wrappers (PEFT LoRA, quantised linears)
    expose `in_features` / `out_features`; GPT-2's Conv1D stores `weight [in, out]` and `nf` = out."""
    if type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None:
        return mod.weight.shape[1] if side == "output" else mod.weight.shape[0]
    n = getattr(mod, "out_features" if side == "output" else "in_features", None)
    if isinstance(n, int):
        return n
    base = getattr(mod, "base_layer", None)
    if isinstance(base, nn.Module) and base is not mod:
        return _width(base, side, default)
    return default


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for path, mod in model.named_modules():
        if mod is target:
            return path
    raise SiteError("module not found in the model")


def resolve_site(model: nn.Module, site: "Site | str") -> ResolvedSite:
    site = Site.parse(site)
    if site.module is not None:
        mod = _get(model, site.module)
        if mod is None:
            raise SiteError(f"no module at path {site.module!r}; see model.named_modules() for valid paths")
        # a module that does not declare its width (an activation, a custom block) is not guessed from the
        # model's hidden size: the engine checks the intervention against the vectors of the first activation
        return ResolvedSite(site, mod, site.module, site.side, 0, None, _width(mod, site.side, None))

    dims = model_dims(model)
    if site.component == "embedding":
        emb = model.get_input_embeddings()
        return ResolvedSite(site, emb, _module_path(model, emb), "output", 0, None, dims.hidden)

    blocks_path, blocks = find_blocks(model)
    if not 0 <= site.layer < len(blocks):
        raise SiteError(f"layer {site.layer} is out of range for {site.name}; valid layers are 0..{len(blocks) - 1}")
    block = blocks[site.layer]
    base = f"{blocks_path}.{site.layer}"
    found = _component(block, site, dims)
    if found is None:
        valid = [c for c in archs.CANONICAL_COMPONENTS if c != "embedding" and _component_exists(block, c, dims)]
        raise SiteError(f"component {site.component!r} is not available on {type(block).__name__}; "
                        f"valid: {', '.join(valid)}")
    rel, mod, side, index, sl, width, flat = found
    return ResolvedSite(site, mod, f"{base}.{rel}" if rel else base, side, index, sl, width, flat)


def _component_exists(block, component, dims) -> bool:
    head = 0 if component in archs.HEAD_COMPONENTS else None
    try:
        return _component(block, Site(layer=0, component=component, head=head), dims) is not None
    except SiteError:
        return False


def _component(block: nn.Module, site: Site, dims: ModelDims):
    """-> (relative path, module, side, tuple index, dims slice, width, flat_tokens) or None."""
    comp = site.component
    fam = archs.family_of(dims.model_type)
    if comp == "block_input":
        return "", block, "input", 0, None, dims.hidden, False
    if comp == "block_output":
        return "", block, "output", 0, None, dims.hidden, False
    if comp in archs.HEAD_COMPONENTS:
        return _head(block, site, dims)
    if comp in fam.paths:
        rel, side, index = fam.paths[comp]
        mod = _get(block, rel)
        if mod is None:
            return None
        return rel, mod, side, index, None, _width(mod, side, dims.hidden), False
    if comp in ("query_output", "key_output", "value_output") and fam.fused_qkv is not None:
        return _fused(block, comp, dims, fam.fused_qkv, head=None)
    attn = _first(block, archs.ATTENTION)
    mlp = _first(block, archs.MLP)
    if comp in ("attention_input", "attention_output"):
        if attn is None:
            return None
        side = "input" if comp == "attention_input" else "output"
        return attn[0], attn[1], side, 0, None, dims.hidden, False
    if comp in ("mlp_input", "mlp_output"):
        if mlp is None:
            return None
        side = "input" if comp == "mlp_input" else "output"
        return mlp[0], mlp[1], side, 0, None, dims.hidden, False
    if comp == "attention_value_output":
        found = attn and _first(block, archs.ATTN_OUT_PROJ, under=attn[0])
        if not found:
            return None
        return found[0], found[1], "input", 0, None, _width(found[1], "input", dims.n_heads * dims.head_dim), False
    if comp == "mlp_activation":
        found = mlp and _first(block, archs.MLP_DOWN_PROJ, under=mlp[0])
        if not found:
            return None
        return found[0], found[1], "input", 0, None, _width(found[1], "input", dims.hidden), False
    if comp in ("query_output", "key_output", "value_output"):
        cands = {"query_output": archs.Q_PROJ, "key_output": archs.K_PROJ, "value_output": archs.V_PROJ}[comp]
        found = attn and _first(block, cands, under=attn[0])
        if not found:
            return None
        return found[0], found[1], "output", 0, None, _width(found[1], "output", dims.hidden), False
    if comp == "moe_experts_output":
        found = mlp and _first(block, ("experts",), under=mlp[0])
        if not found or isinstance(found[1], nn.ModuleList):  # a list of experts is called one by one, never as a whole
            return None
        return found[0], found[1], "output", 0, None, dims.hidden, True
    if comp == "moe_router":
        found = mlp and _first(block, ("gate", "router"), under=mlp[0])
        if not found or not hasattr(mlp[1], "experts"):
            return None
        mod = found[1]
        if isinstance(mod, nn.Linear):  # a plain gate returns the logits that the block routes with
            return found[0], mod, "output", 0, None, mod.out_features, True
        # a top-k router returns (logits, routing weights of the chosen experts, expert indices); the block
        # routes with the weights, so the weights are what an intervention edits
        if dims.experts_per_token is None:
            return None
        return found[0], mod, "output", 1, None, dims.experts_per_token, True
    return None


def _fused(block, comp, dims, fused: archs.FusedQKV, head):
    mod = _get(block, fused.path)
    if mod is None:
        return None
    which = {"query_output": 0, "key_output": 1, "value_output": 2}[comp]
    hd, nh = dims.head_dim, dims.n_heads
    if fused.layout == "blocked":
        start = which * dims.hidden + (0 if head is None else head * hd)
        width = dims.hidden if head is None else hd
        return fused.path, mod, "output", 0, slice(start, start + width), width, False
    # per_head layout: one head is a contiguous slice, all heads of q, k or v an index set
    if head is None:
        index = torch.cat([torch.arange(h * 3 * hd + which * hd, h * 3 * hd + (which + 1) * hd) for h in range(nh)])
        return fused.path, mod, "output", 0, index, nh * hd, False
    start = head * 3 * hd + which * hd
    return fused.path, mod, "output", 0, slice(start, start + hd), hd, False


def _head(block, site: Site, dims: ModelDims):
    parent = archs.HEAD_COMPONENTS[site.component]
    n = dims.n_kv_heads if parent in ("key_output", "value_output") else dims.n_heads
    if not 0 <= site.head < n:
        raise SiteError(f"head {site.head} is out of range for {site.component}; valid heads are 0..{n - 1}")
    fam = archs.family_of(dims.model_type)
    if parent != "attention_value_output" and fam.fused_qkv is not None and parent not in fam.paths:
        return _fused(block, parent, dims, fam.fused_qkv, site.head)
    found = _component(block, Site(layer=site.layer, component=parent), dims)
    if found is None:
        return None
    rel, mod, side, index, _, width, flat = found
    hd = width // n
    return rel, mod, side, index, slice(site.head * hd, (site.head + 1) * hd), hd, flat


def decoder_root(model: nn.Module) -> nn.Module:
    """The module that owns the block list (it sees every generation step's input ids and cache)."""
    try:
        path, _ = find_blocks(model)
    except SiteError:
        return model
    parent = path.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model
