"""Engine: generation with interventions. Cached generation must equal a no-cache reference that reruns the
whole sequence with the intervention at the same absolute positions; padding and beams must not matter."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close
from engine_util import left_pad, token_ids

from reftkit.engine import Binding, IntervenableModel
from reftkit.interventions.basic import AddIntervention, CollectIntervention, ReplaceIntervention
from reftkit.positions import Positions

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
NEW = 6


def _steering(model, positions=None):
    vector = torch.linspace(-3, 3, 64)
    return IntervenableModel(model, [Binding("L1.block_output", AddIntervention(vector=vector), positions=positions)])


@torch.no_grad()
def _reference(im, prompt: torch.Tensor, which) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding without a cache: each step reruns the full sequence with the edit at `which(P, L)`."""
    seq, scores = prompt, []
    P = prompt.shape[1]
    for _ in range(NEW):
        L = seq.shape[1]
        pos = which(P, L)
        logits = im(input_ids=seq, positions=Positions.indices(pos)).logits[:, -1]
        scores.append(logits)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq, scores


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("scope", ["prompt", "generated", "all"])
def test_cached_generation_equals_the_no_cache_reference(tiny_model, family, scope):
    model = tiny_model(family)[0]
    prompt = token_ids(2, 5, seed=4)
    positions = {"prompt": "l1", "generated": "generated", "all": "l1@all"}[scope]
    which = {
        "prompt": lambda P, L: [P - 1],
        "generated": lambda P, L: list(range(P, L)) or [-1],
        "all": lambda P, L: [P - 1] + list(range(P, L)),
    }[scope]
    with _steering(model) as im:
        out = im.generate(prompt, positions=positions, max_new_tokens=NEW, output_scores=True,
                          return_dict_in_generate=True, **GREEDY)
        expected, scores = _reference(im, prompt, which)
        plain = model.generate(input_ids=prompt, max_new_tokens=NEW, **GREEDY)
    assert torch.equal(out.sequences, expected)
    for got, want in zip(out.scores, scores):
        assert_close(got, want)
    assert not torch.equal(out.sequences, plain)  # the edit matters


def test_left_padded_batch_generates_like_one_by_one(tiny_llama):
    model = tiny_llama[0]
    rows = [token_ids(1, 7, seed=1)[0], token_ids(1, 4, seed=2)[0], token_ids(1, 5, seed=3)[0]]
    ids, mask = left_pad(rows)
    with _steering(model, positions="f1+l1@all") as im:
        batched = im.generate(ids, attention_mask=mask, max_new_tokens=NEW, **GREEDY)
        for i, row in enumerate(rows):
            single = im.generate(row[None], max_new_tokens=NEW, **GREEDY)
            assert torch.equal(batched[i, -NEW:], single[0, -NEW:]), i


def test_beam_search_expands_positions_and_sources(tiny_llama):
    model = tiny_llama[0]
    rows = [token_ids(1, 6, seed=7)[0], token_ids(1, 4, seed=8)[0]]
    ids, mask = left_pad(rows)
    sources = [token_ids(1, 6, seed=9)[0], token_ids(1, 4, seed=10)[0]]
    src_ids, src_mask = left_pad(sources)
    beams = dict(num_beams=2, num_return_sequences=2, max_new_tokens=NEW, **GREEDY)
    bindings = [Binding("L1.block_output", AddIntervention(vector=torch.linspace(-3, 3, 64)), positions="l1@all"),
                Binding("L2.block_output", ReplaceIntervention(), positions="f1")]
    with IntervenableModel(model, bindings) as im:
        batched = im.generate(ids, attention_mask=mask, sources=[{"input_ids": src_ids, "attention_mask": src_mask}],
                              **beams)
        assert batched.shape == (4, ids.shape[1] + NEW)
        for i, row in enumerate(rows):
            single = im.generate(row[None], sources=[{"input_ids": sources[i][None]}], **beams)
            assert torch.equal(batched[2 * i: 2 * i + 2, -NEW:], single[:, -NEW:]), i
        plain = model.generate(input_ids=ids, attention_mask=mask, **beams)
    assert not torch.equal(batched, plain)


def test_generation_routing_and_collection(tiny_llama):
    model = tiny_llama[0]
    prompt = token_ids(2, 5, seed=11)
    bindings = [Binding("L1.block_output", AddIntervention(vector=torch.linspace(-3, 3, 64)), name="steer",
                        positions="l1@all"),
                Binding("L3.block_output", CollectIntervention(), name="probe", positions="generated")]
    with IntervenableModel(model, bindings) as im:
        routed, collected = im.generate(prompt, active={"steer": torch.tensor([False, True])}, max_new_tokens=NEW,
                                        return_collected=True, **GREEDY)
        steered = im.generate(prompt, max_new_tokens=NEW, **GREEDY)
    plain = model.generate(input_ids=prompt, max_new_tokens=NEW, **GREEDY)
    assert torch.equal(routed[0], plain[0]) and torch.equal(routed[1], steered[1])
    # one collected [batch, 1, d] per generated token that was fed back
    assert [tuple(t.shape) for t in collected["probe"]] == [(2, 1, 64)] * (NEW - 1)
