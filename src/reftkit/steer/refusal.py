"""Refusal directions (Arditi et al., arXiv 2406.11717): candidates over post-instruction positions × layers,
selected by bypass, induce and KL filters; applied as directional ablation everywhere or as an addition.

`refusal_direction(model, tokenizer, harmful, harmless)` reads `L{l}.block_input` at each post-instruction
position (the chat-template tokens after the user's instruction, `instruction_suffix`; the instruction is the
user turn, after a `system` turn when one is given) of every harmful and harmless instruction, and forms the
candidates `r[i, l] = mean_harmful(i, l) − mean_harmless(i, l)` (float64 means). Each candidate is scored on held-out prompts (`val_harmful` / `val_harmless`, else a seeded
`val_ratio` split of the given ones), at the last prompt position, i.e. the distribution of the first generated
token:

- the **refusal score** of a prompt is the log-odds `log p(R) − log(1 − p(R))` of the refusal-start tokens R
  (`refusal_token_ids`: the first token of each phrase in `REFUSAL_STARTS`, or of the phrases given);
- `bypass`: the mean refusal score on harmful prompts with r̂ ablated (`h − r̂r̂ᵀh`) at every layer's block
  input, attention output and MLP output, every position (what the paper ablates);
- `induce`: the mean refusal score on harmless prompts with `+r` (un-normalised) added at `L{l}.block_input`;
- `kl`: the mean KL(base ‖ ablated) of the last-position next-token distribution on harmless prompts.

Candidates at layers `l ≥ int((1 − prune_layer_fraction)·L)` are not scored (the paper's default keeps the first
80% of layers), nor are zero ones (at layer 0 the template's tokens are the same embeddings); of the rest, those
with `kl > kl_threshold` (0.1) or `induce < induce_threshold` (0) are filtered out, and the lowest `bypass` wins.
When none passes, the lowest bypass of all scored candidates is taken and a warning says so.

The result is a `SteeringVector` (method `refusal`, unit `raw`, scope every token) whose direction at each site
is the raw r of the winner: `operator="ablate"` puts it at `L{k}.block_input`, `L{k}.attention_output` and
`L{k}.mlp_output` for every layer k (coefficient 1 is full directional ablation), `operator="add"` at
`L{l*}.block_input` only (coefficient 1 induces refusal, −1 is the paper's subtraction).
`refusal_addition(vector)` turns an ablation vector into the addition. The report lists every candidate's
scores, the selected one and the base refusal scores.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from ..adapters import base_model_record
from ..chat import prompt_ids
from ..errors import ConfigError, DataError
from ..positions import Positions
from ..sites import Site, model_dims
from .data import Sequence, padded_batch
from .reading import iter_batches, read_sites
from .vector import SteeringVector

log = logging.getLogger(__name__)

REFUSAL_STARTS = ("I", "I'm", "Sorry", "As", "Unfortunately", "No")
OPERATORS = ("ablate", "add")
ABLATION_COMPONENTS = ("block_input", "attention_output", "mlp_output")
_SENTINEL = "\u2063INSTRUCTION\u2063"


# ------------------------------------------------------------------------------------------------- the data

def refusal_token_ids(tokenizer, starts=REFUSAL_STARTS) -> list[int]:
    """The first token of each refusal-start phrase (tokenised without special tokens), without repeats."""
    if isinstance(starts, str) or not starts:
        raise DataError(f"refusal starts must be a non-empty list of phrases, got {starts!r}")
    out = []
    for phrase in starts:
        if not isinstance(phrase, str) or not phrase:
            raise DataError(f"refusal start {phrase!r} must be a non-empty string")
        ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"refusal start {phrase!r} tokenises to nothing")
        if ids[0] not in out:
            out.append(int(ids[0]))
    return out


def instruction_suffix(tokenizer, chat: bool = True) -> list[int]:
    """The tokens the chat template puts after the user's instruction (with the assistant turn opened); empty
    without a chat template."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return []
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    tail = text[text.rindex(_SENTINEL) + len(_SENTINEL):]
    return list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []


