"""Causal models: evaluation, interventions, interchanges and counterfactual datasets."""

from __future__ import annotations

import pytest

from reftkit.analysis.causal_model import CausalModel, hierarchical_equality
from reftkit.errors import ConfigError, DataError


def test_run_intervene_and_interchange():
    cm = hierarchical_equality(5)
    assert cm.inputs == ["W", "X", "Y", "Z"] and cm.outputs == ["O"]
    base = {"W": 1, "X": 1, "Y": 2, "Z": 3}
    assert cm.run(base) == {"W": 1, "X": 1, "WX": True, "Y": 2, "Z": 3, "YZ": False, "O": False}
    assert cm.output(base, {"WX": False}) is True
    assert cm.output(base, {"YZ": True}) is True
    source = {"W": 0, "X": 4, "Y": 1, "Z": 1}
    assert cm.interchange(base, {"WX": source})["O"] is True  # WX becomes False, as on the source
    assert cm.interchange(base, {"YZ": source})["O"] is True
    assert cm.interchange(base, {"W": source})["WX"] is False  # an input variable can be interchanged too


def test_counterfactual_dataset_is_seeded_and_balanced():
    cm = hierarchical_equality(10)
    data = cm.counterfactual_dataset(400, "WX", seed=3)
    assert data == cm.counterfactual_dataset(400, "WX", seed=3)
    assert data != cm.counterfactual_dataset(400, "WX", seed=4)
    for e in data[:50]:
        assert e["counterfactual_output"] == cm.output(e["base"], {"WX": cm.run(e["sources"][0])["WX"]})
    changed = sum(e["counterfactual_output"] != e["base_output"] for e in data) / len(data)
    assert 0.4 < changed < 0.6
    kept = cm.counterfactual_dataset(20, ["WX", "YZ"], keep=lambda e: e["base_output"], seed=0)
    assert len(kept) == 20 and all(e["base_output"] for e in kept) and len(kept[0]["sources"]) == 2


def test_invalid_models_and_queries():
    with pytest.raises(ConfigError, match="cycle"):
        CausalModel({"A": [0], "B": [0]}, {"A": ["B"], "B": ["A"]}, {"A": int, "B": int})
    with pytest.raises(ConfigError, match="no mechanism"):
        CausalModel({"A": [0], "B": [0]}, {"B": ["A"]}, {})
    with pytest.raises(ConfigError, match="no domain"):
        CausalModel({"A": [0]}, {"B": ["A"]}, {"B": int})
    cm = hierarchical_equality(3)
    with pytest.raises(DataError, match="missing values"):
        cm.run({"W": 0})
    with pytest.raises(DataError, match="unknown variables"):
        cm.counterfactual_dataset(1, "Q")
    with pytest.raises(DataError, match="rejects almost every"):
        cm.counterfactual_dataset(2, "WX", keep=lambda e: False, max_tries=2)
