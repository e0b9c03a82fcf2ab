"""`reftkit adapters inspect/list`, `generate --adapter` without `--model` (the adapter's recorded base), the checks
`--adapter` runs before any model is loaded, and `--device`/`--dtype`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

import reftkit.models
from reftkit.cli import main
from reftkit.models import build_tiny_model, build_tiny_tokenizer, load_model
from reftkit.reft.config import ReftConfig
from reftkit.reft.model import ReftModel

METRICS = {"task": "sft", "model": "tiny", "steps": 12, "losses": [3.0, 2.5, 1.25], "eval": [[12, 1.5]],
           "train_seconds": 4.2, "examples_per_second": 9.5, "trainable_parameters": 1040}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    build_tiny_model("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run_folder(base_folder, tmp_path_factory):
    """A training run's folder as `reftkit train` leaves it: adapter/ and metrics.json."""
    run = tmp_path_factory.mktemp("runs") / "caps"
    model, _ = load_model(base_folder)
    reft = ReftModel(model, ReftConfig(layers=[1, 3], rank=2, positions="f1+l1"))
    with torch.no_grad():  # an edit that changes greedy replies
        generator = torch.Generator().manual_seed(0)
        for name, p in reft.adapters.named_parameters():
            if "learned_source" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 5)
    reft.save_pretrained(run / "adapter")
    (run / "metrics.json").write_text(json.dumps(METRICS))
    return run


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"load_model was called with {args}")

    monkeypatch.setattr(reftkit.models, "load_model", refuse)


def test_inspect_json_describes_the_adapter_and_its_run(capsys, run_folder, base_folder):
    code, out, err = run(capsys, "adapters", "inspect", str(run_folder / "adapter"), "--json")
    assert code == 0, err
    info = json.loads(out)
    state = json.loads((run_folder / "adapter" / "adapter_config.json").read_text())
    assert info["kind"] == "reft" and info["method"] == "loreft" and info["rank"] == 2
    assert info["sites"] == ["L1.block_output", "L3.block_output"] and info["positions"] == "f1+l1"
    assert info["parameters"] == 2 * (64 * 2 + 2 * 64 + 2)  # 2 interventions: R [64, 2], W [2, 64] and b [2]
    assert info["base_model"] == state["base_model"] and info["base_model"]["source"] == str(base_folder.resolve())
    assert info["metrics"] == {"path": str(run_folder / "metrics.json"), "task": "sft", "model": "tiny", "steps": 12,
                               "final_loss": 1.25, "eval_loss": 1.5, "train_seconds": 4.2,
                               "examples_per_second": 9.5, "trainable_parameters": 1040}


def test_inspect_table(capsys, run_folder, base_folder):
    code, out, err = run(capsys, "adapters", "inspect", str(run_folder / "adapter"))
    assert code == 0, err
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["method"].strip() == "loreft" and lines["rank"].strip() == "2"
    assert lines["sites"].strip() == "L1.block_output, L3.block_output (2)"
    assert lines["positions"].strip() == "f1+l1 (tied)"
    assert lines["parameters"].strip() == "516 in adapter_model.safetensors"
    assert lines["base model"].strip() == f"{base_folder.resolve()} (LlamaForCausalLM, llama, hidden 64, 4 layers)"
    assert lines["training"].strip().startswith("12 steps, final loss 1.2500, eval loss 1.5000, 4.2 s")


def test_list_finds_every_adapter_under_a_folder(capsys, run_folder, base_folder, tmp_path):
    model, _ = load_model("tiny-llama")
    ReftModel(model, ReftConfig(method="noreft", layers=[0], rank=1)).save_pretrained(tmp_path / "b" / "adapter")
    (tmp_path / "a").symlink_to(run_folder, target_is_directory=True)  # symlinks are not followed
    code, out, err = run(capsys, "adapters", "list", str(tmp_path), "--json")
    assert code == 0, err
    assert json.loads(out) == [{"path": str(tmp_path / "b" / "adapter"), "kind": "reft", "method": "noreft",
                                "base": "tiny-llama", "parameters": 64 + 64 + 1}]
    code, out, err = run(capsys, "adapters", "list", str(run_folder.parent))
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["PATH", "METHOD", "BASE", "PARAMETERS"]
    assert row.split() == [str(run_folder / "adapter"), "loreft", str(base_folder.resolve()), "516"]


def test_list_reports_a_broken_adapter_and_goes_on(capsys, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"config": {}}')
    code, out, err = run(capsys, "adapters", "list", str(tmp_path))
    assert code == 0, err
    assert "(unreadable:" in out and "no weights file adapter_model.safetensors" in out


def test_inspect_errors_are_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "adapters", "inspect", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("error: adapter folder") and "does not exist" in err
    code, _, err = run(capsys, "adapters", "inspect", str(tmp_path))
    assert code == 2 and "is not an adapter folder" in err


