"""Language-specific MLP neurons by activation-probability entropy (LAPE; Tang et al., arXiv 2402.16438) and the
"language arithmetics" edits on them (Gurgurov et al., arXiv 2507.22608).

**Site.** A neuron is active on a token when the MLP's activation function output is > 0. For gated MLPs
(Llama-style `down_proj(act_fn(gate_proj x) * up_proj x)`) that is the output of `act_fn`, read and written at
the raw module site `module:<block>.mlp.act_fn:output` (the `mlp_activation` site there is the product with
`up_proj x`, whose sign is not the activation's); for plain MLPs (GPT-2) it is `L{l}.mlp_activation`.
`activation_site(model, layer)` picks it. The edits are applied at the same site, so filling an activation
with 0 silences the neuron exactly as the papers do.

**Statistics** (`activation_statistics`): per language k, layer l and neuron j, over every ordinary token of the
language's texts (special tokens such as BOS are not counted), the activation probability
`p[l, j, k] = #(act > 0) / n_k` and the mean activation `μ[l, j, k]`, accumulated in float64.

**Selection** (`select_language_neurons`, Tang et al.'s `identify.py` rules, their thresholds as defaults):
- normalise over languages `p' = p / Σ_k p` (0 where a neuron is never active) and take the entropy
  `H = −Σ_k p' log p'`;
- filter 1: a neuron whose largest `p` over languages is not above the `filter_rate` (0.95) quantile of all `p`
  values is dropped (H := +inf);
- keep the `top_rate` (0.01) lowest-entropy neurons of all L × d_ff (rounded, at least one);
- filter 2: a kept neuron belongs to language k when `p[l, j, k]` is above the `activation_bar_ratio` (0.95)
  quantile of all `p` values; a neuron may belong to several languages, or to none.
The quantile at ratio q is the k-th smallest value with k = round(q · count) (torch's `kthvalue`, as the
reference code does). Ties in entropy are broken by the lower flat index (layer-major).

**Edits** (`LanguageNeurons.vector(language, edit)`), on the language's neurons in every layer that has some,
at all positions (prompt and generated tokens), as a `SteeringVector` with unit `raw`:
- `deactivate`: `neuron_fill` with `value` (default 0: Tang's deactivation; Gurgurov also uses −1, −2.5);
- `additive`: `neuron_add` of μ_k (coefficient = Gurgurov's activation strength, default 1);
- `replacement`: `neuron_fill` with μ_k (coefficient 1 sets each neuron to the language's mean activation);
- `diffmean`: `neuron_add` of μ_k − mean over the other languages of μ.
The vector's report records every language's neuron set per layer, the thresholds and the token counts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .. import archs
from ..adapters import base_model_record
from ..chat import prompt_ids
from ..errors import ConfigError, DataError
from ..sites import Site, find_blocks, model_dims, resolve_site
from .data import Sequence
from .reading import iter_batches
from .vector import SteeringVector

log = logging.getLogger(__name__)

EDITS = ("deactivate", "additive", "replacement", "diffmean")
TOP_RATE = 0.01
FILTER_RATE = 0.95
ACTIVATION_BAR_RATIO = 0.95


def activation_site(model, layer: int) -> str:
    """The site of layer `layer`'s MLP activation-function output (module docstring)."""
    blocks_path, blocks = find_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ConfigError(f"layer {layer} is out of range; valid layers are 0..{len(blocks) - 1}")
    block = blocks[layer]
    for name in archs.MLP:
        mlp = getattr(block, name, None)
        if mlp is None:
            continue
        act = getattr(mlp, "act_fn", None)
        gated = any(hasattr(mlp, n) for n in ("up_proj", "w3", "gate_up_proj"))
        if gated and isinstance(act, torch.nn.Module):
            return Site(module=f"{blocks_path}.{layer}.{name}.act_fn", side="output").name
        break
    return Site(layer=layer, component="mlp_activation").name


