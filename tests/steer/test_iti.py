"""ITI: per-head probes against a float64 Newton-method reference, the mass-mean shift and σ against hand
formulas on heads read by plain hooks on `o_proj`, a planted head found, and the edit applied at the last prompt
token and every generated token."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close

from reftkit.errors import ConfigError, DataError
from reftkit.steer.iti import from_head_activations, iti, mass_mean_shift, probe_heads, rank_heads, split_pairs
from reftkit.steer.vector import SteeringVector

pytestmark = pytest.mark.numerics

PAIRS = [(f"Q: is {i} odd? A: yes, {i} is odd", f"Q: is {i} odd? A: no, {i} is even") for i in range(12)]


def _newton_probe(x, y, l2, iterations=50):
    """L2-regularised logistic regression by Newton's method in float64 (the exact minimiser of the same loss)."""
    n, d = x.shape
    z = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    theta = torch.zeros(d + 1, dtype=torch.float64)
    reg = torch.full((d + 1,), 2 * l2, dtype=torch.float64)
    reg[-1] = 0.0
    for _ in range(iterations):
        p = torch.sigmoid(z @ theta)
        grad = z.T @ (p - y) / n + reg * theta
        hess = (z.T * (p * (1 - p))) @ z / n + torch.diag(reg)
        theta = theta - torch.linalg.solve(hess, grad)
    return theta[:-1], theta[-1]


def test_probes_equal_newtons_method():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(30, 3, 8, generator=g, dtype=torch.float64) + 0.4
    neg = torch.randn(30, 3, 8, generator=g, dtype=torch.float64)
    train, val = torch.arange(22), torch.arange(22, 30)
    acc, loglik = probe_heads(pos[train], neg[train], pos[val], neg[val], l2=0.01)
    for h in range(3):
        x = torch.cat([pos[train, h], neg[train, h]])
        mean = x.mean(0)
        rms = (x - mean).pow(2).sum(1).mean().sqrt()
        y = torch.cat([torch.ones(22), torch.zeros(22)]).double()
        w, b = _newton_probe((x - mean) / rms, y, 0.01)
        xv = (torch.cat([pos[val, h], neg[val, h]]) - mean) / rms
        yv = torch.cat([torch.ones(8), torch.zeros(8)]).double()
        logits = xv @ w + b
        assert float(acc[h]) == float(((logits > 0).double() == yv).double().mean())
        ref = -torch.nn.functional.binary_cross_entropy_with_logits(logits, yv)
        assert_close(loglik[h], ref)


def test_ranking_and_split_rules():
    acc = torch.tensor([0.5, 1.0, 1.0, 0.75], dtype=torch.float64)
    ll = torch.tensor([-0.1, -0.3, -0.2, -0.1], dtype=torch.float64)
    assert rank_heads(acc, ll, 3) == [2, 1, 3]  # accuracy, then log-likelihood
    assert rank_heads(torch.ones(3), torch.zeros(3), 2) == [0, 1]  # then the lower index
    train, val = split_pairs(10, 0.2, seed=1)
    assert len(val) == 2 and sorted(train.tolist() + val.tolist()) == list(range(10))
    assert torch.equal(split_pairs(10, 0.2, seed=1)[1], val)
    with pytest.raises(DataError, match="at least 2 pairs"):
        split_pairs(1, 0.2, 0)
    with pytest.raises(ConfigError, match="val_ratio"):
        split_pairs(10, 1.0, 0)


def test_a_planted_head_is_found_with_its_direction_and_sigma():
    g = torch.Generator().manual_seed(2)
    N, H, d = 40, 4, 8
    positive = {l: torch.randn(N, H, d, generator=g) for l in range(3)}
    negative = {l: torch.randn(N, H, d, generator=g) for l in range(3)}
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    positive[2][:, 1] += 6.0 * u  # layer 2, head 1 carries the contrast
    v = from_head_activations(positive, negative, heads=1, val_ratio=0.25, seed=0)
    assert v.sites == ["L2.H1.head_attention_value_output"]
    head = v.report["heads"][0]
    assert (head["layer"], head["head"], head["val_accuracy"]) == (2, 1, 1.0)
    p, n = positive[2][:, 1].double(), negative[2][:, 1].double()
    theta = p.mean(0) - n.mean(0)
    unit = theta / theta.norm()
    proj = torch.cat([p, n]) @ unit
    sigma = ((proj - proj.mean()) ** 2).mean().sqrt()
    assert_close(v.directions["L2.H1.head_attention_value_output"], (sigma * unit).float(), dtype=torch.float32)
    assert head["sigma"] == pytest.approx(float(sigma), rel=1e-12)
    assert head["mean_diff_norm"] == pytest.approx(float(theta.norm()), rel=1e-12)
    assert float(unit @ u.double()) > 0.95
    others = [max(a) for l, a in v.report["val_accuracy"].items() if l != "2"]
    assert max(others) < 1.0  # noise heads do not separate the held-out pairs perfectly
    assert v.scope == "l1@all" and v.operator == "add" and v.unit == "raw"


