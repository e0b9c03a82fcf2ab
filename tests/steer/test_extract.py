"""Steering-vector extraction: the arithmetic of each method on planted activations, and the reading path on a tiny
model against `output_hidden_states` (left and right padding alike)."""

from __future__ import annotations

import logging

import pytest
import torch
from numerics import assert_close

from reftkit.adapters import base_model_record
from reftkit.chat import prompt_ids
from reftkit.errors import ConfigError, DataError
from reftkit.steer.data import ContrastPair, make_pairs
from reftkit.steer.extract import (actadd, difference_consistency, extract, from_activations, logistic_direction,
                                   mean_difference, normalize_across_behaviours, pca_direction, read_pairs)
from reftkit.steer.vector import SteeringVector

pytestmark = pytest.mark.numerics

SITE = "L2.block_output"


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def _unit(d: int, i: int) -> torch.Tensor:
    u = torch.zeros(d)
    u[i] = 1.0
    return u


def _planted(n=40, d=16, shift=3.0, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    pos = base + shift * u + noise * torch.randn(n, d, generator=g)
    neg = base + noise * torch.randn(n, d, generator=g)
    return pos, neg, u


# ----------------------------------------------------------------------------------------------------- the math

def test_mean_diff_is_the_difference_of_means_with_its_report():
    pos, neg, u = _planted()
    sv = from_activations({SITE: pos}, {SITE: neg})
    v = sv.directions[SITE]
    assert_close(v, (pos.double().mean(0) - neg.double().mean(0)).float())
    assert_close(mean_difference(pos, neg), v)
    assert _cos(v, u) > 0.99 and abs(float(v.norm()) - 3.0) < 0.1
    assert sv.method == "mean_diff" and sv.unit == "raw" and sv.counts == {"positive": 40, "negative": 40}
    site = sv.report["sites"][SITE]
    d = (pos - neg).double()
    cos = torch.nn.functional.cosine_similarity(d, d.mean(0, keepdim=True), dim=1).mean()
    assert_close(torch.tensor(site["consistency"]), cos, dtype=torch.float32)
    assert site["consistency"] > 0.95 and site["norm"] == pytest.approx(float(v.norm()))
    h = torch.cat([pos, neg]).norm(dim=1).mean()
    assert site["hidden_norm"] == pytest.approx(float(h), rel=1e-6)
    assert site["relative_norm"] == pytest.approx(float(v.norm()) / float(h), rel=1e-6)
    assert sv.scales[f"{SITE}/mean_diff_norm"] == pytest.approx(float(v.norm()), rel=1e-6)
    assert sv.scales[f"{SITE}/hidden_norm"] == pytest.approx(float(h), rel=1e-6)
    assert sv.report["layers"] == [2] and sv.report["warnings"] == []
    # a coefficient of 1 in mean_diff_norm units is one mean difference
    hidden = from_activations({SITE: pos}, {SITE: neg}, unit="hidden_norm", hidden_norm={SITE: 10.0})
    assert hidden.raw_multipliers(1.0)[SITE] == pytest.approx(10.0 / float(v.norm()), rel=1e-6)


def test_consistency_is_one_for_parallel_differences_and_low_for_random_ones():
    pos, neg, _ = _planted(noise=0.0)
    assert difference_consistency(pos, neg) == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    assert difference_consistency(torch.randn(200, 32, generator=g), torch.randn(200, 32, generator=g)) < 0.3


def test_cross_behaviour_normalisation_rescales_to_the_mean_norm():
    vectors = [from_activations({SITE: p}, {SITE: n}) for p, n, _ in
               (_planted(shift=s, seed=i) for i, s in enumerate((1.0, 2.0, 6.0)))]
    norms = [float(sv.directions[SITE].norm()) for sv in vectors]
    target = sum(norms) / 3
    normalised = normalize_across_behaviours(vectors)
    for before, after in zip(vectors, normalised):
        assert float(after.directions[SITE].norm()) == pytest.approx(target, rel=1e-6)
        assert _cos(after.directions[SITE], before.directions[SITE]) == pytest.approx(1.0, abs=1e-6)
        assert after.scales[f"{SITE}/direction_norm"] == pytest.approx(target, rel=1e-6)
    # the same rule inside mean_diff: the mean is over the reference vectors and this one
    p, n, _ = _planted(shift=1.0, seed=0)
    inline = from_activations({SITE: p}, {SITE: n}, normalize="cross_behaviour", norm_reference=vectors[1:])
    assert_close(inline.directions[SITE], normalised[0].directions[SITE])
    fixed = from_activations({SITE: p}, {SITE: n}, normalize="cross_behaviour", norm_reference=5.0)
    assert float(fixed.directions[SITE].norm()) == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ConfigError, match="norm_reference"):
        from_activations({SITE: p}, {SITE: n}, normalize="cross_behaviour")


