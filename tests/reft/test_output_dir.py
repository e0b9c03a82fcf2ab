"""Output folders: nothing is lost and failures come early. A non-empty run folder needs --resume or --overwrite;
an overwrite replaces the run only once the new one is complete; an unwritable folder or a full disk fails with
one typed error before training; a failed checkpoint write keeps the previous checkpoint; the demo writes its own
folder and finds its packaged recipe from any folder."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import reftkit.reft.train as train_module
from reftkit.errors import OutputError
from reftkit.models import build_tiny_model
from reftkit.reft.config import ReftConfig
from reftkit.reft.data import encode
from reftkit.reft.model import ReftModel
from reftkit.reft.recipe import load_recipe, run_recipe
from reftkit.reft.train import TrainArgs, train

from .conftest import ANIMALS, interrupt_after, run_cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "animals.jsonl").write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in ANIMALS * 2))
    path = tmp_path / "recipe.yaml"

    def write(max_steps=4, **changes):
        cfg = {"model": "tiny-llama", "data": "animals.jsonl", "output_dir": "run", "chat": False, "max_length": 64,
               "reft": {"method": "loreft", "layers": [1, 3], "rank": 4, "positions": "f1+l1"},
               "train": {"max_steps": max_steps, "batch_size": 4, "lr": 0.01, "save_every": 2}, **changes}
        path.write_text(yaml.safe_dump(cfg))
        return path

    write()
    return write


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def steps_in(run_dir: Path) -> int:
    return json.loads((run_dir / "metrics.json").read_text())["steps"]


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the output folder was checked")


# -------------------------------------------------------------------------------- refusing a non-empty folder

def test_train_refuses_a_non_empty_run_folder_naming_it_and_both_flags(capsys, recipe, tmp_path, monkeypatch):
    assert run_cli(capsys, "train", recipe(), "--json")[0] == 0
    before = {str(p): p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    monkeypatch.setattr("reftkit.models.load_model", no_model)
    code, out, err = run_cli(capsys, "train", recipe())
    assert code == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: output folder {tmp_path / 'run'} is not empty")
    assert "--resume" in line and "--overwrite" in line
    assert {str(p): p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before  # nothing touched
    with pytest.raises(OutputError, match=r"resume=True.*overwrite=True"):
        run_recipe(load_recipe(recipe()), progress=False)
    code, _, err = run_cli(capsys, "train", recipe(), "--resume", "--overwrite")
    assert code == 2 and "not allowed with argument" in err


def test_train_function_refuses_a_non_empty_output_dir_unless_resume_or_overwrite(tok, tmp_path):
    data = encode(tok, [{"prompt": p, "completion": c} for p, c in ANIMALS], "sft", chat=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = TrainArgs(max_steps=2, batch_size=4, save_every=2, output_dir=str(out), progress=False)
    reft = ReftModel(build_tiny_model("llama"), ReftConfig(layers=[1], rank=2))
    with pytest.raises(OutputError, match=rf"{re.escape(str(out))} is not empty.*resume=True.*overwrite=True"):
        train(reft, data, args, pad_token_id=tok.pad_token_id)
    assert listing(out) == ["notes.txt"]
    assert train(reft, data, args, pad_token_id=tok.pad_token_id, overwrite=True)["step"] == 2
    assert listing(out) == ["checkpoint", "notes.txt"]  # train writes only its checkpoint; other files stay
    no_checkpoints = TrainArgs(max_steps=1, batch_size=4, output_dir=str(out), progress=False)
    assert train(reft, data, no_checkpoints, pad_token_id=tok.pad_token_id)["step"] == 1  # writes nothing: no check


# ------------------------------------------------------------------------------------------------ overwrite

def test_overwrite_replaces_the_run_only_once_the_new_run_is_complete(capsys, recipe, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", recipe(max_steps=4), "--json")[0] == 0
    (out / "notes.txt").write_text("from the first run")

    with monkeypatch.context() as m:  # the replacement is interrupted half-way: the first run is untouched
        interrupt_after(m, 2)
        code, _, err = run_cli(capsys, "train", recipe(max_steps=6), "--overwrite")
    assert code == 130
    staging = tmp_path / ".run.overwrite"
    assert err.strip().splitlines()[-1].endswith(f"the checkpoint of step 2 is in {staging / 'checkpoint'}; "
                                                 f"continue with: reftkit train {recipe(max_steps=6)} --resume")
    assert steps_in(out) == 4 and (out / "notes.txt").exists()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4

    code, out_text, err = run_cli(capsys, "train", recipe(max_steps=6), "--resume", "--json")  # finishes the replacement
    assert code == 0, err
    assert json.loads(out_text)["steps"] == 6 and json.loads(out_text)["adapter"] == str(out / "adapter")
    assert steps_in(out) == 6 and not (out / "notes.txt").exists()  # the whole run was replaced, not mixed
    assert listing(out) == ["adapter", "checkpoint", "loss.png", "metrics.json"]
    assert listing(tmp_path) == ["animals.jsonl", "recipe.yaml", "run"]  # no staging or old copy left

    assert run_cli(capsys, "train", recipe(max_steps=2), "--overwrite", "--json")[0] == 0
    assert steps_in(out) == 2 and len(json.loads((out / "metrics.json").read_text())["losses"]) == 2
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert listing(tmp_path) == ["animals.jsonl", "recipe.yaml", "run"]


# ----------------------------------------------------------------------------- unwritable folders, full disks

def test_an_output_folder_under_a_file_fails_before_the_model_is_loaded(capsys, recipe, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr("reftkit.models.load_model", no_model)
    code, out, err = run_cli(capsys, "train", recipe(output_dir="taken/run"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 2  # the status line, then the error
    assert err.strip().splitlines()[-1] == (
        f"error: cannot write to {tmp_path / 'taken' / 'run'}: {tmp_path / 'taken'}, a folder above it, is a file, "
        "not a folder; choose another output folder or move the file away")


def test_a_full_disk_is_found_before_training(tok, recipe, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    monkeypatch.setattr("reftkit.models.load_model", no_model)
    with pytest.raises(OutputError, match=rf"cannot write to {re.escape(str(tmp_path / 'run'))}: No space left"):
        run_recipe(load_recipe(recipe()), progress=False)
    data = encode(tok, [{"prompt": p, "completion": c} for p, c in ANIMALS], "sft", chat=False)
    monkeypatch.setattr(train_module, "_loop", no_model)
    with pytest.raises(OutputError, match="No space left on device"):  # the Python API probes too
        train(ReftModel(build_tiny_model("llama"), ReftConfig(layers=[1], rank=2)), data,
              TrainArgs(max_steps=2, save_every=1, output_dir=str(tmp_path / "api"), progress=False),
              pad_token_id=tok.pad_token_id)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_before_training(capsys, recipe, tmp_path):
    (tmp_path / "run").mkdir()
    os.chmod(tmp_path / "run", 0o555)
    try:
        code, _, err = run_cli(capsys, "train", recipe())
    finally:
        os.chmod(tmp_path / "run", 0o755)
    assert code == 2 and f"cannot write to {tmp_path / 'run'}" in err.strip().splitlines()[-1]


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_names_the_folder(capsys, recipe, tmp_path, monkeypatch):
    import safetensors.torch

    real_save_file = safetensors.torch.save_file
    calls = []

    def enospc_on_the_second_checkpoint(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 5:  # the 2nd checkpoint's second file (3 files per checkpoint)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", enospc_on_the_second_checkpoint)
    code, _, err = run_cli(capsys, "train", recipe())
    checkpoint = tmp_path / "run" / "checkpoint"
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"error: could not write {checkpoint}: No space left on device")
    assert "its previous contents are unchanged; free some disk space" in err
    assert listing(tmp_path / "run") == ["checkpoint"]  # no temporary folder left behind
    assert listing(checkpoint) == ["model_state.safetensors", "optimizer.json", "optimizer.safetensors",
                                   "rng_state.safetensors", "trainer_state.json"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    assert all(load_file(str(p)) is not None for p in checkpoint.glob("*.safetensors"))  # complete and readable
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    code, out, err = run_cli(capsys, "train", recipe(), "--resume", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 4


# ------------------------------------------------------------------------------------------------- the demo

def test_the_demo_finds_its_packaged_recipe_from_any_folder(tmp_path, monkeypatch):
    from reftkit.reft.demo import demo_setup, example_path

    monkeypatch.chdir(tmp_path)
    cfg, prompts = demo_setup()
    package = Path(__import__("reftkit").__file__).parent
    assert Path(cfg["data"]) == package / "examples" / "data" / "caps_train.jsonl" and Path(cfg["data"]).is_file()
    assert len(prompts) == 12 and prompts[0] == "What is the capital of Italy?"
    assert cfg["output_dir"] == "runs/demo"  # its own folder, in the current folder
    assert load_recipe(example_path())["output_dir"] == str(package / "examples" / "runs" / "caps")
    cfg, _ = demo_setup(output_dir="elsewhere")
    assert cfg["output_dir"] == "elsewhere"


def test_the_repository_examples_are_the_packaged_files(tmp_path):
    from reftkit.reft.demo import example_path

    for name in ("caps.yaml", "data/caps_train.jsonl", "data/caps_heldout.jsonl"):
        assert os.path.samefile(REPO / "examples" / name, example_path(name))  # one copy, not two
    cfg = load_recipe(REPO / "examples" / "caps.yaml")  # resolved beside the link, not inside the package
    assert cfg["data"] == str(REPO / "examples" / "data" / "caps_train.jsonl")
    assert cfg["output_dir"] == str(REPO / "examples" / "runs" / "caps")
    tomllib = pytest.importorskip("tomllib")
    shipped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["reftkit"]
    package = REPO / "src" / "reftkit"
    matched = {p.relative_to(package).as_posix() for pattern in shipped for p in package.glob(pattern)}
    assert {"examples/caps.yaml", "examples/data/caps_train.jsonl", "examples/data/caps_heldout.jsonl"} <= matched


def test_the_demo_refuses_a_non_empty_run_folder_before_loading_the_model(capsys, tmp_path, monkeypatch):
    from reftkit.reft.demo import run_demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("reftkit.models.load_model", no_model)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "metrics.json").write_text("{}")
    with pytest.raises(OutputError, match=r"runs/demo is not empty"):
        run_demo()
    code, out, err = run_cli(capsys, "demo")
    assert code == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: output folder runs/demo is not empty") and "--resume" in line and "--overwrite" in line