def _prompts(values, what: str) -> list[str]:
    if isinstance(values, str) or not hasattr(values, "__iter__"):
        raise DataError(f"{what} must be a list of instructions, got {type(values).__name__}")
    values = list(values)
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{what}[{i}] must be a non-empty string, got {v!r}")
    return values


def _split(prompts: list[str], ratio: float, seed: int, what: str) -> tuple[list[str], list[str]]:
    n_val = max(1, round(len(prompts) * ratio))
    if len(prompts) - n_val < 1:
        raise DataError(f"{what}: {len(prompts)} prompt(s) cannot be split into training and validation "
                        f"(val_ratio={ratio}); give more, or val_harmful / val_harmless")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [prompts[i] for i in order[n_val:]], [prompts[i] for i in order[:n_val]]


# ----------------------------------------------------------------------------------------------- the math

def refusal_scores(logits: torch.Tensor, token_ids) -> torch.Tensor:
    """Per row of `[B, V]` logits: log p(R) − log(1 − p(R)), float64, for the token set R."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    lp = torch.logsumexp(logp[:, list(token_ids)], dim=-1).clamp(max=-1e-12)
    return lp - torch.log(-torch.expm1(lp))


def kl_divergence(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row: KL(base ‖ other) of the next-token distributions, float64."""
    p = torch.log_softmax(base_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1)


def candidate_directions(harmful: dict, harmless: dict) -> dict:
    """`{site: [N, E, d]}` per class -> `{site: [E, d]}` float64 mean differences (harmful − harmless)."""
    out = {}
    for site, h in harmful.items():
        out[site] = h.double().mean(0) - harmless[site].double().mean(0)
    return out


def select_candidate(candidates: list[dict], *, kl_threshold: float, induce_threshold: float) -> tuple[dict, bool]:
    """-> (the scored candidate with the lowest bypass among those with kl ≤ kl_threshold and induce ≥
    induce_threshold, True), or (the lowest bypass of all scored ones, False) when none passes. Candidates
    without scores (pruned layers) are skipped."""
    scored = [c for c in candidates if c.get("bypass") is not None]
    if not scored:
        raise DataError("no refusal-direction candidate was scored (pruned layers and zero directions only); "
                        "lower prune_layer_fraction or give earlier layers")
    for c in scored:
        reasons = []
        if not c["kl"] <= kl_threshold:
            reasons.append(f"kl {c['kl']:.3g} > {kl_threshold}")
        if not c["induce"] >= induce_threshold:
            reasons.append(f"induce {c['induce']:.3g} < {induce_threshold}")
        if not math.isfinite(c["bypass"]):
            reasons.append("bypass is not finite")
        c["passed"] = not reasons
        c["filtered"] = reasons
    passing = [c for c in scored if c["passed"]]
    pool = passing or [c for c in scored if math.isfinite(c["bypass"])] or scored
    best = min(pool, key=lambda c: (c["bypass"], c["layer"], c["position"]))
    return best, bool(passing)


# ------------------------------------------------------------------------------------------------ vectors

def ablation_sites(n_layers: int) -> list[str]:
    return [Site(layer=k, component=c).name for k in range(n_layers) for c in ABLATION_COMPONENTS]


def _vector(direction: torch.Tensor, sites: list[str], operator: str, *, hidden_norm: float, model_hint: dict,
            counts: dict, report: dict) -> SteeringVector:
    r = direction.float().contiguous()
    scales = {}
    for s in sites:
        scales[f"{s}/mean_diff_norm"] = float(r.norm())
        scales[f"{s}/hidden_norm"] = float(hidden_norm)
    return SteeringVector(directions={s: r.clone() for s in sites}, method="refusal", operator=operator,
                          scope="all@all", unit="raw", scales=scales, counts=counts, model_hint=model_hint,
                          report=report)


