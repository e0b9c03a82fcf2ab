"""Tests for the `reftkit` command line (run in-process through `main(argv)`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reftkit import cli
from reftkit.cli import COMMANDS, main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_models_list_json_parses(capsys):
    code, out, _ = run(capsys, "models", "list", "--json")
    assert code == 0
    names = [row["name"] for row in json.loads(out)]
    assert "smollm2-135m-instruct" in names and "tiny-llama" in names


def test_json_flag_is_accepted_before_the_subcommand(capsys):
    code, out, _ = run(capsys, "--json", "models", "list")
    assert code == 0
    assert isinstance(json.loads(out), list)


def test_models_list_table(capsys):
    code, out, _ = run(capsys, "models", "list")
    assert code == 0
    assert out.splitlines()[0].startswith("NAME")
    assert "minilm-l6" in out


def test_generate_json_on_tiny_llama(capsys):
    code, out, err = run(capsys, "generate", "--model", "tiny-llama", "--prompt", "hello", "--prompt",
                         "a longer prompt here", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == "tiny-llama"
    assert [o["prompt"] for o in result["outputs"]] == ["hello", "a longer prompt here"]
    assert all(isinstance(o["reply"], str) for o in result["outputs"])
    assert "loading tiny-llama" in err


def test_generate_plain_text_without_chat_template(capsys):
    code, out, _ = run(capsys, "generate", "--model", "tiny-gpt2", "--prompt", "hi", "--no-chat",
                       "--max-new-tokens", "2")
    assert code == 0
    assert out.startswith("> hi\n")


def test_generate_is_deterministic(capsys):
    argv = ("--json", "generate", "--model", "tiny-qwen2", "--prompt", "x y z", "--max-new-tokens", "5")
    assert run(capsys, *argv)[1] == run(capsys, *argv)[1]


def test_unknown_model_exits_2_with_one_line_error(capsys):
    code, out, err = run(capsys, "generate", "--model", "no-such-model", "--prompt", "hi")
    assert code == 2
    assert out == ""
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "no-such-model" in error_lines[0] and "tiny-llama" in error_lines[0]
    assert "Traceback" not in err


def test_debug_flag_adds_traceback(capsys):
    code, _, err = run(capsys, "generate", "--model", "no-such-model", "--prompt", "hi", "--debug")
    assert code == 2
    assert "Traceback" in err and "ModelNotFoundError" in err


def test_generate_on_encoder_is_a_clear_error(capsys):
    code, _, err = run(capsys, "generate", "--model", "tiny-bert", "--prompt", "hi")
    assert code == 2
    assert "cannot generate" in err


def test_adapter_folder_must_exist(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", "tiny-llama", "--prompt", "hi",
                       "--adapter", str(tmp_path / "missing"))
    assert code == 2
    assert "adapter" in err.splitlines()[-1]


def test_unexpected_exception_is_one_line(capsys, monkeypatch):
    def explode(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(COMMANDS, "demo", cli.Command(COMMANDS["demo"].add_arguments, explode, "demo"))
    code, _, err = run(capsys, "demo")
    assert code == 2
    assert err.strip() == "error: RuntimeError: boom second line"


def test_bad_arguments_exit_2(capsys):
    assert run(capsys, "generate", "--prompt", "x", "--max-new-tokens", "0")[0] == 2
    assert run(capsys)[0] == 2


def test_demo_on_tiny_model(capsys, tmp_path):
    rows = [{"prompt": f"question {i}", "completion": "YES SIR"} for i in range(8)]
    (tmp_path / "caps_train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "caps_heldout.jsonl").write_text("\n".join(json.dumps({"prompt": f"other {i}"}) for i in range(3)))
    (tmp_path / "demo.yaml").write_text(
        "model: tiny-llama\ndata: caps_train.jsonl\noutput_dir: " + str(tmp_path / "run") + "\n"
        "reft: {method: loreft, layers: [1, 3], rank: 2, positions: l1}\ntrain: {epochs: 1, batch_size: 4}\n")
    code, out, err = run(capsys, "demo", "--config", str(tmp_path / "demo.yaml"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [r["prompt"] for r in result["replies"]] == [f"other {i}" for i in range(3)]
    assert result["steps"] == 2 and 0 < result["trainable_percent"] < 100
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "reftkit", "models", "list", "--json"],
                            capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)[0]["name"] == "smollm2-135m-instruct"


@pytest.mark.real_model
def test_generate_on_smollm2_says_paris(capsys):
    code, out, err = run(capsys, "--json", "generate", "--model", "smollm2-135m-instruct", "--prompt",
                         "What is the capital of France?", "--max-new-tokens", "12")
    assert code == 0, err
    assert "Paris" in json.loads(out)["outputs"][0]["reply"]
