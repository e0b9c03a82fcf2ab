"""Training survives a kill: `reftkit train` is SIGKILLed in a subprocess (after a checkpoint, in the middle of
writing one, in the middle of swapping one in) and `--resume` ends with the adapter and the loss history of an
uninterrupted run, with no temporary folder left behind. Also: the recovery states of `atomic.write_folder` one
by one, the Python API's resume after a kill mid-swap, and the line Ctrl-C prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from numerics import assert_close, assert_state_close
from safetensors.torch import load_file

import reftkit.atomic as atomic
import reftkit.reft.train as train_module
from reftkit.atomic import recover_folder, write_folder
from reftkit.cli import main
from reftkit.models import build_tiny_model
from reftkit.reft.config import ReftConfig
from reftkit.reft.data import encode
from reftkit.reft.model import ReftModel
from reftkit.reft.train import TrainArgs, train

from .conftest import ANIMALS, interrupt_after

STEPS = 40
# The subprocess runs `reftkit train` with one torch thread, as the in-process reference does (conftest), and
# stalls where the test wants to kill it: "swap" right after the old checkpoint was renamed away (the folder
# `checkpoint` is missing), "write" after the first file of the second checkpoint (inside its temporary folder).
DRIVER = r"""
import os, pathlib, sys, time
import torch
torch.set_num_threads(1)
mode, mark = sys.argv[1], pathlib.Path(sys.argv[2])

def stall():
    mark.write_text("stalled")
    time.sleep(600)

if mode == "swap":
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.path.basename(dst) == ".checkpoint.old":
            stall()
    os.replace = replace
elif mode == "write":
    import safetensors.torch
    real_save = safetensors.torch.save_file
    calls = []
    def save_file(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        calls.append(filename)
        if len(calls) == 4:
            stall()
    safetensors.torch.save_file = save_file
from reftkit.cli import main
sys.exit(main(sys.argv[3:]))
"""


def write_recipe(root: Path, name: str) -> Path:
    """A recipe in its own folder, reading the shared data one folder up (paths are relative to the recipe)."""
    data = root / "animals.jsonl"
    if not data.exists():
        data.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in ANIMALS * 3))
    folder = root / name
    folder.mkdir()
    cfg = {"model": "tiny-llama", "data": "../animals.jsonl", "chat": False, "max_length": 64,
           "reft": {"method": "loreft", "layers": [1, 3], "rank": 4, "positions": "f1+l1", "dropout": 0.1},
           "train": {"max_steps": STEPS, "batch_size": 4, "lr": 0.01, "save_every": 2,
                     "bf16": False}}  # fp32 in the subprocess too, whatever the processor
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dir(recipe: Path) -> Path:
    return recipe.parent / "runs" / "recipe"  # the default output_dir: runs/<stem> beside the recipe


def checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def start(argv: list[str], mode: str | None = None, mark: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if mode is None:
        cmd = [sys.executable, "-c", "import torch, sys; torch.set_num_threads(1); from reftkit.cli import main; "
                                     "sys.exit(main(sys.argv[1:]))", *argv]
    else:
        cmd = [sys.executable, "-c", DRIVER, mode, str(mark), *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its adapter tensors and metrics."""
    recipe = write_recipe(tmp_path_factory.mktemp("reference"), "whole")
    assert main(["train", str(recipe), "--json"]) == 0
    out = run_dir(recipe)
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), json.loads((out / "metrics.json").read_text())


def assert_matches_reference(out: Path, reference) -> None:
    weights, metrics = reference
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["steps"] == STEPS and len(resumed["losses"]) == STEPS
    assert_close(torch.tensor(resumed["losses"]), torch.tensor(metrics["losses"]))
    assert_state_close(load_file(str(out / "adapter" / "adapter_model.safetensors")), weights)
    assert checkpoint_step(out) == STEPS
    assert leftovers(out) == []  # no temporary, new or old checkpoint folder survives the resumed run
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint", "loss.png", "metrics.json"]


