"""Steering-vector formats: llama.cpp control-vector GGUF (round trip through gguf.GGUFReader and import_gguf, the
index convention, refusals, hostile files, model checks) and lm-eval `steered` .pt (schema, weights_only load,
and the exported entry applied by a plain forward hook gives reftkit's logits)."""

from __future__ import annotations

import struct

import pytest
import torch
from numerics import assert_close, assert_identical

from reftkit.errors import ConfigError, IncompatibleModelError
from reftkit.models import build_tiny_model
from reftkit.steer import SteeringVector
from reftkit.steer.formats import export_gguf, export_lm_eval, import_gguf, import_lm_eval

LAYERS = (1, 2, 3)


class _Opaque:
    """An arbitrary object: loading it would need unpickling."""


def _vec(width=64, layers=LAYERS, seed=0, **kw) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({f"L{l}.block_output": torch.randn(width, generator=g) for l in layers}, **kw)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama")


def _ids():
    return torch.randint(3, 260, (2, 6), generator=torch.Generator().manual_seed(0))


# ---- GGUF ------------------------------------------------------------------------------------------------------

def test_gguf_round_trip_through_gguf_reader_and_import(tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader

    v = _vec(model_hint={"model_type": "llama", "hidden_size": 64, "num_layers": 4}, method="mean_diff")
    path = export_gguf(v, tmp_path / "v.gguf")
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 3
    assert reader.fields["controlvector.reftkit.unit"].contents() == "raw"
    assert reader.fields["controlvector.reftkit.method"].contents() == "mean_diff"
    names = [t.name for t in reader.tensors]
    assert names == [f"direction.{l}" for l in LAYERS]  # direction.N is block_output[N]
    for t in reader.tensors:
        assert t.tensor_type == GGMLQuantizationType.F32 and list(t.shape) == [64]
        expected = v.directions[f"L{t.name.split('.')[1]}.block_output"].numpy()
        assert np.array_equal(np.asarray(t.data).view(np.uint32), expected.view(np.uint32))
    del reader
    back = import_gguf(path)
    assert back.sites == v.sites
    for s in v.sites:
        assert_identical(back.directions[s], v.directions[s])
    assert back.method == "mean_diff" and back.unit == "raw" and back.scales == v.scales
    assert back.model_hint == {"model_type": "llama", "hidden_size": 64, "num_layers": 4}


def test_gguf_round_trip_keeps_unit_and_scales(tmp_path):
    v = _vec(layers=(2,), unit="mean_diff_norm", scales={"L2.block_output/mean_diff_norm": 3.25})
    back = import_gguf(export_gguf(v, tmp_path / "v.gguf", model_hint="llama"))
    assert back.unit == "mean_diff_norm" and back.scales == v.scales
    assert back.raw_multipliers(2.0) == v.raw_multipliers(2.0)


def test_gguf_export_refusals(tmp_path):
    out = tmp_path / "v.gguf"
    with pytest.raises(ConfigError, match="block_output\\[0\\]"):
        export_gguf(_vec(layers=(0, 1)), out, model_hint="llama")
    with pytest.raises(ConfigError, match="residual-stream"):
        export_gguf(SteeringVector({"L1.mlp_output": torch.ones(64)}), out, model_hint="llama")
    with pytest.raises(ConfigError, match="positional"):
        export_gguf(SteeringVector({"L1.block_output": torch.ones(3, 64)}), out, model_hint="llama")
    with pytest.raises(ConfigError, match="operator 'ablate'"):
        export_gguf(_vec(operator="ablate"), out, model_hint="llama")
    with pytest.raises(ConfigError, match="scope"):
        export_gguf(_vec(scope="prompt"), out, model_hint="llama")
    with pytest.raises(ConfigError, match="model_hint"):
        export_gguf(_vec(), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v


def _tensor_info(name: str, width: int, offset: int, ggml_type: int = 0) -> bytes:
    n = name.encode()
    return struct.pack("<Q", len(n)) + n + struct.pack("<IQIQ", 1, width, ggml_type, offset)


def _gguf(kvs: list[bytes], infos: list[bytes], data: bytes, *, n_tensors=None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos) if n_tensors is None else n_tensors, len(kvs))
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + data


def test_hostile_gguf_files_are_config_errors_naming_the_file(tmp_path):
    good = export_gguf(_vec(), tmp_path / "good.gguf", model_hint="llama").read_bytes()
    arch = [_kv_string("general.architecture", "controlvector")]
    data = b"\0" * 16
    cases = {
        "truncated": good[: len(good) // 2],
        "random": bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1)).tolist()),
        "tiny": b"GGUF",
        "model_file": _gguf([_kv_string("general.architecture", "llama")], [_tensor_info("direction.1", 4, 0)], data),
        "no_arch": _gguf([], [_tensor_info("direction.1", 4, 0)], data),
        "count_lies": _gguf(arch, [_tensor_info("direction.1", 4, 0)], data, n_tensors=2**40),
        "count_lies_small": _gguf(arch, [_tensor_info("direction.1", 4, 0)], data, n_tensors=2),
        "data_short": _gguf(arch, [_tensor_info("direction.1", 64, 0)], data),
        "direction_0": _gguf(arch, [_tensor_info("direction.0", 4, 0)], data),
        "other_tensor": _gguf(arch, [_tensor_info("token_embd.weight", 4, 0)], data),
        "f16": _gguf(arch, [_tensor_info("direction.1", 8, 0, ggml_type=1)], data),
        "widths": _gguf(arch, [_tensor_info("direction.1", 4, 0), _tensor_info("direction.2", 2, 32)],
                        data + b"\0" * 32),
        "nan": _gguf(arch, [_tensor_info("direction.1", 4, 0)], struct.pack("<4f", 1, float("nan"), 0, 0)),
        "layer_count": _gguf(arch + [b"".join([struct.pack("<Q", 25), b"controlvector.layer_count",
                                               struct.pack("<II", 4, 7)])],
                             [_tensor_info("direction.1", 4, 0)], data),
    }
    for name, blob in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(blob)
        with pytest.raises(ConfigError) as e:
            import_gguf(path)
        assert str(path) in str(e.value), (name, str(e.value))
    # the hand-built layout itself is sound: the same file with a good name loads
    ok = tmp_path / "ok.gguf"
    ok.write_bytes(_gguf(arch, [_tensor_info("direction.3", 4, 0)], struct.pack("<4f", 1, 2, 3, 4)))
    v = import_gguf(ok)
    assert v.sites == ["L3.block_output"] and v.directions["L3.block_output"].tolist() == [1, 2, 3, 4]
    assert v.model_hint == {"hidden_size": 4} and v.method == "imported"
    # as llama.cpp's cvector-generator writes it: layer_count as int32, with a model hint
    count = struct.pack("<Q", 25) + b"controlvector.layer_count" + struct.pack("<Ii", 5, 1)
    ok.write_bytes(_gguf(arch + [_kv_string("controlvector.model_hint", "llama"), count],
                         [_tensor_info("direction.3", 4, 0)], struct.pack("<4f", 1, 2, 3, 4)))
    assert import_gguf(ok).model_hint == {"model_type": "llama", "hidden_size": 4}


