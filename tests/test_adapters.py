"""Adapters know their base: both writers record the base model, loading onto another model names both, folders
written before the record existed still load, and folders are read (config + safetensors header) without torch."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch

import reftkit
from reftkit.adapters import find_adapters, read_adapter, safetensors_header
from reftkit.engine import Binding, IntervenableModel
from reftkit.errors import ConfigError, IncompatibleModelError
from reftkit.interventions.basic import AddIntervention
from reftkit.models import build_tiny_model, build_tiny_tokenizer, load_model
from reftkit.reft.config import ReftConfig
from reftkit.reft.model import ReftModel

IDS = torch.tensor([[1, 72, 101, 108, 108, 111]])


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    build_tiny_model("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def adapter(base_folder, tmp_path):
    model, _ = load_model(base_folder)
    reft = ReftModel(model, ReftConfig(layers=[1, 2], rank=2, positions="f1+l1"))
    with torch.no_grad():
        for name, p in reft.adapters.named_parameters():
            if "learned_source" in name:
                p.add_(0.5)
    reft.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", reft


def test_save_pretrained_records_the_base_model(adapter, base_folder):
    meta = json.loads((adapter[0] / "adapter_config.json").read_text())
    record = meta["base_model"]
    assert record["source"] == str(base_folder.resolve())
    assert record["architecture"] == "LlamaForCausalLM" and record["model_type"] == "llama"
    assert record["hidden_size"] == 64 and record["num_layers"] == 4
    weights = record["weights"]
    assert weights["tensor"] == "model.embed_tokens.weight" and weights["shape"] == [512, 64]
    assert len(weights["sample"]) == 16 and len(set(weights["sample"])) > 8
    assert meta["reftkit_version"] == reftkit.__version__


def test_the_engine_save_records_the_base_model(base_folder, tmp_path):
    model, _ = load_model(base_folder)
    with IntervenableModel(model, Binding("L1.block_output", AddIntervention(vector=torch.ones(64)))) as im:
        im.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["base_model"]["source"] == str(base_folder.resolve())
    assert config["base_model"]["num_layers"] == 4 and config["reftkit_version"] == reftkit.__version__
    again, _ = load_model(base_folder)
    IntervenableModel.load(again, tmp_path / "saved").remove()
    other = build_tiny_model("llama", seed=1)
    other.reftkit_source = "tiny-llama (seed 1)"
    with pytest.raises(IncompatibleModelError) as info:
        IntervenableModel.load(other, tmp_path / "saved")
    assert str(base_folder.resolve()) in str(info.value) and "tiny-llama (seed 1)" in str(info.value)


def test_the_same_base_loads_also_in_bfloat16(adapter, base_folder):
    model, _ = load_model(base_folder, dtype="bf16")
    loaded = ReftModel.from_pretrained(model, adapter[0])
    assert loaded.adapter_names == ["default"]


def test_a_base_with_other_weights_is_refused_naming_both(adapter, base_folder):
    other, _ = load_model("tiny-llama", seed=5)  # same architecture and widths, other weights
    with pytest.raises(IncompatibleModelError) as info:
        ReftModel.from_pretrained(other, adapter[0])
    message = str(info.value)
    assert f"saved for {base_folder.resolve()} (LlamaForCausalLM, llama, hidden 64, 4 layers)" in message
    assert "being loaded onto tiny-llama (LlamaForCausalLM" in message and "the weights differ" in message
    assert f"load it onto {base_folder.resolve()}" in message
    loaded = ReftModel.from_pretrained(other, adapter[0], check_base=False)  # a fine-tuned variant, on purpose
    assert loaded.adapter_names == ["default"]


def test_another_architecture_is_refused_naming_both(adapter, base_folder):
    other, _ = load_model("tiny-qwen2")
    with pytest.raises(IncompatibleModelError) as info:
        ReftModel.from_pretrained(other, adapter[0])
    message = str(info.value)
    assert "llama" in message and "qwen2" in message
    assert str(base_folder.resolve()) in message and "tiny-qwen2" in message
    smaller = build_tiny_model("llama", hidden_size=32, intermediate_size=64, head_dim=8)
    with pytest.raises(IncompatibleModelError, match="hidden_size=64.*this model has hidden_size=32.*"
                                                     "the adapter's base model: .*tiny-llama"):
        ReftModel.from_pretrained(smaller, adapter[0])


def test_a_folder_written_before_the_record_still_loads(adapter, base_folder):
    path = adapter[0] / "adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["base_model"]  # exactly what save_pretrained wrote before the base was recorded
    path.write_text(json.dumps(meta, indent=2))
    model, _ = load_model(base_folder)
    loaded = ReftModel.from_pretrained(model, adapter[0])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, adapter[1](input_ids=IDS).logits)
    other, _ = load_model("tiny-llama", seed=5)
    ReftModel.from_pretrained(other, adapter[0])  # no record: only the structure can be checked
    assert read_adapter(adapter[0])["base_model"] is None


def test_an_old_engine_folder_still_loads(base_folder, tmp_path):
    model, _ = load_model(base_folder)
    with IntervenableModel(model, Binding("L1.block_output", AddIntervention(vector=torch.ones(64)))) as im:
        im.save(tmp_path / "saved")
    path = tmp_path / "saved" / "config.json"
    config = json.loads(path.read_text())
    del config["base_model"]
    path.write_text(json.dumps(config))
    IntervenableModel.load(model, tmp_path / "saved").remove()


def test_a_trained_embedding_is_not_fingerprinted(base_folder, tmp_path):
    model, _ = load_model(base_folder)
    reft = ReftModel(model, ReftConfig(layers=[1], rank=2, modules_to_save=["model.embed_tokens"]))
    reft.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model"]["weights"] is None


def test_read_adapter_describes_a_folder_from_its_files(adapter, base_folder):
    info = read_adapter(adapter[0])
    expected_parameters = sum(v.numel() for v in adapter[1].adapter_state_dict("default").values())
    assert info["kind"] == "reft" and info["method"] == "loreft" and info["rank"] == 2
    assert info["sites"] == ["L1.block_output", "L2.block_output"] and info["positions"] == "f1+l1"
    assert info["parameters"] == expected_parameters and info["base_model"]["source"] == str(base_folder.resolve())


def test_reading_adapters_imports_no_torch(adapter):
    script = ("import sys; from reftkit.adapters import read_adapter, find_adapters\n"
              f"info = read_adapter({str(adapter[0])!r}); rows = find_adapters({str(adapter[0].parent)!r})\n"
              "print(info['parameters'], len(rows), 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1:] == ["1", "False"]


def _write_header(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.write_bytes(b""), "not a safetensors file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-4]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes() + b"xx"), "trailing bytes"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "header length"),
    (lambda p: _write_header(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     "malformed"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}"), "not JSON"),
])
def test_safetensors_headers_are_checked_against_the_file(adapter, mutate, message):
    weights = adapter[0] / "adapter_model.safetensors"
    assert sum(e["shape"][0] * e["shape"][-1] for e in safetensors_header(weights).values()) > 0
    mutate(weights)
    with pytest.raises(ConfigError, match=message):
        read_adapter(adapter[0])


def test_find_adapters_walks_folders_and_reports_broken_ones(adapter, tmp_path):
    (tmp_path / "runs" / "b").mkdir(parents=True)
    (tmp_path / "runs" / "b" / "adapter_config.json").write_text("{not json")
    (tmp_path / "runs" / ".hidden").mkdir()
    (tmp_path / "runs" / ".hidden" / "adapter_config.json").write_text("{}")
    rows = find_adapters(tmp_path)
    assert [r["path"] for r in rows] == [str(adapter[0]), str(tmp_path / "runs" / "b")]
    assert "error" not in rows[0] and "not valid JSON" in rows[1]["error"]
