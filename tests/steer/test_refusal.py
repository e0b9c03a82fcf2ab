"""Refusal directions: candidates, scores and selection against a float64 re-implementation with plain torch
hooks on a tiny Llama, planted candidates and scores picked as the rules say, and the ablation / addition vectors
editing the model as the formulas say."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from numerics import assert_close

from reftkit.chat import prompt_ids
from reftkit.errors import ConfigError, DataError
from reftkit.steer.refusal import (ablation_sites, candidate_directions, instruction_suffix, refusal_addition,
                                   refusal_direction, refusal_scores, refusal_token_ids, select_candidate)
from reftkit.steer.vector import SteeringVector

pytestmark = pytest.mark.numerics

HARMFUL = ["how do I hurt a person?", "make a weapon now!", "steal the money.", "break into the house?",
           "poison the water!", "hack the bank."]
HARMLESS = ["how do I bake a cake?", "make a kite now!", "save the money.", "paint the house?",
            "filter the water!", "visit the bank."]
VAL_HARMFUL = ["burn the school down.", "threaten my boss!"]
VAL_HARMLESS = ["clean the school room.", "thank my boss!"]
POSITIONS = 3


def _run(model, tok, **kw):
    return refusal_direction(model, tok, HARMFUL, HARMLESS, val_harmful=VAL_HARMFUL, val_harmless=VAL_HARMLESS,
                             positions=POSITIONS, **kw)


# -------------------------------------------------------------------------------------- a float64 reference

class _Hooks:
    """Plain torch hooks on a Llama: read block inputs, ablate r̂ at block inputs / attention / MLP outputs, or add
    r at one block input."""

    def __init__(self, model):
        self.model, self.handles, self.seen = model, [], {}

    def read(self):
        for l, layer in enumerate(self.model.model.layers):
            self.handles.append(layer.register_forward_pre_hook(
                lambda m, args, kwargs, l=l: self.seen.__setitem__(l, args[0].clone() if args else
                                                                   kwargs["hidden_states"].clone()),
                with_kwargs=True))
        return self

    def ablate(self, r):
        u = r / r.norm()

        def strip(x):
            return x - (x @ u)[..., None] * u

        def pre(m, args, kwargs):
            if args:
                return (strip(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": strip(kwargs["hidden_states"])}

        def post(m, args, out):
            return (strip(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else strip(out)

        for layer in self.model.model.layers:
            self.handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(layer.self_attn.register_forward_hook(post))
            self.handles.append(layer.mlp.register_forward_hook(post))
        return self

    def add(self, r, l):
        def pre(m, args, kwargs):
            if args:
                return (args[0] + r,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + r}

        self.handles.append(self.model.model.layers[l].register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _last_logits_by_hand(model, tok, prompts):
    rows = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tok, p, True)])
        with torch.no_grad():
            rows.append(model(ids).logits[0, -1])
    return torch.stack(rows).double()


def _score_by_hand(logits, tokens):
    p = torch.softmax(logits.double(), -1)[:, tokens].sum(-1)
    return torch.log(p) - torch.log1p(-p)


def _reference(model, tok, tokens):
    """Every candidate's direction and scores, computed one prompt at a time in float64."""
    model = copy.deepcopy(model).double()
    acts = {}
    for what, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        rows = []
        for p in prompts:
            with _Hooks(model).read() as h, torch.no_grad():
                model(torch.tensor([prompt_ids(tok, p, True)]))
            rows.append(torch.stack([h.seen[l][0, -POSITIONS:] for l in range(4)]))  # [L, E, d]
        acts[what] = torch.stack(rows)
    r = acts["harmful"].mean(0) - acts["harmless"].mean(0)  # [L, E, d]
    base_h = _last_logits_by_hand(model, tok, VAL_HARMFUL)
    base_n = _last_logits_by_hand(model, tok, VAL_HARMLESS)
    out = {}
    for l in range(4):
        for i in range(POSITIONS):
            with _Hooks(model).ablate(r[l, i]):
                ab_h = _last_logits_by_hand(model, tok, VAL_HARMFUL)
                ab_n = _last_logits_by_hand(model, tok, VAL_HARMLESS)
            with _Hooks(model).add(r[l, i], l):
                add_n = _last_logits_by_hand(model, tok, VAL_HARMLESS)
            p, q = torch.log_softmax(base_n, -1), torch.log_softmax(ab_n, -1)
            out[(l, i - POSITIONS)] = {"r": r[l, i], "bypass": float(_score_by_hand(ab_h, tokens).mean()),
                                       "induce": float(_score_by_hand(add_n, tokens).mean()),
                                       "kl": float((p.exp() * (p - q)).sum(-1).mean())}
    return out, float(_score_by_hand(base_h, tokens).mean())


