"""A ReFT adapter and steering vectors in one model: `steer(reft_model, ...)` applies the active adapter's
interventions and the vectors in one engine call. Checked against an independent reference (the ReftModel itself
with a plain torch hook adding the vector), and at the identities: coefficient 0 is the adapter alone, disabled
adapters are the vector alone, leaving the block restores the ReftModel."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close, assert_identical

from reftkit.reft.config import ReftConfig
from reftkit.reft.model import ReftModel
from reftkit.steer import SteeringVector, steer

pytestmark = pytest.mark.numerics

GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=6)


def _vector(site="L1.block_output", seed=3):
    return SteeringVector({site: 3 * torch.randn(64, generator=torch.Generator().manual_seed(seed))})


def _batch():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    return ids, (ids != 0).long()


def _block(model, layer):
    return model.model.layers[layer]


@pytest.fixture
def reft(tiny_llama):
    model, _ = tiny_llama
    reft = ReftModel(model, ReftConfig(rank=4, layers=[0, 1, 2], positions="l1"), adapter_name="a")
    yield reft
    reft.unload()


@torch.no_grad()
def test_adapter_and_vector_in_one_forward_equal_the_adapter_plus_a_hand_hook(reft, tiny_llama):
    model, _ = tiny_llama
    v, c = _vector(), 2.5
    ids, mask = _batch()
    direction = v.directions["L1.block_output"]

    def add(module, args, output):  # registered after the adapter's hooks: it edits the adapter's output
        return (output[0] + c * direction,) + tuple(output[1:]) if isinstance(output, tuple) else output + c * direction

    handle = _block(model, 1).register_forward_hook(add)
    try:
        expected = reft(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    with steer(reft, [(v, c)], scope="all") as s:
        got = s(ids, attention_mask=mask).logits
    keep = mask.bool()  # padded positions are not edited by the scope (the hand hook edits them)
    assert_close(got[keep], expected[keep], dtype=torch.float32)
    assert not torch.allclose(got[keep], reft(input_ids=ids, attention_mask=mask).logits[keep])


@torch.no_grad()
def test_generate_with_adapter_and_vectors_and_the_identities(reft, tiny_llama):
    model, _ = tiny_llama
    ids, mask = _batch()
    adapter_only = reft.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    with steer(reft, [(_vector(), 0.0)]) as s:
        assert_identical(s.generate(ids, attention_mask=mask, **GREEDY), adapter_only)
    v1, v2 = _vector(seed=3), _vector("L2.block_output", seed=4)
    direction = v1.directions["L1.block_output"]

    def add(module, args, output):
        return (output[0] + 4.0 * direction,) + tuple(output[1:]) if isinstance(output, tuple) \
            else output + 4.0 * direction

    square = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # no padding: the hand hook and the scope agree
    handle = _block(model, 1).register_forward_hook(add)
    try:
        expected = reft.generate(input_ids=square, attention_mask=torch.ones_like(square), output_logits=True,
                                 return_dict_in_generate=True, **GREEDY)
    finally:
        handle.remove()
    with steer(reft, [(v1, 4.0)], scope="all") as s:
        got = s.generate(square, attention_mask=torch.ones_like(square), output_logits=True,
                         return_dict_in_generate=True, **GREEDY)
    assert_identical(got.sequences, expected.sequences)
    assert_close(torch.stack(got.logits), torch.stack(expected.logits), dtype=torch.float32)
    with steer(reft, [(v1, 4.0), (v2, -2.0)], scope="all") as s:
        both = s.generate(ids, attention_mask=mask, **GREEDY)
    assert not torch.equal(both, adapter_only)
    reft.disable_adapters()
    try:
        with steer(reft, [(v1, 4.0), (v2, -2.0)], scope="all") as s:
            vectors_only = s.generate(ids, attention_mask=mask, **GREEDY)
        with steer(model, [(v1, 4.0), (v2, -2.0)], scope="all") as s:
            assert_identical(vectors_only, s.generate(ids, attention_mask=mask, **GREEDY))
    finally:
        reft.enable_adapters()
    assert_identical(reft.generate(input_ids=ids, attention_mask=mask, **GREEDY), adapter_only)  # restored
