"""Tests for the `reftkit` command line (run in-process through `main(argv)`)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys

import pytest

import reftkit
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


def test_demo_on_tiny_model(capsys, tmp_path, monkeypatch):
    rows = [{"prompt": f"question {i}", "completion": "YES SIR"} for i in range(8)]
    (tmp_path / "caps_train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "caps_heldout.jsonl").write_text("\n".join(json.dumps({"prompt": f"other {i}"}) for i in range(3)))
    (tmp_path / "demo.yaml").write_text(
        "model: tiny-llama\ndata: caps_train.jsonl\noutput_dir: recipe-run\n"
        "reft: {method: loreft, layers: [1, 3], rank: 2, positions: l1}\n"
        "train: {epochs: 1, batch_size: 4, save_every: 1}\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, out, err = run(capsys, "demo", "--config", str(tmp_path / "demo.yaml"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [r["prompt"] for r in result["replies"]] == [f"other {i}" for i in range(3)]
    assert result["steps"] == 2 and 0 < result["trainable_percent"] < 100
    # the demo writes its own folder (runs/demo of the current folder), not the recipe's output_dir
    assert result["adapter"] == "runs/demo/adapter" and (cwd / "runs" / "demo" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "recipe-run").exists()
    code, _, err = run(capsys, "demo", "--config", str(tmp_path / "demo.yaml"))  # nothing is overwritten
    assert code == 2 and "runs/demo is not empty" in err and "--resume" in err and "--overwrite" in err
    code, out, err = run(capsys, "demo", "--config", str(tmp_path / "demo.yaml"), "--resume", "--json")
    assert code == 0, err
    assert json.loads(out)["replies"] == result["replies"]  # a finished run resumes to the same adapter
    code, out, err = run(capsys, "demo", "--config", str(tmp_path / "demo.yaml"), "--output-dir", str(tmp_path / "other"),
                         "--json")
    assert code == 0, err
    assert json.loads(out)["adapter"] == str(tmp_path / "other" / "adapter")


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


# ------------------------------------------------------------------------- parser: help, usage errors, version

def _walk(parser: argparse.ArgumentParser):
    """(parser, action) for every action of `parser` and of its subparsers, depth first."""
    for action in parser._actions:
        yield parser, action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk(sub)


def _has_default_to_show(action: argparse.Action) -> bool:
    default = action.default
    return (bool(action.option_strings) and not action.required and action.nargs != 0
            and default is not None and default is not False and default is not argparse.SUPPRESS)


def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    parser = cli.build_parser()
    checked = set()
    for owner, action in _walk(parser):
        if isinstance(action, argparse._SubParsersAction):
            assert all(choice.help for choice in action._choices_actions), f"{owner.prog}: a subcommand has no help"
            continue
        if action.help is argparse.SUPPRESS:
            continue
        name = f"{owner.prog} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help.strip(), f"{name} has no help"
        if _has_default_to_show(action):
            shown = owner._get_formatter()._expand_help(action)
            assert str(action.default) in shown, f"{name} does not show its default {action.default!r}: {shown!r}"
        checked.add(owner.prog)
    assert {f"reftkit {name}" for name in COMMANDS} | {"reftkit", "reftkit models list"} <= checked


def test_valued_options_show_their_defaults_in_the_help(capsys):
    code, out, _ = run(capsys, "eval", "--help")
    text = " ".join(out.split())
    assert code == 0 and "examples per forward (default 8)" in text and "(default 512)" in text
    code, out, _ = run(capsys, "trace", "--help")
    assert code == 0 and "seed of the noise samples (default 0)" in " ".join(out.split())  # a falsy default


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--prompt", "hi", "--bogus"], "unrecognized arguments: --bogus (see 'reftkit generate --help')"),
    (["--no-such-flag", "models", "list"], "unrecognized arguments: --no-such-flag"),
    (["generate"], "the following arguments are required: --prompt"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "many"], "--max-new-tokens: expected a positive integer"),
    (["trace", "--prompt", "p", "--subject", "s", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["eval", "--data", "rows.jsonl", "--task", "translate"], "argument --task: invalid choice: 'translate'"),
    (["models"], "the following arguments are required: ACTION (see 'reftkit models --help')"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line_on_stderr_and_exit_2(capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err and "--help')" in err


@pytest.mark.parametrize("argv", [[], ["--json"]])
def test_no_command_prints_the_help_on_stderr_and_exits_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("usage: reftkit") and all(name in err for name in COMMANDS)


def test_version_comes_from_the_package_metadata(capsys):
    code, out, err = run(capsys, "--version")
    assert (code, out, err) == (0, f"reftkit {importlib.metadata.version('reftkit')}\n", "")


def test_version_falls_back_to_the_module_attribute(capsys, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert run(capsys, "--version")[:2] == (0, f"reftkit {reftkit.__version__}\n")


# ------------------------------------------------------------------ process behaviour: imports, pipes, output

def test_models_list_imports_neither_torch_nor_transformers():
    code = ("import sys; import reftkit; from reftkit.cli import main; status = main(['models', 'list']); "
            "rows = reftkit.list_models(); "
            "print(status, len(rows), 'torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    status, count, torch_loaded, transformers_loaded = result.stderr.split()
    assert (status, torch_loaded, transformers_loaded) == ("0", "False", "False")
    assert int(count) == len(result.stdout.splitlines()) - 1 and "tiny-llama" in result.stdout


def test_stdout_closed_early_ends_quietly_with_status_0():
    """`reftkit models list | head -1`: the reader may go away before the output is written."""
    process = subprocess.Popen([sys.executable, "-m", "reftkit", "models", "list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # gone before the interpreter has even started: every write meets a closed pipe
    err = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=120) == 0
    assert err == b""


def test_transformers_output_is_off_during_a_command_unless_verbose_and_restored_after(capsys, monkeypatch):
    from transformers.utils import logging as transformers_logging

    def settings():
        return transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()

    before = settings()
    during = []

    def record(args):
        during.append(settings())
        return 0

    monkeypatch.setitem(COMMANDS, "generate", cli.Command(COMMANDS["generate"].add_arguments, record, "generate"))
    assert run(capsys, "generate", "--prompt", "hi")[0] == 0
    assert run(capsys, "generate", "--prompt", "hi", "--verbose")[0] == 0
    assert run(capsys, "--debug", "generate", "--prompt", "hi")[0] == 0
    assert during == [(transformers_logging.ERROR, False), before, before]
    assert settings() == before


def test_library_logs_reach_stderr_during_a_command_and_the_logger_is_restored_after(capsys, monkeypatch):
    import logging

    library = logging.getLogger("reftkit")
    before = (list(library.handlers), library.level)

    def log_something(args):
        logging.getLogger("reftkit.steer.vector").info("a library record")
        return 0

    monkeypatch.setitem(COMMANDS, "generate", cli.Command(COMMANDS["generate"].add_arguments, log_something, "x"))
    code, out, err = run(capsys, "generate", "--prompt", "hi")
    assert code == 0 and out == "" and err == "reftkit: a library record\n"
    assert (list(library.handlers), library.level) == before
    # a record after the command never reaches the stream the command wrote to (it may be closed by then)
    logging.getLogger("reftkit.steer.vector").info("after the command")
    assert "after the command" not in capsys.readouterr().err


def test_loading_a_folder_writes_no_transformers_progress_bar_or_load_report(tmp_path):
    """A folder whose weights hold an unexpected key: transformers draws a "Loading weights" bar and logs a
    coloured load report; the CLI shows neither, and shows both with --verbose."""
    from safetensors.torch import load_file, save_file

    import torch
    from reftkit.models import build_tiny_model, build_tiny_tokenizer

    build_tiny_model("llama").save_pretrained(tmp_path)
    build_tiny_tokenizer().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.unexpected.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    code = ("import sys; from reftkit.cli import main\n"
            "argv = ['generate', '--model', sys.argv[1], '--prompt', 'hi', '--max-new-tokens', '1']\n"
            "for extra in ([], ['--verbose'], []):\n"
            "    assert main(argv + extra) == 0\n"
            "    print('-----', file=sys.stderr, flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    quiet, verbose, quiet_again, _ = result.stderr.split("-----\n")
    for err in (quiet, quiet_again):
        assert err.splitlines() == [f"reftkit: loading {tmp_path}", "reftkit: generating 1 reply"], err
        assert "\r" not in err
    assert "Loading weights" in verbose and "LOAD REPORT" in verbose and "UNEXPECTED" in verbose
