"""Hugging Face Hub ids: `load_model("org/name")` reads the snapshot from the local Hugging Face cache (laid out here
in a temporary folder, exactly as huggingface_hub writes it), and a model that is not cached while the Hub may not
be asked is one clear `ModelNotFoundError`. Nothing here reaches the network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import assert_close
from safetensors.torch import load_file

from reftkit.errors import ModelNotFoundError
from reftkit.models import build_tiny_model, build_tiny_tokenizer, load_model, parse_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 33]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved as a folder, and its logits on IDS."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    model = build_tiny_model("llama", seed=7)
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    with torch.no_grad():
        return folder, model(IDS).logits


def lay_out_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """`models--org--name/{blobs,snapshots/<commit>,refs/main}` with the snapshot's files linked to blobs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for index, file in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"{index:040x}"
        shutil.copyfile(file, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, saved):
    """An offline Hugging Face cache holding `org/tiny-llama`."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    lay_out_cache(cache, "org/tiny-llama", saved[0])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub reads both once, at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named org/tiny-llama
    return cache


@pytest.mark.parametrize("name, expected", [
    ("org/name", ("org/name", None)), ("HuggingFaceTB/SmolLM2-135M", ("HuggingFaceTB/SmolLM2-135M", None)),
    ("org/name@v1.0", ("org/name", "v1.0")), (f"org/name@{COMMIT}", ("org/name", COMMIT)),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("name", None), ("./org/name", None), ("org/name/extra", None), ("/abs/path", None), ("org--x/name", None),
    ("org/na..me", None), ("tiny-llama", None), ("org/", None)])
def test_hub_ids_are_org_slash_name_with_an_optional_revision(name, expected):
    assert parse_hub_id(name) == expected


def test_a_cached_hub_model_loads_offline_with_the_saved_logits(offline_cache, saved):
    model, tokenizer = load_model("org/tiny-llama")
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.equal(logits, saved[1])
    assert tokenizer.decode(tokenizer("hello!")["input_ids"], skip_special_tokens=True) == "hello!"
    assert model.reftkit_source == "org/tiny-llama" and model.config._name_or_path == "org/tiny-llama"


def test_a_revision_selects_the_snapshot_and_dtype_applies(offline_cache, saved):
    model, _ = load_model(f"org/tiny-llama@{COMMIT}", dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.reftkit_source == f"org/tiny-llama@{COMMIT}"
    with torch.no_grad():
        logits = model(IDS).logits.float()
    scale = saved[1].abs().max()
    assert (logits - saved[1]).abs().max() <= 0.05 * scale  # bfloat16 rounding of the same weights


def test_not_cached_and_offline_is_one_clear_error(offline_cache):
    with pytest.raises(ModelNotFoundError) as info:
        load_model("org/not-downloaded")
    message = str(info.value)
    assert "'org/not-downloaded' is not in the local Hugging Face cache" in message
    assert str(offline_cache) in message and "HF_HUB_CACHE" in message and "HF_HOME" in message
    assert "HF_HUB_OFFLINE is set" in message


def test_an_unknown_revision_offline_is_the_same_error(offline_cache):
    with pytest.raises(ModelNotFoundError, match="'org/tiny-llama@v9' is not in the local Hugging Face cache"):
        load_model("org/tiny-llama@v9")


def test_an_unreachable_hub_is_one_clear_error(offline_cache, monkeypatch):
    """Online but without a connection: huggingface_hub's own error becomes a ModelNotFoundError."""
    import huggingface_hub
    import huggingface_hub.constants as constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def unreachable(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache.*Hub is unreachable"):
        load_model("org/elsewhere")
    assert calls == [True, False]  # the cache first, then the Hub


def test_a_local_folder_with_a_hub_like_name_stays_a_local_folder(tmp_path, monkeypatch, saved):
    (tmp_path / "org").mkdir()
    shutil.copytree(saved[0], tmp_path / "org" / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    model, _ = load_model("org/tiny-llama")
    assert model.reftkit_source == str((tmp_path / "org" / "tiny-llama").resolve())


def test_offline_cache_in_a_fresh_process_from_the_environment_alone(tmp_path, saved):
    """HF_HUB_CACHE and HF_HUB_OFFLINE set before anything is imported, as a user's shell would."""
    cache = tmp_path / "hf-home" / "hub"
    lay_out_cache(cache, "org/tiny-llama", saved[0])
    logits = tmp_path / "logits.safetensors"
    script = ("import sys, torch; from safetensors.torch import save_file; from reftkit.models import load_model\n"
              "m, _ = load_model('org/tiny-llama')\n"
              f"ids = torch.tensor({IDS.tolist()})\n"
              "with torch.no_grad(): save_file({'logits': m(ids).logits}, sys.argv[1])\n"
              "print(m.reftkit_source)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script, str(logits)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "org/tiny-llama"
    assert_close(load_file(logits)["logits"], saved[1])  # another process, other threads: equal up to rounding


def test_an_adapter_trained_on_a_hub_model_records_its_id(offline_cache, tmp_path):
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.model import ReftModel

    model, _ = load_model("org/tiny-llama")
    ReftModel(model, ReftConfig(layers=[1], rank=2)).save_pretrained(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model"]["source"] == "org/tiny-llama"