def test_adapters_commands_import_no_torch(run_folder):
    script = ("import sys\nfrom reftkit.cli import main\n"
              f"code = main(['adapters', 'list', {str(run_folder)!r}, '--json'])\n"
              f"code += main(['adapters', 'inspect', {str(run_folder / 'adapter')!r}])\n"
              "print(code, 'torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.split()[-3:] == ["0", "False", "False"]


def test_generate_without_model_uses_the_adapters_recorded_base(capsys, run_folder, base_folder):
    code, out, err = run(capsys, "generate", "--adapter", str(run_folder / "adapter"), "--prompt", "the cat",
                         "--no-chat", "--max-new-tokens", "4", "--device", "cpu", "--json")
    assert code == 0, err
    assert f"using the adapter's base model {base_folder.resolve()}" in err
    result = json.loads(out)
    assert result["model"] == str(base_folder.resolve())
    code, out, err = run(capsys, "generate", "--model", str(base_folder), "--prompt", "the cat", "--no-chat",
                         "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["outputs"][0]["reply"] != result["outputs"][0]["reply"]  # the adapter was applied


def test_generate_without_model_needs_a_recorded_base(capsys, run_folder, tmp_path, no_model_load):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run_folder / "adapter", old)
    meta = json.loads((old / "adapter_config.json").read_text())
    del meta["base_model"]
    (old / "adapter_config.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "generate", "--adapter", str(old), "--prompt", "hi")
    assert code == 2 and "does not record its base model" in err and "pass --model" in err


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist"),
    ("no-config", "is not an adapter folder"),
    ("bad-json", "is not valid JSON"),
    ("no-weights", "no weights file adapter_model.safetensors"),
    ("truncated-weights", "truncated"),
])
def test_a_broken_adapter_fails_before_the_model_is_loaded(capsys, run_folder, base_folder, tmp_path, no_model_load,
                                                           command, breakage, message):
    import shutil

    adapter = tmp_path / "adapter"
    if breakage != "missing":
        shutil.copytree(run_folder / "adapter", adapter)
    if breakage == "no-config":
        (adapter / "adapter_config.json").unlink()
    elif breakage == "bad-json":
        (adapter / "adapter_config.json").write_text('{"config": ')
    elif breakage == "no-weights":
        (adapter / "adapter_model.safetensors").unlink()
    elif breakage == "truncated-weights":
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-10])
    extra = ["--prompt", "hi"] if command == "generate" else ["--data", str(tmp_path / "data.jsonl")]
    started = time.perf_counter()
    code, _, err = run(capsys, command, "--model", str(base_folder), "--adapter", str(adapter), *extra)
    assert time.perf_counter() - started < 0.5
    assert code == 2 and message in err.splitlines()[-1], err


def test_a_base_of_another_width_fails_from_its_config_alone(capsys, run_folder, tmp_path, no_model_load):
    narrow = tmp_path / "narrow"
    build_tiny_model("llama", hidden_size=32, intermediate_size=64, head_dim=8).save_pretrained(narrow)
    build_tiny_tokenizer().save_pretrained(narrow)
    (narrow / "model.safetensors").write_bytes(b"not weights: only config.json may be read")
    code, _, err = run(capsys, "generate", "--model", str(narrow), "--adapter", str(run_folder / "adapter"),
                       "--prompt", "hi")
    assert code == 2, err
    line = err.splitlines()[-1]
    assert "hidden size 64 vs 32" in line and "LlamaForCausalLM" in line and str(narrow) in line
    code, _, err = run(capsys, "eval", "--model", "tiny-qwen2", "--adapter", str(run_folder / "adapter"),
                       "--data", str(tmp_path / "data.jsonl"))
    assert code == 2 and "model type 'llama' vs 'qwen2'" in err


def test_device_and_dtype_options_reach_load_model(capsys, monkeypatch):
    seen = {}
    real = reftkit.models.load_model

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(reftkit.models, "load_model", spy)
    code, out, err = run(capsys, "generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "2",
                         "--device", "cpu", "--dtype", "bf16", "--json")
    assert code == 0, err
    assert len(json.loads(out)["outputs"]) == 1
    assert seen == {"device": "cpu", "dtype": "bf16"}


@pytest.mark.parametrize("option, value, message", [("--dtype", "int3", "unknown dtype 'int3'"),
                                                    ("--device", "gpu", "unknown device 'gpu'")])
def test_bad_device_or_dtype_is_one_line(capsys, option, value, message):
    code, _, err = run(capsys, "generate", "--model", "tiny-llama", "--prompt", "hi", option, value)
    assert code == 2 and err.splitlines()[-1].startswith(f"error: {message}")


@pytest.mark.parametrize("command", ["generate", "eval", "trace"])
def test_commands_that_load_a_model_take_device_and_dtype(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    text = " ".join(out.split())
    assert code == 0 and "--device DEVICE" in text and "--dtype DTYPE" in text
    assert "else cpu; default auto)" in text and "default float32)" in text