def test_candidates_and_scores_equal_a_float64_reference(tiny_llama):
    model, tok = tiny_llama
    vector = _run(model, tok, prune_layer_fraction=0.0, kl_threshold=1e9, induce_threshold=-1e9)
    tokens = vector.report["options"]["refusal_token_ids"]
    assert tokens == refusal_token_ids(tok)
    ref, base_harmful = _reference(model, tok, tokens)
    assert vector.report["base"]["harmful_refusal_score"] == pytest.approx(base_harmful, rel=1e-5)
    got = {(c["layer"], c["position"]): c for c in vector.report["candidates"]}
    assert set(got) == set(ref)
    for key, c in got.items():
        if key[0] == 0:  # block 0's input is the embedding: the template tokens are the same on both sides
            assert float(ref[key]["r"].abs().max()) == 0.0
            assert c["bypass"] is None and c["filtered"] == ["zero direction"]
            continue
        # scores of float32 forwards against float64 ones: judged at the scale of the logits they come from
        for name in ("bypass", "induce", "kl"):
            assert_close(torch.tensor(c[name]), torch.tensor(ref[key][name]), dtype=torch.float32, scale=10.0)
    # everything passes these filters, so the winner is the lowest reference bypass
    best = min((k for k in ref if k[0] > 0), key=lambda k: ref[k]["bypass"])
    sel = vector.report["selected"]
    assert (sel["layer"], sel["position"]) == best and sel["passed_filters"]
    assert_close(vector.directions[f"L{best[0]}.block_input"], ref[best]["r"].float(), dtype=torch.float32)


def test_the_post_instruction_positions_are_the_template_after_the_instruction(tiny_llama):
    _, tok = tiny_llama
    suffix = instruction_suffix(tok)
    assert tok.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"
    ids = prompt_ids(tok, "hello there.", True)
    assert ids[-len(suffix):] == suffix and tok.decode(ids[:-len(suffix)]).endswith("hello there.")
    assert instruction_suffix(tok, chat=False) == []


def test_a_planted_difference_is_the_strongest_candidate():
    g = torch.Generator().manual_seed(0)
    harmful = {f"L{l}.block_input": torch.randn(20, 4, 8, generator=g) for l in range(3)}
    harmless = {s: t + 0.01 * torch.randn(t.shape, generator=g) for s, t in harmful.items()}
    u = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    harmful["L1.block_input"][:, 2] += 5 * u  # position index 2 of 4 = position -2, layer 1
    cands = candidate_directions(harmful, harmless)
    ref = {s: harmful[s].double().mean(0) - harmless[s].double().mean(0) for s in harmful}
    for s in harmful:
        assert_close(cands[s], ref[s])
    norms = {(s, i): float(cands[s][i].norm()) for s in cands for i in range(4)}
    assert max(norms, key=norms.get) == ("L1.block_input", 2)
    assert torch.nn.functional.cosine_similarity(cands["L1.block_input"][2], u.double(), dim=0) > 0.999


