"""SteeringVector: construction checks, units, arithmetic (identities and refusals), files (bit-exact round trip,
hostile folders), and the model check."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import assert_close, assert_identical
from safetensors.torch import load_file, save_file

from reftkit.adapters import base_model_record
from reftkit.errors import ConfigError, IncompatibleModelError
from reftkit.steer import SteeringVector
from reftkit.steer.vector import CONFIG_NAME, WEIGHTS_NAME

SITES = ("L1.block_output", "L2.block_output")


def _vec(seed=0, **kw) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({s: torch.randn(64, generator=g) for s in SITES}, **kw)


def _ids(seed=0):
    return torch.randint(3, 260, (2, 6), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _steered_logits(model, vector, coefficient=1.0, **kw):
    with vector.apply(model, coefficient, **kw) as steered:
        return steered(input_ids=_ids()).logits


def test_construction_canonicalises_and_checks_fields():
    v = SteeringVector({"L1.block_output": torch.ones(4, dtype=torch.float64)})
    assert v.directions["L1.block_output"].dtype == torch.float32 and v.sites == ["L1.block_output"]
    assert v.scales == {"L1.block_output/direction_norm": 2.0}
    assert v.norms() == {"L1.block_output": 2.0}
    bad = [
        ({}, "non-empty"),
        ({"layer one": torch.ones(4)}, "not a site name"),
        ({"L1.block_output": torch.ones(2, 2, 2)}, r"\[d\] or \[T, d\]"),
        ({"L1.block_output": torch.tensor([1.0, float("nan")])}, "NaN"),
        ({"L1.block_output": torch.arange(4)}, "float tensor"),
    ]
    for directions, match in bad:
        with pytest.raises(ConfigError, match=match):
            SteeringVector(directions)
    one = {"L1.block_output": torch.ones(4)}
    with pytest.raises(ConfigError, match="unknown steering operator"):
        SteeringVector(one, operator="multiply")
    with pytest.raises(ConfigError, match="unknown coefficient unit"):
        SteeringVector(one, unit="sigma")
    with pytest.raises(ConfigError, match="positions string"):
        SteeringVector(one, scope="everywhere")
    with pytest.raises(ConfigError, match="'<site>/<kind>'"):
        SteeringVector(one, scales={"L1.block_output": 3.0})
    with pytest.raises(ConfigError, match="needs scales"):
        SteeringVector(one, unit="mean_diff_norm")
    with pytest.raises(ConfigError, match="raw coefficients"):
        SteeringVector({"L1.block_output": torch.ones(3, 4)}, unit="hidden_norm",
                       scales={"L1.block_output/hidden_norm": 1.0})


def test_units_convert_coefficients_to_raw_multipliers():
    v = SteeringVector({"L1.block_output": torch.full((4,), 0.5)}, unit="mean_diff_norm",
                       scales={"L1.block_output/mean_diff_norm": 6.0, "L1.block_output/hidden_norm": 20.0})
    assert v.raw_multipliers(2.0) == {"L1.block_output": 2.0 * 6.0 / 1.0}
    assert v.raw_multipliers(0.1, unit="hidden_norm") == {"L1.block_output": pytest.approx(0.1 * 20.0)}
    assert v.raw_multipliers(3.0, unit="raw") == {"L1.block_output": 3.0}
    raw = v.in_raw_units()
    assert raw.unit == "raw"
    assert_close(raw.directions["L1.block_output"], torch.full((4,), 3.0))
    # arithmetic keeps the conversion linear: twice the vector is twice the edit in every unit
    assert (2 * v).raw_multipliers(1.0) == v.raw_multipliers(1.0)
    assert_close((2 * v).in_raw_units().directions["L1.block_output"], 2 * raw.directions["L1.block_output"])
    for bad in (float("nan"), float("inf"), "1", None, True):
        with pytest.raises(ConfigError):
            v.raw_multipliers(bad)


def test_arithmetic_acts_on_directions():
    a, b = _vec(0), _vec(1)
    for s in SITES:
        da, db = a.directions[s], b.directions[s]
        assert_identical((a + b).directions[s], da + db)
        assert_identical((a - b).directions[s], da - db)
        assert_identical((2 * a).directions[s], 2 * da)
        assert_identical((a * 2).directions[s], da * 2)
        assert_identical((-a).directions[s], -da)
        assert_identical((a / 2).directions[s], da / 2)
    assert (a + b).method == "mean_diff" and (a + b).operator == "add"
    assert a == _vec(0) and a != b


def test_arithmetic_refuses_vectors_that_do_not_match():
    a = _vec(0)
    other_site = SteeringVector({"L3.block_output": torch.ones(64), "L1.block_output": torch.ones(64)})
    cases = [
        (other_site, "different sites"),
        (SteeringVector({s: torch.ones(32) for s in SITES}), "different shapes"),
        (_vec(1, operator="ablate"), "different operator"),
        (_vec(1, scope="l1@all"), "different scope"),
        (_vec(1, operator_config={"norm_preserving": True}), "different operator_config"),
    ]
    for other, match in cases:
        with pytest.raises(ConfigError, match=match):
            a + other
        with pytest.raises(ConfigError, match=match):
            a - other
    scaled = dict(unit="hidden_norm")
    x = _vec(0, scales={f"{s}/hidden_norm": 10.0 for s in SITES}, **scaled)
    y = _vec(1, scales={f"{s}/hidden_norm": 20.0 for s in SITES}, **scaled)
    with pytest.raises(ConfigError, match="different scales"):
        x + y
    for bad in (float("nan"), "2", None):
        with pytest.raises(ConfigError):
            a * bad
    with pytest.raises(ConfigError, match="by 0"):
        a / 0
    with pytest.raises(TypeError):
        a + 1.0


def test_v_minus_v_and_v_times_zero_give_the_base_model_bit_for_bit(tiny_llama):
    model = tiny_llama[0]
    v = _vec(0)
    with torch.no_grad():
        plain = model(input_ids=_ids()).logits
    assert_identical(_steered_logits(model, v - v, 3.0), plain)
    assert_identical(_steered_logits(model, v * 0, 3.0), plain)
    assert_identical(_steered_logits(model, v, 0.0), plain)
    assert not torch.equal(_steered_logits(model, v, 3.0), plain)
    # 2v at 1 is v at 2 (up to rounding), and a sum steers like both vectors at once
    assert_close(_steered_logits(model, 2 * v, 1.0), _steered_logits(model, v, 2.0))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    v = SteeringVector({SITES[0]: torch.randn(64), SITES[1]: torch.randn(64)}, method="pca", operator="clamp",
                       operator_config={"value": 2.5, "bias": {SITES[0]: torch.randn(64), SITES[1]: torch.randn(64)},
                                        "norm_preserving": False},
                       scope="l1@all", unit="mean_diff_norm",
                       scales={f"{s}/mean_diff_norm": 1.25 for s in SITES}, counts={"positive": 3, "negative": 3},
                       model_hint={"architecture": "LlamaForCausalLM", "hidden_size": 64},
                       report={"sites": {SITES[0]: {"consistency": 0.5}}, "warnings": []})
    v.save(tmp_path / "v")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["v"]  # nothing temporary left behind
    loaded = SteeringVector.load(tmp_path / "v")
    assert loaded == v
    for s in SITES:
        assert_identical(loaded.directions[s], v.directions[s])
        assert_identical(loaded.operator_config["bias"][s], v.operator_config["bias"][s])
    positional = SteeringVector({SITES[0]: torch.randn(3, 64)}, method="actadd", scope="f3@prompt")
    positional.save(tmp_path / "p")
    assert SteeringVector.load(tmp_path / "p") == positional
    v.save(tmp_path / "v")  # overwriting a save is allowed and atomic
    assert SteeringVector.load(tmp_path / "v") == v


def _saved(tmp_path):
    v = _vec(0, operator="clamp", operator_config={"bias": {s: torch.ones(64) for s in SITES}})
    v.save(tmp_path / "v")
    return tmp_path / "v"


def _edit_json(folder, fn):
    path = folder / CONFIG_NAME
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _edit_tensors(folder, fn):
    path = folder / WEIGHTS_NAME
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


HOSTILE = {
    "config-missing": (lambda f: (f / CONFIG_NAME).unlink(), CONFIG_NAME),
    "weights-missing": (lambda f: (f / WEIGHTS_NAME).unlink(), WEIGHTS_NAME),
    "config-not-json": (lambda f: (f / CONFIG_NAME).write_text("{not json"), CONFIG_NAME),
    "config-not-utf8": (lambda f: (f / CONFIG_NAME).write_bytes(b"\xff\xfe{}"), CONFIG_NAME),
    "config-a-list": (lambda f: (f / CONFIG_NAME).write_text("[]"), CONFIG_NAME),
    "unknown-field": (lambda f: _edit_json(f, lambda d: d.update(pickle="os.system")), CONFIG_NAME),
    "missing-field": (lambda f: _edit_json(f, lambda d: d.pop("unit")), CONFIG_NAME),
    "newer-version": (lambda f: _edit_json(f, lambda d: d.update(format_version=99)), CONFIG_NAME),
    "bool-version": (lambda f: _edit_json(f, lambda d: d.update(format_version=True)), CONFIG_NAME),
    "unknown-operator": (lambda f: _edit_json(f, lambda d: d.update(operator="os.system")), CONFIG_NAME),
    "bad-scope": (lambda f: _edit_json(f, lambda d: d.update(scope="../../etc")), CONFIG_NAME),
    "nan-scale": (lambda f: _edit_json(f, lambda d: d["scales"].update({f"{SITES[0]}/hidden_norm": "NaN"})),
                  CONFIG_NAME),
    "sites-not-a-list": (lambda f: _edit_json(f, lambda d: d.update(sites="L1.block_output")), CONFIG_NAME),
    "site-without-tensor": (lambda f: _edit_json(f, lambda d: d["sites"].append("L3.block_output")), WEIGHTS_NAME),
    "tensor-ref-outside": (lambda f: _edit_json(
        f, lambda d: d["operator_config"]["bias"].update({SITES[0]: {"$tensor": f"direction.{SITES[1]}"}})),
        CONFIG_NAME),
    "tensor-ref-missing": (lambda f: _edit_json(
        f, lambda d: d["operator_config"]["bias"].update({SITES[0]: {"$tensor": "config.nothing"}})), CONFIG_NAME),
    "weights-truncated": (lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:40]),
                          WEIGHTS_NAME),
    "weights-garbage": (lambda f: (f / WEIGHTS_NAME).write_bytes(b"\x00" * 64), WEIGHTS_NAME),
    "float64-direction": (lambda f: _edit_tensors(f, lambda t: t.update(
        {f"direction.{SITES[0]}": t[f"direction.{SITES[0]}"].double()})), WEIGHTS_NAME),
    "nan-direction": (lambda f: _edit_tensors(f, lambda t: t.update(
        {f"direction.{SITES[0]}": torch.full((64,), float("nan"))})), CONFIG_NAME),
    "extra-tensor": (lambda f: _edit_tensors(f, lambda t: t.update({"payload": torch.zeros(2)})), WEIGHTS_NAME),
    "wrong-bias-shape": (lambda f: _edit_tensors(f, lambda t: t.update(
        {f"config.bias.{SITES[0]}": torch.zeros(3)})), None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_folders_raise_config_errors_naming_the_file(tmp_path, tiny_llama, case):
    folder = _saved(tmp_path)
    damage, names = HOSTILE[case]
    damage(folder)
    if names is None:  # readable, but refused when it is built for a model
        v = SteeringVector.load(folder)
        with pytest.raises(ConfigError, match="bias must be a tensor"):
            v.to_bindings(tiny_llama[0])
        return
    with pytest.raises(ConfigError) as info:
        SteeringVector.load(folder)
    assert names in str(info.value)


def test_check_model_names_both_models(tiny_llama, tiny_model):
    model = tiny_llama[0]
    record = base_model_record(model)
    ok = _vec(0, model_hint=record)
    ok.check_model(model)
    narrow = SteeringVector({"L1.block_output": torch.ones(32)}, model_hint=record)
    with pytest.raises(IncompatibleModelError, match="width 32 .* width 64"):
        narrow.check_model(model)
    with pytest.raises(IncompatibleModelError, match="does not exist"):
        SteeringVector({"L9.block_output": torch.ones(64)}).check_model(model)
    gpt2 = tiny_model("gpt2")[0]
    foreign = _vec(0, model_hint=base_model_record(gpt2))
    with pytest.raises(IncompatibleModelError) as info:
        foreign.check_model(model)
    assert "GPT2LMHeadModel" in str(info.value) and "LlamaForCausalLM" in str(info.value)
    with pytest.raises(IncompatibleModelError, match="architecture"):
        foreign.to_bindings(model)
    other_weights = {**record, "weights": {**record["weights"], "sample": [v + 1.0 for v in record["weights"]["sample"]]}}
    with pytest.raises(IncompatibleModelError, match="weights differ"):
        _vec(0, model_hint=other_weights).check_model(model)
    _vec(0, model_hint=other_weights).check_model(model, check_weights=False)


def test_head_and_neuron_vectors_save_load_and_steer(tiny_llama, tmp_path):
    model = tiny_llama[0]
    ids = _ids(2)
    g = torch.Generator().manual_seed(9)
    head = SteeringVector({"L2.H1.head_attention_value_output": torch.randn(16, generator=g)})
    neurons = SteeringVector({"L1.mlp_activation": torch.randn(128, generator=g)}, operator="neuron_fill",
                             operator_config={"neurons": [4, 17, 90]}, method="lape")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    for k, v in enumerate((head, neurons)):
        v.save(tmp_path / str(k))
        loaded = SteeringVector.load(tmp_path / str(k))
        assert loaded == v
        with torch.no_grad():
            a, b = _steered_logits(model, v, 2.0), _steered_logits(model, loaded, 2.0)
        assert_identical(a, b)
        assert not torch.equal(a, plain)
    with pytest.raises(IncompatibleModelError, match="width 64 .* width 16"):
        SteeringVector({"L2.H1.head_attention_value_output": torch.ones(64)}).check_model(model)
