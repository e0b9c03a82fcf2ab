"""Positions: parsing, resolution to index tensors, padding invariance, errors, and pyvene's unit_locations."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close
from engine_util import left_pad, main_output, position_ids, right_pad, token_ids

from reftkit.engine import Binding, IntervenableModel
from reftkit.errors import PositionError
from reftkit.interventions.basic import AddIntervention, CollectIntervention
from reftkit.positions import Positions

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path


def _picked(loc) -> list[list[int]]:
    """The valid absolute positions per row, in slot order."""
    return [[int(i) for i, v in zip(row, valid) if v] for row, valid in zip(loc.index, loc.valid)]


@pytest.mark.parametrize("text, fields", [
    ("f3+l3", ("first_last", 3, 3, "prompt")),
    ("F2", ("first_last", 2, 0, "prompt")),
    ("l1", ("first_last", 0, 1, "prompt")),
    ("first", ("first_last", 1, 0, "prompt")),
    ("last", ("first_last", 0, 1, "prompt")),
    ("all", ("all", 0, 1, "prompt")),
    ("generated", ("all", 0, 1, "generated")),
    ("l1@generated", ("first_last", 0, 1, "generated")),
    ("f1+l1@all", ("first_last", 1, 1, "all")),
])
def test_parse_strings(text, fields):
    p = Positions.parse(text)
    assert (p.kind, p.first, p.last, p.scope) == fields
    assert Positions.from_dict(p.to_dict()).cache_key() == p.cache_key()


@pytest.mark.parametrize("bad", ["", "x3", "f-1", "l0", "f0+l0", "+l3", "l3+f1", "f1l1", "span:2", "span:a:b",
                                 "span:-1:2", "l1@later", "f1+l1+l1", 3.5, None, {"kind": "first_last", "colour": 1}])
def test_bad_specs_raise_position_error(bad):
    with pytest.raises(PositionError):
        Positions.parse(bad)


def test_first_last_unpadded_and_short_rows():
    region = torch.ones(2, 6, dtype=torch.bool)
    loc = Positions.parse("f2+l2").resolve(region)
    assert loc.all_rows and loc.canon is None
    assert _picked(loc) == [[0, 1, 4, 5]] * 2
    # 3 tokens, f2+l2: the first two and the last one; the missing slot repeats a valid one
    loc = Positions.parse("f2+l2").resolve(torch.ones(1, 3, dtype=torch.bool))
    assert _picked(loc) == [[0, 1, 2]] and not loc.all_rows
    assert loc.canon is not None and set(loc.index[0].tolist()) == {0, 1, 2}


def test_first_last_counts_real_tokens_under_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert _picked(Positions.parse("f1+l2").resolve(left)) == [[2, 4, 5], [0, 4, 5]]
    assert _picked(Positions.parse("f1+l2").resolve(right)) == [[0, 2, 3], [0, 4, 5]]
    assert _picked(Positions.parse("all").resolve(left)) == [[2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert _picked(Positions.parse("span:1:3").resolve(left)) == [[3, 4], [1, 2]]


def test_spans_shared_and_per_example():
    region = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    loc = Positions.span(torch.tensor([0, 2]), torch.tensor([2, 5])).resolve(region)
    assert _picked(loc) == [[1, 2], [2, 3, 4]]
    with pytest.raises(PositionError, match="0 <= start <= end"):
        Positions.span(3, 1).resolve(region)
    with pytest.raises(PositionError, match="0 <= start <= end"):
        Positions.span(torch.tensor([0, -1]), 2).resolve(region)


def test_short_rows_clamp_first_last_and_spans_alike():
    """One rule for selectors counted over real tokens: they are clipped to each row's real tokens."""
    region = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # 3 and 6 real tokens
    assert _picked(Positions.parse("f50").resolve(region)) == [[3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert _picked(Positions.parse("span:0:50").resolve(region)) == [[3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert _picked(Positions.parse("l4").resolve(region)) == [[3, 4, 5], [2, 3, 4, 5]]
    # f/l together: each token of a short row at most once, the first part taking at most half (rounded up)
    assert _picked(Positions.parse("f5+l5").resolve(region)) == [[3, 4, 5], [0, 1, 2, 3, 4, 5]]
    # a span keeps its part inside the real tokens; one that starts past the end selects nothing in that row
    loc = Positions.parse("span:2:6").resolve(region)
    assert _picked(loc) == [[5], [2, 3, 4, 5]] and loc.row_valid.tolist() == [True, True]
    loc = Positions.parse("span:4:6").resolve(region)
    assert _picked(loc) == [[], [4, 5]] and loc.row_valid.tolist() == [False, True]
    # an open span that starts at or past every row's end selects nothing, and every slot still indexes inside
    # the sequence (the engine gathers there before it masks)
    for start in (6, 7, 40):
        loc = Positions.span(start, None).resolve(region)
        assert _picked(loc) == [[], []] and loc.row_valid.tolist() == [False, False]
        assert int(loc.index.max()) <= 5 and int(loc.index.min()) >= 0
    loc = Positions.span(torch.tensor([3, 3]), None).resolve(region)
    assert _picked(loc) == [[], [3, 4, 5]] and int(loc.index.max()) <= 5
    # the unpadded fast path follows the same rule
    nine = torch.ones(1, 9, dtype=torch.bool)
    assert _picked(Positions.parse("f50").resolve(nine)) == _picked(Positions.parse("span:0:50").resolve(nine))
    assert _picked(Positions.parse("f50").resolve(nine)) == [list(range(9))]
    # absolute index positions are not counts over real tokens: outside the sequence stays an error
    with pytest.raises(PositionError, match="must lie in"):
        Positions.indices([[12]]).resolve(nine)


def test_indices_tensor_and_nested_lists():
    region = torch.ones(3, 5, dtype=torch.bool)
    loc = Positions.parse([[0, 4], [2, -1], [None, None]]).resolve(region)
    assert _picked(loc) == [[0, 4], [2], []]
    assert loc.row_valid.tolist() == [True, True, False]
    assert _picked(Positions.parse(torch.tensor([1, 3])).resolve(region)) == [[1, 3]] * 3
    assert _picked(Positions.indices(torch.tensor([[1], [2], [3]])).resolve(region)) == [[1], [2], [3]]
    with pytest.raises(PositionError, match=r"must lie in 0..4"):
        Positions.parse([[0, 5]] * 3).resolve(region)
    with pytest.raises(PositionError, match=r"must lie in 0..4"):
        Positions.parse([[-2]] * 3).resolve(region)
    with pytest.raises(PositionError, match="batch=3"):
        Positions.parse([[0], [1]]).resolve(region)
    with pytest.raises(PositionError, match="integers"):
        Positions.parse([[0.5]])
    with pytest.raises(PositionError, match="integers"):
        Positions.indices(torch.tensor([1.0]))
    with pytest.raises(PositionError, match="mix lists and integers"):
        Positions.parse([[0], 1])


def test_masks_are_absolute():
    m = torch.tensor([[True, False, True, False], [False, False, False, True]])
    assert _picked(Positions.parse(m).resolve(torch.ones(2, 4, dtype=torch.bool))) == [[0, 2], [3]]
    with pytest.raises(PositionError, match="shape"):
        Positions.mask(m).resolve(torch.ones(2, 5, dtype=torch.bool))


def test_tensor_positions_cannot_be_saved():
    with pytest.raises(PositionError, match="cannot be saved"):
        Positions.parse([1, 2]).to_dict()


def test_from_pyvene_unit_locations():
    base, source = Positions.from_pyvene({"sources->base": ([[[0, 3]] * 2, [[1]] * 2], [[[4, 5]] * 2, [[2]] * 2])})
    region = torch.ones(2, 6, dtype=torch.bool)
    assert [_picked(p.resolve(region)) for p in base] == [[[4, 5]] * 2, [[2]] * 2]
    assert [_picked(p.resolve(region)) for p in source] == [[[0, 3]] * 2, [[1]] * 2]
    same, same_src = Positions.from_pyvene({"sources->base": [[[1], [2]]]})
    assert same is same_src and _picked(same[0].resolve(region)) == [[1], [2]]
    only_base, none = Positions.from_pyvene({"base": [[[0], [None]]]})
    assert none is None and _picked(only_base[0].resolve(region)) == [[0], []]
    everywhere, _ = Positions.from_pyvene(3)
    assert _picked(everywhere.resolve(region)) == [[3], [3]]
    with pytest.raises(PositionError, match="per head"):
        Positions.from_pyvene({"base": [[[[0], [1]]]]})
    with pytest.raises(PositionError):
        Positions.from_pyvene({"source->base": [[[0]]]})


def test_from_pyvene_feeds_the_engine(tiny_llama):
    model = tiny_llama[0]
    ids = token_ids()
    bindings = [Binding("L1.block_output", CollectIntervention()), Binding("L2.block_output", CollectIntervention())]
    base, _ = Positions.from_pyvene({"base": [[[0, 5], [1, 2]], [[3], [4]]]})
    with IntervenableModel(model, bindings) as im:
        got = im.run({"input_ids": ids}, positions=base).collected
        whole = im.run({"input_ids": ids}, positions="all").collected
    assert torch.equal(got["L1.block_output"][0], whole["L1.block_output"][0, [0, 5]])
    assert torch.equal(got["L1.block_output"][1], whole["L1.block_output"][1, [1, 2]])
    assert torch.equal(got["L2.block_output"][:, 0], whole["L2.block_output"][[0, 1], [3, 4]])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_and_right_padding_give_the_same_intervened_outputs(tiny_model, family):
    model = tiny_model(family)[0]
    rows = [token_ids(1, 7, seed=1)[0], token_ids(1, 4, seed=2)[0]]
    vector = torch.linspace(-2, 2, 64)
    outs = {}
    for side, pad in (("left", left_pad), ("right", right_pad)):
        ids, mask = pad(rows)
        im = IntervenableModel(model, [Binding("L1.block_output", AddIntervention(vector=vector)),
                                       Binding("L2.mlp_output", CollectIntervention())], default_positions="f1+l2")
        with im, torch.no_grad():
            res = im.run({"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)})
        logits = main_output(res.output)
        outs[side] = ([logits[i][mask[i].bool()] for i in range(2)], res.collected["L2.mlp_output"])
    for a, b in zip(outs["left"][0], outs["right"][0]):
        assert_close(a, b)
    assert_close(outs["left"][1], outs["right"][1])


def test_padded_slots_write_once_and_empty_rows_stay_untouched(tiny_llama):
    model = tiny_llama[0]
    ids = token_ids(2, 3)
    vector = torch.linspace(-1, 1, 64)
    base = main_output(model(input_ids=ids)).detach()
    with IntervenableModel(model, Binding("L1.block_output", AddIntervention(vector=vector))) as im, torch.no_grad():
        # f3+l3 on 3 tokens selects each token once or twice; every token must get the vector exactly once
        overlapping = main_output(im(input_ids=ids, positions="f3+l3"))
        once = main_output(im(input_ids=ids, positions="all"))
        partial = main_output(im(input_ids=ids, positions=[[1], [-1]]))
    assert torch.equal(overlapping, once)
    assert torch.equal(partial[1], base[1]) and not torch.equal(partial[0], base[0])
