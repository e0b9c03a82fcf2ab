"""Fixtures for the ReFT tests: tiny models that can learn and small datasets.

The default tiny models are initialised with std 0.02, which together with the final norm caps every logit near
1: no adapter can bring a loss far below log(vocab) there. Tests that check learning build the tiny Llama with
`initializer_range=0.2` instead, where a few dozen steps memorise a toy dataset."""

from __future__ import annotations

import pytest

import reftkit.reft.train as train_module
from reftkit.cli import main
from reftkit.models import build_tiny_model, build_tiny_tokenizer

ANIMALS = [("cat", "meow"), ("dog", "woof"), ("cow", "moo"), ("owl", "hoot")]


@pytest.fixture
def llama():
    """A fresh tiny Llama (adapters freeze and hook it, so tests that attach them get their own)."""
    return build_tiny_model("llama")


@pytest.fixture
def learnable_llama():
    return build_tiny_model("llama", initializer_range=0.2)


@pytest.fixture(scope="session")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture
def animal_rows():
    return [{"prompt": p, "completion": c} for p, c in ANIMALS] * 2


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`reftkit ARGV` in-process -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def interrupt_after(monkeypatch, step: int) -> None:
    """Make training stop with KeyboardInterrupt right after the checkpoint of `step` is written."""
    real_save = train_module._save_checkpoint

    def save_then_interrupt(reft, opt, sched, state, directory):
        real_save(reft, opt, sched, state, directory)
        if state["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_interrupt)
