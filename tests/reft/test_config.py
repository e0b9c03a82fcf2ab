"""ReftConfig: validation, the checks that need a model, and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from reftkit.errors import ConfigError, PositionError
from reftkit.positions import Positions
from reftkit.reft.config import FORMAT_VERSION, METHODS, ReftConfig
from reftkit.reft.model import ReftModel


def test_unknown_method_names_the_choices():
    with pytest.raises(ConfigError, match=r"unknown ReFT method 'lora'.*loreft"):
        ReftConfig(method="lora")


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_rank_must_be_a_positive_integer(rank):
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        ReftConfig(rank=rank)


def test_rank_larger_than_the_hidden_size_fails_on_the_model_naming_both(llama):
    config = ReftConfig(rank=65, layers=[1])  # valid as data: the width is only known on a model
    with pytest.raises(ConfigError, match=r"rank 65 .* width 64 of L1\.block_output"):
        ReftModel(llama, config)
    ReftModel(llama, ReftConfig(rank=64, layers=[1])).unload()  # the largest rank that fits


def test_layers_out_of_range_name_the_valid_range(llama):
    with pytest.raises(ConfigError, match=r"layers \[4, 7\] are out of range; this model has layers 0\.\.3"):
        ReftModel(llama, ReftConfig(layers=[1, 4, 7]))


@pytest.mark.parametrize("layers", [[], ["a"], [1.5], "1,x"])
def test_bad_layers(layers):
    with pytest.raises(ConfigError, match="layers"):
        ReftConfig(layers=layers)


def test_layers_from_a_string():
    assert ReftConfig(layers="2;10;18").layers == [2, 10, 18]
    assert ReftConfig(layers="1, 3").layers == [1, 3]
    assert ReftConfig(layers=2).layers == [2]


@pytest.mark.parametrize("positions", ["f1+", "x3", "f1+l1+l2", "", "span:3"])
def test_unparsable_positions_raise_position_error(positions):
    with pytest.raises(PositionError, match="cannot parse"):
        ReftConfig(positions=positions)


def test_positions_must_be_a_string():
    with pytest.raises(ConfigError, match="positions must be a string"):
        ReftConfig(positions=[0, 1])


@pytest.mark.parametrize("field,value", [("dropout", 1.0), ("dropout", -0.1), ("dropout_on", "input")])
def test_dropout_fields(field, value):
    with pytest.raises(ConfigError, match=field):
        ReftConfig(**{field: value})


def test_split_positions_tied_and_untied():
    assert [s for s, _ in ReftConfig(positions="f2+l3").split_positions()] == [""]
    (s1, p1), (s2, p2) = ReftConfig(positions="f2+l3", tied=False).split_positions()
    assert (s1, p1.first, p1.last) == ("first", 2, 0)
    assert (s2, p2.first, p2.last) == ("last", 0, 3)
    # untied only splits when both first and last are used
    assert len(ReftConfig(positions="l3", tied=False).split_positions()) == 1
    assert ReftConfig(positions="all", tied=False).split_positions()[0][1].kind == "all"


def test_json_round_trip_keeps_every_field():
    config = ReftConfig(method="noreft", layers=[0, 2], component="mlp_output", rank=3, positions="f2+l2",
                        tied=False, dropout=0.1, dropout_on="output", act_fn="gelu", seed=7,
                        modules_to_save=["score"], extra={"add_bias": True})
    text = config.to_json()
    assert json.loads(text)["format_version"] == FORMAT_VERSION
    assert ReftConfig.from_json(text) == config
    assert ReftConfig.from_dict(config.to_dict()) == config


def test_json_round_trip_of_explicit_sites():
    sites = [{"layer": 0, "method": "consreft", "config": {"low_rank_dimension": 2}},
             {"layer": 1, "component": "mlp_output", "method": "red"}]
    config = ReftConfig(layers=[0, 1], interventions=sites)
    again = ReftConfig.from_json(config.to_json())
    assert again == config
    assert [(s.layer, s.component, s.method) for s in again.sites(4)] == [(0, "block_output", "consreft"),
                                                                          (1, "mlp_output", "red")]


def test_format_version_mismatch():
    d = ReftConfig().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ConfigError, match=f"format version {FORMAT_VERSION + 1} is not supported"):
        ReftConfig.from_dict(d)


def test_unknown_fields_and_bad_json():
    with pytest.raises(ConfigError, match=r"unknown ReftConfig fields \['ranks'\]"):
        ReftConfig.from_dict({"ranks": 4})
    with pytest.raises(ConfigError, match="JSON"):
        ReftConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="mapping"):
        ReftConfig.from_dict([1, 2])


def test_bad_explicit_sites():
    with pytest.raises(ConfigError, match=r"interventions\[0\]: unknown method 'lora'"):
        ReftConfig(interventions=[{"layer": 0, "method": "lora"}])
    with pytest.raises(ConfigError, match=r"interventions\[1\] must be a mapping"):
        ReftConfig(interventions=[{"layer": 0, "method": "loreft"}, {"method": "loreft"}])
    with pytest.raises(ConfigError, match="twice"):
        ReftConfig(interventions=[{"layer": 0, "method": "loreft"}, {"layer": 0, "method": "red"}]).sites(4)


def test_modules_to_save_from_extra_moves_to_its_field():
    config = ReftConfig(extra={"modules_to_save": ["classifier"]})
    assert config.modules_to_save == ["classifier"] and "modules_to_save" not in config.extra


def test_every_method_builds_on_a_model(llama):
    reft = ReftModel(llama)
    for method in METHODS:
        reft.add_adapter(method, ReftConfig(method=method, layers=[1], rank=2))
    assert sorted(reft.adapter_names) == sorted(METHODS)
    assert {type(reft.adapters[m][0]).type_name for m in METHODS} == set(METHODS)
    reft.unload()


def test_positions_spec_is_parsed():
    assert isinstance(ReftConfig(positions="l3").position_spec(), Positions)
