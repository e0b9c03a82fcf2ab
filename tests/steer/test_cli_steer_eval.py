"""`reftkit steer eval CONFIG.yaml` on tiny-llama (in-process through `main(argv)`): a base, a prompting, a vector,
a layer-sweep, a CAST and an adapter method in one report folder (report.json, sweep plots, a table on stdout or
JSON), the refusal to overwrite it, and bad configs failing before any model is loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import reftkit.models
from reftkit.cli import main
from reftkit.steer import SteeringVector

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["hello", "what is up", "say hi", "tell me", "good day", "how are you"]
FACTS = [{"prompt": "capital?", "answer": ["a", "e"]}, {"prompt": "two plus two", "answer": "e"},
         {"prompt": "name a letter", "answer": ["a", "o"]}]
NEUTRAL = ["the cat sat on the mat", "a b c d e"]
PAIRS = [{"prompt": "hi", "target": "ab", "other": "xyz"}, {"prompt": "yo", "target": "q", "other": "rs"}]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def _setup(folder: Path, methods=None, **keys) -> Path:
    g = torch.Generator().manual_seed(3)
    SteeringVector({f"L{i}.block_output": 3 * torch.randn(64, generator=g) for i in (1, 2)}).save(folder / "vec")
    SteeringVector({"L1.block_output": torch.randn(64, generator=g)}).save(folder / "cond")
    data = {"prompts": _jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]),
            "facts": _jsonl(folder / "facts.jsonl", FACTS),
            "neutral": _jsonl(folder / "neutral.jsonl", [{"text": t} for t in NEUTRAL]),
            "pairs": _jsonl(folder / "pairs.jsonl", PAIRS)}
    cfg = {"model": "tiny-llama", "behaviour": "regex:.", "chat": False, "max_new_tokens": 3, "data": data,
           "methods": methods if methods is not None else [
               {"base": True}, {"name": "asking", "prompt": "Be loud."},
               {"name": "caa", "vector": "vec", "coefficients": [0, 2], "scope": "all"},
               {"name": "layers", "vector": "vec", "coefficients": [1, 3], "layers": [1, 2], "scope": "all"},
               {"name": "cast", "vector": "vec", "coefficients": [2], "scope": "all",
                "condition": {"vector": "cond", "threshold": 0.0}}], **keys}
    path = folder / "eval.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@pytest.fixture(autouse=True)
def _no_stale_log_handler():
    """`main` points reftkit's log handler at the stderr of its call; files saved between calls log through it."""
    yield
    logging.getLogger("reftkit").handlers = []


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"load_model was called with {args}")

    monkeypatch.setattr(reftkit.models, "load_model", refuse)


