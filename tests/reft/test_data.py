"""Reading rows, encoding them for each task, and collating batches."""

from __future__ import annotations

import json

import pytest
import torch

from reftkit.errors import DataError
from reftkit.reft.data import Collator, encode, read_rows

ROWS = [{"prompt": "cat", "completion": "meow"}, {"prompt": "a dog", "completion": "woof woof"}]


def test_read_rows_jsonl_csv_json(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\ncat,meow\na dog,woof woof\n")
    js = tmp_path / "d.json"
    js.write_text(json.dumps(ROWS))
    for path in (jsonl, csv, js):
        assert read_rows(path) == ROWS, path.suffix


@pytest.mark.parametrize("name,text,match", [
    ("empty.jsonl", "", "holds no examples"),
    ("blank.jsonl", "\n  \n", "holds no examples"),
    ("header.csv", "prompt,completion\n", "holds no examples"),
    ("empty.json", "[]", "holds no examples"),
    ("object.json", '{"prompt": "x"}', "holds a list of objects"),
    ("broken.json", "[{", "not valid JSON"),
    ("broken.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n', "line 2: not valid JSON"),
])
def test_bad_files(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_rows(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("rows,task,match", [
    ([ROWS[0], {"prompt": "x"}], "sft", r"rows\.jsonl, row 2: missing field 'completion'"),
    ([{"prompt": " ", "completion": "x"}], "sft", r"row 1: missing field 'prompt'"),
    ([{"text": "a", "label": 0}, {"text": "b"}], "classification", r"row 2: missing field 'label'"),
    ([{"prompt": "p", "chosen": "a", "rejected": None}], "dpo", r"row 1: missing field 'rejected'"),
    ([ROWS[0], "just text"], "sft", r"row 2: expected an object"),
])
def test_missing_fields_name_the_row_and_the_field(tok, rows, task, match):
    with pytest.raises(DataError, match=match):
        encode(tok, rows, task, where="rows.jsonl")


def test_missing_field_from_a_csv_file(tok, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\ncat,meow\ndog\n")
    with pytest.raises(DataError, match=r"row 2: missing field 'completion'"):
        encode(tok, read_rows(path), "sft", where=str(path))


def test_too_long_example_names_the_row(tok):
    rows = [ROWS[0], {"prompt": "x" * 40, "completion": "y" * 40}]
    with pytest.raises(DataError, match=r"row 2: 8\d tokens is longer than max_length=64"):
        encode(tok, rows, "sft", chat=False, max_length=64)
    assert len(encode(tok, rows, "sft", chat=False, max_length=128)) == 2


def test_unknown_task_and_labels(tok):
    with pytest.raises(DataError, match="unknown task 'qa'"):
        encode(tok, ROWS, "qa")
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "meh", "label": "1"}]
    assert [e.label for e in encode(tok, rows, "classification", label_names=["neg", "pos"])] == [1, 0, 1]
    with pytest.raises(DataError, match=r"row 2: label 'neg' is not among label_names \['pos'\]"):
        encode(tok, rows, "classification", label_names=["pos"])


def test_sft_encoding_applies_the_chat_template_and_ends_with_eos(tok):
    chat, = encode(tok, ROWS[:1], "sft", chat=True)
    text = tok.decode(chat.prompt)
    assert "cat" in text and text != tok.decode(tok("cat")["input_ids"])
    expected = tok.apply_chat_template([{"role": "user", "content": "cat"}], tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert chat.completion == tok("meow", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    plain, = encode(tok, ROWS[:1], "sft", chat=False)
    assert plain.prompt == tok("cat")["input_ids"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_marks_labels_on_completions_and_prompt_mask_on_prompts(tok, side):
    data = encode(tok, ROWS, "sft", chat=False)
    batch = Collator(tok.pad_token_id, "sft", side)(data)
    T = max(len(e.prompt) + len(e.completion) for e in data)
    assert batch["input_ids"].shape == (2, T)
    for i, e in enumerate(data):
        n = len(e.prompt) + len(e.completion)
        real = torch.arange(T) >= T - n if side == "left" else torch.arange(T) < n
        start = T - n if side == "left" else 0
        assert torch.equal(batch["attention_mask"][i].bool(), real)
        assert batch["input_ids"][i][real].tolist() == e.prompt + e.completion
        assert (batch["input_ids"][i][~real] == tok.pad_token_id).all()
        prompt = torch.zeros(T, dtype=torch.bool)
        prompt[start: start + len(e.prompt)] = True
        assert torch.equal(batch["prompt_mask"][i], prompt)
        labelled = batch["labels"][i] != -100
        assert torch.equal(labelled, real & ~prompt)
        assert batch["labels"][i][labelled].tolist() == e.completion
    if side == "left":  # real tokens are numbered from 0, as without padding
        for i in range(2):
            assert batch["position_ids"][i][batch["attention_mask"][i].bool()].tolist() == \
                list(range(int(batch["attention_mask"][i].sum())))
    else:
        assert "position_ids" not in batch


def test_collator_for_classification_and_dpo(tok):
    cls = encode(tok, [{"text": "good", "label": 1}, {"text": "not good at all", "label": 0}], "classification")
    batch = Collator(tok.pad_token_id, "classification")(cls)
    assert batch["labels"].tolist() == [1, 0]
    assert torch.equal(batch["prompt_mask"], batch["attention_mask"].bool())
    dpo = encode(tok, [{"prompt": "q", "chosen": "yes", "rejected": "no way"},
                       {"prompt": "longer q", "chosen": "a", "rejected": "b"}], "dpo", chat=False)
    batch = Collator(tok.pad_token_id, "dpo")(dpo)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    for i, (e, completion) in enumerate([(dpo[0], dpo[0].chosen), (dpo[1], dpo[1].chosen),
                                         (dpo[0], dpo[0].rejected), (dpo[1], dpo[1].rejected)]):
        labelled = batch["labels"][i] != -100
        assert batch["labels"][i][labelled].tolist() == completion
        assert batch["input_ids"][i][batch["prompt_mask"][i]].tolist() == e.prompt


def test_collator_rejects_a_bad_side():
    with pytest.raises(DataError, match="padding_side must be 'left' or 'right'"):
        Collator(0, "sft", "middle")
