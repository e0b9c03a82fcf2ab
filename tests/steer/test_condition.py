"""Conditional steering: the CAST similarity formula, per-row decisions in one batch equal to each row run alone
(rows that do not fire are the plain model), decisions that do not follow row 0, the threshold grid search, and
the refusals."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close

from reftkit.errors import ConfigError, DataError
from reftkit.steer import SteeringVector, steer
from reftkit.steer.condition import Condition, best_threshold, cast_similarity, conditional_steer

SITE = "L1.block_output"
LENGTH = 6


def _prompts(n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 260, (LENGTH,), generator=g).tolist() for _ in range(n)]


def _behaviour(seed=3):
    return SteeringVector({SITE: 4 * torch.randn(64, generator=torch.Generator().manual_seed(seed))})


def _direction(seed=8):
    return torch.randn(64, generator=torch.Generator().manual_seed(seed))


def test_similarity_is_cos_of_h_and_tanh_of_its_projection():
    h = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [-1.0, 0.5, 0.0]])
    c = torch.tensor([2.0, 0.0, 0.0])
    sims = cast_similarity(h, c)
    # P h = (h·c / c·c) c keeps the first component: tanh(3) e1, 0, tanh(-1) e1
    expected = [3.0 / 5.0, 0.0, 1.0 / float(torch.tensor([-1.0, 0.5]).norm())]
    assert sims.tolist() == pytest.approx(expected, abs=1e-6)
    assert cast_similarity(h, -c).tolist() == pytest.approx(expected, abs=1e-6)  # the sign of c does not matter


def test_rows_above_the_threshold_are_steered_and_the_others_are_not_in_one_batch(tiny_llama):
    model = tiny_llama[0]
    prompts = _prompts()
    probe = Condition(_direction(), SITE, threshold=0.0)
    sims = probe.similarities_of_ids(model, prompts)
    assert len(set(sims.tolist())) == len(prompts)
    order = sims.argsort()
    # a threshold between the second and third smallest similarity: two rows fire, two do not
    threshold = float(sims[order[1]] + sims[order[2]]) / 2
    condition = Condition(_direction(), SITE, threshold=threshold)
    ids = torch.tensor(prompts)
    behaviour = _behaviour()
    with conditional_steer(model, None, prompts, behaviour, 2.0, condition, scope="all") as cs:
        assert cs.decisions == [bool(s > threshold) for s in sims]
        assert sum(cs.decisions) == 2
        assert cs.coefficients == [2.0 if d else None for d in cs.decisions]
        batch_logits = cs.run({"input_ids": ids}).logits
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    for r, prompt in enumerate(prompts):
        alone_ids = torch.tensor([prompt])
        assert_close(probe.similarities_of_ids(model, [prompt])[0], sims[r], ulps=64)
        if cs.decisions[r]:
            with steer(model, [(behaviour, 2.0)], scope="all") as single:
                alone = single(alone_ids).logits
            assert not torch.allclose(batch_logits[r], plain[r], atol=1e-3)
        else:
            with torch.no_grad():
                alone = model(input_ids=alone_ids).logits
            assert torch.equal(batch_logits[r], plain[r])
        assert_close(batch_logits[r], alone[0], ulps=1024)


def test_the_decision_is_made_per_row_not_from_row_0(tiny_llama):
    model = tiny_llama[0]
    prompts = _prompts()
    sims = Condition(_direction(), SITE, threshold=0.0).similarities_of_ids(model, prompts)
    low, high = int(sims.argmin()), int(sims.argmax())
    threshold = float(sims[low] + sims[high]) / 2
    condition = Condition(_direction(), SITE, threshold=threshold)
    for first, second in ((low, high), (high, low)):
        batch = [prompts[first], prompts[second]]
        with conditional_steer(model, None, batch, _behaviour(), 1.0, condition) as cs:
            assert cs.decisions == [first == high, second == high]
    below = Condition(_direction(), SITE, threshold=threshold, fire="below")
    assert below.decide(sims[[low, high]]) == [True, False]
    with conditional_steer(model, None, [prompts[low]], _behaviour(), 1.0,
                           condition.with_threshold(10.0)) as cs:  # nothing fires: the model is untouched
        assert cs.decisions == [False] and cs.steered is None
        with torch.no_grad():
            assert torch.equal(cs.run({"input_ids": torch.tensor([prompts[low]])}).logits,
                               model(input_ids=torch.tensor([prompts[low]])).logits)


def test_last_token_aggregate_reads_only_the_last_prompt_token(tiny_llama):
    model = tiny_llama[0]
    prompts = _prompts(2)
    last = Condition(_direction(), SITE, aggregate="last")
    mean = Condition(_direction(), SITE, aggregate="mean")
    s_last, s_mean = last.similarities_of_ids(model, prompts), mean.similarities_of_ids(model, prompts)
    assert not torch.allclose(s_last, s_mean)
    # padding does not change a row: the same prompt next to a longer one
    longer = prompts[1] + prompts[1][:3]
    assert_close(last.similarities_of_ids(model, [prompts[0], longer])[0], s_last[0], ulps=64)
    assert_close(mean.similarities_of_ids(model, [prompts[0], longer])[0], s_mean[0], ulps=64)


def test_grid_search_finds_a_planted_threshold():
    g = torch.Generator().manual_seed(0)
    positive = (0.62 + 0.3 * torch.rand(40, generator=g)).tolist()  # all above 0.62
    negative = (0.2 + 0.4 * torch.rand(40, generator=g)).tolist()  # all below 0.60
    fit = best_threshold(positive, negative)
    assert fit.fire == "above" and 0.6 <= fit.threshold < 0.62 and fit.f1 == 1.0
    assert fit.threshold == 0.6 or min(positive) > fit.threshold > max(negative)
    flipped = best_threshold(negative, positive)  # positives below: the "below" side wins
    assert flipped.fire == "below" and flipped.f1 == 1.0 and max(negative) < flipped.threshold <= min(positive)
    noisy = best_threshold(positive + [0.1], negative + [0.9], fire="above")
    assert noisy.fire == "above" and 0.6 <= noisy.threshold < 0.62
    assert noisy.precision == pytest.approx(40 / 41) and noisy.recall == pytest.approx(40 / 41)


def test_fit_threshold_on_prompts(tiny_llama):
    from reftkit.steer.condition import fit_threshold

    model, tokenizer = tiny_llama
    condition = Condition(_direction(), SITE)
    pos, neg = ["aaaa aaaa aaaa", "aaa aaa aaaa"], ["zq xv", "qqz vvx"]
    fitted, fit = fit_threshold(model, tokenizer, condition, pos, neg, chat=False)
    sims_pos = condition.similarities(model, tokenizer, pos, chat=False)
    sims_neg = condition.similarities(model, tokenizer, neg, chat=False)
    assert fitted.threshold == fit.threshold and fitted.fire == fit.fire
    decided = fitted.decide(torch.cat([sims_pos, sims_neg]))
    tp = sum(decided[:2])
    assert fit.recall == tp / 2 and fit.f1 == best_threshold(sims_pos.tolist(), sims_neg.tolist()).f1


def test_bad_input_is_a_typed_error(tiny_llama):
    model = tiny_llama[0]
    with pytest.raises(ConfigError, match="float tensor"):
        Condition(torch.zeros(3, 3), SITE)
    with pytest.raises(ConfigError, match="non-zero"):
        Condition(torch.zeros(64), SITE)
    with pytest.raises(ConfigError, match="site name"):
        Condition(_direction(), "layer six")
    with pytest.raises(ConfigError, match="finite number"):
        Condition(_direction(), SITE, threshold=float("nan"))
    with pytest.raises(ConfigError, match="aggregate"):
        Condition(_direction(), SITE, aggregate="max")
    with pytest.raises(ConfigError, match="above"):
        Condition(_direction(), SITE, fire="sideways")
    with pytest.raises(ConfigError, match="width 64"):
        Condition(torch.ones(10), SITE).similarities_of_ids(model, _prompts(1))
    with pytest.raises(DataError, match="no prompts"):
        Condition(_direction(), SITE).similarities_of_ids(model, [])
    with pytest.raises(DataError, match="prompt 1 has no tokens"):
        Condition(_direction(), SITE).similarities_of_ids(model, [[5, 6], []])
    with pytest.raises(ConfigError, match="2 sites"):
        Condition.from_vector(SteeringVector({SITE: _direction(), "L0.block_output": _direction()}))
    assert Condition.from_vector(SteeringVector({SITE: _direction()})).site == SITE
    with pytest.raises(DataError, match="finite"):
        best_threshold([0.5, float("nan")], [0.1])
    with pytest.raises(DataError, match="no negative"):
        best_threshold([0.5], [])
    condition = Condition(_direction(), SITE, threshold=-1.0)
    with conditional_steer(model, None, _prompts(2), _behaviour(), 1.0, condition) as cs:
        with pytest.raises(ConfigError, match="decided for 2 rows"):
            cs.run({"input_ids": torch.tensor(_prompts(3))})