def read_language_texts(texts) -> dict[str, list[str]]:
    """`{language: [texts]}` from a dict of lists or from rows `{"language", "text"}` (the order of first
    appearance is kept); every text a non-empty string, at least two languages."""
    if isinstance(texts, dict):
        out = {}
        for lang, values in texts.items():
            if not isinstance(lang, str) or not lang:
                raise DataError(f"language names must be non-empty strings, got {lang!r}")
            if isinstance(values, str) or not hasattr(values, "__iter__"):
                raise DataError(f"language {lang!r}: expected a list of texts, got {type(values).__name__}")
            out[lang] = list(values)
    else:
        if isinstance(texts, str) or not hasattr(texts, "__iter__"):
            raise DataError(f"texts must be {{language: [texts]}} or rows {{language, text}}, got "
                            f"{type(texts).__name__}")
        out = {}
        for i, row in enumerate(texts):
            if not isinstance(row, dict) or set(row) != {"language", "text"}:
                raise DataError(f"row {i}: expected {{\"language\", \"text\"}}, got {row!r}")
            if not isinstance(row["language"], str) or not row["language"]:
                raise DataError(f"row {i}: language must be a non-empty string, got {row['language']!r}")
            out.setdefault(row["language"], []).append(row["text"])
    for lang, values in out.items():
        if not values:
            raise DataError(f"language {lang!r} has no texts")
        for i, t in enumerate(values):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"language {lang!r}, text {i}: expected a non-empty string, got {t!r}")
    if len(out) < 2:
        raise DataError(f"LAPE compares languages: got {len(out)} ({', '.join(out) or 'none'}); give at least two")
    return out


