"""Sweeps under a KL budget, layers x strengths (`layer_sweep`, `single_site`) and CAST as an evaluated method
(`ConditionalMethod`): planted scorers pin the choice rules; tiny-llama checks that a budget is kept on real
measurements, that a row whose condition does not fire is the base model bit for bit and one that fires is the
steered model."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import assert_close, assert_identical

from reftkit.errors import ConfigError, DataError
from reftkit.steer import SteeringVector, steer
from reftkit.steer.condition import Condition
from reftkit.steer.methods import BaseMethod, ConditionalMethod, VectorMethod
from reftkit.steer.sweep import layer_sweep, plot_sweep, single_site, sweep

pytestmark = pytest.mark.numerics

PROMPTS = ["hello", "what is up", "say hi", "tell me"]
NEUTRAL = ["the cat sat on the mat", "a b c d"]


def _vector(sites=("L1.block_output",), seed=3):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({s: 4 * torch.randn(64, generator=g) for s in sites},
                          scales={f"{s}/hidden_norm": 2.0 + i for i, s in enumerate(sites)}, unit="hidden_norm")


def _planted(rates: dict, kls: dict):
    def evaluator(c, split):
        return {"behaviour_rate": rates[c], "content_retention": 1.0, "fluency": 1.0, "kl": kls[c]}

    return evaluator


def test_a_kl_budget_keeps_the_choice_within_it_and_says_when_it_cannot():
    grid = [0.5, 1.0, 2.0]
    data = {"prompts": [f"p{i}" for i in range(4)]}
    rates, kls = {0.5: 0.2, 1.0: 0.6, 2.0: 0.9}, {0.5: 0.05, 1.0: 0.4, 2.0: 3.0}
    free = sweep(None, None, VectorMethod(_vector()), grid, data, evaluator=_planted(rates, kls))
    assert free["best_coefficient"] == 2.0 and "kl_budget" not in free
    kept = sweep(None, None, VectorMethod(_vector()), grid, data, evaluator=_planted(rates, kls), kl_budget=0.5)
    assert kept["best_coefficient"] == 1.0 and kept["kl_budget"] == {"budget": 0.5, "met": True}
    assert [p["within_budget"] for p in kept["validation"]] == [True, True, False]
    none = sweep(None, None, VectorMethod(_vector()), grid, data, evaluator=_planted(rates, kls), kl_budget=0.01)
    assert none["best_coefficient"] == 0.5 and none["kl_budget"]["met"] is False  # the least KL, flagged
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ConfigError, match="kl_budget"):
            sweep(None, None, VectorMethod(_vector()), grid, data, evaluator=_planted(rates, kls), kl_budget=bad)
    with pytest.raises(ConfigError, match="neutral texts"):
        sweep(None, None, VectorMethod(_vector()), grid, data, kl_budget=1.0)


def test_single_site_keeps_that_site_its_scales_and_its_edit(tiny_llama):
    model, tok = tiny_llama
    v = _vector(("L1.block_output", "L2.block_output"))
    one = single_site(v, "L2.block_output")
    assert one.sites == ["L2.block_output"] and one.unit == "hidden_norm"
    assert set(one.scales) == {"L2.block_output/hidden_norm", "L2.block_output/direction_norm"}
    assert one.raw_multipliers(1.5) == {"L2.block_output": v.raw_multipliers(1.5)["L2.block_output"]}
    with pytest.raises(ConfigError, match="no site L3.block_output"):
        single_site(v, "L3.block_output")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), steer(model, [(one, 1.5)], scope="all") as s:
        got = s(ids).logits
    only = SteeringVector({"L2.block_output": v.directions["L2.block_output"]},
                          scales={"L2.block_output/hidden_norm": 3.0}, unit="hidden_norm")
    with torch.no_grad(), steer(model, [(only, 1.5)], scope="all") as s:
        assert_identical(got, s(ids).logits)


def test_layer_sweep_chooses_a_site_and_coefficient_within_the_budget(tiny_llama, tmp_path):
    model, tok = tiny_llama
    v = _vector(("L1.block_output", "L2.block_output"))
    data = {"prompts": PROMPTS, "neutral": NEUTRAL}
    kw = dict(behaviour_spec="regex:.", max_new_tokens=3, scope="all", eos_token_id=None)
    free = layer_sweep(model, tok, v, [0.25, 4.0], data, **kw)
    assert set(free["sites"]) == {"L1.block_output", "L2.block_output"}
    points = [p for entry in free["sites"].values() for p in entry["validation"]]
    assert len(points) == 4 and all(p["metrics"]["kl"] > 0 for p in points)
    # the KL of the same edit grows with its strength at each site
    for entry in free["sites"].values():
        assert entry["validation"][1]["metrics"]["kl"] > entry["validation"][0]["metrics"]["kl"]
    budget = min(p["metrics"]["kl"] for p in points if p["coefficient"] == 4.0) * 0.99
    kept = layer_sweep(model, tok, v, [0.25, 4.0], data, kl_budget=budget, **kw)
    chosen = kept["sites"][kept["best_site"]]["validation"]
    assert kept["best_coefficient"] == 0.25 and kept["kl_budget"] == {"budget": budget, "met": True}
    assert all(p["metrics"]["kl"] <= budget for p in chosen if p["coefficient"] == kept["best_coefficient"])
    assert kept["test"]["site"] == kept["best_site"] and kept["test"]["metrics"]["kl"] > 0
    json.dumps(kept, allow_nan=False)
    pytest.importorskip("matplotlib")
    assert plot_sweep(kept, tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="sites must be"):
        layer_sweep(model, tok, v, [1.0], data, sites=[], **kw)
    with pytest.raises(DataError, match="at least 2"):
        layer_sweep(model, tok, v, [1.0], {"prompts": ["one"]}, **kw)


@torch.no_grad()
def test_conditional_method_steers_only_the_rows_whose_condition_fires(tiny_llama):
    from reftkit.steer.metrics import replies

    model, tok = tiny_llama
    v = _vector()
    direction = torch.randn(64, generator=torch.Generator().manual_seed(9))
    probe = Condition(direction, "L1.block_output", threshold=0.0)
    sims = probe.similarities(model, tok, PROMPTS).tolist()
    threshold = sorted(sims)[1] + 1e-6  # two prompts fire, two do not
    condition = Condition(direction, "L1.block_output", threshold=threshold)
    fired = condition.decide(sims)
    assert sum(fired) == 2
    method = ConditionalMethod(v, condition, scope="all")
    kw = dict(max_new_tokens=4, eos_token_id=None, batch_size=4)
    said = replies(model, tok, method, PROMPTS, 3.0, **kw)
    plain = replies(model, tok, BaseMethod(), PROMPTS, **kw)
    steered = replies(model, tok, VectorMethod(v, scope="all"), PROMPTS, 3.0, **kw)
    assert steered != plain
    for i, f in enumerate(fired):
        assert said[i] == (steered[i] if f else plain[i])
    assert method.describe()["fired"] == 2 and method.describe()["decided"] == 4
    ids = torch.tensor([tok("hello")["input_ids"]])
    with method.session(model, 3.0) as runner:
        logits = runner.logits(ids, torch.ones_like(ids))
    if not condition.decide(condition.similarities_of_ids(model, [ids[0].tolist()]))[0]:
        assert_identical(logits, model(input_ids=ids).logits)
    else:
        with steer(model, [(v, 3.0)], scope="all") as s:
            assert_close(logits, s(ids).logits, dtype=torch.float32)
    with pytest.raises(ConfigError, match="takes a Condition"):
        ConditionalMethod(v, "not a condition")