def test_import_gguf_checks_the_model(tmp_path, model):
    fits = import_gguf(export_gguf(_vec(), tmp_path / "fits.gguf", model_hint="llama"), model=model)
    assert fits.sites == [f"L{l}.block_output" for l in LAYERS]
    wide = export_gguf(_vec(width=32), tmp_path / "wide.gguf", model_hint="llama")
    with pytest.raises(IncompatibleModelError, match="width 32.*hidden size is 64") as e:
        import_gguf(wide, model=model)
    assert str(wide) in str(e.value) and "LlamaForCausalLM" in str(e.value)
    deep = export_gguf(_vec(layers=(2, 4)), tmp_path / "deep.gguf", model_hint="llama")
    with pytest.raises(IncompatibleModelError, match=r"block_output\[4\].*4 layers") as e:
        import_gguf(deep, model=model)
    assert str(deep) in str(e.value)
    other = export_gguf(_vec(), tmp_path / "other.gguf", model_hint="gpt2")
    with pytest.raises(IncompatibleModelError, match="model type 'gpt2' vs 'llama'"):
        import_gguf(other, model=model)


# ---- lm-eval -----------------------------------------------------------------------------------------------------

def test_lm_eval_export_schema_and_round_trip(tmp_path):
    v = _vec(unit="mean_diff_norm", scales={f"L{l}.block_output/mean_diff_norm": 2.0 * l for l in LAYERS})
    path = export_lm_eval(v, tmp_path / "steer.pt", coefficient=1.5)
    doc = torch.load(path, weights_only=True)
    assert list(doc) == [f"layers.{l}" for l in LAYERS]  # relative to model.base_model
    k = v.raw_multipliers(1.5)
    for l in LAYERS:
        entry = doc[f"layers.{l}"]
        assert set(entry) == {"steering_vector", "steering_coefficient", "action", "bias", "head_index"}
        assert entry["action"] == "add" and entry["bias"] is None and entry["head_index"] is None
        assert isinstance(entry["steering_coefficient"], float)
        assert entry["steering_coefficient"] == k[f"L{l}.block_output"]
        assert_identical(entry["steering_vector"], v.directions[f"L{l}.block_output"])
    back = import_lm_eval(path)
    assert back.sites == v.sites and back.operator == "add"
    for s in v.sites:
        assert_close(back.directions[s], v.directions[s] * k[s])
    with pytest.raises(ConfigError, match="takes no bias"):
        export_lm_eval(v, tmp_path / "x.pt", bias=torch.zeros(64))
    with pytest.raises(ConfigError, match="operator is 'add' but action='clamp'"):
        export_lm_eval(v, tmp_path / "x.pt", action="clamp")
    with pytest.raises(ConfigError, match="positional"):
        export_lm_eval(SteeringVector({"L1.block_output": torch.ones(3, 64)}), tmp_path / "x.pt")


