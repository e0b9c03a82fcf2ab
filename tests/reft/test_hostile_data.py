"""Hostile data files: JSONL, CSV and JSON rows that are empty, random, truncated, not UTF-8, mistyped or nested
too deep raise a `DataError` naming the file (and the line or row) and what was expected; a UTF-8 byte order mark
is accepted. Reading goes through `read_rows` then `encode` (what `reftkit eval` and recipes do); the CLI prints
one `error:` line for a representative few. Nothing is written anywhere."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from reftkit.cli import main
from reftkit.errors import DataError
from reftkit.models import build_tiny_tokenizer
from reftkit.reft.data import encode, read_rows

BOM = b"\xef\xbb\xbf"
ROW = {"prompt": "cat", "completion": "meow"}
ROWS = [ROW, {"prompt": "a dog", "completion": "woof"}]


def noise(n: int, salt: str) -> bytes:
    return random.Random(f"hostile-{salt}").randbytes(n)


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


# (id, file name, content, task, error, match); error None: the file is read and `rows` are what it holds
CASES = [
    ("missing", "none.jsonl", None, "sft", DataError, "does not exist"),
    ("empty-jsonl", "d.jsonl", b"", "sft", DataError, "holds no examples"),
    ("empty-csv", "d.csv", b"", "sft", DataError, "holds no examples"),
    ("empty-json", "d.json", b"", "sft", DataError, "not valid JSON"),
    ("random-bytes-jsonl", "d.jsonl", noise(2048, "jsonl"), "sft", DataError, r"line \d+: byte \d+ is not UTF-8"),
    ("random-bytes-csv", "d.csv", noise(2048, "csv"), "sft", DataError, "is not UTF-8"),
    ("random-bytes-json", "d.json", noise(2048, "json"), "sft", DataError, "is not UTF-8"),
    ("latin1-byte-on-line-2", "d.jsonl", jsonl(ROW) + b'{"prompt": "caf\xe9", "completion": "x"}\n', "sft",
     DataError, "line 2: byte 55 is not UTF-8.*re-save the file as UTF-8"),
    ("utf16-file", "d.jsonl", jsonl(ROW).decode().encode("utf-16"), "sft", DataError, "is not UTF-8"),
    ("bom-jsonl", "d.jsonl", BOM + jsonl(*ROWS), "sft", None, ROWS),
    ("bom-csv", "d.csv", BOM + b"prompt,completion\ncat,meow\na dog,woof\n", "sft", None, ROWS),
    ("bom-json", "d.json", BOM + json.dumps(ROWS).encode(), "sft", None, ROWS),
    ("crlf-jsonl", "d.jsonl", jsonl(*ROWS).replace(b"\n", b"\r\n"), "sft", None, ROWS),
    ("line-separator-inside-a-string", "d.jsonl", jsonl({"prompt": "a\u2028b", "completion": "c\x85d"}), "sft",
     None, [{"prompt": "a\u2028b", "completion": "c\x85d"}]),
    ("csv-quoted-newline", "d.csv", b'prompt,completion\n"two\nlines",x\n', "sft", None,
     [{"prompt": "two\nlines", "completion": "x"}]),
    ("truncated-last-line", "d.jsonl", jsonl(*ROWS)[:-8], "sft", DataError, "line 2: not valid JSON"),
    ("line-is-a-list", "d.jsonl", jsonl(ROW, [1, 2]), "sft", DataError, "row 2: expected an object"),
    ("line-is-nan", "d.jsonl", jsonl(ROW) + b"NaN\n", "sft", DataError, "row 2: expected an object"),
    ("nested-100000-deep", "d.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "sft", DataError,
     "line 1: not valid JSON.*recursion"),
    ("int-of-5000-digits", "d.jsonl", b'{"prompt": 1' + b"0" * 5000 + b"}\n", "sft", DataError,
     "line 1: not valid JSON.*digits"),
    ("json-top-level-object", "d.json", json.dumps(ROW).encode(), "sft", DataError, "holds a list of objects"),
    ("json-nested-100000-deep", "d.json", b"[" * 100_000 + b"]" * 100_000, "sft", DataError, "not valid JSON"),
    ("prompt-is-a-number", "d.jsonl", jsonl({"prompt": 5, "completion": "x"}), "sft", DataError,
     "row 1: field 'prompt' must be a string, got int 5"),
    ("prompt-is-a-list", "d.jsonl", jsonl({"prompt": ["a"], "completion": "x"}), "sft", DataError,
     "field 'prompt' must be a string, got list"),
    ("completion-is-nan", "d.jsonl", jsonl(ROW) + b'{"prompt": "a", "completion": NaN}\n', "sft", DataError,
     "row 2: field 'completion' must be a string, got float nan"),
    ("chosen-is-an-object", "d.jsonl", jsonl({"prompt": "p", "chosen": {"x": 1}, "rejected": "r"}), "dpo",
     DataError, "field 'chosen' must be a string"),
    ("label-is-nan", "d.jsonl", b'{"text": "a", "label": NaN}\n', "classification", DataError,
     "label must be an integer or a string"),
    ("label-is-true", "d.jsonl", jsonl({"text": "a", "label": True}), "classification", DataError,
     "label must be an integer or a string"),
    ("label-is-a-list", "d.jsonl", jsonl({"text": "a", "label": [1]}), "classification", DataError,
     "label must be an integer or a string"),
    ("label-superscript-digit", "d.jsonl", jsonl({"text": "a", "label": "\u00b2"}), "classification", DataError,
     "label '\u00b2' is not among label_names"),
    ("label-digits-as-text", "d.csv", b"text,label\na,1\nb,-0\n", "classification", None,
     [{"text": "a", "label": "1"}, {"text": "b", "label": "-0"}]),
    ("csv-field-over-the-limit", "d.csv", b'prompt,completion\n"' + b"x" * 200_000 + b'",y\n', "sft", DataError,
     "not valid CSV after line 1 .*field larger than field limit"),
    ("csv-nul-byte", "d.csv", b"prompt,completion\na\x00b,c\n", "sft", None, [{"prompt": "a\x00b", "completion": "c"}]),
    ("csv-missing-column", "d.csv", b"prompt,completion\ncat\n", "sft", DataError, "row 1: missing field 'completion'"),
    ("directory-named-jsonl", "dir.jsonl", "mkdir", "sft", DataError, "does not exist"),
]


def make(tmp_path, name, content):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / name
    if content == "mkdir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("name,content,task,error,expected", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_data_file(tok, tmp_path, monkeypatch, name, content, task, error, expected):
    path = make(tmp_path, name, content)
    monkeypatch.chdir(tmp_path / "in")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    if error is None:
        rows = read_rows(path)
        assert rows == expected
        assert len(encode(tok, rows, task, chat=False, where=str(path))) == len(expected)
    else:
        with pytest.raises(error) as info:
            encode(tok, read_rows(path), task, chat=False, where=str(path), label_names=["neg", "pos"])
        message = str(info.value)
        assert str(path) in message and re.search(expected, message, re.S), message
        assert len(message) < 2000
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name,content,task,match", [
    pytest.param("d.jsonl", noise(1024, "cli-data"), "sft", "is not UTF-8", id="random-bytes"),
    pytest.param("d.jsonl", jsonl(*ROWS)[:-8], "sft", "line 2: not valid JSON", id="truncated"),
    pytest.param("d.jsonl", b'{"text": "a", "label": NaN}\n', "classification", "label must be an integer",
                 id="label-nan"),
    pytest.param("d.csv", b'prompt,completion\n"' + b"x" * 200_000 + b'",y\n', "sft", "not valid CSV",
                 id="csv-field-over-the-limit"),
])
def test_cli_eval_with_bad_data(tmp_path, monkeypatch, capsys, name, content, task, match):
    path = make(tmp_path, name, content)
    monkeypatch.chdir(tmp_path / "in")
    before = sorted(os.listdir(tmp_path / "in"))
    code = main(["eval", "--model", "tiny-llama", "--data", str(path), "--task", task])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert not re.match(r"error: [A-Za-z_.]*(Error|Exception): ", lines[0]), f"an untyped error: {lines[0]}"
    assert str(path) in lines[0] and re.search(match, lines[0]), lines[0]
    assert sorted(os.listdir(tmp_path / "in")) == before


def test_cli_eval_accepts_a_bom(tmp_path, monkeypatch, capsys):
    path = make(tmp_path, "d.jsonl", BOM + jsonl(*ROWS))
    monkeypatch.chdir(tmp_path / "in")
    code = main(["eval", "--model", "tiny-llama", "--data", str(path), "--no-chat", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["examples"] == 2 and result["loss"] > 0
