"""The evaluation protocol: Δ log-likelihood against a hand computation from logits, steerability on synthetic
propensities, coefficient 0 equal to the base model, KL(base||base) = 0, distinct-n on fixed strings, the sweep's
selection on a planted scorer, collapse flags, JSON reports, plots, and the refusals."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
from numerics import assert_close

from reftkit.chat import prompt_ids
from reftkit.errors import ConfigError, DataError
from reftkit.steer import SteeringVector
from reftkit.steer.evaluate import (BaseMethod, PromptMethod, VectorMethod, behaviour_rate, content_retention,
                                    distinct_n, harmonic_mean, likelihood, replies, side_effects, split_half, steerability,
                                    sweep)

SITE = "L1.block_output"
ROWS = [{"prompt": "hi", "target": "ab", "other": "xyz"},
        {"prompt": "a longer prompt", "target": "q", "other": "rs"}]
F32 = torch.float32  # the model computes in float32; the sums are taken in float64
NEUTRAL = ["the cat sat on the mat", "a b"]


def _vector(seed=3):
    return SteeringVector({SITE: 4 * torch.randn(64, generator=torch.Generator().manual_seed(seed))})


@torch.no_grad()
def _hand_logp(model, tok, prompt: str, completion: str) -> float:
    context = prompt_ids(tok, prompt)
    scored = tok(completion, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([context + scored])).logits[0].double().log_softmax(-1)
    return sum(float(logits[len(context) - 1 + k, t]) for k, t in enumerate(scored))


def test_delta_loglikelihood_equals_hand_computation(tiny_llama):
    model, tok = tiny_llama
    out = likelihood(model, tok, BaseMethod(), ROWS)
    for i, row in enumerate(ROWS):
        t, o = _hand_logp(model, tok, row["prompt"], row["target"]), _hand_logp(model, tok, row["prompt"], row["other"])
        assert_close(out["per_example"][i][0], t - o, scale=abs(t) + abs(o), dtype=F32)
        assert_close(out["per_coefficient"][0]["logp_target"][i], t, scale=abs(t), dtype=F32)
    per_token = likelihood(model, tok, BaseMethod(), ROWS, per_token=True)
    t, o = _hand_logp(model, tok, "hi", "ab"), _hand_logp(model, tok, "hi", "xyz")
    assert_close(per_token["per_example"][0][0], t / 2 - o / 3, scale=abs(t) + abs(o), dtype=F32)
    assert out["coefficients"] == [None] and out["mean"][0] == pytest.approx(sum(r[0] for r in out["per_example"]) / 2)


def test_steered_likelihood_moves_and_zero_equals_base(tiny_llama):
    model, tok = tiny_llama
    base = likelihood(model, tok, BaseMethod(), ROWS)
    steered = likelihood(model, tok, VectorMethod(_vector()), ROWS, [0.0, 1.0])
    assert steered["per_coefficient"][0]["delta"] == base["per_coefficient"][0]["delta"]  # identical
    assert steered["per_coefficient"][1]["delta"] != base["per_coefficient"][0]["delta"]
    json.dumps(steered, allow_nan=False)


def test_steerability_on_known_propensities():
    xs = [-1.0, 0.0, 1.0, 2.0]
    props = [[2 * x + 1 for x in xs],  # slope 2
             [-0.5 * x for x in xs],  # slope -0.5
             [3.0, 1.0, 1.0, 3.0]]  # symmetric about x = 0.5: slope 0
    out = steerability(xs, props)
    assert out["slopes"] == pytest.approx([2.0, -0.5, 0.0], abs=1e-12)
    assert out["mean_slope"] == pytest.approx(0.5)
    assert out["anti_steerable_fraction"] == pytest.approx(1 / 3)
    # means: (-1+0.5+3)/3, (1+0+1)/3, (3-0.5+1)/3, (5-1+3)/3 = 2.5/3, 2/3, 3.5/3, 7/3 -> ranks 2,1,3,4
    # Spearman of ranks (1,2,3,4) vs (2,1,3,4): 1 - 6*(1+1)/(4*15) = 0.8
    assert out["spearman"] == pytest.approx(0.8)
    assert out["mean_propensity"] == pytest.approx([2.5 / 3, 2 / 3, 3.5 / 3, 7 / 3])
    assert steerability([0, 1], [[1.0, 1.0]])["spearman"] is None  # constant propensity: undefined
    with pytest.raises(ConfigError):
        steerability([1.0, 1.0], [[0.0, 1.0]])
    with pytest.raises(ConfigError):
        steerability([0.0, float("nan")], [[0.0, 1.0]])
    with pytest.raises(DataError):
        steerability([0.0, 1.0], [[0.0]])
    with pytest.raises(DataError):
        steerability([0.0, 1.0], [[0.0, float("inf")]])


def test_kl_is_zero_for_base_and_positive_when_steered(tiny_llama):
    model, tok = tiny_llama
    base = side_effects(model, tok, BaseMethod(), None, NEUTRAL)
    assert base["kl"] == 0.0 and base["nll"] == base["base_nll"]
    zero = side_effects(model, tok, VectorMethod(_vector()), 0.0, NEUTRAL)
    assert zero == base
    steered = side_effects(model, tok, VectorMethod(_vector()), 2.0, NEUTRAL)
    assert steered["kl"] > 1e-3 and steered["base_nll"] == base["base_nll"] and steered["nll"] != base["nll"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in NEUTRAL]
    assert base["tokens"] == sum(len(x) for x in ids)  # every text token is predicted after BOS
    # the base NLL by hand
    nll = 0.0
    with torch.no_grad():
        for x in ids:
            lp = model(input_ids=torch.tensor([[tok.bos_token_id] + x])).logits[0].double().log_softmax(-1)
            nll -= sum(float(lp[k, t]) for k, t in enumerate(x))
    assert_close(base["base_nll"], nll / base["tokens"], dtype=F32)
    prompted = side_effects(model, tok, PromptMethod("Answer in capitals."), None, NEUTRAL)
    assert prompted["kl"] > 0 and prompted["tokens"] == base["tokens"]
    # the text is a continuation of the BOS prompt: a scope from the last prompt token on edits every text token
    # (scoring the text as a prompt would edit only its last token, whose prediction is not scored)
    from reftkit.steer import steer

    last_on = side_effects(model, tok, VectorMethod(_vector(), scope="last_prompt_token_then_generated"), 2.0,
                           NEUTRAL[:1])
    x = [tok.bos_token_id] + tok(NEUTRAL[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad(), steer(model, [(_vector(), 2.0)], scope="all") as s:
        lp = s(torch.tensor([x])).logits[0].double().log_softmax(-1)
    assert_close(last_on["nll"], -sum(float(lp[k, t]) for k, t in enumerate(x[1:])) / (len(x) - 1), dtype=F32)
    prompt_only = side_effects(model, tok, VectorMethod(_vector(), scope="prompt"), 2.0, NEUTRAL[:1])
    assert 0 < prompt_only["kl"] < last_on["kl"]  # only the BOS prompt is edited


def test_distinct_n_on_fixed_strings():
    assert distinct_n(["a b a b", "c c c c"], 1) == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert distinct_n(["a b a b", "c c c c"], 2) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert distinct_n(["a b", "a b"], 2, pooled=True) == pytest.approx(1 / 2)
    assert distinct_n(["one", "x y"], 2) == pytest.approx((0 + 1) / 2)
    assert distinct_n([""], 1) == 0.0
    with pytest.raises(DataError):
        distinct_n([], 1)
    with pytest.raises(ConfigError):
        distinct_n(["a"], 0)


def test_rates_retention_and_harmonic_mean():
    assert behaviour_rate(["HELLO THERE", "hello", "OK!!"], "all_caps") == pytest.approx(1 / 3)
    rows = [{"prompt": "p", "answer": "Paris"}, {"prompt": "q", "answer": "4"}, {"prompt": "r", "answer": "blue"}]
    kept = content_retention(["It is Paris.", "4", "red"], ["paris", "five", "blue"], rows)
    assert kept == {"base_correct": 2, "kept": 1, "retention": 0.5}  # "blue" was not known by the base
    assert content_retention(["x", "y", "z"], ["Paris", "4", "blue"], rows)["retention"] is None
    assert harmonic_mean([0.5, 1.0, None]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.0, 1.0]) == 0.0
    with pytest.raises(DataError):
        content_retention(["x"], ["y"], [{"prompt": "p"}])


def _planted(values: dict, distinct: dict | None = None):
    """A scorer: validation behaviour rate per coefficient from `values`, fixed retention and fluency."""
    calls = []

    def evaluator(c, split):
        calls.append((c, split))
        return {"behaviour_rate": values[c], "content_retention": 1.0, "fluency": 1.0,
                "distinct_2": (distinct or {}).get(c, 0.9)}

    return evaluator, calls


def test_sweep_picks_the_planted_best_and_flags_collapse():
    grid = [0.0, 1.0, 2.0, 4.0, 8.0]
    rates = {0.0: 0.1, 1.0: 0.4, 2.0: 0.8, 4.0: 0.5, 8.0: 0.2}
    evaluator, calls = _planted(rates, {8.0: 0.1, 4.0: 0.5})
    data = {"prompts": [f"p{i}" for i in range(6)]}
    report = sweep(None, None, VectorMethod(_vector()), grid, data, evaluator=evaluator)
    assert report["best_coefficient"] == 2.0
    # harmonic mean of 0.8, 1, 1 = 3 / (1.25 + 2)
    assert report["best_validation_score"] == pytest.approx(3 / 3.25)
    assert calls == [(c, "validation") for c in grid] + [(2.0, "test")]
    assert report["collapse"] == [8.0]  # distinct-2 0.1 and the rate fell; 4.0 has distinct-2 0.5
    assert report["split"]["validation_prompts"] == 3 and report["split"]["test_prompts"] == 3
    json.dumps(report, allow_nan=False)
    both, _ = _planted({-4.0: 0.1, -1.0: 0.6, 0.0: 0.2, 1.0: 0.3}, {-4.0: 0.2, 0.0: 0.1})
    flagged = sweep(None, None, VectorMethod(_vector()), [-4.0, -1.0, 0.0, 1.0], data, evaluator=both)
    assert flagged["collapse"] == [-4.0] and flagged["best_coefficient"] == -1.0  # 0.0: low distinct-2, nothing before
    tie, _ = _planted({-1.0: 0.5, 0.5: 0.5, 1.0: 0.5})
    assert sweep(None, None, VectorMethod(_vector()), [-1.0, 1.0, 0.5], data,
                 evaluator=tie)["best_coefficient"] == 0.5  # ties: the gentlest


def test_split_is_seeded_and_disjoint():
    rows = list(range(7))
    v, t = split_half(rows, 0)
    assert len(v) == 4 and len(t) == 3 and sorted(v + t) == rows
    assert split_half(rows, 0) == (v, t) and split_half(rows, 1) != (v, t)


def test_sweep_on_a_tiny_model_end_to_end(tiny_llama, tmp_path):
    model, tok = tiny_llama
    data = {"prompts": ["hello", "what is up", "say hi", "tell me"],
            "facts": [{"prompt": "capital?", "answer": ["a", "e"]}, {"prompt": "two plus two", "answer": "a"}],
            "neutral": NEUTRAL, "pairs": ROWS}
    report = sweep(model, tok, VectorMethod(_vector()), [0.0, 2.0], data, behaviour_spec="regex:.", max_new_tokens=4,
                   eos_token_id=None)
    json.dumps(report, allow_nan=False)
    zero = report["validation"][0]["metrics"]
    assert zero["kl"] == 0.0 and zero["fluency"] == 1.0
    assert zero["behaviour_rate"] == zero["base_behaviour_rate"]
    assert report["validation"][1]["metrics"]["kl"] > 0
    assert set(report["steerability"]) >= {"slopes", "anti_steerable_fraction", "spearman"}
    base = sweep(model, tok, BaseMethod(), None, data, behaviour_spec="regex:.", max_new_tokens=4, eos_token_id=None)
    for key in ("behaviour_rate", "kl", "nll", "distinct_2", "replies", "content_retention"):
        assert base["validation"][0]["metrics"][key] == zero[key]  # coefficient 0 of a vector = the base model
    pytest.importorskip("matplotlib")
    old = os.umask(0o027)
    try:
        from reftkit.steer.evaluate import plot_sweep
        path = plot_sweep(report, tmp_path / "sweep.png")
    finally:
        os.umask(old)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_prompt_method_puts_the_instruction_in_the_template(tiny_llama):
    _, tok = tiny_llama
    ids = PromptMethod("Shout.").prompt_ids(tok, "hello")
    text = tok.decode(ids)
    assert "<|im_start|>system\nShout.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    user = tok.decode(PromptMethod("Shout.", role="user").prompt_ids(tok, "hello"))
    assert "<|im_start|>user\nShout.\n\nhello<|im_end|>" in user


def test_bad_inputs_are_typed_errors(tiny_llama):
    model, tok = tiny_llama
    method = VectorMethod(_vector())
    with pytest.raises(DataError):
        likelihood(model, tok, BaseMethod(), [])
    with pytest.raises(DataError):
        likelihood(model, tok, BaseMethod(), [{"prompt": "p", "target": "t"}])
    with pytest.raises(ConfigError):
        likelihood(model, tok, method, ROWS, [0.0, math.nan])
    with pytest.raises(ConfigError):
        likelihood(model, tok, method, ROWS, None)
    with pytest.raises(ConfigError):
        likelihood(model, tok, BaseMethod(), ROWS, [0.0, 1.0])
    evaluator, _ = _planted({0.0: 0.5})
    with pytest.raises(DataError):
        sweep(None, None, method, [0.0], {"prompts": []}, evaluator=evaluator)
    with pytest.raises(DataError):
        sweep(None, None, method, [0.0], {"prompts": ["a", "b"], "facts": [{"prompt": "x"}, {"prompt": "y"}]},
              evaluator=evaluator)
    with pytest.raises(DataError):
        sweep(None, None, method, [0.0], {"prompts": ["a", "b"], "typo": []}, evaluator=evaluator)
    with pytest.raises(ConfigError):
        sweep(None, None, method, [float("nan")], {"prompts": ["a", "b"]}, evaluator=evaluator)
    with pytest.raises(ConfigError):
        sweep(None, None, method, [0.0], {"prompts": ["a", "b"]}, evaluator=evaluator, fluency="vibes")
    with pytest.raises(ConfigError):
        VectorMethod("not a vector")
    with pytest.raises(DataError):
        side_effects(model, tok, BaseMethod(), None, ["a"])


def test_adapter_method_scores_through_the_adapter(tiny_llama):
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.model import ReftModel
    from reftkit.steer.evaluate import AdapterMethod

    model, tok = tiny_llama
    reft = ReftModel(model, ReftConfig(rank=4, layers=[0, 2], positions="l1"), adapter_name="shout")
    try:
        method = AdapterMethod(reft)
        out = likelihood(model, tok, method, ROWS[:1])
        context = prompt_ids(tok, "hi")
        lp = {}
        with torch.no_grad():
            for f in ("target", "other"):
                scored = tok(ROWS[0][f], add_special_tokens=False)["input_ids"]
                prompt = torch.tensor([[1] * len(context) + [0] * len(scored)])  # the edit is on the prompt's last token
                logits = reft(input_ids=torch.tensor([context + scored]), prompt_mask=prompt).logits[0]
                logits = logits.double().log_softmax(-1)
                lp[f] = sum(float(logits[len(context) - 1 + k, t]) for k, t in enumerate(scored))
        assert_close(out["per_example"][0][0], lp["target"] - lp["other"], scale=abs(lp["target"]) + abs(lp["other"]),
                     dtype=F32)
        assert out["per_example"][0][0] != likelihood(model, tok, BaseMethod(), ROWS[:1])["per_example"][0][0]
        said = replies(model, tok, method, ["hi"], max_new_tokens=4, eos_token_id=None)
        ids = torch.tensor([context])
        direct = reft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=["shout"],
                               max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert said == [tok.decode(direct[0, len(context):], skip_special_tokens=True).strip()]
        with pytest.raises(ConfigError):
            AdapterMethod(reft, "missing")
    finally:
        reft.unload()


@pytest.mark.parametrize("scope, expected", [
    ("all", lambda P, T: list(range(T))),
    ("generated", lambda P, T: list(range(P, T))),
    ("prompt", lambda P, T: list(range(P))),
    ("l2", lambda P, T: [P - 2, P - 1]),  # last_k: the prompt's last two tokens only
    ("last_prompt_token_then_generated", lambda P, T: list(range(P - 1, T))),
])
def test_likelihood_edits_where_generation_would(tiny_llama, scope, expected):
    from reftkit.steer import steer

    model, tok = tiny_llama
    row = ROWS[0]
    context = prompt_ids(tok, row["prompt"])
    P = len(context)
    out = likelihood(model, tok, VectorMethod(_vector(), scope=scope), [row], [1.5])
    # the reference: an explicit mask of the analytic positions, one unpadded forward
    from reftkit.positions import Positions

    lp = {}
    with torch.no_grad(), steer(model, [(_vector(), 1.5)], scope="all") as s:  # positions given per call below
        for f in ("target", "other"):
            ids = tok(row[f], add_special_tokens=False)["input_ids"]
            sel = torch.zeros(1, len(context) + len(ids), dtype=torch.bool)
            sel[0, expected(P, len(context) + len(ids))] = True
            logits = s.run({"input_ids": torch.tensor([context + ids])}, positions=Positions.mask(sel)).output.logits
            logits = logits[0].double().log_softmax(-1)
            lp[f] = sum(float(logits[P - 1 + k, t]) for k, t in enumerate(ids))
    assert_close(out["per_example"][0][0], lp["target"] - lp["other"], scale=abs(lp["target"]) + abs(lp["other"]),
                 dtype=F32)
