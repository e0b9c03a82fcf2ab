"""YAML recipes and the `reftkit train / eval / generate --adapter` commands on tiny models."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from reftkit.errors import ConfigError
from reftkit.reft.evaluate import evaluate_file
from reftkit.reft.recipe import load_recipe, run_recipe

from .conftest import ANIMALS, run_cli


@pytest.fixture
def recipe(tmp_path):
    data = tmp_path / "animals.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in ANIMALS * 2))
    cfg = {"model": "tiny-llama", "task": "sft", "data": "animals.jsonl", "eval_data": "animals.jsonl",
           "output_dir": str(tmp_path / "run"), "chat": False, "max_length": 64,
           "reft": {"method": "loreft", "layers": [1, 3], "rank": 4, "positions": "f1+l1"},
           "train": {"max_steps": 4, "batch_size": 4, "lr": 0.01, "save_every": 2}}
    path = tmp_path / "recipe.yaml"

    def write(**changes):
        path.write_text(yaml.safe_dump({**cfg, **changes}))
        return path

    write()
    return write


def test_train_command_writes_adapter_metrics_and_plot(capsys, recipe, tmp_path):
    code, out, err = run_cli(capsys, "train", recipe())
    assert code == 0, err
    run_dir = tmp_path / "run"
    assert {p.name for p in (run_dir / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4 and metrics["eval"][-1][0] == 4
    assert metrics["trainable_parameters"] == 2 * (64 * 4 + 4 * 64 + 4)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "trained 4 steps" in out and f"adapter: {run_dir / 'adapter'}" in out

    code, out, err = run_cli(capsys, "train", recipe(train={"max_steps": 6, "batch_size": 4, "lr": 0.01, "save_every": 2}),
                         "--resume", "--json")
    assert code == 0, err
    resumed = json.loads(out)
    assert resumed["steps"] == 6 and resumed["losses"][:4] == metrics["losses"]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 6


def test_eval_and_generate_with_the_trained_adapter(capsys, recipe, tmp_path):
    assert run_cli(capsys, "train", recipe(), "--json")[0] == 0
    adapter, data = tmp_path / "run" / "adapter", tmp_path / "animals.jsonl"
    code, out, err = run_cli(capsys, "eval", "--model", "tiny-llama", "--adapter", adapter, "--data", data,
                         "--no-chat", "--json")
    assert code == 0, err
    with_adapter = json.loads(out)
    assert with_adapter["examples"] == 8 and with_adapter["loss"] > 0
    code, out, _ = run_cli(capsys, "eval", "--model", "tiny-llama", "--data", data, "--no-chat", "--json")
    assert code == 0 and json.loads(out)["loss"] != with_adapter["loss"]
    code, out, err = run_cli(capsys, "generate", "--model", "tiny-llama", "--adapter", adapter, "--prompt", "cat",
                         "--no-chat", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["outputs"][0]["prompt"] == "cat"


@pytest.mark.parametrize("changes,match", [
    ({"modle": "tiny-llama"}, r"unknown keys \['modle'\]"),
    ({"reft": {"rnak": 4}}, r"unknown ReftConfig fields \['rnak'\]"),
    ({"train": {"epochz": 1}}, r"unknown train options \['epochz'\]"),
    ({"train": {"lr": "fast"}}, "lr must be a number"),
    ({"task": "qa"}, "unknown task 'qa'"),
    ({"reft": {"positions": "f1+"}}, "cannot parse positions"),
])
def test_bad_recipes_exit_2_with_one_line(capsys, recipe, changes, match):
    import re

    code, out, err = run_cli(capsys, "train", recipe(**changes))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(match, err)


def test_resume_without_a_checkpoint_is_an_error(capsys, recipe):
    code, _, err = run_cli(capsys, "train", recipe(), "--resume")
    assert code == 2 and "nothing to resume" in err


def test_recipe_paths_are_relative_to_the_recipe_folder_never_the_current_one(tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    (folder / "data").mkdir(parents=True)
    (folder / "local-model").mkdir()
    (elsewhere / "data").mkdir(parents=True)
    for where in (folder, elsewhere):  # the same relative names exist in the current folder: they must not win
        (where / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "local-model", "data": "data/train.jsonl", "eval_data": "../shared.jsonl",
                                    "output_dir": "out"}))
    cfg = load_recipe(path)
    assert cfg["data"] == str(folder / "data" / "train.jsonl")
    assert cfg["eval_data"] == str(folder / ".." / "shared.jsonl")
    assert cfg["output_dir"] == str(folder / "out")
    assert cfg["model"] == str(folder / "local-model")  # a folder beside the recipe
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "data": str(elsewhere / "data" / "train.jsonl"),
                                    "output_dir": "~/runs/x"}))
    cfg = load_recipe(path)
    assert cfg["model"] == "tiny-llama" and cfg["data"] == str(elsewhere / "data" / "train.jsonl")  # absolute: kept
    assert cfg["output_dir"] == str(tmp_path / "home" / "runs" / "x")
    path.write_text(yaml.safe_dump({"model": "org/not-here", "data": "data/train.jsonl"}))
    cfg = load_recipe(path)
    assert cfg["output_dir"] == str(folder / "runs" / "r")  # the default: runs/<stem> beside the recipe
    assert cfg["model"] == "org/not-here"  # no such path beside the recipe: passed on as written
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(folder / "missing.yaml")
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "data": ["a.jsonl"]}))
    with pytest.raises(ConfigError, match=r"data must be a path \(a string\)"):
        load_recipe(path)
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "data": "d.jsonl", "train": {"output_dir": "x"}}))
    with pytest.raises(ConfigError, match="set output_dir at the top level"):
        load_recipe(path)


def test_train_gives_the_same_run_from_any_current_folder(capsys, recipe, tmp_path, monkeypatch):
    path = recipe(output_dir="run-here")
    cwd = tmp_path / "somewhere" / "else"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    code, out, err = run_cli(capsys, "train", path, "--json")
    assert code == 0, err
    assert json.loads(out)["adapter"] == str(tmp_path / "run-here" / "adapter")
    assert (tmp_path / "run-here" / "metrics.json").is_file() and list(cwd.iterdir()) == []


def test_classification_recipe_trains_and_saves_the_head(tmp_path):
    from reftkit.models import build_tiny_model, build_tiny_tokenizer

    data = tmp_path / "sentiment.csv"
    data.write_text("text,label\n" + "".join(f"{w * n},{lab}\n" for w, lab in (("a ", "neg"), ("b ", "pos"))
                                               for n in range(1, 5)))
    cfg = {"model": "tiny-bert", "task": "classification", "data": str(data), "output_dir": str(tmp_path / "run"),
           "label_names": ["neg", "pos"], "reft": {"layers": "all", "rank": 2},
           "train": {"max_steps": 3, "batch_size": 4, "progress": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cfg = load_recipe(tmp_path / "c.yaml")
    model = build_tiny_model("bert", task="sequence-classification", num_labels=2)
    tok = build_tiny_tokenizer("encoder")
    metrics = run_recipe(cfg, progress=False, model_and_tokenizer=(model, tok))
    assert metrics["reft"]["modules_to_save"] == ["classifier"]
    fresh = build_tiny_model("bert", task="sequence-classification", num_labels=2)
    result = evaluate_file(fresh, tok, data, task="classification", adapter=metrics["adapter"],
                           label_names=["neg", "pos"])
    assert result["examples"] == 8 and 0.0 <= result["accuracy"] <= 1.0
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)  # the trained head came with the adapter


def test_device_and_dtype_come_from_the_recipe_or_the_command_line(capsys, recipe, monkeypatch):
    import reftkit.models as models
    import reftkit.reft.recipe as recipe_module

    seen = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda name, **kw: seen.append(kw) or real(name, **kw))
    code, _, err = run_cli(capsys, "train", recipe(device="cpu", dtype="bf16", train={"max_steps": 1, "batch_size": 4}))
    assert code == 0, err
    assert seen[-1]["device"] == "cpu" and seen[-1]["dtype"] == "bf16"
    code, _, err = run_cli(capsys, "train", recipe(dtype="bf16", train={"max_steps": 1, "batch_size": 4}),
                           "--dtype", "float32", "--overwrite")
    assert code == 0, err
    assert seen[-1]["dtype"] == "float32"
    calls = len(seen)
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        recipe_module.load_recipe(recipe(dtype="int8"))
    code, _, err = run_cli(capsys, "train", recipe(), "--dtype", "int8", "--overwrite")
    assert code == 2 and "unknown dtype 'int8'" in err and len(seen) == calls  # refused before any model loads


@pytest.mark.parametrize("change,message", [
    ({"data": "bad.jsonl"}, "bad.jsonl, row 2: field 'prompt' must be a string"),
    ({"reft": {"layers": [1], "rank": 4, "component": "blok_output"}}, "unknown component 'blok_output'"),
    ({"reft": {"layers": [1], "rank": 400}}, r"tiny-llama \(4 layers, hidden size 64\): rank 400 is larger"),
    ({"reft": {"layers": [9], "rank": 4}}, "layers \\[9\\] are out of range; this model has layers 0..3"),
], ids=["data-row", "component-typo", "rank-above-width", "layer-out-of-range"])
def test_mistakes_are_reported_before_the_model_loads(capsys, recipe, tmp_path, monkeypatch, change, message):
    import reftkit.models as models

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 5, "completion": "c"}\n')
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli(capsys, "train", recipe(**change))
    assert code == 2 and len(err.strip().splitlines()[-1:]) == 1
    assert re.search(message, err.strip().splitlines()[-1]), err
    assert not (tmp_path / "run").exists()  # nothing was written either
