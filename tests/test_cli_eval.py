"""`reftkit eval`: loss on rows with targets, success rate of generated replies with --behaviour, and the shipped
held-out file (prompts only) accepted with a behaviour and refused, before any model loads, without one."""

from __future__ import annotations

import json

import pytest

import reftkit.models
from reftkit.cli import main
from reftkit.reft.demo import example_path

HELDOUT = str(example_path("data/caps_heldout.jsonl"))


def test_the_shipped_heldout_prompts_are_scored_with_a_behaviour(capsys):
    code = main(["eval", "--model", "tiny-llama", "--data", HELDOUT, "--behaviour", "all_caps",
                 "--max-new-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    prompts = [json.loads(line)["prompt"] for line in open(HELDOUT, encoding="utf-8") if line.strip()]
    assert result["behaviour"] == "all_caps" and result["examples"] == len(prompts)
    assert [r["prompt"] for r in result["replies"]] == prompts
    assert result["success_rate"] == pytest.approx(sum(r["ok"] for r in result["replies"]) / len(prompts))
    assert "loss" not in result  # prompts only: nothing to compute a loss on


def test_rows_with_completions_get_loss_and_success_rate(capsys, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {w}", "completion": w.upper()}) for w in ("hi", "yes")))
    code = main(["eval", "--model", "tiny-llama", "--data", str(data), "--behaviour", "regex:.", "--no-chat",
                 "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    keys = [line.split(":")[0] for line in out.splitlines()]
    assert {"loss", "perplexity", "behaviour", "success_rate", "successes"} <= set(keys)


def test_prompts_without_a_behaviour_fail_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.setattr(reftkit.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["eval", "--model", "tiny-llama", "--data", HELDOUT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --behaviour SPEC" in err[0] and "prompt, completion" in err[0]
    assert main(["eval", "--model", "tiny-llama", "--data", HELDOUT, "--behaviour", "shout"]) == 2
    assert "unknown behaviour 'shout'" in capsys.readouterr().err
