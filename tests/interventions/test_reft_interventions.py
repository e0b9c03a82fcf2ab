"""ReFT interventions: pyreft parity on golden fixtures (outputs and gradients), the formulas, orthonormality,
dtype handling, dropout placement, configs and state dicts, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.utils import parametrize

from numerics import assert_close
from reftkit.errors import ConfigError, InterventionError
from reftkit.interventions import build_intervention
from reftkit.interventions.reft import ACTIVATIONS, trivialization_for

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pyreft"
PARITY = ["loreft", "loreft_gelu", "direft", "orthogonal_direft", "noreft", "consreft", "lobireft"]
ROTATION_TYPES = ["loreft", "orthogonal_direft", "consreft", "lobireft"]
RANKED_TYPES = ROTATION_TYPES + ["direft", "noreft"]
ALL_TYPES = RANKED_TYPES + ["red"]
D, R = 16, 4


def config_for(type_name, **kw):
    base = {"embed_dim": D} if type_name == "red" else {"embed_dim": D, "low_rank_dimension": R}
    return {**base, **kw}


def make(type_name, seed=0, **kw):
    """A built intervention with every parameter moved away from its initial value."""
    torch.manual_seed(seed)
    iv = build_intervention({"type": type_name, "config": config_for(type_name, **kw)})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in iv.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            # only the reflectors (below the diagonal) of the raw rotation parameter: its diagonal holds signs
            p.add_(0.3 * noise.tril(-1) if name.endswith("original") else 0.5 * noise)
    return iv


def fixture(name):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return meta, load_file(str(FIXTURES / f"{name}.safetensors"))


def from_fixture(name, compact=False, **overrides):
    """Our intervention with pyreft's weights: its raw parametrization tensors, or (compact) the computed R."""
    meta, t = fixture(name)
    type_name = name.split("_gelu")[0]
    extra = {k: v for k, v in meta["kwargs"].items() if k in ("act_fn", "dropout") or
             (k == "add_bias" and type_name == "noreft")}
    iv = build_intervention({"type": type_name, "config": config_for(type_name, **{**extra, **overrides})})
    state = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    if type_name == "direft":
        state.pop("proj_layer.bias")  # pyreft creates it and never uses it
    if compact and "rotation" in t:
        state = {k: v for k, v in state.items() if not k.startswith("rotate_layer.")}
        state["rotate_layer.weight"] = t["rotation"]
    iv.load_state_dict(state, strict=True)
    return iv, t


def loss_of(out, weight):
    return (out * weight).sum() + 0.5 * (out**2).sum()


def gradients(iv, x, loss_weight):
    """(output, loss, grad of the input, grads of the parameters, grad of the computed rotation or None)."""
    x = x.clone().requires_grad_(True)
    iv.zero_grad()
    with parametrize.cached():
        rot = iv.rotate_layer.weight if hasattr(iv, "rotate_layer") else None
        if rot is not None:
            rot.retain_grad()
        out = iv(x)
        loss = loss_of(out, loss_weight)
        loss.backward()
    grads = {n: p.grad for n, p in iv.named_parameters()}
    return out, loss, x.grad, grads, (rot.grad if rot is not None else None)


# ---- parity with pyreft ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PARITY)
@pytest.mark.parametrize("compact", [False, True], ids=["raw-parametrization", "computed-rotation"])
def test_forward_matches_pyreft(name, compact):
    iv, t = from_fixture(name, compact=compact)
    with torch.no_grad():
        iv.eval()
        assert_close(iv(t["input"]), t["output_eval"])
        iv.train()
        assert_close(iv(t["input"]), t["output_train"])


@pytest.mark.parametrize("name", PARITY)
def test_gradients_match_pyreft(name):
    iv, t = from_fixture(name)
    iv.train()
    out, loss, gx, grads, grot = gradients(iv, t["input"], t["loss_weight"])
    assert_close(loss, t["loss"].reshape(()))
    assert_close(gx, t["grad.input"])
    for pname, g in grads.items():
        assert_close(g, t[f"grad.{pname}"], msg=pname)
    if grot is not None:
        assert_close(grot, t["grad.rotation"])


@pytest.mark.parametrize("name", PARITY)
def test_gradients_match_pyreft_after_loading_the_computed_rotation(name):
    """Through a compact state dict the raw parametrization differs, but every gradient that does not depend on
    it (input, learned source, projection, and the computed rotation) is pyreft's."""
    iv, t = from_fixture(name, compact=True)
    iv.train()
    _, _, gx, grads, grot = gradients(iv, t["input"], t["loss_weight"])
    assert_close(gx, t["grad.input"])
    for pname, g in grads.items():
        if not pname.startswith("rotate_layer."):
            assert_close(g, t[f"grad.{pname}"], msg=pname)
    if grot is not None:
        assert_close(grot, t["grad.rotation"])