def test_eval_writes_the_report_and_plots_and_refuses_to_overwrite(tmp_path, capsys):
    config = _setup(tmp_path, kl_budget=100.0)
    code, out, err = run(capsys, "steer", "eval", str(config), "--device", "cpu")
    assert code == 0, err
    folder = tmp_path / "runs" / "eval"
    report = json.loads((folder / "report.json").read_text())
    assert list(report["methods"]) == ["base", "asking", "caa", "layers", "cast"]
    assert sorted(p.name for p in folder.iterdir()) == ["report.json", "sweep_caa.png", "sweep_layers.png"]
    rows = {r["method"]: r for r in report["table"]}
    assert rows["base"]["kl"] == 0.0 and rows["base"]["retention"] in (None, 1.0)  # None: the base knows none
    assert report["methods"]["caa"]["steerability"]["coefficients"] == [0.0, 2.0]
    assert report["methods"]["layers"]["best_site"] in ("L1.block_output", "L2.block_output")
    assert rows["layers"]["coefficient"].startswith(report["methods"]["layers"]["best_site"] + "@")
    assert report["methods"]["cast"]["method"]["decided"] > 0
    assert report["kl_budget"] == 100.0 and all(r["within_budget"] for r in report["table"])
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["METHOD", "COEFFICIENT", "BEHAVIOUR"]
    assert [line.split()[0] for line in lines[1:6]] == ["base", "asking", "caa", "layers", "cast"]
    assert lines[-1] == f"report: {folder}"
    before = (folder / "report.json").read_bytes()
    code, out, err = run(capsys, "steer", "eval", str(config))
    assert code == 2 and out == "" and "is not empty" in err and "--overwrite" in err
    assert (folder / "report.json").read_bytes() == before
    code, out, err = run(capsys, "steer", "eval", str(config), "--overwrite", "--json",
                         "--output", str(tmp_path / "other"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["output"] == str(tmp_path / "other") and [r["method"] for r in doc["table"]][0] == "base"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder left


def test_eval_scores_an_adapter(tmp_path, capsys, tiny_llama):
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.model import ReftModel

    model, _ = tiny_llama
    reft = ReftModel(model, ReftConfig(rank=2, layers=[1], positions="f1"))  # l1 edits no scored token
    reft.save_pretrained(tmp_path / "adapter")
    reft.unload()
    config = _setup(tmp_path, methods=[{"base": True}, {"name": "reft", "adapter": "adapter"}])
    code, out, err = run(capsys, "steer", "eval", str(config), "--json")
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(out)["table"]}
    assert rows["reft"]["kl"] > 0 and rows["base"]["kl"] == 0.0


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown keys ['colour']"),
    ({"methods": []}, "methods must be a non-empty list"),
    ({"methods": [{"vector": "vec"}]}, "coefficients must be a non-empty list"),
    ({"methods": [{"vector": "vec", "coefficients": [float("nan")]}]}, "methods[0]"),
    ({"methods": [{"vector": "missing", "coefficients": [1]}]}, "vector folder"),
    ({"methods": [{"vector": "vec", "coefficients": [1], "layers": [5]}]}, "has no L5.block_output"),
    ({"methods": [{"vector": "vec", "coefficients": [1], "unit": "volts"}]}, "unknown unit 'volts'"),
    ({"methods": [{"vector": "vec", "coefficients": [1], "scope": "nowhere"}]}, "scope 'nowhere'"),
    ({"methods": [{"vector": "vec", "coefficients": [1], "condition": {"vector": "cond"}}]},
     "condition must be a mapping with vector and threshold"),
    ({"methods": [{"vector": "vec", "coefficients": [1], "condition": {"vector": "vec", "threshold": 0.1}}]},
     "has 2 sites"),
    ({"methods": [{"prompt": ""}]}, "prompt must be a non-empty instruction"),
    ({"methods": [{"base": True, "prompt": "x"}]}, "exactly one of base, prompt, vector, adapter"),
    ({"methods": [{"base": True}, {"base": True, "name": "base"}]}, "used twice"),
    ({"methods": [{"adapter": "vec"}]}, "methods[0]"),
    ({"behaviour": "sparkly"}, "sparkly"),
    ({"kl_budget": -1}, "kl_budget must be a number >= 0"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
])
def test_bad_configs_fail_before_the_model_loads(tmp_path, capsys, no_model_load, change, message):
    config = _setup(tmp_path)
    cfg = json.loads(config.read_text())
    cfg.update(change)
    config.write_text(json.dumps(cfg, allow_nan=True))
    code, out, err = run(capsys, "steer", "eval", str(config))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_bad_data_files_fail_before_the_model_loads(tmp_path, capsys, no_model_load):
    config = _setup(tmp_path)
    (tmp_path / "facts.jsonl").write_text('{"prompt": "x"}\n')
    code, _, err = run(capsys, "steer", "eval", str(config))
    assert code == 2 and "facts.jsonl, row 1: expected an object with prompt, answer" in err
    _setup(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "only one"}\n')
    code, _, err = run(capsys, "steer", "eval", str(config))
    assert code == 2 and "at least 2 prompts" in err
    cfg = json.loads(config.read_text())
    del cfg["data"]["neutral"]
    cfg["kl_budget"] = 1.0
    _setup(tmp_path)
    config.write_text(json.dumps(cfg))
    code, _, err = run(capsys, "steer", "eval", str(config))
    assert code == 2 and "kl_budget needs data.neutral" in err


def test_the_example_configs_are_valid(tmp_path):
    """examples/steer/eval_caps.yaml (with stand-ins for the vector and adapter it evaluates, which the example's
    own commands make), caps_vector.yaml and caps_own.yaml load and check."""
    import shutil

    from reftkit.reft.config import ReftConfig
    from reftkit.reft.model import ReftModel
    from reftkit.reft.recipe import load_recipe
    from reftkit.steer.config import load_steer_config
    from reftkit.steer.eval_config import load_eval_config

    example = ROOT / "examples" / "steer"
    vector_cfg = load_steer_config(example / "caps_vector.yaml")
    assert vector_cfg["layers"] == [3, 6, 9] and vector_cfg["read"] == "completion_mean"
    assert len(vector_cfg["pairs_rows"]) >= 20
    recipe = load_recipe(example / "caps_own.yaml")
    assert recipe["reft"]["rank"] == 4 and recipe["behaviour"] == "all_caps"
    shutil.copy(example / "eval_caps.yaml", tmp_path / "eval_caps.yaml")
    shutil.copytree(example / "data", tmp_path / "data")
    SteeringVector({f"L{i}.block_output": torch.ones(576) for i in (3, 6, 9)}).save(tmp_path / "runs" / "caps_vector")
    from reftkit.models import load_model

    model, _ = load_model("tiny-llama")
    reft = ReftModel(model, ReftConfig(rank=1, layers=[1], positions="f1+l1"))
    reft.save_pretrained(tmp_path / "runs" / "caps_own" / "adapter")
    reft.unload()
    cfg = load_eval_config(tmp_path / "eval_caps.yaml")
    assert [m["kind"] for m in cfg["methods"]] == ["base", "prompt", "vector", "vector", "adapter"]
    assert cfg["methods"][3]["sites"] == ["L3.block_output", "L6.block_output", "L9.block_output"]
    assert len(cfg["data_rows"]["prompts"]) == 16 and len(cfg["data_rows"]["facts"]) == 16
    assert cfg["output"] == str(tmp_path / "runs" / "eval_caps") and cfg["kl_budget"] == 2.0


def test_the_report_folder_is_written_whole_with_the_usual_modes(tmp_path):
    import os
    import stat

    from reftkit.steer.eval_config import write_report

    old = os.umask(0o027)
    try:
        folder = write_report({"table": []}, tmp_path / "out", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert json.loads((folder / "report.json").read_text()) == {"table": []}
    with pytest.raises(ValueError):  # NaN is not JSON: nothing is left behind
        write_report({"x": float("nan")}, tmp_path / "bad", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
