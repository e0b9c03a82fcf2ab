"""Behaviour checks: each rule on replies that pass and fail, specs as data, and the generation evaluation that
scores an adapter or the base model by a success rate."""

from __future__ import annotations

import json

import pytest
import torch

from reftkit.behaviours import BEHAVIOURS, behaviour, is_all_caps
from reftkit.errors import ConfigError, DataError
from reftkit.models import build_tiny_model, build_tiny_tokenizer
from reftkit.reft.evaluate import evaluate_generations

CASES = [
    ("all_caps", "PARIS IS THE CAPITAL.", True), ("all_caps", "Paris is the capital.", False),
    ("all_caps", "OK", False),  # fewer than three letters
    ("json", '{"city": "Paris"}', True), ("json", '```json\n[1, 2]\n```', True), ("json", "{city: Paris}", False),
    ("contains:Paris", "it is paris!", True), ("contains:Paris", "it is parisian", False),
    ("regex:^[0-9]+$", "42", True), ("regex:^[0-9]+$", "42 apples", False),
]


@pytest.mark.parametrize("spec,reply,ok", CASES)
def test_each_rule_passes_and_fails(spec, reply, ok):
    assert behaviour(spec).check(reply) is ok


def test_answer_reads_each_rows_answer_ignoring_case_and_punctuation():
    check = behaviour("answer")
    assert check.check("The answer is 7.", {"answer": "7"})
    assert not check.check("The answer is 17.", {"answer": "7"})
    assert check.check("It's ROME, of course", {"answer": ["Rome", "Roma"]})
    with pytest.raises(DataError, match="row 3: the 'answer' check needs an 'answer' field"):
        check.check("x", {"prompt": "p"}, 3)
    with pytest.raises(DataError, match="data.jsonl: row 1"):
        check.validate_rows([{"answer": "a"}, {"answer": 5}], "data.jsonl")


@pytest.mark.parametrize("spec,message", [
    ("shout", "unknown behaviour 'shout'; expected one of all_caps, answer, json, contains, regex"),
    ("regex:(", "not a valid regular expression"), ("contains:", "needs the text"), ("all_caps:x", "no argument"),
    ("", "spec string"), ("os.system", "unknown behaviour"),
])
def test_bad_specs_are_refused_with_what_was_expected(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        behaviour(spec)


def test_the_demo_check_is_the_all_caps_rule():
    assert set(BEHAVIOURS) == {"all_caps", "answer", "json", "contains", "regex"}
    assert is_all_caps("HELLO") and behaviour("all_caps").check("HELLO")


def test_generation_evaluation_scores_every_reply(tmp_path):
    torch.manual_seed(0)
    model, tok = build_tiny_model("llama"), build_tiny_tokenizer()
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in ["hello there", "what is two plus two", "hi"]))
    result = evaluate_generations(model, tok, data, "regex:.", max_new_tokens=4, batch_size=2)
    assert result["behaviour"] == "regex:." and result["examples"] == 3 and len(result["replies"]) == 3
    assert result["success_rate"] == result["successes"] / 3
    assert [r["ok"] for r in result["replies"]] == [bool(r["reply"]) for r in result["replies"]]
    never = evaluate_generations(model, tok, data, "regex:^NEVER MATCHES$", max_new_tokens=4)
    assert never["successes"] == 0 and [r["reply"] for r in never["replies"]] == [r["reply"] for r in result["replies"]]


def test_generation_evaluation_refuses_rows_it_cannot_score_before_generating(tmp_path, monkeypatch):
    import reftkit.chat as chat

    monkeypatch.setattr(chat, "generate_replies", lambda *a, **k: pytest.fail("generated before validating"))
    model, tok = build_tiny_model("llama"), build_tiny_tokenizer()
    no_prompt = tmp_path / "a.jsonl"
    no_prompt.write_text('{"completion": "x"}\n')
    with pytest.raises(DataError, match="row 0 has no 'prompt'"):
        evaluate_generations(model, tok, no_prompt, "all_caps")
    no_answer = tmp_path / "b.jsonl"
    no_answer.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="b.jsonl: row 0: the 'answer' check"):
        evaluate_generations(model, tok, no_answer, "answer")