def test_lm_eval_clamp_export(tmp_path):
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(64, generator=g)
    v = _vec(layers=(2,), operator="clamp", operator_config={"value": 0.5, "bias": bias})
    doc = torch.load(export_lm_eval(v, tmp_path / "c.pt", coefficient=3.0, action="clamp"), weights_only=True)
    entry = doc["layers.2"]
    assert entry["action"] == "clamp" and entry["steering_coefficient"] == 1.5
    assert_identical(entry["bias"], bias)
    back = import_lm_eval(tmp_path / "c.pt")
    assert back.operator == "clamp" and back.operator_config["value"] == {"L2.block_output": 1.5}
    assert_identical(back.operator_config["bias"]["L2.block_output"], bias)


def test_import_lm_eval_refuses_bad_files(tmp_path):
    bad = {
        "list": [1, 2],
        "hook": {"layers.1.mlp": {"steering_vector": torch.ones(4)}},
        "action": {"layers.1": {"steering_vector": torch.ones(4), "action": "scale"}},
        "head": {"layers.1": {"steering_vector": torch.ones(4), "head_index": 2}},
        "add_bias": {"layers.1": {"steering_vector": torch.ones(4), "bias": torch.ones(4)}},
    }
    for name, doc in bad.items():
        path = tmp_path / f"{name}.pt"
        torch.save(doc, path)
        with pytest.raises(ConfigError) as e:
            import_lm_eval(path)
        assert str(path) in str(e.value), name
    pickled = tmp_path / "pickled.pt"
    torch.save({"layers.1": {"steering_vector": torch.ones(4), "extra": _Opaque()}},
               pickled)
    with pytest.raises(ConfigError, match="never unpickled") as e:
        import_lm_eval(pickled)
    assert str(pickled) in str(e.value)


@torch.no_grad()
def test_lm_eval_entry_applied_by_hand_matches_reftkit(tmp_path, model):
    v = _vec(seed=5) * 0.5
    coefficient = 2.5
    doc = torch.load(export_lm_eval(v, tmp_path / "s.pt", coefficient=coefficient, model=model), weights_only=True)
    assert list(doc) == [f"layers.{l}" for l in LAYERS]
    modules = dict(model.base_model.named_modules())
    handles = []
    for hook, entry in doc.items():
        add = entry["steering_vector"] * entry["steering_coefficient"]

        def hook_fn(module, args, output, add=add):
            if isinstance(output, tuple):
                return (output[0] + add, *output[1:])
            return output + add

        handles.append(modules[hook].register_forward_hook(hook_fn))
    try:
        by_hand = model(input_ids=_ids()).logits
    finally:
        for h in handles:
            h.remove()
    with v.apply(model, coefficient, scope="all") as steered:
        ours = steered(input_ids=_ids()).logits
    plain = model(input_ids=_ids()).logits
    assert not torch.allclose(ours, plain)
    assert_close(by_hand, ours)


@torch.no_grad()
def test_lm_eval_clamp_entry_applied_by_hand_matches_reftkit(tmp_path, model):
    g = torch.Generator().manual_seed(7)
    v = _vec(layers=(2,), operator="clamp", operator_config={"value": 0.75, "bias": torch.randn(64, generator=g)})
    entry = torch.load(export_lm_eval(v, tmp_path / "c.pt", coefficient=2.0, action="clamp", model=model),
                       weights_only=True)["layers.2"]
    d = entry["steering_vector"] / torch.norm(entry["steering_vector"])

    def hook_fn(module, args, output):  # lm-eval's clamp: (h - b) + d (c - (h - b)·d) + b
        h = output[0] if isinstance(output, tuple) else output
        a = h - entry["bias"]
        out = a + d * (entry["steering_coefficient"] - (a * d).sum(-1, keepdim=True)) + entry["bias"]
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = dict(model.base_model.named_modules())["layers.2"].register_forward_hook(hook_fn)
    try:
        by_hand = model(input_ids=_ids()).logits
    finally:
        handle.remove()
    with v.apply(model, 2.0, scope="all") as steered:
        ours = steered(input_ids=_ids()).logits
    assert_close(by_hand, ours)


def test_lm_eval_hookpoints_follow_the_model(tmp_path):
    gpt2 = build_tiny_model("gpt2")
    width = gpt2.config.hidden_size
    v = _vec(width=width, layers=(1,))
    doc = torch.load(export_lm_eval(v, tmp_path / "g.pt", model=gpt2), weights_only=True)
    assert list(doc) == ["h.1"] and "h.1" in dict(gpt2.base_model.named_modules())
    assert import_lm_eval(tmp_path / "g.pt", model=gpt2).sites == ["L1.block_output"]
    with pytest.raises(ConfigError, match="not a block output"):
        import_lm_eval(tmp_path / "g.pt")
