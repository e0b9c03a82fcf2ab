"""Matrix entropy and effective rank: closed-form cases, invariances, per-layer use with padding."""

from __future__ import annotations

import math

import torch

from reftkit.analysis.metrics import effective_rank, layer_metrics, matrix_entropy


def test_matrix_entropy_bounds_and_invariances():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(4000, 8, generator=g)
    assert matrix_entropy(iso) > 0.99  # isotropic: all directions equally used
    line = torch.randn(50, 1, generator=g) * torch.randn(1, 8, generator=g)
    assert matrix_entropy(line) < 1e-9  # one direction
    # k orthogonal directions with equal use: entropy log(k) / log(d)
    basis = torch.eye(8)[:4]
    signs = torch.tensor([1.0, -1.0]).repeat(2)[:, None, None]
    x = (signs * basis).reshape(-1, 8)
    assert abs(matrix_entropy(x) - math.log(4) / math.log(8)) < 1e-9
    scaled = iso * torch.rand(4000, 1, generator=g) * 10 + 3
    assert abs(matrix_entropy(scaled) - matrix_entropy(iso + 3)) < 1e-2  # rows are normalised after centring


def test_effective_rank_closed_forms():
    assert abs(effective_rank(torch.eye(6)) - 6) < 1e-9
    assert abs(effective_rank(torch.ones(5, 5)) - 1) < 1e-9
    d = torch.diag(torch.tensor([3.0, 1.0]))
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert abs(effective_rank(d) - math.exp(float(-(p * p.log()).sum()))) < 1e-9


def test_layer_metrics_ignore_padding(tiny_llama):
    model, tokenizer = tiny_llama
    texts = ["a short one", "a much longer sentence than that"]
    together = layer_metrics(model, texts, tokenizer=tokenizer, layers=[0, 2])
    alone = [layer_metrics(model, [t], tokenizer=tokenizer, layers=[0, 2]) for t in texts]
    assert together["layers"] == [0, 2]
    for i in range(2):
        mean = (alone[0]["matrix_entropy"][i] + alone[1]["matrix_entropy"][i]) / 2
        assert abs(together["matrix_entropy"][i] - mean) < 1e-5
    assert all(1 <= r <= 64 for r in together["effective_rank"])


def test_skip_first_leaves_out_the_first_tokens(tiny_llama):
    import pytest

    from reftkit.errors import DataError

    model, tokenizer = tiny_llama
    text = "the first token is special"
    skipped = layer_metrics(model, [text], tokenizer=tokenizer, layers=[1], skip_first=2)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
    assert abs(skipped["matrix_entropy"][0] - matrix_entropy(hidden[2:])) < 1e-6
    assert abs(skipped["effective_rank"][0] - effective_rank(hidden[2:])) < 1e-4
    with pytest.raises(DataError, match="skip_first"):
        layer_metrics(model, ["ab"], tokenizer=tokenizer, layers=[0], skip_first=5)
