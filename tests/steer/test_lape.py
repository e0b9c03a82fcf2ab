"""LAPE language neurons: the statistics against hooks on the activation function, the selection against a
float64 re-implementation of Tang et al.'s rules, planted language neurons found on a tiny Llama, and the
language-arithmetics edits applied at the neurons (and saved and loaded)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from numerics import assert_close, assert_identical

from reftkit.errors import ConfigError, DataError
from reftkit.models import build_tiny_model, build_tiny_tokenizer
from reftkit.steer.lape import activation_site, activation_statistics, lape, read_language_texts, \
    select_language_neurons
from reftkit.steer.vector import SteeringVector

pytestmark = pytest.mark.numerics

ALPHABETS = {"a": "abcdefghijklm", "b": "nopqrstuvwxyz"}
PLANTED = {"a": (1, 5), "b": (2, 77)}  # language -> (layer, neuron)


def _texts(n=12, length=30, seed=0):
    rng = random.Random(seed)
    return {lang: ["".join(rng.choice(chars) for _ in range(length)) for _ in range(n)]
            for lang, chars in ALPHABETS.items()}


@pytest.fixture(scope="module")
def planted():
    """A tiny Llama whose hidden dimension 0 carries the language (+10 for a's letters, −10 for b's) and two
    neurons that read only it: neuron 5 of layer 1 fires on a, neuron 77 of layer 2 on b; no other projection
    reads dimension 0."""
    model, tok = build_tiny_model("llama"), build_tiny_tokenizer()
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for lang, sign in (("a", 10.0), ("b", -10.0)):
            for ch in ALPHABETS[lang]:
                emb[tok(ch, add_special_tokens=False)["input_ids"][0], 0] = sign
        for layer in model.model.layers:  # nothing but the two planted gates reads dimension 0
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                         layer.mlp.up_proj):
                proj.weight[:, 0] = 0.0
        for lang, (layer, j) in PLANTED.items():
            row = model.model.layers[layer].mlp.gate_proj.weight[j]
            row.zero_()
            row[0] = 1.0 if lang == "a" else -1.0
    return model, tok


def _hooked_statistics(model, tok, texts):
    """Per language: counts of act_fn output > 0 and its sums over ordinary tokens, by plain forward hooks."""
    special = set(tok.all_special_ids)
    out = {}
    for lang, values in texts.items():
        count = torch.zeros(4, 128, dtype=torch.float64)
        total = torch.zeros(4, 128, dtype=torch.float64)
        n = 0
        for text in values:
            ids = tok(text)["input_ids"]
            keep = torch.tensor([i not in special for i in ids])
            seen = {}
            hooks = [layer.mlp.act_fn.register_forward_hook(lambda m, a, o, l=l: seen.__setitem__(l, o[0]))
                     for l, layer in enumerate(model.model.layers)]
            try:
                with torch.no_grad():
                    model(torch.tensor([ids]))
            finally:
                for h in hooks:
                    h.remove()
            for l in range(4):
                v = seen[l][keep].double()
                count[l] += (v > 0).double().sum(0)
                total[l] += v.sum(0)
            n += int(keep.sum())
        out[lang] = (count / n, total / n, n)
    return out


def _reference_selection(p, top_rate, filter_rate, bar_ratio):
    """Tang et al.'s identify.py rules, written out with Python loops in float64."""
    L, D, K = p.shape
    values = sorted(float(x) for x in p.flatten())
    q = lambda r: values[min(max(round(len(values) * r), 1), len(values)) - 1]  # noqa: E731
    top_value, bar = q(filter_rate), q(bar_ratio)
    entropy = {}
    for l in range(L):
        for j in range(D):
            probs = [float(p[l, j, k]) for k in range(K)]
            s = sum(probs)
            h = -sum((x / s) * math.log(x / s) for x in probs if x > 0) if s > 0 else 0.0
            entropy[(l, j)] = h if max(probs) > top_value else math.inf
    keep = sorted(entropy, key=lambda key: (entropy[key], key))[:min(max(round(L * D * top_rate), 1), L * D)]
    return [[sorted(j for (l2, j) in keep if l2 == l and float(p[l, j, k]) > bar) for l in range(L)]
            for k in range(K)], entropy


