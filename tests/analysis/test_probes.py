"""Linear probes: exact fits on separable data, control tasks per type, per-layer collection with padding."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close

from reftkit.analysis.probes import collect_vectors, control_labels, fit_probe, probe_layers
from reftkit.errors import DataError

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path


def test_probe_separates_linear_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(-1)  # three classes, linearly separable
    probe = fit_probe(x[:300], y[:300], l2=1e-4)
    assert probe.accuracy(x[300:], y[300:]) >= 0.95
    random_labels = torch.randint(0, 2, (400,), generator=g)
    chance = fit_probe(x[:300], random_labels[:300]).accuracy(x[300:], random_labels[300:])
    assert chance < 0.7


def test_control_labels_are_one_per_type_and_follow_the_label_distribution():
    types = ["cat", "dog", "cat", "emu", "dog", "cat"] * 50
    labels = torch.tensor([0, 1, 0, 2, 1, 0] * 50)
    control = control_labels(types, labels, seed=3)
    for t in set(types):
        assert len({int(c) for c, tt in zip(control, types) if tt == t}) == 1
    assert torch.equal(control, control_labels(types, labels, seed=3))
    many = torch.stack([control_labels(list(range(3000)), labels[:6].repeat(500), seed=s) for s in range(2)])
    share = (many == 0).float().mean()
    assert abs(float(share) - 0.5) < 0.05  # label 0 is half of the labels
    with pytest.raises(DataError, match="one type per example"):
        control_labels(types[:3], labels)


def test_collected_vectors_are_the_last_real_tokens(tiny_llama):
    model, tokenizer = tiny_llama
    texts = ["a cat", "the big dog", "emu"]
    vectors = collect_vectors(model, texts, tokenizer=tokenizer, layers=[1, 3])
    assert vectors.shape == (2, 3, 64)
    for i, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert_close(vectors[0, i], hidden[2][0, -1])  # hidden_states[l + 1] = block l output
    first = collect_vectors(model, texts, tokenizer=tokenizer, layers=[0], positions=torch.tensor([0, 1, 0]))
    assert first.shape == (1, 3, 64)
    with pytest.raises(DataError, match="one vector per example"):
        collect_vectors(model, texts, tokenizer=tokenizer, layers=[0], positions="f2")


def test_probe_layers_reports_selectivity(tiny_llama):
    model, tokenizer = tiny_llama
    words = ["apple", "grape", "lemon", "melon", "peach", "chair", "table", "couch", "shelf", "stool"]
    texts, labels, types = [], [], []
    for i, w in enumerate(words):
        for template in ("I like the {}", "a {}", "the {} is here", "my {}"):
            texts.append(template.format(w))
            labels.append(int(i >= 5))
            types.append(w)
    result = probe_layers(model, texts, labels, tokenizer=tokenizer, types=types, layers=[0, 3])
    assert result.layers == [0, 3] and len(result.test_accuracy) == 2 and len(result.control_accuracy) == 2
    assert all(0 <= a <= 1 for a in result.test_accuracy + result.train_accuracy + result.control_accuracy)
    assert result.selectivity == [a - c for a, c in zip(result.test_accuracy, result.control_accuracy)]
    assert 0.5 <= result.majority <= 0.7
    with pytest.raises(DataError, match="one label per example"):
        probe_layers(model, texts, labels[:-1], tokenizer=tokenizer, layers=[0])
