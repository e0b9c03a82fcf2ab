"""Steering parity with the references, on golden fixtures made in their own virtualenv by
tools/make_steer_fixtures.py (repeng 0.4.0, steering-vectors 0.12.2 and its copy of the original CAA code,
lm-eval 0.4.13, transformers 4.57.6; reftkit runs here on transformers 5).

Both sides rebuild the same seeded tiny Llama from the recipe in the tool; the first test checks that this
virtualenv's model gives the fixture's base logits, so every later difference is the steering code's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from numerics import assert_close, assert_identical
from safetensors.torch import load_file

from reftkit.steer import scope_positions, steer
from reftkit.steer.extract import extract
from reftkit.steer.formats import import_gguf, import_lm_eval

pytestmark = pytest.mark.numerics

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "steer"
MIN_COSINE = 0.9999  # the criterion for "the same direction"
# A 5-layer forward in another transformers version (other rotary and attention code paths) differs by more
# rounding steps than one kernel: 256 ulps of float32 (3e-5 relative to the largest logit).
FORWARD_ULPS = 256


def _tool():
    spec = importlib.util.spec_from_file_location("make_steer_fixtures", ROOT / "tools" / "make_steer_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def refs():
    tool = _tool()
    meta = json.loads((FIXTURES / "refs.json").read_text())
    tok = tool.hf_tokenizer(str(FIXTURES / "tokenizer.json"))
    return {"tool": tool, "meta": meta, "t": load_file(str(FIXTURES / "refs.safetensors")), "tok": tok,
            "model": tool.seeded_llama(meta["model"])}


def _cos(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _same_direction(mine, theirs, what):
    c = _cos(mine, theirs)
    assert c >= MIN_COSINE, f"{what}: cosine {c:.6f} (below {MIN_COSINE}; negative means the sign differs)"


def _one(tok, text):
    return tok(text, return_tensors="pt")


def test_the_rebuilt_model_is_the_fixtures_model(refs):
    t, model = refs["t"], refs["model"]
    batch = {"input_ids": t["ids.probe_input_ids"], "attention_mask": t["ids.probe_attention_mask"]}
    assert refs["tok"]([a for a, _ in refs["tool"].text_pairs()[:4]], padding=True)["input_ids"] \
        == batch["input_ids"].tolist()
    with torch.no_grad():
        assert_close(model(**batch).logits, t["base.logits"], ulps=FORWARD_ULPS)


# ---- repeng: read_representations ----------------------------------------------------------------------------

def test_diff_centered_is_repengs_pca_diff_direction(refs):
    t, meta = refs["t"], refs["meta"]
    last = meta["model"]["num_hidden_layers"] - 1
    layers = [l for l in meta["blocks"] if l < last]
    v = extract(refs["model"], refs["tok"], refs["tool"].text_pairs(), method="pca", layers=layers,
                variant="diff_centered", batch_size=5)
    for l in layers:
        _same_direction(v.directions[f"L{l}.block_output"], t[f"repeng.pca_diff.{l}"], f"layer {l}")
    # repeng's key L-1 reads hidden_states[L], after the final norm: reftkit reads it there only when asked, and
    # says the scale is not the residual stream's
    post = extract(refs["model"], refs["tok"], refs["tool"].text_pairs(), method="pca", variant="diff_centered",
                   sites=["module:model.norm:output"], batch_size=5)
    _same_direction(post.directions["module:model.norm:output"], t[f"repeng.pca_diff.{last}"], "after the norm")
    assert any("after the final norm" in w for w in post.report["warnings"])
    pre = extract(refs["model"], refs["tok"], refs["tool"].text_pairs(), method="pca", layers=[last],
                  variant="diff_centered", batch_size=5)
    assert _cos(pre.directions[f"L{last}.block_output"], t[f"repeng.pca_diff.{last}"]) < MIN_COSINE


def test_pair_centered_is_repengs_pca_center_direction(refs):
    t, meta = refs["t"], refs["meta"]
    layers = [l for l in meta["blocks"] if l < meta["model"]["num_hidden_layers"] - 1]
    v = extract(refs["model"], refs["tok"], refs["tool"].text_pairs(), method="pca", layers=layers,
                variant="pair_centered")
    for l in layers:
        _same_direction(v.directions[f"L{l}.block_output"], t[f"repeng.pca_center.{l}"], f"layer {l}")


# ---- steering-vectors: PCA and CAA ---------------------------------------------------------------------------

def test_diff_uncentered_is_steering_vectors_pca(refs):
    t, meta = refs["t"], refs["meta"]
    v = extract(refs["model"], refs["tok"], refs["tool"].text_pairs(), method="pca", layers=meta["blocks"],
                variant="diff_uncentered")
    for l in meta["blocks"]:  # steering-vectors hooks the block's output, before the final norm, at every layer
        _same_direction(v.directions[f"L{l}.block_output"], t[f"sv.pca.{l}"], f"layer {l}")


def _caa_vector(refs):
    pairs = [(p, "A )", "B )") for p in refs["tool"].caa_prompts()]
    return extract(refs["model"], refs["tok"], pairs, layers=refs["meta"]["caa_layers"], read="answer")


def test_mean_diff_at_the_answer_is_steering_vectors_caa_vector(refs):
    v = _caa_vector(refs)
    for l in refs["meta"]["caa_layers"]:
        theirs = refs["t"][f"sv.caa.{l}"]
        # a difference of two means vs a mean of differences: judged against the activations' size
        assert_close(v.directions[f"L{l}.block_output"], theirs, ulps=FORWARD_ULPS,
                     scale=float(v.report["sites"][f"L{l}.block_output"]["hidden_norm"]))


def _caa_steered(refs, offsets, scope=None):
    v = _caa_vector(refs)
    scope = scope or scope_positions("from_instruction_end", start=torch.tensor(offsets))
    return steer(refs["model"], [(v, refs["meta"]["caa_multiplier"])], scope=scope)


def _left_padded(tok, prompts):
    ids = [tok(p)["input_ids"] for p in prompts]
    T = max(map(len, ids))
    input_ids = torch.zeros(len(ids), T, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, T - len(x):], mask[i, T - len(x):] = torch.tensor(x), 1
    return input_ids, mask, [len(x) for x in ids]


def test_caa_scope_logits_equal_steering_vectors(refs):
    """mean_diff + the CAA scope (from the instruction end, inclusive) gives steering-vectors' steered logits, here
    for the three prompts left-padded in one batch (steering-vectors ran them one at a time, unpadded)."""
    t, tok, meta = refs["t"], refs["tok"], refs["meta"]
    prompts, ends = meta["test_prompts"], meta["instruction_end"]
    input_ids, mask, lengths = _left_padded(tok, prompts)
    with _caa_steered(refs, ends) as steered, torch.no_grad():
        logits = steered(input_ids=input_ids, attention_mask=mask).logits
    with torch.no_grad():
        base = refs["model"](input_ids=input_ids, attention_mask=mask).logits
    T = input_ids.shape[1]
    for i, n in enumerate(lengths):
        theirs = t[f"sv.caa.logits.{i}"]
        assert_close(logits[i, T - n:], theirs, ulps=FORWARD_ULPS, msg=f"prompt {i}")
        assert not torch.allclose(base[i, T - n:], theirs, atol=1e-3)  # the edit shows in the logits


def test_cached_generation_equals_steering_vectors_without_cache(refs):
    """Under the KV cache steering-vectors' min_token_index is relative to each chunk, so the generated tokens go
    unsteered (steering-vectors#60); re-feeding the whole sequence it steers them. reftkit's cached generation
    gives the latter."""
    t, tok, meta = refs["t"], refs["tok"], refs["meta"]
    for i, (p, end) in enumerate(zip(meta["test_prompts"], meta["instruction_end"])):
        enc = _one(tok, p)
        with _caa_steered(refs, [end]) as steered:
            out = steered.generate(**enc, max_new_tokens=meta["gen_tokens"], do_sample=False, pad_token_id=0)
        assert out[0].tolist() == t[f"ids.sv.generate.nocache.{i}"].tolist(), f"prompt {i}"
    assert any(t[f"ids.sv.generate.cache.{i}"].tolist() != t[f"ids.sv.generate.nocache.{i}"].tolist()
               for i in range(len(meta["test_prompts"])))


def test_original_caa_is_the_exclusive_scope(refs):
    """The original CAA code adds after the instruction end (position > end, CAA#3), so it leaves the last prompt
    token, and with it the first generated token, unsteered. reftkit's scope starting one token later reproduces it
    (cached greedy generation and its logits); reftkit's CAA scope (inclusive) edits that token. On these prompts,
    which end at the instruction end, "after the end" is reftkit's `generated` scope, and the original code's plain
    forward is the base model's."""
    t, tok, meta = refs["t"], refs["tok"], refs["meta"]
    if not meta.get("original_caa"):
        pytest.skip("the fixtures were made without the original CAA code")
    for i, (p, end) in enumerate(zip(meta["test_prompts"], meta["instruction_end"])):
        enc = _one(tok, p)
        assert enc["input_ids"].shape[1] == end + 1
        with torch.no_grad():
            assert_close(refs["model"](**enc).logits[0], t[f"caa.logits.{i}"], ulps=FORWARD_ULPS, msg=f"prompt {i}")
        with _caa_steered(refs, [end], scope="generated") as steered, torch.no_grad():
            g = steered.generate(**enc, max_new_tokens=meta["gen_tokens"], do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        assert g.sequences[0].tolist() == t[f"ids.caa.generate.{i}"].tolist(), f"prompt {i}"
        assert_close(torch.stack(g.logits)[:, 0], t[f"caa.generate.logits.{i}"], ulps=FORWARD_ULPS)
        with _caa_steered(refs, [end]) as inclusive, torch.no_grad():
            first = inclusive(**enc).logits[0, -1]
        assert not torch.allclose(first, t[f"caa.generate.logits.{i}"][0], atol=1e-3)


# ---- GGUF: reftkit's export read by repeng, repeng's export read by reftkit ----------------------------------

def test_repeng_reads_reftkits_gguf_bit_for_bit(refs):
    import numpy as np
    from gguf import GGUFReader

    t = refs["t"]
    path = FIXTURES / "reftkit_pca.gguf"
    reader = GGUFReader(path)
    mine = import_gguf(path, model=refs["model"])
    assert refs["meta"]["repeng_import"] == {"model_type": "llama",
                                           "layers": [int(x.name.split(".")[1]) for x in reader.tensors]}
    for x in reader.tensors:
        l = int(x.name.split(".")[1])
        theirs = t[f"repeng.import.{l}"]
        assert np.array_equal(np.asarray(x.data).view(np.uint32), theirs.numpy().view(np.uint32))
        assert_identical(mine.directions[f"L{l}.block_output"], theirs)


def test_repeng_control_model_logits_equal_reftkit_on_the_gguf(refs):
    t, tok, meta = refs["t"], refs["tok"], refs["meta"]
    v = import_gguf(FIXTURES / "reftkit_pca.gguf", model=refs["model"])
    with steer(refs["model"], [(v, meta["repeng_coefficient"])], scope="all") as steered, torch.no_grad():
        for i, p in enumerate(meta["test_prompts"]):
            assert_close(steered(**_one(tok, p)).logits[0], t[f"repeng.control.logits.{i}"], ulps=FORWARD_ULPS)


def test_reftkit_reads_repengs_gguf(refs):
    t, meta = refs["t"], refs["meta"]
    v = import_gguf(FIXTURES / "repeng.gguf", model=refs["model"])
    assert v.sites == [f"L{l}.block_output" for l in sorted(meta["blocks"])]
    for l in meta["blocks"]:  # repeng exported its ControlVector.train (pca_diff) vector: the same directions
        assert_identical(v.directions[f"L{l}.block_output"], t[f"repeng.pca_diff.{l}"])


# ---- lm-eval's steered model on reftkit's exports ------------------------------------------------------------

@pytest.mark.parametrize("action", ["add", "clamp"])
def test_lm_eval_steered_logits_equal_reftkit(refs, action):
    t = refs["t"]
    v = import_lm_eval(FIXTURES / f"reftkit_{action}.pt", model=refs["model"])
    ids = t["ids.probe_input_ids"]
    with steer(refs["model"], [(v, 1.0)], scope="all") as steered, torch.no_grad():
        logits = steered(input_ids=ids).logits  # lm-eval's _model_call passes the ids alone
    with torch.no_grad():
        base = refs["model"](input_ids=ids).logits
    assert_close(logits, t[f"lm_eval.{action}.logits"], ulps=FORWARD_ULPS)
    assert not torch.allclose(base, t[f"lm_eval.{action}.logits"], atol=1e-3)


def test_lm_eval_clamp_file_is_the_ace_formula(refs):
    """The clamp file holds value and bias such that lm-eval's clamp is ACE's h - r̂r̂ᵀ(h - b) + value·r̂."""
    doc = torch.load(FIXTURES / "reftkit_clamp.pt", weights_only=True)
    h = torch.randn(5, doc["layers.1"]["steering_vector"].shape[0], generator=torch.Generator().manual_seed(0))
    for entry in doc.values():
        r = entry["steering_vector"] / entry["steering_vector"].norm()
        b, value = entry["bias"], entry["steering_coefficient"]
        ace = h - ((h - b) @ r)[:, None] * r + value * r
        assert value == refs["meta"]["clamp_value"]
        assert_close((ace - b) @ r, torch.full((5,), value), scale=float(h.abs().max() + b.abs().max()))


def test_a_span_from_the_first_generated_token_edits_only_generated_tokens(refs):
    """CAA's scope with its start at the prompt's length (or past it) edits nothing of the prompt and every token
    generation feeds back, on the one forward path generate takes (prefill, then cached steps)."""
    inputs = _one(refs["tok"], refs["meta"]["test_prompts"][0])
    T = inputs["input_ids"].shape[1]
    v = _caa_vector(refs)
    for start in (T, T + 3):
        scope = scope_positions("from_instruction_end", start=torch.tensor([start]))
        with steer(refs["model"], [(v, refs["meta"]["caa_multiplier"])], scope=scope, trace=True) as steered:
            steered.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
            edited = next(iter(steered.edited_positions().values()))
        assert edited == [[T, T + 1]], (start, edited)  # the two generated tokens fed back; no prompt token


def test_todays_exports_are_the_files_the_references_read(refs, tmp_path):
    """The reference outputs were computed on reftkit's exports when the fixtures were made; today's code exports
    the same entries (so the lm-eval and repeng results speak for it)."""
    import shutil

    shutil.copy(FIXTURES / "tokenizer.json", tmp_path / "tokenizer.json")
    refs["tool"].reftkit_exports(tmp_path)
    for action in ("add", "clamp"):
        old = torch.load(FIXTURES / f"reftkit_{action}.pt", weights_only=True)
        new = torch.load(tmp_path / f"reftkit_{action}.pt", weights_only=True)
        assert list(new) == list(old)
        for hook, entry in old.items():
            assert {k: v for k, v in new[hook].items() if not isinstance(v, torch.Tensor)} \
                == {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)}
            for key in ("steering_vector", "bias"):
                if entry[key] is not None:
                    assert_close(new[hook][key], entry[key], msg=f"{action} {hook} {key}")
    old, new = import_gguf(FIXTURES / "reftkit_pca.gguf"), import_gguf(tmp_path / "reftkit_pca.gguf")
    assert new.sites == old.sites
    for s in old.sites:
        assert_close(new.directions[s], old.directions[s], scale=1.0)