def _hooked_heads(model, tok, texts):
    """Every layer's o_proj input at the last token, [N, L, H, d_head], by plain pre-hooks."""
    rows = []
    for text in texts:
        seen = {}
        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(l, a[0][0, -1]))
                 for l, layer in enumerate(model.model.layers)]
        try:
            with torch.no_grad():
                model(torch.tensor([tok(text)["input_ids"]]))
        finally:
            for h in hooks:
                h.remove()
        rows.append(torch.stack([seen[l].reshape(4, 16) for l in range(4)]))
    return torch.stack(rows)


def test_iti_on_a_tiny_model_equals_hand_formulas_on_hooked_heads(tiny_llama, tmp_path):
    model, tok = tiny_llama
    v = iti(model, tok, PAIRS, heads=3, val_ratio=0.25, batch_size=5)  # batches of 5: padding is ignored
    pos = _hooked_heads(model, tok, [p for p, _ in PAIRS]).double()
    neg = _hooked_heads(model, tok, [n for _, n in PAIRS]).double()
    ref = from_head_activations({l: pos[:, l] for l in range(4)}, {l: neg[:, l] for l in range(4)}, heads=3,
                                val_ratio=0.25)
    assert v.sites == ref.sites
    for s in v.sites:
        assert_close(v.directions[s], ref.directions[s], dtype=torch.float32)
    for head in v.report["heads"]:
        unit, sigma, norm = mass_mean_shift(pos[:, head["layer"], head["head"]], neg[:, head["layer"], head["head"]])
        assert head["sigma"] == pytest.approx(sigma, rel=1e-5)
        assert_close(v.directions[head["site"]], (sigma * unit).float(), dtype=torch.float32)
    v.save(tmp_path / "iti")
    assert SteeringVector.load(tmp_path / "iti") == v


def test_the_edit_is_at_the_last_prompt_token_and_every_generated_token(tiny_llama):
    model, tok = tiny_llama
    v = iti(model, tok, PAIRS, heads=2)
    batch = tok(["hello there", "hi"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad(), v.apply(model, coefficient=15.0, trace=True) as steered:
        steered.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        edited = steered.edited_positions()
    T = batch["input_ids"].shape[1]
    for rows in edited.values():
        assert rows == [[T - 1, T, T + 1]] * 2  # left-padded: the last prompt token is T - 1 in both rows
    # the edit adds alpha * sigma * theta-hat to the head's slice of o_proj's input at the last position
    site = v.sites[0]
    layer, head = int(site[1]), int(site.split(".")[1][1:])
    ids = torch.tensor([tok("hello there")["input_ids"]])

    def add(m, args):
        x = args[0].clone()
        x[0, -1, head * 16:(head + 1) * 16] += 15.0 * v.directions[site]
        return (x,)

    one = v._replace({site: v.directions[site]}, scales={k: x for k, x in v.scales.items() if k.startswith(site)})
    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(add)
    try:
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        handle.remove()
    with torch.no_grad(), one.apply(model, coefficient=15.0) as steered:
        got = steered(ids).logits
    assert_close(got, expected)


def test_bad_input_is_a_typed_error(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ConfigError, match="heads"):
        iti(model, tok, PAIRS, heads=0)
    with pytest.raises(DataError, match="at least 2 pairs"):
        iti(model, tok, PAIRS[:1])
    with pytest.raises(DataError, match="same layers"):
        from_head_activations({0: torch.zeros(4, 2, 3)}, {1: torch.zeros(4, 2, 3)})
    with pytest.raises(DataError, match="same mean"):
        mass_mean_shift(torch.ones(3, 2), torch.ones(3, 2))
    with pytest.raises(ConfigError, match="l2"):
        probe_heads(torch.zeros(2, 1, 3), torch.ones(2, 1, 3), torch.zeros(1, 1, 3), torch.ones(1, 1, 3), l2=0.0)


def test_a_config_file_extracts_the_same_vector_and_the_example_is_valid(tiny_llama, tmp_path):
    import json
    from pathlib import Path

    from reftkit.steer.config import extraction_kwargs, load_steer_config
    from reftkit.steer.extract import extract

    model, tok = tiny_llama
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in PAIRS))
    (tmp_path / "c.yaml").write_text("model: tiny-llama\npairs: pairs.jsonl\nmethod: iti\noptions: {heads: 2}\n"
                                     "chat: false\n")
    cfg = load_steer_config(tmp_path / "c.yaml")
    got = extract(model, tok, cfg["pairs_rows"], **extraction_kwargs(cfg))
    direct = iti(model, tok, PAIRS, heads=2)
    assert got.sites == direct.sites and all(torch.equal(got.directions[s], direct.directions[s]) for s in got.sites)
    with pytest.raises(ConfigError, match="sites"):
        extract(model, tok, PAIRS, "iti", sites=["L0.block_output"])
    example = load_steer_config(Path(__file__).parents[2] / "examples" / "steer" / "iti.yaml")
    assert example["method"] == "iti" and all("prompt" in r for r in example["pairs_rows"])