def test_activation_site_is_the_activation_function_output_of_gated_mlps(planted, tiny_model):
    model, _ = planted
    assert activation_site(model, 2) == "module:model.layers.2.mlp.act_fn:output"
    gpt2, tok = tiny_model("gpt2")
    assert activation_site(gpt2, 1) == "L1.mlp_activation"  # c_proj's input is the activation's output there
    neurons = lape(gpt2, tok, _texts(n=3), top_rate=0.05)
    assert neurons.sites == [f"L{l}.mlp_activation" for l in range(4)]
    assert neurons.probabilities.shape == (4, 128, 2)


def test_statistics_equal_hooks_on_the_activation_function(planted):
    model, tok = planted
    texts = _texts(n=5)
    stats = activation_statistics(model, tok, texts, batch_size=2)  # batches of 2: right padding is ignored
    ref = _hooked_statistics(model, tok, texts)
    for k, lang in enumerate(stats["languages"]):
        prob, mean, n = ref[lang]
        assert stats["tokens"][lang] == n == 5 * 30  # BOS is not counted
        assert_identical(stats["probabilities"][..., k], prob)
        assert_close(stats["mean_activation"][..., k], mean, dtype=torch.float32)


def test_selection_equals_a_float64_reference():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(3, 40, 4, generator=g, dtype=torch.float64)
    p[0, 3] = torch.tensor([0.99, 0.0, 0.0, 0.01], dtype=torch.float64)  # specific to language 0
    p[2, 7] = torch.tensor([0.0, 0.98, 0.97, 0.0], dtype=torch.float64)  # shared by languages 1 and 2
    p[1, 9] = 0.0  # never active: entropy 0, but filtered out
    for top_rate, filter_rate, bar in ((0.05, 0.95, 0.95), (0.2, 0.8, 0.9), (0.01, 0.95, 0.95)):
        got = select_language_neurons(p, top_rate=top_rate, filter_rate=filter_rate, activation_bar_ratio=bar)
        expected, entropy = _reference_selection(p, top_rate, filter_rate, bar)
        assert got["neurons"] == expected
        ref = torch.tensor([[entropy[(l, j)] for j in range(40)] for l in range(3)], dtype=torch.float64)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(got["entropy"]), finite)
        assert_close(got["entropy"][finite], ref[finite])
    got = select_language_neurons(p, top_rate=0.05)
    assert 3 in got["neurons"][0][0] and 7 in got["neurons"][1][2] and 7 in got["neurons"][2][2]
    assert all(9 not in got["neurons"][k][1] for k in range(4))


def test_planted_language_neurons_are_found_and_only_they(planted):
    model, tok = planted
    neurons = lape(model, tok, _texts(), top_rate=2 / 512)
    stats_a = neurons.probabilities[PLANTED["a"][0], PLANTED["a"][1]]
    assert stats_a.tolist() == [1.0, 0.0]
    assert neurons.neurons["a"] == {0: [], 1: [5], 2: [], 3: []}
    assert neurons.neurons["b"] == {0: [], 1: [], 2: [77], 3: []}
    assert float(neurons.entropy[1, 5]) == 0.0 and float(neurons.entropy[2, 77]) == 0.0
    # with a looser top rate the planted neurons are still the most specific, and stay with their language
    wide = lape(model, tok, _texts(), top_rate=0.02)
    assert 5 in wide.neurons["a"][1] and 77 in wide.neurons["b"][2]
    assert 5 not in wide.neurons["b"][1] and 77 not in wide.neurons["a"][2]


def _act_outputs(model, ids, vector=None, coefficient=1.0):
    """Each layer's act_fn output as the rest of the model sees it (hooks added after the steering hooks)."""
    seen = {}

    def run(call):
        hooks = [layer.mlp.act_fn.register_forward_hook(lambda m, a, o, l=l: seen.__setitem__(l, o.clone()))
                 for l, layer in enumerate(model.model.layers)]
        try:
            with torch.no_grad():
                call(ids)
        finally:
            for h in hooks:
                h.remove()

    if vector is None:
        run(model)
    else:
        with vector.apply(model, coefficient=coefficient) as steered:
            run(steered)
    return seen