def _majority_vs_mean_case(d=8, n_noise=0.01):
    """Four pairs differ by +1 along u, one by -10: the centred top component is u, the majority says +u, the mean
    projection says -u."""
    u = _unit(d, 0)
    g = torch.Generator().manual_seed(2)
    a = torch.tensor([1.0, 1.0, 1.0, 1.0, -10.0])
    neg = torch.randn(5, d, generator=g)
    pos = neg + a[:, None] * u + n_noise * torch.randn(5, d, generator=g)
    return pos, neg, u


def test_pca_diff_centered_sign_is_a_majority_vote():
    pos, neg, u = _majority_vs_mean_case()
    v, ev = pca_direction(pos, neg, "diff_centered")
    assert _cos(v, u) > 0.999 and ev > 0.99  # 4 of 5 pairs project p > n on +u
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    v_mean, _ = pca_direction(pos, neg, "diff_centered", sign="mean")
    assert _cos(v_mean, u) < -0.999  # mean(d . u) = -1.2 < 0
    # the vote looks at the pairs, not at which way the SVD happened to point: flipping the inputs flips the result
    v_swapped, _ = pca_direction(neg, pos, "diff_centered")
    assert_close(v_swapped, -v)


def test_pca_centred_and_uncentred_differ_and_the_low_cosine_warning_fires(caplog):
    d, n = 8, 30
    g = torch.Generator().manual_seed(3)
    u, w = _unit(d, 0), _unit(d, 1)
    a = torch.randn(n, generator=g)
    neg = torch.randn(n, d, generator=g)
    pos = neg + 3.0 * u + a[:, None] * w  # a shared shift along u, the pairs vary along w
    centred, ev_c = pca_direction(pos, neg, "diff_centered")
    uncentred, ev_u = pca_direction(pos, neg, "diff_uncentered")
    assert abs(_cos(centred, w)) > 0.999 and abs(_cos(centred, u)) < 1e-4
    assert _cos(uncentred, u) > 0.9 and ev_c == pytest.approx(1.0, abs=1e-6) and ev_u < 1.0
    # pair centring subtracts each pair's mean: the same direction as the un-centred differences
    pair, ev_p = pca_direction(pos, neg, "pair_centered")
    assert _cos(pair, uncentred) == pytest.approx(1.0, abs=1e-6) and ev_p == pytest.approx(ev_u, rel=1e-6)
    with caplog.at_level(logging.WARNING, logger="reftkit.steer.extract"):
        sv = from_activations({SITE: pos}, {SITE: neg}, "pca", variant="diff_centered")
    site = sv.report["sites"][SITE]
    assert site["cosine_to_mean_diff"] < 0.8 and site["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert len(sv.report["warnings"]) == 1 and "cosine" in sv.report["warnings"][0]
    assert any("cosine" in r.message for r in caplog.records)
    ok = from_activations({SITE: pos}, {SITE: neg}, "pca", variant="diff_uncentered")
    assert ok.report["sites"][SITE]["cosine_to_mean_diff"] > 0.8 and ok.report["warnings"] == []
    assert ok.method == "pca" and ok.report["options"]["variant"] == "diff_uncentered"


def test_logistic_separates_a_planted_linear_case_deterministically():
    g = torch.Generator().manual_seed(4)
    d = 12
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    x = torch.randn(400, d, generator=g)
    x = x[(x @ u).abs() > 0.3]  # a margin around the boundary
    above = x @ u > 0
    pos, neg = x[above][:100], x[~above][:100]
    v, accuracy = logistic_direction(pos, neg, l2=1e-4, steps=200)
    assert accuracy == 1.0 and _cos(v, u) > 0.9
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float((pos @ v).min()) > float((neg @ v).max())  # separates every example
    again, _ = logistic_direction(pos, neg, l2=1e-4, steps=200)
    assert torch.equal(v, again)
    sv = from_activations({SITE: pos}, {SITE: neg}, "logistic", l2=1e-4, steps=200)
    assert torch.equal(sv.directions[SITE], v) and sv.report["sites"][SITE]["accuracy"] == 1.0
    # oriented towards the positives even with the sides swapped
    assert_close(logistic_direction(neg, pos, l2=1e-4, steps=200)[0], -v, ulps=1e4)


def test_bad_activations_and_options_are_typed_errors():
    pos, neg, _ = _planted(n=4)
    with pytest.raises(DataError, match=SITE):
        from_activations({SITE: pos}, {SITE: neg[:3]})
    with pytest.raises(DataError, match="differ"):
        from_activations({SITE: pos}, {"L1.block_output": neg})
    with pytest.raises(ConfigError, match="unknown extraction method"):
        from_activations({SITE: pos}, {SITE: neg}, "pca_diff")
    with pytest.raises(ConfigError, match="variant"):
        from_activations({SITE: pos}, {SITE: neg}, "pca", varient="diff_centered")
    with pytest.raises(ConfigError, match="unknown PCA variant"):
        pca_direction(pos, neg, "centred")
    with pytest.raises(DataError, match="at least 2 pairs"):
        pca_direction(pos[:1], neg[:1], "diff_centered")
    with pytest.raises(DataError, match="do not differ"):
        logistic_direction(pos, pos)


def test_pairs_are_checked_and_named():
    with pytest.raises(DataError, match="3 positive and 2 negative"):
        make_pairs(["a", "b", "c"], ["x", "y"])
    with pytest.raises(DataError, match="no contrast pairs"):
        make_pairs([], [])
    with pytest.raises(DataError, match="pair 1: field 'negative'"):
        make_pairs(pairs=[("a", "b"), ("c", None)])
    with pytest.raises(DataError, match="pair 0"):
        make_pairs(pairs=[("a", "b", "c", "d")])
    assert make_pairs(pairs=[("q", "yes", "no"), {"positive": "a", "negative": "b"}]) == [
        ContrastPair("yes", "no", "q"), ContrastPair("a", "b")]
    assert make_pairs(["yes", "no"], ["no", "yes"], prompts="Q?")[1] == ContrastPair("no", "yes", "Q?")


# ------------------------------------------------------------------------------------------- reading a model

def _hidden(model, ids) -> tuple:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


TEXT_PAIRS = [("I love this film", "I hate it"), ("a good day", "a very bad day indeed"), ("yes", "no, never")]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2's learned absolute positions see left padding
def test_reading_equals_hidden_states_at_the_last_token_for_both_paddings(tiny_model, family):
    model, tok = tiny_model(family)
    n_layers = model.config.num_hidden_layers
    right = read_pairs(model, tok, TEXT_PAIRS, padding_side="right", batch_size=4)
    left = read_pairs(model, tok, TEXT_PAIRS, padding_side="left", batch_size=4)
    assert right.sites == [f"L{l}.block_output" for l in range(n_layers)]  # default: every layer
    for i, pair in enumerate(TEXT_PAIRS):
        for side, text in zip(("positive", "negative"), pair):
            hs = _hidden(model, tok(text)["input_ids"])
            for l in range(n_layers):
                got = getattr(right, side)[f"L{l}.block_output"][i]
                assert_close(getattr(left, side)[f"L{l}.block_output"][i], got)
                if l < n_layers - 1:
                    assert_close(got, hs[l + 1][0, -1])  # hidden_states[l + 1] is block l's output
                else:  # HF's last hidden state is after the final norm; the block output is before it
                    final_norm = model.model.norm if family == "llama" else model.transformer.ln_f
                    assert_close(final_norm(got), hs[n_layers][0, -1])
                    assert not torch.allclose(got, hs[n_layers][0, -1])


def test_answer_completion_mean_and_selectors_read_the_right_tokens(tiny_llama):
    model, tok = tiny_llama
    pairs = [("Is it?", " (A)", " (B) no"), ("Tell me", "Sure thing", "No")]
    head = [prompt_ids(tok, q, chat=True) for q, _, _ in pairs]
    answer_norms = []
    for padding in ("left", "right"):
        answer = read_pairs(model, tok, pairs, read="answer", chat=True, layers=[1], padding_side=padding)
        mean = read_pairs(model, tok, pairs, read="completion_mean", chat=True, layers=[1], padding_side=padding)
        last2 = read_pairs(model, tok, pairs, read="l2", chat=True, layers=[1], padding_side=padding)
        for i, (_, p, n) in enumerate(pairs):
            for side, text in (("positive", p), ("negative", n)):
                tail = tok(text, add_special_tokens=False)["input_ids"]
                hs = _hidden(model, head[i] + tail)[2][0]  # block 1's output
                start = len(head[i])
                assert_close(getattr(answer, side)["L1.block_output"][i], hs[start])
                answer_norms.append(float(hs[start].norm()))
                assert_close(getattr(mean, side)["L1.block_output"][i], hs[start:].mean(0))
                assert_close(getattr(last2, side)["L1.block_output"][i], hs[-2:].mean(0))
    # the mean token norm is over the read tokens (here one per sequence)
    assert answer.hidden_norm["L1.block_output"] == pytest.approx(sum(answer_norms[4:]) / 4, rel=1e-5)


def test_one_forward_per_batch_reads_every_site(tiny_llama):
    model, tok = tiny_llama
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        acts = read_pairs(model, tok, TEXT_PAIRS, batch_size=4)
    finally:
        handle.remove()
    assert len(calls) == 2  # 6 sequences in batches of 4
    assert len(acts.sites) == model.config.num_hidden_layers and not model._forward_hooks
    assert all(v.dtype == torch.float32 and v.shape == (3, 64) for v in acts.positive.values())


def test_extract_builds_a_steering_vector_from_the_model(tiny_llama, tmp_path):
    model, tok = tiny_llama
    acts = read_pairs(model, tok, TEXT_PAIRS, layers=[0, 3])
    sv = extract(model, tok, TEXT_PAIRS, layers=[0, 3], unit="mean_diff_norm")
    assert sv.sites == ["L0.block_output", "L3.block_output"] and sv.unit == "mean_diff_norm"
    for s in sv.sites:
        assert_close(sv.directions[s], mean_difference(acts.positive[s], acts.negative[s]))
        assert sv.report["sites"][s]["hidden_norm"] == pytest.approx(acts.hidden_norm[s])
    assert sv.model_hint == base_model_record(model)
    assert sv.report["read"] == "last" and sv.report["layers"] == [0, 3]
    assert sv.report["timing"]["read_s"] > 0 and sv.report["counts"] == {"positive": 3, "negative": 3}
    pca = extract(model, tok, TEXT_PAIRS, "pca", sites=["L1.block_output"], variant="pair_centered")
    logistic = extract(model, tok, TEXT_PAIRS, "logistic", sites="L1.block_output")
    for v in (pca, logistic):
        assert float(v.directions["L1.block_output"].norm()) == pytest.approx(1.0, abs=1e-5)
    for i, v in enumerate((sv, pca, actadd(model, tok, "Love", "Hate", layers=[1]))):  # the report is JSON data
        assert SteeringVector.load(v.save(tmp_path / str(i))) == v


def test_post_norm_sites_are_flagged(tiny_llama):
    model, tok = tiny_llama
    sv = extract(model, tok, TEXT_PAIRS, sites=["L3.block_output", "module:model.norm:output"])
    assert len(sv.report["warnings"]) == 1 and "module:model.norm:output" in sv.report["warnings"][0]
    head = extract(model, tok, TEXT_PAIRS, sites=["module:lm_head:input"])
    assert "final norm" in head.report["warnings"][0]


def test_bad_read_positions_name_the_pair(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(DataError, match="pair 1: the negative side has no token"):
        read_pairs(model, tok, [("q", "a", "b"), ("q", "yes", "")], read="answer")
    with pytest.raises(DataError, match="pair 0: read='completion_mean'"):
        read_pairs(model, tok, TEXT_PAIRS, read="completion_mean")
    with pytest.raises(DataError, match="cannot read at"):
        read_pairs(model, tok, TEXT_PAIRS, read="middle")
    with pytest.raises(ConfigError, match="method 'logistic'"):
        extract(model, tok, TEXT_PAIRS, "logistic", variant="diff_centered")


def test_actadd_is_the_positional_difference_at_the_front(tiny_llama):
    model, tok = tiny_llama
    pos_ids, neg_ids = tok("Love")["input_ids"], tok("Hate you")["input_ids"]
    T = len(neg_ids)
    space = tok(" ", add_special_tokens=False)["input_ids"][0]
    sv = actadd(model, tok, "Love", "Hate you", layers=[0, 2])
    assert sv.method == "actadd" and sv.scope == f"f{T}@prompt" and sv.positional and sv.unit == "raw"
    padded = pos_ids + [space] * (T - len(pos_ids))  # the shorter prompt is right-padded with spaces
    hp, hn = _hidden(model, padded), _hidden(model, neg_ids)
    for l in (0, 2):
        v = sv.directions[f"L{l}.block_output"]
        assert v.shape == (T, 64)
        assert_close(v, hp[l + 1][0] - hn[l + 1][0], scale=float(hp[l + 1].abs().max()))
        assert float(v[0].abs().max()) == 0.0  # the shared BOS cancels
    cut = actadd(model, tok, "Love", "Hate you", layers=[0], pad="truncate")
    assert cut.directions["L0.block_output"].shape == (len(pos_ids), 64)
    via_extract = extract(model, tok, [("Love", "Hate you")], "actadd", layers=[0, 2])
    assert_close(via_extract.directions["L2.block_output"], sv.directions["L2.block_output"])
    with pytest.raises(DataError, match="exactly one"):
        extract(model, tok, TEXT_PAIRS, "actadd")