def _batches(tokenizer, texts: list[str], chat: bool, batch_size: int, lang: str):
    special = set(tokenizer.all_special_ids or [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    seqs = []
    for i, text in enumerate(texts):
        ids = list(prompt_ids(tokenizer, text, chat))
        if not any(t not in special for t in ids):
            raise DataError(f"language {lang!r}, text {i} has no ordinary token to count")
        seqs.append(Sequence(ids, len(ids), i, lang))
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        T = max(len(q.ids) for q in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, q in enumerate(chunk):
            ids[b, :len(q.ids)] = torch.tensor(q.ids)
            mask[b, :len(q.ids)] = 1
        read = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(special), dtype=torch.long))
        out.append(({"input_ids": ids, "attention_mask": mask}, read))
    return out


@torch.no_grad()
def activation_statistics(model, tokenizer, texts, *, layers=None, chat: bool = False, batch_size: int = 16,
                          progress: bool = False) -> dict:
    """-> {"languages", "layers", "sites", "probabilities" [L, d_ff, K], "mean_activation" [L, d_ff, K] (float64),
    "tokens" {language: n}} (module docstring)."""
    texts = read_language_texts(texts)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = model_dims(model).n_layers
    layers = list(range(n)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n]
    if bad or not layers:
        raise ConfigError(f"layers must be layer numbers in 0..{n - 1}, got {layers!r}")
    sites = [Site.parse(activation_site(model, l)) for l in layers]
    batches = {lang: _batches(tokenizer, values, chat, batch_size, lang) for lang, values in texts.items()}
    over, total, tokens = [], [], {}
    for lang, lang_batches in batches.items():
        count = {s.name: None for s in sites}
        summed = {s.name: None for s in sites}
        seen = 0
        for counts, collected in iter_batches(model, lang_batches, sites, progress=progress,
                                              desc=f"activations ({lang})"):
            seen += int(counts.sum())
            for name, v in collected.items():
                valid = (torch.arange(v.shape[1])[None, :] < counts[:, None])[..., None]
                c = ((v > 0) & valid).sum((0, 1)).double()
                a = (v.double() * valid).sum((0, 1))
                count[name] = c if count[name] is None else count[name] + c
                summed[name] = a if summed[name] is None else summed[name] + a
        widths = {count[s.name].shape[0] for s in sites}
        if len(widths) != 1:
            raise DataError(f"the MLP activations have different widths across layers ({sorted(widths)})")
        tokens[lang] = seen
        over.append(torch.stack([count[s.name] for s in sites]) / seen)
        total.append(torch.stack([summed[s.name] for s in sites]) / seen)
    return {"languages": list(texts), "layers": layers, "sites": [s.name for s in sites],
            "probabilities": torch.stack(over, -1), "mean_activation": torch.stack(total, -1), "tokens": tokens}


def _kth(values: torch.Tensor, ratio: float) -> float:
    k = min(max(round(values.numel() * ratio), 1), values.numel())
    return float(values.flatten().kthvalue(k).values)


def select_language_neurons(probabilities: torch.Tensor, *, top_rate: float = TOP_RATE,
                            filter_rate: float = FILTER_RATE,
                            activation_bar_ratio: float = ACTIVATION_BAR_RATIO) -> dict:
    """LAPE on `[L, d_ff, K]` activation probabilities -> `{"neurons": [K][L] sorted index lists, "entropy" [L, d_ff],
    "selected": [(layer, neuron)], "filter_value", "activation_bar"}` (module docstring)."""
    for name, value in (("top_rate", top_rate), ("filter_rate", filter_rate),
                        ("activation_bar_ratio", activation_bar_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")
    p = probabilities.double()
    if p.dim() != 3 or p.shape[-1] < 2:
        raise DataError(f"activation probabilities must be [layers, neurons, languages >= 2], got {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or bool((p > 1).any()):
        raise DataError("activation probabilities must be finite numbers in [0, 1]")
    L, D, K = p.shape
    total = p.sum(-1, keepdim=True)
    normed = torch.where(total > 0, p / total.clamp(min=1e-300), torch.zeros_like(p))
    logs = torch.where(normed > 0, normed.clamp(min=1e-300).log(), torch.zeros_like(normed))
    entropy = -(normed * logs).sum(-1)
    filter_value = _kth(p, filter_rate)
    entropy = torch.where((p > filter_value).any(-1), entropy, torch.full_like(entropy, float("inf")))
    n_keep = min(max(round(L * D * top_rate), 1), L * D)
    flat = entropy.flatten()
    order = sorted(range(flat.numel()), key=lambda i: (float(flat[i]), i))[:n_keep]
    bar = _kth(p, activation_bar_ratio)
    neurons = [[[] for _ in range(L)] for _ in range(K)]
    for i in order:
        layer, j = divmod(i, D)
        for k in range(K):
            if float(p[layer, j, k]) > bar:
                neurons[k][layer].append(j)
    neurons = [[sorted(x) for x in per_lang] for per_lang in neurons]
    return {"neurons": neurons, "entropy": entropy, "selected": [divmod(i, D) for i in order],
            "filter_value": filter_value, "activation_bar": bar}


@dataclass
class LanguageNeurons:
    """Per language, the LAPE neurons of each layer read, and the statistics they were chosen from."""

    languages: list
    layers: list
    sites: list
    neurons: dict  # language -> {layer: [neuron indices]}
    probabilities: torch.Tensor  # [L, d_ff, K]
    mean_activation: torch.Tensor  # [L, d_ff, K]
    entropy: torch.Tensor  # [L, d_ff]
    tokens: dict
    options: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    model_hint: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)

    def count(self, language: str) -> int:
        return sum(len(v) for v in self._language(language).values())

    def _language(self, language: str) -> dict:
        if language not in self.neurons:
            raise ConfigError(f"unknown language {language!r}; these neurons cover {', '.join(self.languages)}")
        return self.neurons[language]

    def summary(self) -> dict:
        """JSON data: per language its neuron count per layer and in all, plus the thresholds and token counts."""
        return {"languages": {lang: {"total": self.count(lang), "per_layer": {str(l): len(idx) for l, idx in
                                                                             self.neurons[lang].items()}}
                              for lang in self.languages},
                "tokens": dict(self.tokens), "options": dict(self.options)}

    def vector(self, language: str, edit: str = "deactivate", *, value: float = 0.0) -> SteeringVector:
        """The `edit` of `language`'s neurons as a `SteeringVector` (module docstring)."""
        if edit not in EDITS:
            raise ConfigError(f"unknown LAPE edit {edit!r}; expected one of {EDITS}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not torch.isfinite(torch.tensor(value)):
            raise ConfigError(f"value must be a finite number, got {value!r}")
        if value != 0 and edit != "deactivate":
            raise ConfigError(f"value is the fill of a deactivation; edit {edit!r} uses the language's mean "
                              "activation (scale it with the coefficient)")
        sets = self._language(language)
        k = self.languages.index(language)
        directions, neurons = {}, {}
        for i, (layer, site) in enumerate(zip(self.layers, self.sites)):
            idx = sets.get(layer, [])
            if not idx:
                continue
            mu = self.mean_activation[i, :, k]
            if edit == "deactivate":
                v = torch.full_like(mu, float(value))
            elif edit == "diffmean":
                others = [j for j in range(len(self.languages)) if j != k]
                v = mu - self.mean_activation[i][:, others].mean(-1)
            else:
                v = mu
            directions[site] = v.float()
            neurons[site] = list(idx)
        if not directions:
            raise DataError(f"language {language!r} has no LAPE neurons at these thresholds; raise top_rate or give "
                            "more text")
        operator = "neuron_add" if edit in ("additive", "diffmean") else "neuron_fill"
        report = {"method": "lape", "options": {**self.options, "language": language, "edit": edit, "value": value},
                  "read": "every ordinary token", "layers": [l for l, s in zip(self.layers, self.sites)
                                                             if s in directions],
                  "counts": dict(self.tokens), "neurons": {lang: {str(l): v for l, v in per.items() if v}
                                                           for lang, per in self.neurons.items()},
                  "summary": self.summary()["languages"], "direction_kind": "neuron_values",
                  "warnings": list(self.warnings), "timing": dict(self.timing)}
        return SteeringVector(directions=directions, method="lape", operator=operator,
                              operator_config={"neurons": neurons}, scope="all@all", unit="raw",
                              counts={"tokens": dict(self.tokens)}, model_hint=dict(self.model_hint), report=report)


def lape(model, tokenizer, texts, *, layers=None, top_rate: float = TOP_RATE, filter_rate: float = FILTER_RATE,
         activation_bar_ratio: float = ACTIVATION_BAR_RATIO, chat: bool = False, batch_size: int = 16,
         progress: bool = False) -> LanguageNeurons:
    """Read `texts` ({language: [texts]} or rows {language, text}) and select each language's neurons."""
    start = time.perf_counter()
    stats = activation_statistics(model, tokenizer, texts, layers=layers, chat=chat, batch_size=batch_size,
                                  progress=progress)
    read_s = time.perf_counter() - start
    chosen = select_language_neurons(stats["probabilities"], top_rate=top_rate, filter_rate=filter_rate,
                                     activation_bar_ratio=activation_bar_ratio)
    neurons = {lang: {l: chosen["neurons"][k][i] for i, l in enumerate(stats["layers"])}
               for k, lang in enumerate(stats["languages"])}
    warnings = [f"language {lang!r} got no neuron" for lang in stats["languages"]
                if not any(neurons[lang].values())]
    if chosen["filter_value"] >= float(stats["probabilities"].max()):
        warnings.append(f"the {filter_rate} quantile of the activation probabilities is their maximum "
                        f"({chosen['filter_value']:.3g}), so no neuron is above it; give more (or more varied) text")
    small = [lang for lang, n in stats["tokens"].items() if n < 1000]
    if small:
        warnings.append(f"few tokens for {', '.join(small)} (under 1000): activation probabilities are noisy; "
                        "Tang et al. count millions")
    for w in warnings:
        log.warning("%s", w)
    for s in stats["sites"]:
        resolve_site(model, s)  # the site exists (the reading went through it)
    options = {"top_rate": top_rate, "filter_rate": filter_rate, "activation_bar_ratio": activation_bar_ratio,
               "chat": chat, "filter_value": chosen["filter_value"], "activation_bar": chosen["activation_bar"]}
    log.info("LAPE: %s", ", ".join(f"{lang} {sum(len(v) for v in neurons[lang].values())}" for lang in neurons))
    return LanguageNeurons(stats["languages"], stats["layers"], stats["sites"], neurons, stats["probabilities"],
                           stats["mean_activation"], chosen["entropy"], stats["tokens"], options, warnings,
                           base_model_record(model),
                           {"read_s": read_s, "fit_s": time.perf_counter() - start - read_s})


__all__ = ["EDITS", "LanguageNeurons", "activation_site", "activation_statistics", "lape", "read_language_texts",
           "select_language_neurons"]
