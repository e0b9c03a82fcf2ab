"""Save and load: config.json + interventions.safetensors round-trip every registered intervention type exactly,
writes are atomic, and malformed folders or mismatched models raise typed errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from engine_util import main_output, token_ids

import reftkit
from reftkit import io
from reftkit.engine import Binding, IntervenableModel
from reftkit.errors import ConfigError, IncompatibleModelError
from reftkit.interventions import REGISTRY, build_intervention, intervention_types
from reftkit.interventions.basic import AddIntervention, CallableIntervention, CollectIntervention
from reftkit.models import build_tiny_model

# Constructor arguments beyond embed_dim, per registered type. A type missing here is built with embed_dim only;
# if that fails, the test fails and names the type (no type is skipped silently).
EXTRA = {
    "add": {"has_vector": True, "coefficient": 0.5},
    "subtract": {"has_vector": True},
    "scale": {"factor": 0.5},
    "noise": {"std": 0.1, "seed": 3},
    "autoencoder": {"latent_dim": 16},
    "jumprelu_sae": {"latent_dim": 16},
    "low_rank_rotated": {"low_rank_dimension": 4},
    "pca_rotated": {"n_components": 8},
    "replace": {"interchange_dim": 32},
    "rotated": {"interchange_dim": 8},
    "positional_add": {"length": 2},
    "norm_preserving": {"inner": {"type": "add", "config": {"embed_dim": 64, "has_vector": True}}},
}
NOT_SAVEABLE = {"callable"}  # code, not data: saving raises ConfigError (tested below)


def _build(type_name: str):
    spec = {"type": type_name, "config": {"embed_dim": 64, **EXTRA.get(type_name, {})}}
    if type_name not in EXTRA and "low_rank_dimension" in REGISTRY[type_name].config_class.__dataclass_fields__:
        spec["config"]["low_rank_dimension"] = 4
    try:
        iv = build_intervention(spec)
    except Exception as e:  # noqa: BLE001 - the message must name the type that needs constructor arguments
        raise AssertionError(f"cannot build {type_name!r} from {spec}; add its arguments to EXTRA: {e}") from e
    gen = torch.Generator().manual_seed(sum(map(ord, type_name)))
    with torch.no_grad():  # move every weight off its initial value
        for name, p in iv.named_parameters():
            if p.is_floating_point():
                noise = 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
                if "parametrizations." in name and p.dim() == 2:
                    noise = noise.tril(-1)  # an orthogonal map's free part; its diagonal holds signs
                p.add_(noise)
    return iv


def _run(im, ids, src):
    kwargs = {"sources": [{"input_ids": src}]} if im.bindings[0].intervention.source == "required" else {}
    with torch.no_grad():
        return im.run({"input_ids": ids}, **kwargs)


@pytest.mark.parametrize("type_name", [t for t in intervention_types() if t not in NOT_SAVEABLE])
def test_round_trip_reproduces_outputs_exactly(tiny_llama, tmp_path, type_name):
    model = tiny_llama[0]
    ids, src = token_ids(seed=0), token_ids(seed=1)
    iv = _build(type_name)
    with IntervenableModel(model, Binding("L1.block_output", iv, positions="f1+l1")) as im:
        before = _run(im, ids, src)
        im.save(tmp_path / "saved")
    with IntervenableModel.load(model, tmp_path / "saved") as loaded:
        after = _run(loaded, ids, src)
        assert type(loaded.interventions[0]) is type(iv)
        assert loaded.interventions[0].spec() == iv.spec()
    assert torch.equal(main_output(after.output), main_output(before.output))
    for k in before.collected:
        assert torch.equal(after.collected[k], before.collected[k])


def test_config_contents_linked_interventions_and_fields(tiny_llama, tmp_path):
    model = tiny_llama[0]
    shared = AddIntervention(vector=torch.linspace(-1, 1, 64))
    bindings = [Binding("L1.block_output", shared, name="a", positions="l2"),
                Binding("L2.block_output", shared, name="b"),
                Binding("L3.H1.head_value_output", build_intervention({"type": "replace", "config": {}}), name="c",
                        source=1, source_site="L2.H0.head_value_output", source_positions="f1", positions="span:1:3")]
    with IntervenableModel(model, bindings, default_positions="f1+l1") as im:
        im.save(tmp_path / "x")
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    assert config["format_version"] == io.FORMAT_VERSION and config["reftkit_version"] == reftkit.__version__
    assert config["model"] == {"model_type": "llama", "hidden_size": 64, "num_layers": 4, "num_attention_heads": 4,
                               "num_key_value_heads": 2}
    assert [b["intervention"] for b in config["bindings"]] == [0, 0, 1]
    assert config["bindings"][1]["positions"] is None and config["bindings"][0]["source_site"] is None
    assert config["bindings"][2]["source_site"] == {"layer": 2, "component": "head_value_output", "head": 0,
                                                    "module": None, "side": "output"}
    assert config["interventions"][0] == shared.spec()
    assert sorted(os.listdir(tmp_path)) == ["x"]  # no temporary folders left behind
    with IntervenableModel.load(model, tmp_path / "x") as loaded:
        assert len(loaded.interventions) == 2
        assert loaded.bindings[0].intervention is loaded.bindings[1].intervention
        c = loaded.bindings[2]
        assert (c.source, str(c.source_site.name), repr(c.source_positions), repr(c.positions)) == \
            (1, "L2.H0.head_value_output", "Positions(f1, scope=prompt)", "Positions(span:1:3, scope=prompt)")
        assert repr(loaded.default_positions) == "Positions(f1+l1, scope=prompt)"


def test_separate_interventions_sharing_a_tensor_are_saved(tiny_llama, tmp_path):
    model = tiny_llama[0]
    a = AddIntervention(vector=torch.linspace(-1, 1, 64))
    b = AddIntervention(embed_dim=64, has_vector=True)
    b.vector = a.vector  # tied by the user: safetensors refuses shared memory, so each is stored as a copy
    ids = token_ids()
    with IntervenableModel(model, [Binding("L1.block_output", a), Binding("L2.block_output", b)]) as im:
        before = main_output(im(input_ids=ids)).detach()
        im.save(tmp_path / "tied")
    with IntervenableModel.load(model, tmp_path / "tied") as loaded:
        assert torch.equal(main_output(loaded(input_ids=ids)).detach(), before)


def test_saving_is_atomic_and_replaces_an_earlier_save(tiny_llama, tmp_path, monkeypatch):
    model = tiny_llama[0]
    target = tmp_path / "run"
    with IntervenableModel(model, Binding("L1.block_output", AddIntervention(vector=torch.ones(64)))) as im:
        im.save(target)
        first = (target / "interventions.safetensors").read_bytes()
        im.interventions[0].vector.data.fill_(2.0)
        im.save(target)
        assert (target / "interventions.safetensors").read_bytes() != first

        def fail(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr("safetensors.torch.save_file", fail)
        im.interventions[0].vector.data.fill_(3.0)
        with pytest.raises(OSError, match="disk full"):
            im.save(target)
    assert sorted(os.listdir(tmp_path)) == ["run"]
    with IntervenableModel.load(model, target) as loaded:
        assert torch.equal(loaded.interventions[0].vector, torch.full((64,), 2.0))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        im.save(tmp_path / "file")


def test_unsaveable_bindings_raise_config_error(tiny_llama, tmp_path):
    model = tiny_llama[0]
    with IntervenableModel(model, Binding("L1.block_output", CallableIntervention(lambda b, s: b))) as im:
        with pytest.raises(ConfigError, match="callable intervention cannot be saved"):
            im.save(tmp_path / "c")
    with IntervenableModel(model, Binding("L1.block_output", CollectIntervention(), positions=[[1], [2]])) as im:
        with pytest.raises(ConfigError, match="positions.*cannot be saved"):
            im.save(tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, message", [
    ({"hidden_size": 32, "head_dim": 8}, r"hidden_size: saved 64, model has 32"),
    ({"num_hidden_layers": 2}, r"num_layers: saved 4, model has 2"),
])
def test_loading_onto_a_different_model_raises(tiny_llama, tmp_path, overrides, message):
    with IntervenableModel(tiny_llama[0], Binding("L1.block_output", AddIntervention(vector=torch.ones(64)))) as im:
        im.save(tmp_path / "s")
    other = build_tiny_model("llama", **overrides)
    with pytest.raises(IncompatibleModelError, match=message):
        IntervenableModel.load(other, tmp_path / "s")


def test_loading_onto_another_architecture_raises(tiny_llama, tiny_model, tmp_path):
    with IntervenableModel(tiny_llama[0], Binding("L1.block_output", AddIntervention(vector=torch.ones(64)))) as im:
        im.save(tmp_path / "s")
    with pytest.raises(IncompatibleModelError, match=r"model_type: saved 'llama', model has 'gpt2'"):
        IntervenableModel.load(tiny_model("gpt2")[0], tmp_path / "s")


def _saved(model, folder: Path) -> dict:
    with IntervenableModel(model, Binding("L1.block_output", AddIntervention(vector=torch.ones(64)))) as im:
        im.save(folder)
    return json.loads((folder / "config.json").read_text())


def _edit(config, path, value):
    node = config
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()


@pytest.mark.parametrize("path, value, message", [
    (("format_version",), 99, "format_version 99 was written by a newer reftkit"),
    (("format_version",), "1", "format_version must be a positive integer"),
    (("colour",), "red", r"unknown field\(s\) \['colour'\]"),
    (("bindings",), _DELETE, r"missing field\(s\) \['bindings'\]"),
    (("bindings", 0, "intervention"), 5, "names intervention 5; expected an index 0..0"),
    (("bindings", 0, "extra"), 1, r"binding 0: unknown field\(s\) \['extra'\]"),
    (("bindings", 0, "site"), {"layer": 1, "component": "nope"}, "unknown component 'nope'"),
    (("bindings", 0, "positions"), {"kind": "first_last", "first": -1, "last": 0}, "bad positions"),
    (("interventions", 0, "type"), "os.system", r"unknown intervention type 'os.system'"),
    (("interventions", 0, "config", "colour"), 1, r"unknown fields \['colour'\]"),
    (("model", "gpu"), "x", "'model' must be an object"),
])
def test_malformed_configs_raise_config_error(tiny_llama, tmp_path, path, value, message):
    model = tiny_llama[0]
    folder = tmp_path / "s"
    config = _saved(model, folder)
    _edit(config, path, value)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        IntervenableModel.load(model, folder)


def test_broken_files_raise_config_error(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    model = tiny_llama[0]
    folder = tmp_path / "s"
    _saved(model, folder)
    with pytest.raises(ConfigError, match="no config.json"):
        IntervenableModel.load(model, tmp_path / "missing")
    save_file({"0.other": torch.zeros(3)}, str(folder / "interventions.safetensors"))
    with pytest.raises(ConfigError, match=r"weights of intervention 0 \(add\) do not fit"):
        IntervenableModel.load(model, folder)
    save_file({"7.vector": torch.zeros(64)}, str(folder / "interventions.safetensors"))
    with pytest.raises(ConfigError, match="unexpected tensor '7.vector'"):
        IntervenableModel.load(model, folder)
    (folder / "interventions.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        IntervenableModel.load(model, folder)
    (folder / "interventions.safetensors").unlink()
    with pytest.raises(ConfigError, match="no interventions.safetensors"):
        IntervenableModel.load(model, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        IntervenableModel.load(model, folder)


def test_atomic_folders_get_ordinary_permissions(tmp_path):
    import os

    import torch

    from reftkit.atomic import write_folder

    umask = os.umask(0o022)
    try:
        out = write_folder(tmp_path / "adapter", {"config.json": "{}"}, {"w.safetensors": {"x": torch.zeros(2)}})
    finally:
        os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert {os.stat(f).st_mode & 0o777 for f in out.iterdir()} == {0o644}