@pytest.mark.parametrize("name", [n for n in PARITY if fixture(n)[0]["dropout_output"] is not None])
def test_output_dropout_matches_pyreft(name):
    meta, _ = fixture(name)
    spec = meta["dropout_output"]
    iv, t = from_fixture(name, dropout=spec["p"], dropout_on=spec["dropout_on"])
    iv.train()
    torch.manual_seed(spec["seed"])
    with torch.no_grad():
        out = iv(t["input"])
    assert_close(out, t["output_train_dropout"])


# ---- the formulas ------------------------------------------------------------------------------------------


def expected(iv, h):
    """Each type's formula, written out with R (r x d), W, b, W2 as in the docstrings."""
    t = iv.type_name
    act = ACTIVATIONS[iv.config.act_fn or "linear"] if hasattr(iv.config, "act_fn") else None
    if t == "red":
        return h * iv.scale + iv.bias
    if hasattr(iv, "rotate_layer"):
        rmat = iv.rotate_layer.weight.T  # r x d, orthonormal rows
    if t == "loreft":
        return h + (act(h @ iv.learned_source.weight.T + iv.learned_source.bias) - h @ rmat.T) @ rmat
    if t == "orthogonal_direft":
        return h + act(h @ iv.learned_source.weight.T + iv.learned_source.bias) @ rmat
    if t == "consreft":
        return h + (iv.learned_source - h @ rmat.T) @ rmat
    if t == "lobireft":
        return h + iv.learned_source @ rmat
    w2 = iv.proj_layer.weight
    source = act(h @ iv.learned_source.weight.T + iv.learned_source.bias)
    if t == "direft":
        return h + source @ w2
    b2 = iv.proj_layer.bias if iv.proj_layer.bias is not None else 0.0
    return h + (source - (h @ w2.T + b2)) @ w2


FORMULA_CASES = [(t, {}) for t in ALL_TYPES] + [(t, {"act_fn": "relu"}) for t in
                                                 ("loreft", "orthogonal_direft", "direft", "noreft")]
FORMULA_CASES += [("noreft", {"add_bias": True}), ("loreft", {"act_fn": "gelu_pytorch_tanh"})]


@pytest.mark.parametrize("type_name,extra", FORMULA_CASES)
def test_formula(type_name, extra):
    iv = make(type_name, **extra)
    h = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close(iv(h), expected(iv, h))


def test_red_starts_as_the_identity():
    iv = build_intervention({"type": "red", "config": {"embed_dim": D}})
    h = torch.randn(2, 3, D)
    assert torch.equal(iv(h), h)


@pytest.mark.parametrize("type_name", ROTATION_TYPES)
def test_rows_of_r_stay_orthonormal_under_training(type_name):
    iv = make(type_name)
    opt = torch.optim.Adam(iv.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        opt.zero_grad()
        loss_of(iv(torch.randn(4, 2, D, generator=gen)), torch.randn(4, 2, D, generator=gen)).backward()
        opt.step()
    rmat = iv.rotation.T.detach()
    assert rmat.shape == (R, D)
    assert_close(rmat @ rmat.T, torch.eye(R))


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_weight_decay_outside_no_weight_decay_keeps_r_orthonormal(type_name):
    iv = make(type_name)
    skip = iv.no_weight_decay()
    assert skip == ({"rotate_layer.parametrizations.weight.original"} if type_name in ROTATION_TYPES else set())
    params = dict(iv.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in params.items() if n not in skip], "weight_decay": 0.1},
                             {"params": [params[n] for n in skip], "weight_decay": 0.0}], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        iv(torch.randn(4, 2, D)).pow(2).sum().backward()
        opt.step()
    if type_name in ROTATION_TYPES:
        rmat = iv.rotation.T.detach()
        assert_close(rmat @ rmat.T, torch.eye(R))


@pytest.mark.parametrize("type_name", ROTATION_TYPES)
def test_rotation_is_computed_once_per_forward(type_name):
    iv = make(type_name)
    calls = []
    iv.rotate_layer.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    out = iv(torch.randn(2, 3, D))
    assert len(calls) == 1
    out.sum().backward()
    assert len(calls) == 1