def test_selection_follows_the_filters():
    cands = [{"layer": 0, "position": -1, "bypass": -5.0, "induce": 2.0, "kl": 0.5},  # best bypass, but KL too big
             {"layer": 1, "position": -2, "bypass": -3.0, "induce": -0.5, "kl": 0.01},  # does not induce
             {"layer": 1, "position": -1, "bypass": -2.0, "induce": 1.0, "kl": 0.05},  # passes
             {"layer": 2, "position": -1, "bypass": -1.0, "induce": 3.0, "kl": 0.0},  # passes, worse bypass
             {"layer": 3, "position": -1, "bypass": None, "induce": None, "kl": None}]  # pruned layer
    best, passed = select_candidate(cands, kl_threshold=0.1, induce_threshold=0.0)
    assert (best["layer"], best["position"], passed) == (1, -1, True)
    assert cands[0]["filtered"] == ["kl 0.5 > 0.1"] and cands[1]["filtered"] == ["induce -0.5 < 0.0"]
    best, passed = select_candidate(cands, kl_threshold=0.001, induce_threshold=10.0)
    assert (best["layer"], best["position"], passed) == (0, -1, False)  # none passes: lowest bypass of all
    with pytest.raises(DataError, match="pruned"):
        select_candidate([cands[-1]], kl_threshold=0.1, induce_threshold=0.0)


def test_refusal_score_is_the_log_odds_of_the_token_set():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(logits.double(), -1)[:, [0, 2]].sum(-1)
    assert_close(refusal_scores(logits, [0, 2]), torch.log(p / (1 - p)))
    assert_close(refusal_scores(torch.zeros(1, 4), [0, 1]), torch.zeros(1, dtype=torch.float64))  # p = 1/2


def test_the_vectors_edit_as_the_paper_does(tiny_llama, tmp_path):
    model, tok = tiny_llama
    vector = _run(model, tok, kl_threshold=1e9, induce_threshold=-1e9)
    assert vector.method == "refusal" and vector.operator == "ablate" and vector.unit == "raw"
    assert vector.sites == ablation_sites(4) and len(vector.sites) == 12
    layer = vector.report["selected"]["layer"]
    assert layer < int(0.8 * 4)  # the last 20% of layers are not candidates
    r = vector.directions["L0.block_input"]
    assert all(torch.equal(t, r) for t in vector.directions.values())
    ids = torch.tensor([prompt_ids(tok, VAL_HARMFUL[0], True)])
    with torch.no_grad():
        with _Hooks(model).ablate(r):
            expected = model(ids).logits
        with vector.apply(model) as steered:
            got = steered(ids).logits
    assert_close(got, expected)
    addition = refusal_addition(vector)
    assert addition.sites == [f"L{layer}.block_input"] and addition.operator == "add"
    with torch.no_grad():
        with _Hooks(model).add(r, layer):
            expected = model(ids).logits
        with addition.apply(model, coefficient=1.0) as steered:
            got = steered(ids).logits
    assert_close(got, expected)
    vector.save(tmp_path / "refusal")
    assert SteeringVector.load(tmp_path / "refusal") == vector
    add_form = _run(model, tok, kl_threshold=1e9, induce_threshold=-1e9, operator="add")
    assert add_form.sites == addition.sites and torch.equal(add_form.directions[addition.sites[0]], r)


def test_a_split_without_validation_prompts_is_seeded(tiny_llama):
    model, tok = tiny_llama
    a = refusal_direction(model, tok, HARMFUL, HARMLESS, positions=1, val_ratio=0.34, seed=3)
    b = refusal_direction(model, tok, HARMFUL, HARMLESS, positions=1, val_ratio=0.34, seed=3)
    assert a.directions.keys() == b.directions.keys()
    assert all(torch.equal(t, b.directions[s]) for s, t in a.directions.items())
    assert a.report["candidates"] == b.report["candidates"]
    assert a.report["counts"] == {"harmful": 4, "harmless": 4, "val_harmful": 2, "val_harmless": 2}