def test_sigkill_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(tmp_path, capsys, reference):
    recipe = write_recipe(tmp_path, "killed")
    out = run_dir(recipe)
    proc = start(["train", str(recipe), "--json"])
    wait_for(proc, lambda: checkpoint_step(out) > 0, "a checkpoint was written")
    kill(proc)
    assert not (out / "metrics.json").exists()  # killed before the end
    assert main(["train", str(recipe), "--resume", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["steps"] == STEPS
    assert_matches_reference(out, reference)


@pytest.mark.parametrize("mode", ["swap", "write"])
def test_sigkill_while_a_checkpoint_is_written_then_resume_recovers(tmp_path, capsys, reference, mode):
    recipe = write_recipe(tmp_path, mode)
    out, mark = run_dir(recipe), tmp_path / "stalled"
    proc = start(["train", str(recipe), "--json"], mode, mark)
    wait_for(proc, mark.exists, f"the {mode} stall")
    kill(proc)
    if mode == "swap":  # killed between the two renames: no `checkpoint`, the complete step-4 copy under .new
        assert not (out / "checkpoint").exists()
        assert leftovers(out) == [".checkpoint.new", ".checkpoint.old"]
        assert json.loads((out / ".checkpoint.new" / "trainer_state.json").read_text())["step"] == 4
    else:  # killed inside the temporary folder: the step-2 checkpoint is intact
        assert checkpoint_step(out) == 2
        assert [n.split("-")[0] for n in leftovers(out)] == [".checkpoint.tmp"]
    assert main(["train", str(recipe), "--resume", "--json"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert_matches_reference(out, reference)


# ------------------------------------------------------------------------------- the Python API, in process

def sft_data(tok):
    return encode(tok, [{"prompt": p, "completion": c} for p, c in ANIMALS * 3], "sft", chat=False)


def fresh():
    return ReftModel(build_tiny_model("llama", initializer_range=0.2), ReftConfig(layers=[1, 3], rank=4, dropout=0.1))


def test_python_resume_after_a_kill_in_the_middle_of_a_swap(tok, tmp_path, monkeypatch):
    data = sft_data(tok)

    def args(out):
        return TrainArgs(max_steps=8, batch_size=4, lr=1e-2, save_every=2, output_dir=str(out), progress=False)

    whole = fresh()
    expected = train(whole, data, args(tmp_path / "whole"), pad_token_id=tok.pad_token_id)
    real_replace = os.replace

    def replace_then_die(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        if Path(dst).name == ".checkpoint.old" and json.loads((Path(src).parent / ".checkpoint.new" /
                                                                "trainer_state.json").read_text())["step"] == 6:
            raise KeyboardInterrupt  # stands for a kill: nothing after this rename runs

    monkeypatch.setattr(atomic.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), data, args(tmp_path / "killed"), pad_token_id=tok.pad_token_id)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    killed = tmp_path / "killed"
    assert sorted(p.name for p in killed.iterdir()) == [".checkpoint.new", ".checkpoint.old"]

    resumed_model = fresh()
    resumed = train(resumed_model, data, args(killed), pad_token_id=tok.pad_token_id, resume=True)
    assert len(resumed["losses"]) == 8
    assert_close(torch.tensor(resumed["losses"]), torch.tensor(expected["losses"]))
    assert_state_close(resumed_model.adapter_state_dict("default"), whole.adapter_state_dict("default"))
    assert sorted(p.name for p in killed.iterdir()) == ["checkpoint"]


# ------------------------------------------------------------------------------ write_folder's recovery states

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "state.txt").write_text(text)
    return path


@pytest.mark.parametrize("state,expected", [
    ("tmp", "old"),        # killed while writing the temporary folder: the old folder stays, the garbage goes
    ("new", "new"),        # killed after the finished copy was named .new: the swap is finished
    ("renamed", "new"),    # killed between the two renames: `target` is missing, .new takes its place
    ("deleting", "new"),   # killed before .old was deleted
    ("first", "new"),      # the first write of a folder, killed before its rename
])
def test_recover_folder_leaves_one_complete_folder(tmp_path, state, expected):
    target = tmp_path / "checkpoint"
    if state == "tmp":
        folder(target, "old")
        folder(tmp_path / f".checkpoint.tmp-{dead_pid()}-abc", "half")
    elif state == "new":
        folder(target, "old")
        folder(tmp_path / ".checkpoint.new", "new")
    elif state == "renamed":
        folder(tmp_path / ".checkpoint.old", "old")
        folder(tmp_path / ".checkpoint.new", "new")
    elif state == "deleting":
        folder(target, "new")
        folder(tmp_path / ".checkpoint.old", "old")
    else:
        folder(tmp_path / ".checkpoint.new", "new")
    live = folder(tmp_path / f".checkpoint.tmp-{os.getpid()}-live", "in progress")  # a running writer's: kept
    recover_folder(target)
    assert (target / "state.txt").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint", live.name])
    write_folder(target, {"more.txt": "x"})  # and the next write works on top of it, keeping its files
    assert (target / "state.txt").read_text() == expected and (target / "more.txt").read_text() == "x"


# ---------------------------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, "ctrl-c")
    interrupt_after(monkeypatch, 4)
    code = main(["train", str(recipe), "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err[0].startswith("reftkit: training")  # the status line first, the interrupt last
    assert err[-1] == (f"reftkit: interrupted; the checkpoint of step 4 is in {run_dir(recipe) / 'checkpoint'}; "
                      f"continue with: reftkit train {recipe} --resume")
    assert main(["train", str(recipe), "--resume", "--json"]) == 0  # and that command does continue it
    assert json.loads(capsys.readouterr().out)["steps"] == STEPS


def test_ctrl_c_without_checkpoints_says_save_every_enables_resuming(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, "no-checkpoints")
    cfg = yaml.safe_load(recipe.read_text())
    cfg["train"]["save_every"] = 0
    recipe.write_text(yaml.safe_dump(cfg))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_loop", interrupted)
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and [line for line in err if "interrupted" in line] == [err[-1]]
    assert err[-1] == ("reftkit: interrupted; no checkpoint was written: set train.save_every in the recipe to make "
                       "runs resumable with --resume")