# ---- dtypes and dropout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_bfloat16_input_keeps_parameters_in_float32(type_name):
    iv = make(type_name)
    h = torch.randn(2, 3, D).to(torch.bfloat16)
    out = iv(h)
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in iv.parameters())
    if hasattr(iv, "rotate_layer"):
        assert iv.rotation.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(out, iv(h.float()).to(torch.bfloat16))


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_dropout_only_touches_the_edit(type_name):
    iv = make(type_name, dropout=1.0)
    h = torch.randn(2, 3, D)
    iv.train()
    assert torch.equal(iv(h), h)  # the whole edit is dropped, the representation is untouched
    iv.eval()
    reference = make(type_name)
    reference.load_state_dict(iv.state_dict())
    with torch.no_grad():
        assert torch.equal(iv(h), reference(h))  # eval() removes dropout


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_output_dropout_drops_the_representation_too(type_name):
    iv = make(type_name, dropout=1.0, dropout_on="output")
    iv.train()
    assert torch.equal(iv(torch.randn(2, 3, D)), torch.zeros(2, 3, D))


def test_partial_edit_dropout_keeps_or_scales_each_element_of_the_edit():
    iv = make("loreft", dropout=0.5)
    h = torch.randn(4, 6, D)
    with torch.no_grad():
        edit = iv.eval()(h) - h
        got = iv.train()(h) - h
    kept = got.abs() > 1e-6
    assert 0 < kept.float().mean() < 1
    assert_close(got[kept], 2 * edit[kept])


# ---- configs and state dicts -------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name,extra", [(t, {}) for t in ALL_TYPES] + [
    ("loreft", {"act_fn": "gelu", "dropout": 0.1, "dropout_on": "output", "dtype": "float64"}),
    ("noreft", {"add_bias": True, "act_fn": "silu"}),
])
def test_spec_and_state_dict_round_trip(type_name, extra):
    iv = make(type_name, **extra).eval()
    spec = json.loads(json.dumps(iv.spec()))
    again = build_intervention(spec).eval()
    again.load_state_dict(iv.state_dict(), strict=True)
    assert again.config == iv.config
    h = torch.randn(2, 3, D)
    with torch.no_grad():
        assert torch.equal(again(h), iv(h))


@pytest.mark.parametrize("type_name", ROTATION_TYPES)
def test_state_dict_holds_the_computed_rotation_not_the_d_by_d_base(type_name):
    iv = make(type_name)
    state = iv.state_dict()
    assert "rotate_layer.weight" in state and state["rotate_layer.weight"].shape == (D, R)
    assert not any(k.startswith("rotate_layer.parametrizations") for k in state)
    assert torch.equal(state["rotate_layer.weight"], iv.rotation.detach())
    again = make(type_name, seed=5)
    again.load_state_dict(state)
    assert torch.equal(again.rotation, iv.rotation)  # rebuilt exactly, not up to rounding
    clone = copy.deepcopy(iv)
    assert set(clone.state_dict()) == set(state)


def test_set_rotation_and_its_errors():
    iv = make("loreft")
    q, _ = torch.linalg.qr(torch.randn(D, R))
    iv.set_rotation(q)
    assert torch.equal(iv.rotation, q)
    with pytest.raises(InterventionError, match="orthonormal"):
        iv.set_rotation(2 * q)
    with pytest.raises(InterventionError, match="shape"):
        trivialization_for(torch.randn(R, D), iv.rotate_layer.parametrizations.weight.original)


def test_rank_larger_than_width_names_both_numbers():
    with pytest.raises(ConfigError, match=r"low_rank_dimension 20 is larger than embed_dim 16"):
        build_intervention({"type": "loreft", "config": {"embed_dim": 16, "low_rank_dimension": 20}})


@pytest.mark.parametrize("config,message", [
    ({"low_rank_dimension": 4}, "needs embed_dim"),
    ({"embed_dim": 16}, "needs low_rank_dimension"),
    ({"embed_dim": 16, "low_rank_dimension": 4, "act_fn": "swiglu"}, "unknown act_fn"),
    ({"embed_dim": 16, "low_rank_dimension": 4, "dropout_on": "input"}, "dropout_on"),
    ({"embed_dim": 16, "low_rank_dimension": 4, "dropout": 1.5}, "dropout"),
    ({"embed_dim": 16, "low_rank_dimension": 4, "dtype": "bfloat16"}, "full precision"),
    ({"embed_dim": 16, "low_rank_dimension": 4, "rank": 4}, "unknown fields"),
])
def test_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        build_intervention({"type": "loreft", "config": config})


def test_rotation_free_types_accept_half_precision_parameters():
    iv = build_intervention({"type": "direft", "config": {"embed_dim": D, "low_rank_dimension": R,
                                                          "dtype": "bfloat16"}})
    assert iv(torch.randn(2, 3, D)).dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in iv.parameters())


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_subspaces_are_refused(type_name):
    with pytest.raises(InterventionError, match="subspaces"):
        make(type_name)(torch.randn(1, 2, D), subspaces=torch.tensor([0]))