def refusal_addition(vector: SteeringVector) -> SteeringVector:
    """The addition form of a refusal vector: its direction r at `L{l*}.block_input` (the selected layer),
    operator `add` (coefficient 1 induces refusal, −1 subtracts the direction)."""
    selected = (vector.report or {}).get("selected") or {}
    if vector.method != "refusal" or "layer" not in selected:
        raise ConfigError("refusal_addition takes a vector made by refusal_direction (its report names the "
                          "selected layer)")
    site = Site(layer=int(selected["layer"]), component="block_input").name
    r = next(iter(vector.directions.values()))
    hidden = vector.scales.get(f"{next(iter(vector.directions))}/hidden_norm", 0.0)
    report = {**vector.report, "options": {**vector.report.get("options", {}), "operator": "add"}}
    return _vector(r, [site], "add", hidden_norm=hidden, model_hint=vector.model_hint, counts=vector.counts,
                   report=report)


# ----------------------------------------------------------------------------------------------- the model

def instruction_ids(tokenizer, text: str, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids of one instruction as the user turn (after a `system` turn when given), assistant turn opened."""
    if system is None or not chat or not getattr(tokenizer, "chat_template", None):
        return list(prompt_ids(tokenizer, text, chat))
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def _sequences(tokenizer, prompts: list[str], suffix: list[int], chat: bool, what: str,
               system: str | None = None) -> list[Sequence]:
    out = []
    for i, text in enumerate(prompts):
        ids = instruction_ids(tokenizer, text, chat, system)
        if suffix and ids[-len(suffix):] != suffix:
            raise DataError(f"{what}[{i}]: its tokens do not end with the chat template's post-instruction tokens "
                            f"{suffix} (the instruction's end merges with the template); end it with a space or "
                            "punctuation, or give positions=1")
        if len(ids) < 1:
            raise DataError(f"{what}[{i}] tokenises to nothing")
        out.append(Sequence(ids, len(ids), i, what))
    return out


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _batches(seqs, read, pad: int, batch_size: int, padding_side: str = "right"):
    return [padded_batch(seqs[i:i + batch_size], read, pad, padding_side) for i in range(0, len(seqs), batch_size)]


def _read_positions(model, seqs, sites, n_positions: int, pad: int, batch_size: int) -> dict:
    """`{site: [N, E, d]}`: each sequence's last E tokens at each site, in order."""
    out = {s.name: [] for s in sites}
    for counts, collected in iter_batches(model, _batches(seqs, Positions.first_last(0, n_positions), pad,
                                                          batch_size), sites):
        if bool((counts != n_positions).any()):
            raise DataError(f"a prompt has fewer than {n_positions} tokens to read")
        for name, v in collected.items():
            out[name].append(v[:, :n_positions])
    return {name: torch.cat(v) for name, v in out.items()}


@torch.no_grad()
def _last_logits(model, seqs, pad: int, batch_size: int, steered=None) -> torch.Tensor:
    """The next-token logits `[N, V]` after each prompt (left-padded, positions from the mask), optionally steered."""
    from .reading import _model_device, accepts

    device = _model_device(model)
    rows = []
    for inputs, _ in _batches(seqs, "last", pad, batch_size, "left"):
        mask = inputs["attention_mask"]
        kwargs = {k: v.to(device) for k, v in inputs.items()}
        if accepts(model, "position_ids"):
            kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0).to(device)
        out = model(**kwargs, use_cache=False) if steered is None else steered.run(kwargs, use_cache=False).output
        rows.append(out.logits[:, -1].float().cpu())
    return torch.cat(rows)