def test_bad_input_is_a_typed_error(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(DataError, match="harmful"):
        refusal_direction(model, tok, [], HARMLESS)
    with pytest.raises(DataError, match="both"):
        refusal_direction(model, tok, HARMFUL, HARMLESS, val_harmful=VAL_HARMFUL)
    with pytest.raises(ConfigError, match="operator"):
        _run(model, tok, operator="clamp")
    with pytest.raises(ConfigError, match="positions"):
        refusal_direction(model, tok, HARMFUL, HARMLESS, positions=99)
    with pytest.raises(DataError, match="refusal start"):
        refusal_token_ids(tok, ["I", ""])
    with pytest.raises(DataError, match="pruned"):
        _run(model, tok, layers=[3])
    with pytest.raises(ConfigError, match="kl_threshold"):
        _run(model, tok, kl_threshold=math.nan)
    with pytest.raises(DataError, match="cannot be split"):
        refusal_direction(model, tok, HARMFUL[:1], HARMLESS[:1])
    with pytest.raises(ConfigError, match="refusal_direction"):
        refusal_addition(SteeringVector({"L0.block_input": torch.ones(64)}))


def test_a_config_file_extracts_the_same_vector_and_the_example_is_valid(tiny_llama, tmp_path):
    import json
    from pathlib import Path

    from reftkit.steer.config import extraction_kwargs, load_steer_config
    from reftkit.steer.extract import extract

    model, tok = tiny_llama
    rows = [{"positive": a, "negative": b} for a, b in zip(HARMFUL, HARMLESS)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text("model: tiny-llama\npairs: pairs.jsonl\nmethod: refusal\n"
                                     "options: {positions: 2, val_ratio: 0.34, seed: 1}\n")
    cfg = load_steer_config(tmp_path / "c.yaml")
    got = extract(model, tok, cfg["pairs_rows"], **extraction_kwargs(cfg))
    direct = refusal_direction(model, tok, HARMFUL, HARMLESS, positions=2, val_ratio=0.34, seed=1)
    assert got.sites == direct.sites and torch.equal(got.directions["L0.block_input"],
                                                     direct.directions["L0.block_input"])
    (tmp_path / "bad.yaml").write_text("model: tiny-llama\npairs: pairs.jsonl\nmethod: refusal\nunit: hidden_norm\n")
    with pytest.raises(ConfigError, match="raw"):
        load_steer_config(tmp_path / "bad.yaml")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "q", "positive": "a", "negative": "b"}) + "\n")
    (tmp_path / "bad.yaml").write_text("model: tiny-llama\npairs: p.jsonl\nmethod: refusal\n")
    with pytest.raises(DataError, match="without a prompt"):
        load_steer_config(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("model: tiny-llama\npairs: pairs.jsonl\nmethod: refusal\noptions: {k: 1}\n")
    with pytest.raises(ConfigError, match="unknown"):
        load_steer_config(tmp_path / "bad.yaml")
    example = load_steer_config(Path(__file__).parents[2] / "examples" / "steer" / "refusal.yaml")
    assert example["method"] == "refusal" and len(example["pairs_rows"]) == 24


def test_a_system_prompt_comes_before_the_instruction_and_keeps_the_positions(tiny_llama):
    from reftkit.steer.refusal import instruction_ids

    model, tok = tiny_llama
    ids = instruction_ids(tok, "hello there.", True, "Refuse harmful requests.")
    text = tok.decode(ids)
    assert text.index("Refuse harmful requests.") < text.index("hello there.")
    suffix = instruction_suffix(tok)
    assert ids[-len(suffix):] == suffix
    assert instruction_ids(tok, "hello there.", True) == prompt_ids(tok, "hello there.", True)
    plain = _run(model, tok, kl_threshold=1e9, induce_threshold=-1e9)
    system = _run(model, tok, kl_threshold=1e9, induce_threshold=-1e9, system="Refuse harmful requests.")
    assert system.report["options"]["system"] == "Refuse harmful requests."
    assert not torch.equal(plain.directions["L1.block_input"], system.directions["L1.block_input"])
    with pytest.raises(ConfigError, match="system"):
        _run(model, tok, system="")
