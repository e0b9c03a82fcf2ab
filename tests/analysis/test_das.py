"""DAS, Boundless DAS and IIT on hierarchical equality, where the ground truth is known.

The network is trained with IIT so that the intermediate variable WX = (W == X) lives in the first 8 of the 16
units of its first hidden layer; DAS, starting from a random rotation, must find it there (IIA >= 0.9), while
the untrained rotation and a site where WX is no longer separate (the last hidden layer) stay near chance."""

from __future__ import annotations

import pytest
import torch

from reftkit.analysis.causal_model import hierarchical_equality
from reftkit.analysis.das import InterchangeData, interchange_accuracy, train_interchange
from reftkit.analysis.synthetic import SymbolMLP, encode_inputs, train_symbol_model
from reftkit.engine import Binding, IntervenableModel
from reftkit.errors import DataError, ReftkitError
from reftkit.interventions.basic import ReplaceIntervention
from reftkit.interventions.das import BoundlessRotatedSpaceIntervention, RotatedSpaceIntervention
from reftkit.sites import Site

H = 16


def logits(output):
    return output.logits[:, 0]


@pytest.fixture(scope="module")
def task():
    cm = hierarchical_equality(20)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SymbolMLP(20, hidden=H, seed=2)

        def encode(settings):
            return {"inputs_embeds": model.embed(encode_inputs(cm, settings))}

        iit = InterchangeData.from_examples(cm.counterfactual_dataset(20000, "WX", seed=12), encode)
        with IntervenableModel(model, Binding(Site(module="layers.0"), ReplaceIntervention(interchange_dim=H // 2))) as im:
            log = train_interchange(im, iit, train="model", epochs=8, lr=3e-3, batch_size=128, logits_fn=logits)
        train = InterchangeData.from_examples(cm.counterfactual_dataset(8000, "WX", seed=1), encode)
        test = InterchangeData.from_examples(cm.counterfactual_dataset(1000, "WX", seed=2), encode)
    return cm, model, log, train, test


def align(model, intervention, site, train=None, **kwargs):
    im = IntervenableModel(model, Binding(Site(module=site), intervention))
    if train is not None:
        train_interchange(im, train, logits_fn=logits, **kwargs)
    return im


def test_iit_puts_the_variable_where_asked(task):
    cm, model, log, _, test = task
    assert log.steps == 8 * (20000 // 128 + 1) and log.losses[-1] < log.losses[0]
    with torch.no_grad():
        accuracy = float((logits(model(**test.base)).argmax(-1) == test.base_labels).float().mean())
    assert accuracy >= 0.95
    with IntervenableModel(model, Binding(Site(module="layers.0"), ReplaceIntervention(interchange_dim=H // 2))) as im:
        assert interchange_accuracy(im, test, logits_fn=logits) >= 0.95
    # the labels change under the interchange about half of the time: a no-op scores about 0.5
    assert 0.4 < float((test.labels == test.base_labels).float().mean()) < 0.6


def test_das_finds_the_variable_at_the_right_site_only(task):
    _, model, _, train, test = task
    torch.manual_seed(0)
    untrained = align(model, RotatedSpaceIntervention(embed_dim=H, interchange_dim=H // 2), "layers.0")
    assert interchange_accuracy(untrained, test, logits_fn=logits) <= 0.7
    untrained.remove()
    found = align(model, RotatedSpaceIntervention(embed_dim=H, interchange_dim=H // 2), "layers.0", train,
                  epochs=6, lr=1e-2)
    assert interchange_accuracy(found, test, logits_fn=logits) >= 0.9
    found.remove()
    wrong = align(model, RotatedSpaceIntervention(embed_dim=H, interchange_dim=H // 2), "layers.2", train,
                  epochs=6, lr=1e-2)
    assert interchange_accuracy(wrong, test, logits_fn=logits) <= 0.7
    wrong.remove()


def test_boundless_das_learns_the_subspace_size(task):
    _, model, _, train, test = task
    torch.manual_seed(0)
    iv = BoundlessRotatedSpaceIntervention(embed_dim=H)
    im = align(model, iv, "layers.0", train, epochs=6, lr=1e-2, temperature=(5.0, 0.05), boundary_penalty=0.1)
    assert float(iv.temperature) == pytest.approx(0.05)
    assert interchange_accuracy(im, test, logits_fn=logits) >= 0.9
    assert 0.0 < float(iv.intervention_boundaries.detach()) < 1.0
    im.remove()


def test_natural_training_and_data_checks():
    cm = hierarchical_equality(10)
    model = SymbolMLP(10, hidden=16, seed=0)
    assert train_symbol_model(cm, model, n_train=20000, epochs=3, n_test=500) > 0.8
    good = InterchangeData({"inputs_embeds": torch.zeros(3, 1, 16)}, [{"inputs_embeds": torch.zeros(3, 1, 16)}],
                           torch.zeros(3, dtype=torch.long))
    with pytest.raises(DataError, match="3 examples"):
        InterchangeData({"inputs_embeds": torch.zeros(2, 1, 16)}, [], torch.zeros(3, dtype=torch.long))
    with IntervenableModel(model, Binding(Site(module="layers.0"), ReplaceIntervention())) as im:
        with pytest.raises(ReftkitError, match="nothing to train"):
            train_interchange(im, good, logits_fn=logits)
        with pytest.raises(DataError, match="base_labels"):
            train_interchange(im, good, train="model", logits_fn=logits)
