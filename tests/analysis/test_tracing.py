"""Causal tracing on tiny models against a hook-based reference; bad inputs; plots; the `trace` command."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
import torch
from numerics import assert_close

from reftkit.analysis.tracing import causal_trace, embedding_std
from reftkit.analysis.text import find_subject
from reftkit.cli import main
from reftkit.errors import DataError

from .reference import embedding_noise_hook, patched_logits, record

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

PROMPT, SUBJECT = "Rome is in", "Rome"


@pytest.fixture(scope="module")
def traced(tiny_llama):
    model, tokenizer = tiny_llama
    return causal_trace(model, tokenizer, PROMPT, SUBJECT, samples=2, window=3, seed=7)


def test_trace_matches_reference(tiny_llama, traced):
    model, tokenizer = tiny_llama
    ids, start, end = find_subject(tokenizer, PROMPT, SUBJECT)
    assert (start, end) == (1, 5) and traced.subject_range == (1, 5)  # bos + 'R','o','m','e'
    T, L = ids.shape[0], 4
    assert all(g.shape == (L, T) for g in traced.grids.values())
    draws = torch.randn(2, end - start, 64, generator=torch.Generator().manual_seed(7)) * 3 * embedding_std(model)
    ids2 = ids[None].expand(2, -1)
    acts, clean_logits = record(model, ids[None], [f"L{l}.{c}" for l in range(L) for c in traced.grids])
    target = traced.target_id
    assert traced.target_id == int(clean_logits[0].argmax())
    assert abs(traced.clean_prob - float(torch.softmax(clean_logits[0], -1)[target])) < 1e-6

    def prob(patches):
        handle = embedding_noise_hook(model, torch.arange(start, end), draws)
        try:
            logits = patched_logits(model, ids2, [(s, t, v.expand(2, -1, -1)) for s, t, v in patches])
        finally:
            handle.remove()
        return float(torch.softmax(logits, -1)[:, target].mean())

    assert abs(traced.corrupted_prob - prob([])) < 1e-6
    for c, window in (("block_output", 1), ("mlp_output", 3), ("attention_output", 3)):
        for l, t in ((0, 4), (1, 2), (3, 7), (2, T - 1)):
            layers = range(max(0, l - window // 2), min(L, l - window // 2 + window))
            want = prob([(f"L{j}.{c}", t, acts[f"L{j}.{c}"]) for j in layers])
            assert abs(float(traced.grids[c][l, t]) - want) < 1e-5, (c, l, t)
    # before the subject nothing is corrupted; the last block at the last token holds the clean prediction
    for g in traced.grids.values():
        assert_close(g[:, 0], torch.full((L,), traced.corrupted_prob))
    assert_close(traced.grids["block_output"][L - 1, T - 1], torch.tensor(traced.clean_prob, dtype=torch.float32))


def test_engine_and_replay_agree(tiny_model):
    model, tokenizer = tiny_model("gpt2")
    a = causal_trace(model, tokenizer, PROMPT, SUBJECT, samples=2, method="engine", chunk_size=50)
    b = causal_trace(model, tokenizer, PROMPT, SUBJECT, samples=2, method="replay", chunk_size=50)
    for c in a.grids:
        assert_close(a.grids[c], b.grids[c])
    again = causal_trace(model, tokenizer, PROMPT, SUBJECT, samples=2, chunk_size=7)
    for c in a.grids:  # seeded noise: another chunking gives the same grids
        assert_close(again.grids[c], a.grids[c])


def test_bad_inputs(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(DataError, match="does not occur in the prompt"):
        causal_trace(model, tokenizer, PROMPT, "Paris")
    with pytest.raises(DataError, match="is 6 tokens"):
        causal_trace(model, tokenizer, PROMPT, SUBJECT, " Italy")


def test_plots_and_json(traced, tmp_path):
    pytest.importorskip("matplotlib")
    paths = traced.save_plots(tmp_path)
    assert sorted(p.name for p in paths) == ["trace_attention_output.png", "trace_block_output.png",
                                             "trace_mlp_output.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    data = json.loads(traced.save_json(tmp_path / "trace.json").read_text())
    assert data["subject_range"] == [1, 5] and len(data["grids"]["mlp_output"]) == 4


def test_trace_command(tmp_path):
    pytest.importorskip("matplotlib")
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["--json", "trace", "--model", "tiny-llama", "--prompt", PROMPT, "--subject", SUBJECT,
                     "--samples", "1", "--window", "2", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads(out.getvalue())
    assert data["samples"] == 1 and len(data["plots"]) == 3
    assert all((tmp_path / p.split("/")[-1]).exists() for p in data["plots"])
    assert main(["trace", "--model", "tiny-llama", "--prompt", PROMPT, "--subject", "Oslo", "--no-plots"]) == 2