def refusal_direction(model, tokenizer, harmful, harmless, *, val_harmful=None, val_harmless=None,
                      val_ratio: float = 0.25, seed: int = 0, layers=None, positions: int | None = None,
                      refusal_starts=REFUSAL_STARTS, kl_threshold: float = 0.1, induce_threshold: float = 0.0,
                      prune_layer_fraction: float = 0.2, operator: str = "ablate", chat: bool = True,
                      system: str | None = None,
                      batch_size: int = 16, progress: bool = False) -> SteeringVector:
    """Arditi et al.'s refusal direction (see the module docstring)."""
    start = time.perf_counter()
    if operator not in OPERATORS:
        raise ConfigError(f"unknown refusal operator {operator!r}; expected one of {OPERATORS}")
    for name, value in (("kl_threshold", kl_threshold), ("induce_threshold", induce_threshold),
                        ("val_ratio", val_ratio), ("prune_layer_fraction", prune_layer_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not 0 < val_ratio < 1 or not 0 <= prune_layer_fraction < 1:
        raise ConfigError(f"val_ratio must lie in (0, 1) and prune_layer_fraction in [0, 1), got {val_ratio}, "
                          f"{prune_layer_fraction}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    harmful, harmless = _prompts(harmful, "harmful"), _prompts(harmless, "harmless")
    if not harmful or not harmless:
        raise DataError("refusal_direction needs harmful and harmless instructions (at least one of each)")
    if (val_harmful is None) != (val_harmless is None):
        raise DataError("give both val_harmful and val_harmless, or neither (then val_ratio splits the prompts)")
    if val_harmful is None:
        harmful, val_harmful = _split(harmful, val_ratio, seed, "harmful")
        harmless, val_harmless = _split(harmless, val_ratio, seed + 1, "harmless")
    else:
        val_harmful, val_harmless = _prompts(val_harmful, "val_harmful"), _prompts(val_harmless, "val_harmless")
        if not val_harmful or not val_harmless:
            raise DataError("val_harmful and val_harmless must hold at least one instruction each")
    tokens = refusal_token_ids(tokenizer, refusal_starts)
    suffix = instruction_suffix(tokenizer, chat)
    warnings = []
    if not suffix:
        warnings.append("no chat template: the only candidate position is the instruction's last token")
    n_pos = len(suffix) or 1
    if positions is not None:
        if isinstance(positions, bool) or not isinstance(positions, int) or not 1 <= positions <= n_pos:
            raise ConfigError(f"positions must be an integer in 1..{n_pos} (the post-instruction tokens), got "
                              f"{positions!r}")
        n_pos = positions
    sites = read_sites(model, layers=layers)
    sites = [Site(layer=s.layer, component="block_input") for s in sites]
    n_layers = model_dims(model).n_layers
    pad = _pad_id(tokenizer)
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise ConfigError(f"system must be a non-empty string (a system prompt), got {system!r}")
    seqs = {what: _sequences(tokenizer, prompts, suffix, chat, what, system) for what, prompts in
            (("harmful", harmful), ("harmless", harmless), ("val_harmful", val_harmful),
             ("val_harmless", val_harmless))}

    acts_h = _read_positions(model, seqs["harmful"], sites, n_pos, pad, batch_size)
    acts_n = _read_positions(model, seqs["harmless"], sites, n_pos, pad, batch_size)
    directions = candidate_directions(acts_h, acts_n)
    hidden = {s: torch.cat([acts_h[s], acts_n[s]]).norm(dim=-1).double().mean(0) for s in acts_h}  # [E]
    read_s = time.perf_counter() - start

    from .apply import steer

    val = seqs["val_harmful"] + seqs["val_harmless"]
    n_vh = len(seqs["val_harmful"])
    base_val = _last_logits(model, val, pad, batch_size)
    base_harmful = float(refusal_scores(base_val[:n_vh], tokens).mean())
    base_harmless = float(refusal_scores(base_val[n_vh:], tokens).mean())
    cutoff = int(n_layers * (1.0 - prune_layer_fraction))  # as the reference code rounds it
    candidates = []
    work = [(s, i) for s in sites for i in range(n_pos)]
    iterator = work
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(work, desc="score candidates", unit="candidate", leave=False)
    # one ablating model for every candidate: its 3·L interventions get each candidate's direction in turn
    template = _vector(torch.ones(model_dims(model).hidden), ablation_sites(n_layers), "ablate", hidden_norm=0.0,
                       model_hint={}, counts={}, report={})
    with steer(model, [(template, 1.0)], check_weights=False) as ablating:
        slots = [iv.direction for iv in ablating.intervenable.interventions]
        for site, i in iterator:
            r = directions[site.name][i]
            entry = {"layer": site.layer, "position": i - n_pos, "norm": float(r.norm()),
                     "relative_norm": float(r.norm()) / max(float(hidden[site.name][i]), 1e-12)}
            candidates.append(entry)
            if site.layer >= cutoff:
                entry.update(bypass=None, induce=None, kl=None, passed=False, filtered=["pruned layer"])
                continue
            if float(r.norm()) == 0.0:  # e.g. layer 0, where the template's tokens have the same embedding
                entry.update(bypass=None, induce=None, kl=None, passed=False, filtered=["zero direction"])
                continue
            with torch.no_grad():
                for slot in slots:
                    slot.copy_(r.to(slot.dtype))
            ablated = _last_logits(model, val, pad, batch_size, ablating)
            add = _vector(r, [site.name], "add", hidden_norm=0.0, model_hint={}, counts={}, report={})
            with ablating.intervenable.disabled(), steer(model, [(add, 1.0)], check_weights=False) as steered:
                induced = _last_logits(model, seqs["val_harmless"], pad, batch_size, steered)
            entry.update(bypass=float(refusal_scores(ablated[:n_vh], tokens).mean()),
                         induce=float(refusal_scores(induced, tokens).mean()),
                         kl=float(kl_divergence(base_val[n_vh:], ablated[n_vh:]).mean()))
    best, passed = select_candidate(candidates, kl_threshold=kl_threshold, induce_threshold=induce_threshold)
    if not passed:
        warnings.append(f"no candidate passed the filters (kl ≤ {kl_threshold}, induce ≥ {induce_threshold}); took "
                        f"the lowest bypass of all: layer {best['layer']}, position {best['position']}")
    if best["bypass"] >= base_harmful:
        warnings.append(f"ablating the selected direction does not lower the refusal score on harmful prompts "
                        f"({best['bypass']:.3g} vs base {base_harmful:.3g}); the model may not refuse these prompts")
    for w in warnings:
        log.warning("%s", w)
    site_name = Site(layer=best["layer"], component="block_input").name
    r = directions[site_name][best["position"] + n_pos]
    options = {"val_ratio": val_ratio, "seed": seed, "positions": n_pos, "refusal_starts": list(refusal_starts),
               "refusal_token_ids": tokens, "kl_threshold": kl_threshold, "induce_threshold": induce_threshold,
               "prune_layer_fraction": prune_layer_fraction, "operator": operator, "chat": chat, "system": system}
    counts = {"harmful": len(harmful), "harmless": len(harmless), "val_harmful": len(val_harmful),
              "val_harmless": len(val_harmless)}
    report = {"method": "refusal", "options": options, "counts": counts, "read": f"l{n_pos}",
              "post_instruction_tokens": suffix, "layers": [s.layer for s in sites],
              "selected": {**best, "passed_filters": passed},
              "sites": {site_name: {"norm": best["norm"], "relative_norm": best["relative_norm"],
                                    "hidden_norm": float(hidden[site_name][best["position"] + n_pos])}},
              "base": {"harmful_refusal_score": base_harmful, "harmless_refusal_score": base_harmless},
              "candidates": candidates, "direction_kind": "raw", "warnings": warnings,
              "timing": {"read_s": read_s, "fit_s": time.perf_counter() - start - read_s}}
    log.info("refusal direction: layer %d, position %d (bypass %.3g, induce %.3g, kl %.3g)", best["layer"],
             best["position"], best["bypass"], best["induce"], best["kl"])
    targets = ablation_sites(n_layers) if operator == "ablate" else [site_name]
    return _vector(r, targets, operator, hidden_norm=float(hidden[site_name][best["position"] + n_pos]),
                   model_hint=base_model_record(model),
                   counts=counts, report=report)


__all__ = ["REFUSAL_STARTS", "ablation_sites", "candidate_directions", "instruction_ids", "instruction_suffix",
           "kl_divergence",
           "refusal_addition", "refusal_direction", "refusal_scores", "refusal_token_ids", "select_candidate"]
