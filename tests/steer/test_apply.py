"""Applying vectors: every scope under greedy generation of a left-padded batch, with and without the KV cache (same
logits, traced positions equal to the analytic set), the first generated token edited, per-row coefficients equal
to each row steered alone, composition, exact removal, and the refusals."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close, assert_identical

from reftkit.errors import ConfigError, IncompatibleModelError, PositionError
from reftkit.steer import SteeringVector, scope_positions, steer

pytestmark = pytest.mark.numerics

GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
NEW = 10
LENGTHS = (4, 6, 7)
P = max(LENGTHS)
SITE = "L1.block_output"


def _batch():
    g = torch.Generator().manual_seed(11)
    rows = [torch.randint(3, 260, (n,), generator=g) for n in LENGTHS]
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = r
        mask[i, P - len(r):] = 1
    return ids, mask, rows


def _vector(shape=(64,), seed=3, **kw):
    return SteeringVector({SITE: 4 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))}, **kw)


def _gen(target, ids, mask, use_cache=True, new=NEW):
    out = target.generate(ids, attention_mask=mask, max_new_tokens=new, use_cache=use_cache, output_logits=True,
                          return_dict_in_generate=True, **GREEDY)
    return out.sequences, torch.stack(out.logits, 1)


PROMPT_START = [P - n for n in LENGTHS]  # absolute position of each row's first real token
GENERATED = list(range(P, P + NEW - 1))  # generated tokens fed back in (the last one is never fed)
STARTS = torch.tensor([1, 2, 3])

SCOPES = {
    "all": (lambda: scope_positions("all"), lambda r: list(range(PROMPT_START[r], P)) + GENERATED),
    "prompt": (lambda: scope_positions("prompt"), lambda r: list(range(PROMPT_START[r], P))),
    "generated": (lambda: scope_positions("generated"), lambda r: GENERATED),
    "from_instruction_end_offset": (lambda: scope_positions("from_instruction_end", start=STARTS),
                                    lambda r: list(range(PROMPT_START[r] + int(STARTS[r]), P)) + GENERATED),
    "from_instruction_end_absolute": (lambda: scope_positions("from_instruction_end", absolute=torch.tensor([3, 2, 5]),
                                                              attention_mask=_batch()[1]),
                                      lambda r: list(range(max(PROMPT_START[r], [3, 2, 5][r]), P)) + GENERATED),
    "from_instruction_end_last_k": (lambda: scope_positions("from_instruction_end", k=2),
                                    lambda r: [P - 2, P - 1] + GENERATED),
    "last_prompt_token_then_generated": (lambda: scope_positions("last_prompt_token_then_generated"),
                                         lambda r: [P - 1] + GENERATED),
    "front": (None, lambda r: list(range(PROMPT_START[r], PROMPT_START[r] + 3))),
    "last_k": (lambda: scope_positions("last_k", k=3), lambda r: [P - 3, P - 2, P - 1]),
}


@pytest.mark.parametrize("name", sorted(SCOPES))
def test_scope_edits_the_analytic_positions_with_and_without_the_cache(tiny_llama, name):
    model = tiny_llama[0]
    ids, mask, _ = _batch()
    make, analytic = SCOPES[name]
    if name == "front":  # ActAdd: a positional [T, d] vector on the first T real prompt tokens
        vector, scope = _vector((3, 64), method="actadd", scope="f3@prompt"), None
    else:
        vector, scope = _vector(), make()
    plain_seq, plain_logits = _gen(model, ids, mask)
    with torch.no_grad():
        plain_forward = model(input_ids=ids, attention_mask=mask).logits
    results = {}
    for use_cache in (True, False):
        with steer(model, [(vector, 2.0)], scope=scope, trace=True) as steered:
            results[use_cache] = _gen(steered, ids, mask, use_cache=use_cache)
            edited = steered.edited_positions()
        (binding,) = edited
        assert edited[binding] == [analytic(r) for r in range(len(LENGTHS))], use_cache
    (seq_c, logits_c), (seq_n, logits_n) = results[True], results[False]
    assert torch.equal(seq_c, seq_n)
    torch.testing.assert_close(logits_c, logits_n, rtol=0, atol=1e-4)
    assert_close(logits_c, logits_n, ulps=1024)
    assert not torch.allclose(logits_c, plain_logits, atol=1e-3)  # the edit matters
    with torch.no_grad():  # removed: the plain model again, bit for bit
        assert_identical(model(input_ids=ids, attention_mask=mask).logits, plain_forward)
    assert torch.equal(_gen(model, ids, mask)[0], plain_seq)


@pytest.mark.parametrize("name", ["generated", "from_instruction_end_last_k"])
def test_the_first_generated_token_is_edited(tiny_llama, name):
    model = tiny_llama[0]
    ids, mask, _ = _batch()
    with steer(model, [(_vector(), 2.0)], scope=SCOPES[name][0](), trace=True) as steered:
        seq, logits = _gen(steered, ids, mask, new=2)
        trace = steered.trace
    # the second forward feeds the first generated token (absolute position P) and edits it in every row
    decode = [entry for entry in trace if entry["past"] == P]
    assert len(decode) == 1 and decode[0]["length"] == 1
    assert list(decode[0]["edits"].values()) == [[[P]] * 3]
    with torch.no_grad():  # the plain model on the same tokens predicts something else for the next one
        plain_next = model(input_ids=seq[:, :-1], attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)],
                                                                              1)).logits[:, -1]
    assert not torch.allclose(logits[:, 1], plain_next, atol=1e-3)
    if name == "generated":  # the prompt is untouched: the first prediction is the plain model's, bit for bit
        plain_first = _gen(model, ids, mask, new=1)[1][:, 0]
        assert_identical(logits[:, 0], plain_first)


def test_per_row_coefficients_equal_each_row_steered_alone(tiny_llama):
    model = tiny_llama[0]
    ids, mask, rows = _batch()
    v, w = _vector(seed=3), _vector(seed=4)
    coefficients = [0.5, None, -2.0]
    with steer(model, [(v, coefficients), (w, [None, 1.5, None])], scope="all", trace=True) as steered:
        seq, logits = _gen(steered, ids, mask)
        edited = steered.edited_positions()
    reached = {name: [bool(r) for r in rows_] for name, rows_ in edited.items()}
    assert reached == {"v0[0.5]:L1.block_output": [True, False, False],
                       "v0[-2]:L1.block_output": [False, False, True],
                       "v1[1.5]:L1.block_output": [False, True, False]}
    alone = [(v, 0.5), (w, 1.5), (v, -2.0)]
    for r, (vector, c) in enumerate(alone):
        with steer(model, [(vector, c)], scope="all") as single:
            seq_r, logits_r = _gen(single, rows[r][None], None)
        assert torch.equal(seq[r, P - LENGTHS[r]:], seq_r[0])
        assert_close(logits[r], logits_r[0], ulps=1024)
        with steer(model, [(vector, c)], scope="all") as same_batch:  # the batch steered with one coefficient
            assert_close(logits[r], _gen(same_batch, ids, mask)[1][r], ulps=256)
    with pytest.raises(ConfigError, match="for 3 rows but got a batch of 2"):
        with steer(model, [(v, coefficients)]) as steered:
            steered.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=1, **GREEDY)


def test_a_row_without_a_vector_is_bit_identical_to_the_base_model(tiny_llama):
    model = tiny_llama[0]
    ids, mask, _ = _batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with steer(model, [(_vector(), [None, 3.0, None])], scope="all") as steered:
            out = steered(input_ids=ids, attention_mask=mask).logits
    assert_identical(out[[0, 2]], plain[[0, 2]])
    assert not torch.allclose(out[1], plain[1], atol=1e-3)


def test_vectors_compose_in_one_model_and_units_are_converted(tiny_llama):
    model = tiny_llama[0]
    ids, mask, _ = _batch()
    v, w = _vector(seed=3), _vector(seed=4)
    with torch.no_grad():
        with steer(model, [(v, 1.0), (w, -0.5)], scope="all") as both:
            assert len(both.binding_names) == 2 and len(both.intervenable.hook_handles) == 1
            composed = both(input_ids=ids, attention_mask=mask).logits
        with steer(model, [(v - 0.5 * w, 1.0)], scope="all") as summed:
            combined = summed(input_ids=ids, attention_mask=mask).logits
        assert_close(composed, combined, ulps=256)
        scaled = SteeringVector(v.directions, unit="mean_diff_norm", scales={f"{SITE}/mean_diff_norm": 8.0})
        with scaled.apply(model, 0.5, scope="all") as steered:
            in_units = steered(input_ids=ids, attention_mask=mask).logits
        with (v * (4.0 / v.norms()[SITE])).apply(model, 1.0, scope="all") as steered:
            raw = steered(input_ids=ids, attention_mask=mask).logits
    assert_close(in_units, raw, ulps=256)


def test_removal_restores_the_model_bit_for_bit(tiny_llama):
    model = tiny_llama[0]
    ids, mask, _ = _batch()
    counts = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before_hooks = counts()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        steered = steer(model, [(_vector(), 3.0), (_vector(seed=5, operator="ablate"), 1.0)], trace=True)
        assert counts() > before_hooks
        assert not torch.equal(steered(input_ids=ids, attention_mask=mask).logits, before)
        steered.remove()
        after = model(input_ids=ids, attention_mask=mask).logits
    assert counts() == before_hooks
    assert all(not iv._forward_hooks for iv in steered.intervenable.interventions)
    assert_identical(after, before)


def test_bad_input_is_refused_with_typed_errors(tiny_llama, tiny_model):
    model = tiny_llama[0]
    ids, mask, _ = _batch()
    with pytest.raises(IncompatibleModelError, match="width 32"):
        steer(model, [(SteeringVector({SITE: torch.ones(32)}), 1.0)])
    gpt2 = tiny_model("gpt2")[0]
    from reftkit.adapters import base_model_record
    with pytest.raises(IncompatibleModelError, match="GPT2LMHeadModel"):
        steer(model, [(_vector(model_hint=base_model_record(gpt2)), 1.0)])
    for bad in (float("nan"), float("inf"), torch.tensor(float("nan")), [1.0, float("nan"), 0.0]):
        with pytest.raises(ConfigError, match="finite"):
            steer(model, [(_vector(), bad)])
    with pytest.raises(ConfigError, match="every per-row coefficient is None"):
        steer(model, [(_vector(), [None, None, None])])
    with steer(model, [(_vector(), 1.0)], scope="span:5:9@prompt") as steered:  # rows of 4 tokens have none
        with pytest.raises(PositionError, match=r"selects no token in row\(s\) \[0\]"):
            steered.generate(ids, attention_mask=mask, max_new_tokens=2, **GREEDY)
        with pytest.raises(PositionError, match="selects no token"):
            steered(input_ids=ids, attention_mask=mask)
    with pytest.raises(ConfigError, match="f3@prompt"):
        steer(model, [(_vector((3, 64)), 1.0)], scope="all")
    with pytest.raises(PositionError, match="unknown steering scope"):
        scope_positions("everywhere")
    with pytest.raises(PositionError, match="exactly one"):
        scope_positions("from_instruction_end")
    with pytest.raises(ConfigError, match="trace=True"):
        with steer(model, _vector()) as steered:
            steered.edited_positions()


@pytest.mark.parametrize("name", ["from_instruction_end_offset", "front"])
def test_scopes_hold_under_beam_search(tiny_llama, name):
    model = tiny_llama[0]
    ids, mask, _ = _batch()
    make, analytic = SCOPES[name]
    if name == "front":
        vector, scope = _vector((3, 64), method="actadd", scope="f3@prompt"), None
    else:
        vector, scope = _vector(), make()
    results = {}
    for use_cache in (True, False):
        with steer(model, [(vector, 2.0)], scope=scope, trace=True) as steered:
            out = steered.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, use_cache=use_cache,
                                   output_scores=True, return_dict_in_generate=True, **GREEDY)
            (rows,) = steered.edited_positions().values()
        results[use_cache] = out
        generated = list(range(P, P + 3)) if name != "front" else []
        expected = [sorted(set(analytic(r)) - set(GENERATED) | set(generated)) for r in range(3) for _ in range(2)]
        assert rows == expected, use_cache
    assert torch.equal(results[True].sequences, results[False].sequences)
    torch.testing.assert_close(results[True].sequences_scores, results[False].sequences_scores, rtol=0, atol=1e-4)
