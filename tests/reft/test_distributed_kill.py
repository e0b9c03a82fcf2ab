"""`reftkit train` under `torchrun --nproc_per_node 2` survives a kill: rank 0 is SIGKILLed in the middle of writing
its second checkpoint (after the first one); the group fails fast (torchrun ends well within the process-group
timeout), the first checkpoint is intact, and `--resume` on 2 processes ends with the adapter and loss history of an
uninterrupted 1-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from numerics import assert_close, assert_state_close
from safetensors.torch import load_file

from reftkit.cli import main
from reftkit.models import build_tiny_model
from reftkit.reft.config import ReftConfig
from reftkit.reft.model import ReftModel

from .conftest import ANIMALS
from .test_concepts import FirstGradients
from .test_distributed import TIMEOUT_S

pytestmark = pytest.mark.numerics
STEPS = 8
REFT = {"method": "loreft", "layers": [1, 3], "rank": 4, "positions": "f1+l1"}
DRIVER = textwrap.dedent(r'''
    import os, pathlib, sys, time
    import torch
    torch.set_num_threads(1)
    mark = pathlib.Path(sys.argv[1])
    (mark.parent / f"pid.rank{os.environ['RANK']}").write_text(str(os.getpid()))
    if mark.name != "none" and os.environ["RANK"] == "0":
        import safetensors.torch
        real_save, calls = safetensors.torch.save_file, []
        def save_file(tensors, filename, *args, **kwargs):  # stall after the first file of the 2nd checkpoint
            real_save(tensors, filename, *args, **kwargs)
            calls.append(filename)
            if len(calls) == 4:
                mark.write_text("stalled")
                time.sleep(600)
        safetensors.torch.save_file = save_file
    from reftkit.cli import main
    sys.exit(main(sys.argv[2:]))
''')


def write_recipe(folder: Path) -> Path:
    folder.mkdir()
    (folder / "animals.jsonl").write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in ANIMALS * 3))
    cfg = {"model": "tiny-llama", "data": "animals.jsonl", "chat": False, "max_length": 64, "reft": REFT,
           "train": {"max_steps": STEPS, "batch_size": 4, "lr": 0.01, "save_every": 2, "bf16": False,
                     "max_grad_norm": 1.0}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "recipe.yaml"


def launch(script: Path, mark: Path, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REFTKIT_DIST_TIMEOUT": str(TIMEOUT_S)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(mark), *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_of_rank0_mid_checkpoint_fails_fast_and_resume_matches_one_process(tmp_path, capsys):
    reference = write_recipe(tmp_path / "reference")
    with FirstGradients() as grads:
        assert main(["train", str(reference), "--json"]) == 0
    capsys.readouterr()
    ref_out = reference.parent / "runs" / "recipe"
    expected = load_file(str(ref_out / "adapter" / "adapter_model.safetensors"))
    expected_losses = json.loads((ref_out / "metrics.json").read_text())["losses"]
    assert grads.seen and all(g > 0 for g in grads.seen.values())  # every trained tensor had a gradient
    start = ReftModel(build_tiny_model("llama"), ReftConfig(**{k: v for k, v in REFT.items() if k != "method"}))
    for key, value in start.adapter_state_dict("default").items():
        assert float((expected[key] - value).abs().max()) > 1e-4, f"{key} did not move"

    recipe = write_recipe(tmp_path / "killed")
    out = recipe.parent / "runs" / "recipe"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    mark = tmp_path / "stalled"
    proc = launch(script, mark, "train", str(recipe), "--json")
    deadline = time.monotonic() + 90
    while not mark.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "rank 0 never reached the second checkpoint"
        time.sleep(0.05)
    killed_at = time.monotonic()
    os.kill(int((tmp_path / "pid.rank0").read_text()), signal.SIGKILL)
    try:
        proc.communicate(timeout=TIMEOUT_S + 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the group did not fail within the process-group timeout")
    assert proc.returncode != 0 and time.monotonic() - killed_at < TIMEOUT_S + 15
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2  # intact
    assert not (out / "metrics.json").exists()

    resumed = launch(script, tmp_path / "none", "train", str(recipe), "--resume", "--json")
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr[-3000:]
    metrics = json.loads(stdout)
    assert metrics["steps"] == STEPS
    assert_close(torch.tensor(metrics["losses"]), torch.tensor(expected_losses))
    assert_state_close(load_file(str(out / "adapter" / "adapter_model.safetensors")), expected)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # the stale temporary is gone
