"""Reading pyreft 0.1.0 folders: the entries, and the logits pyreft recorded, reproduced with plain forward hooks
on the tiny Llama (loaded with the installed transformers) so the check does not depend on the engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from numerics import assert_close
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from reftkit.errors import ConfigError
from reftkit.interventions import build_intervention
from reftkit.io_pyreft import PYREFT_TYPES, read_pyreft_folder

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pyreft"


@pytest.fixture(scope="module")
def pyreft_llama():
    return AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny_llama", dtype=torch.float32).eval()


def attach(model, entries, positions):
    """Apply each intervention at its (layer, component) to the vectors at `positions [B, K]`, out of place."""
    rows = torch.arange(positions.shape[0])[:, None]

    def hook_for(iv):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[rows, positions] = iv(hidden[rows, positions])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    handles = []
    for entry in entries:
        iv = build_intervention({"type": entry.type_name, "config": entry.config}).eval()
        iv.load_state_dict(entry.state_dict, strict=True)
        layer = model.model.layers[entry.layer]
        module = {"block_output": layer, "mlp_output": layer.mlp}[entry.component]
        handles.append(module.register_forward_hook(hook_for(iv)))
    return handles


def logits_with(model, entries, recorded):
    handles = attach(model, entries, recorded["positions"])
    try:
        with torch.no_grad():
            return model(input_ids=recorded["input_ids"], attention_mask=recorded["attention_mask"]).logits
    finally:
        for h in handles:
            h.remove()


def test_tiny_llama_loads_with_pyreft_era_logits(pyreft_llama):
    recorded = load_file(str(FIXTURES / "saved_adapter_logits.safetensors"))
    with torch.no_grad():
        logits = pyreft_llama(input_ids=recorded["input_ids"], attention_mask=recorded["attention_mask"]).logits
    assert_close(logits, recorded["base_logits"])


def test_reads_the_loreft_folder():
    entries = read_pyreft_folder(FIXTURES / "saved_adapter")
    assert [(e.layer, e.component, e.type_name) for e in entries] == [(1, "block_output", "loreft"),
                                                                       (3, "block_output", "loreft")]
    layer, component, type_name, config, state = entries[0]  # a plain tuple too
    assert config == {"embed_dim": 64, "low_rank_dimension": 4}
    assert set(state) == {"learned_source.weight", "learned_source.bias", "rotate_layer.weight"}
    saved = torch.load(FIXTURES / "saved_adapter" / "intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin",
                       weights_only=True)
    iv = build_intervention({"type": type_name, "config": config})
    iv.load_state_dict(state)
    assert torch.equal(iv.rotation, saved["rotate_layer"])


@pytest.mark.parametrize("folder", ["saved_adapter", "saved_adapter_mixed"])
def test_reproduces_pyreft_logits(pyreft_llama, folder):
    recorded = load_file(str(FIXTURES / f"{folder}_logits.safetensors"))
    entries = read_pyreft_folder(FIXTURES / folder)
    logits = logits_with(pyreft_llama, entries, recorded)
    assert (logits - recorded["base_logits"]).abs().max() > 1e-2  # the adapter does change the output
    assert_close(logits, recorded["logits"])


def test_mixed_folder_maps_every_pyreft_type():
    entries = read_pyreft_folder(FIXTURES / "saved_adapter_mixed")
    assert [(e.layer, e.component, e.type_name) for e in entries] == [
        (0, "block_output", "noreft"), (1, "block_output", "consreft"), (2, "mlp_output", "direft"),
        (2, "block_output", "lobireft"), (3, "block_output", "orthogonal_direft")]
    assert entries[0].config["add_bias"] is True
    assert "proj_layer.bias" not in entries[2].state_dict  # pyreft's unused NodiReFT bias is dropped
    assert not any(k in e.state_dict for e in entries for k in ("embed_dim", "interchange_dim"))
    assert set(PYREFT_TYPES.values()) == {e.type_name for e in entries} | {"loreft"}


def copy_folder(tmp_path, name="saved_adapter"):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def rewrite_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_unsupported_type_is_a_config_error(tmp_path):
    folder = copy_folder(tmp_path)
    rewrite_config(folder, lambda c: c["intervention_types"].__setitem__(
        0, "<class 'pyvene.models.interventions.VanillaIntervention'>"))
    with pytest.raises(ConfigError, match="VanillaIntervention.*not supported.*LoreftIntervention"):
        read_pyreft_folder(folder)


def test_missing_config_or_weights_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        read_pyreft_folder(tmp_path)
    folder = copy_folder(tmp_path)
    (folder / "intkey_layer_3_comp_block_output_unit_pos_nunit_1#0.bin").unlink()
    with pytest.raises(ConfigError, match="missing"):
        read_pyreft_folder(folder)


def test_rank_mismatch_and_units_are_checked(tmp_path):
    folder = copy_folder(tmp_path)
    rewrite_config(folder, lambda c: c["representations"][0].__setitem__(4, 8))
    with pytest.raises(ConfigError, match="low_rank_dimension 8 does not match the weights' rank 4"):
        read_pyreft_folder(folder)
    rewrite_config(folder, lambda c: c["representations"][0].__setitem__(2, "h.pos"))
    with pytest.raises(ConfigError, match="unit 'h.pos'"):
        read_pyreft_folder(folder)


def test_representations_written_as_objects_are_read(tmp_path):
    from reftkit.io_pyreft import REPRESENTATION_FIELDS

    folder = copy_folder(tmp_path)
    rewrite_config(folder, lambda c: c.__setitem__(
        "representations", [dict(zip(REPRESENTATION_FIELDS, r)) for r in c["representations"]]))
    assert [e.layer for e in read_pyreft_folder(folder)] == [1, 3]