@pytest.mark.parametrize("edit", ["deactivate", "additive", "replacement", "diffmean"])
def test_edits_set_the_neurons_as_the_formulas_say(planted, tmp_path, edit):
    model, tok = planted
    neurons = lape(model, tok, _texts(), top_rate=2 / 512)
    vector = neurons.vector("a", edit, value=-1.0 if edit == "deactivate" else 0.0)
    assert vector.method == "lape" and vector.sites == ["module:model.layers.1.mlp.act_fn:output"]
    vector.save(tmp_path / "v")
    loaded = SteeringVector.load(tmp_path / "v")
    assert loaded == vector
    ids = torch.tensor([tok("nopqabc")["input_ids"]])
    base = _act_outputs(model, ids)
    mu = neurons.mean_activation[1, 5]  # [a, b]
    # the edit is on layer 1's activation; later layers see its consequences, earlier ones nothing
    steered = _act_outputs(model, ids, loaded, coefficient=2.0)
    assert_identical(steered[0], base[0])
    expected = base[1].clone()
    col = expected[..., 5].double()
    new = {"deactivate": torch.full_like(col, -2.0), "additive": col + 2 * mu[0],
           "replacement": 2 * mu[0].expand_as(col), "diffmean": col + 2 * (mu[0] - mu[1])}[edit]
    expected[..., 5] = new.float()
    assert_close(steered[1], expected)


def test_bad_input_is_a_typed_error(planted):
    model, tok = planted
    with pytest.raises(DataError, match="at least two"):
        read_language_texts({"a": ["x"]})
    with pytest.raises(DataError, match="row 1"):
        read_language_texts([{"language": "a", "text": "x"}, {"lang": "b", "text": "y"}])
    with pytest.raises(DataError, match="text 0"):
        read_language_texts({"a": [""], "b": ["y"]})
    with pytest.raises(ConfigError, match="top_rate"):
        select_language_neurons(torch.rand(2, 3, 2), top_rate=0)
    neurons = lape(model, tok, _texts(n=4), top_rate=2 / 512)
    with pytest.raises(ConfigError, match="unknown language"):
        neurons.vector("c")
    with pytest.raises(ConfigError, match="unknown LAPE edit"):
        neurons.vector("a", "multiply")
    with pytest.raises(ConfigError, match="fill of a deactivation"):
        neurons.vector("a", "additive", value=2.0)
    with pytest.raises(ConfigError, match="layers"):
        lape(model, tok, _texts(n=2), layers=[9])


def test_rows_and_dicts_give_the_same_neurons(planted):
    model, tok = planted
    texts = _texts(n=6)
    rows = [{"language": lang, "text": t} for lang, values in texts.items() for t in values]
    a = lape(model, tok, texts, top_rate=0.02)
    b = lape(model, tok, rows, top_rate=0.02)
    assert a.neurons == b.neurons
    assert_identical(a.probabilities, b.probabilities)


def test_a_config_file_extracts_the_same_vector_and_the_example_is_valid(planted, tmp_path):
    import json
    from pathlib import Path

    from reftkit.steer.config import extraction_kwargs, load_steer_config
    from reftkit.steer.extract import extract

    model, tok = planted
    texts = _texts(n=6)
    rows = [{"language": lang, "text": t} for lang, values in texts.items() for t in values]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text("model: tiny-llama\ntexts: texts.jsonl\nmethod: lape\nchat: false\n"
                                     "options: {language: a, edit: replacement, top_rate: 0.02}\n")
    cfg = load_steer_config(tmp_path / "c.yaml")
    got = extract(model, tok, cfg["pairs_rows"], **extraction_kwargs(cfg))
    direct = lape(model, tok, texts, top_rate=0.02).vector("a", "replacement")
    assert got.sites == direct.sites and got.operator_config == direct.operator_config
    assert all(torch.equal(got.directions[s], direct.directions[s]) for s in got.sites)
    for body, error, match in (
            ("texts: texts.jsonl\nmethod: lape\n", ConfigError, "language"),
            ("texts: texts.jsonl\nmethod: lape\noptions: {language: zz}\n", DataError, "zz"),
            ("pairs: texts.jsonl\nmethod: lape\noptions: {language: a}\n", ConfigError, "texts"),
            ("texts: texts.jsonl\nmethod: mean_diff\n", ConfigError, "pairs")):
        (tmp_path / "bad.yaml").write_text("model: tiny-llama\n" + body)
        with pytest.raises(error, match=match):
            load_steer_config(tmp_path / "bad.yaml")
    (tmp_path / "one.jsonl").write_text(json.dumps({"language": "a", "text": "x"}) + "\n")
    (tmp_path / "bad.yaml").write_text("model: tiny-llama\ntexts: one.jsonl\nmethod: lape\noptions: {language: a}\n")
    with pytest.raises(DataError, match="one.jsonl"):
        load_steer_config(tmp_path / "bad.yaml")
    example = load_steer_config(Path(__file__).parents[2] / "examples" / "steer" / "lape.yaml")
    assert example["method"] == "lape" and {r["language"] for r in example["pairs_rows"]} == {"en", "fr", "de", "es"}
