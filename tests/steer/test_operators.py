"""Steering operators: each formula against a hand-written float64 reference, the documented equivalences (ACE is
clamp, ablate_then_add is clamp with no bias), the norm-preserving wrapper, neuron and head edits on a model, and
save/load through the engine's files."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close, assert_identical

from reftkit.engine import Binding, IntervenableModel
from reftkit.errors import ConfigError, InterventionError
from reftkit.interventions import REGISTRY, build_intervention
from reftkit.interventions.steering import (AblateIntervention, AblateThenAddIntervention, ClampIntervention,
                                            NeuronAddIntervention, NeuronFillIntervention, NeuronScaleIntervention,
                                            NormPreservingIntervention, PositionalAddIntervention)
from reftkit.steer.operators import OPERATORS, build_operator

pytestmark = pytest.mark.numerics

D = 16


def _h(seed=0, shape=(3, 4, D)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _r(seed=1):
    return torch.randn(D, generator=torch.Generator().manual_seed(seed)) * 3


def _unit64(r):
    r = r.double()
    return r / r.norm()


def test_ablate_removes_c_times_the_component_along_the_direction():
    h, r = _h(), _r()
    for c in (1.0, 0.5, -2.0):
        got = AblateIntervention(direction=r, coefficient=c)(h)
        u = _unit64(r)
        want = h.double() - c * torch.einsum("bkd,d->bk", h.double(), u)[..., None] * u
        assert_close(got, want.float())
    assert_close(AblateIntervention(direction=r)(h) @ _unit64(r).float(), torch.zeros(3, 4), scale=float(h.abs().max()))


def test_clamp_sets_the_projection_from_the_bias_and_equals_ace():
    h, r, b = _h(), _r(), _h(5, (D,))
    u = _unit64(r)
    for value in (0.0, 1.5, -4.0):
        got = ClampIntervention(direction=r, bias=b, value=value)(h)
        centred = h.double() - b.double()
        want = h.double() - torch.einsum("bkd,d->bk", centred, u)[..., None] * u + value * u
        assert_close(got, want.float())
        assert_close((got.double() - b.double()) @ u, torch.full((3, 4), value, dtype=torch.float64),
                     dtype=torch.float32, scale=float(h.abs().max()))
    # ACE (Marshall et al.): v' = v − proj_r(v) + proj_r(r⁻) + α·r, with r = r⁺ − r⁻
    r_plus, r_minus, alpha = _h(6, (D,)) * 2, _h(7, (D,)), 0.7
    r = r_plus - r_minus
    u = _unit64(r)
    proj = lambda x: (x.double() @ u)[..., None] * u  # noqa: E731
    ace = h.double() - proj(h) + proj(r_minus) + alpha * r.double()
    got = build_operator("clamp", r, alpha, {"bias": r_minus})(h)
    assert_close(got, ace.float())
    # with bias 0 and value 0 clamp is directional ablation
    assert_close(ClampIntervention(direction=r, value=0.0)(h), AblateIntervention(direction=r)(h))


def test_ablate_then_add_removes_then_adds_and_equals_clamp_without_bias():
    h, r = _h(), _r()
    u = _unit64(r)
    got = AblateThenAddIntervention(direction=r, coefficient=2.0)(h)
    want = h.double() - (h.double() @ u)[..., None] * u + 2.0 * r.double()
    assert_close(got, want.float())
    assert_close(got, ClampIntervention(direction=r, value=2.0 * float(r.norm()))(h))


def test_positional_add_adds_the_kth_vector_to_the_kth_slot_and_needs_exactly_T_slots():
    v = _h(3, (4, D))
    h = _h()
    got = PositionalAddIntervention(vectors=v, coefficient=-1.5)(h)
    assert_close(got, (h.double() - 1.5 * v.double()).float())
    with pytest.raises(InterventionError, match="f4"):
        PositionalAddIntervention(vectors=v).check_input(_h(shape=(3, 2, D)), None, "L1.block_output")


def test_neuron_fill_add_scale_touch_only_the_listed_neurons():
    h = _h()
    idx, u = torch.tensor([3, 0, 9]), torch.tensor([1.0, -2.0, 0.5])
    want_fill, want_add, want_scale = h.clone(), h.clone(), h.clone()
    for i, value in zip(idx.tolist(), u.tolist()):
        want_fill[..., i] = 2.0 * value
        want_add[..., i] = h[..., i] + 2.0 * value
        want_scale[..., i] = h[..., i] * (2.0 * value)
    kw = dict(neurons=idx, values=u, coefficient=2.0, embed_dim=D)
    assert_close(NeuronFillIntervention(**kw)(h), want_fill)
    assert_close(NeuronAddIntervention(**kw)(h), want_add)
    assert_close(NeuronScaleIntervention(**kw)(h), want_scale)
    untouched = [i for i in range(D) if i not in idx.tolist()]
    assert_identical(NeuronAddIntervention(**kw)(h)[..., untouched], h[..., untouched])
    with pytest.raises(ConfigError, match="distinct"):
        NeuronAddIntervention(neurons=torch.tensor([1, 1]), values=torch.ones(2), embed_dim=D)
    with pytest.raises(ConfigError, match="0..15"):
        build_operator("neuron_add", torch.ones(D), 1.0, {"neurons": [16]})


def test_norm_preserving_keeps_each_vectors_length():
    h, r = _h(), _r()
    inner = AblateThenAddIntervention(direction=r, coefficient=3.0)
    got = NormPreservingIntervention(inner=inner)(h)
    edited = inner(h).double()
    want = edited * (h.double().norm(dim=-1, keepdim=True) / edited.norm(dim=-1, keepdim=True))
    assert_close(got, want.float())
    assert_close(got.norm(dim=-1), h.norm(dim=-1))
    # an edit of zero stays exact through the wrapper
    zero = NormPreservingIntervention(inner=build_operator("add", r, 0.0))
    assert_identical(zero(h), h)


def test_build_operator_covers_every_operator_and_refuses_unknown_config():
    h, r = _h(), _r()
    for name in OPERATORS:
        config = {"neurons": [1, 2]} if name.startswith("neuron") else {}
        iv = build_operator(name, r, 1.0, config)
        assert iv.type_name in REGISTRY and iv(h).shape == h.shape
        wrapped = build_operator(name, r, 1.0, {**config, "norm_preserving": True})
        assert wrapped.type_name == "norm_preserving"
        assert_close(wrapped(h).norm(dim=-1), h.norm(dim=-1))
    assert_close(build_operator("add", r, 2.0)(h), h + 2.0 * r)
    with pytest.raises(ConfigError, match="unknown operator_config"):
        build_operator("add", r, 1.0, {"bias": r})
    with pytest.raises(ConfigError, match="unknown steering operator"):
        build_operator("steer_harder", r, 1.0)
    with pytest.raises(ConfigError, match="bias must be a tensor"):
        build_operator("clamp", r, 1.0, {"bias": [1.0]})


def test_zero_direction_edits_nothing():
    h = _h()
    for iv in (AblateIntervention(direction=torch.zeros(D)), ClampIntervention(direction=torch.zeros(D), value=0.0),
               AblateThenAddIntervention(direction=torch.zeros(D))):
        assert_identical(iv(h), h)


@pytest.mark.parametrize("name", ["ablate", "clamp", "ablate_then_add", "neuron_scale", "norm_preserving"])
def test_operators_round_trip_through_engine_files(tiny_llama, tmp_path, name):
    model = tiny_llama[0]
    r = torch.randn(64, generator=torch.Generator().manual_seed(2))
    if name == "norm_preserving":
        iv = build_operator("clamp", r, 0.5, {"bias": r.flip(0), "norm_preserving": True})
    elif name == "neuron_scale":
        iv = build_operator(name, torch.randn(128, generator=torch.Generator().manual_seed(3)), 1.5,
                            {"neurons": [5, 100, 7]})
    else:
        iv = build_operator(name, r, 0.8, {"bias": -r} if name == "clamp" else {})
    site = "L1.mlp_activation" if name == "neuron_scale" else "L1.block_output"
    ids = torch.randint(3, 260, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), IntervenableModel(model, Binding(site, iv)) as im:
        before = im(input_ids=ids).logits
        im.save(tmp_path / "saved")
        plain = model(input_ids=ids).logits
    with torch.no_grad(), IntervenableModel.load(model, tmp_path / "saved") as loaded:
        assert loaded.interventions[0].spec() == iv.spec()
        assert_identical(loaded(input_ids=ids).logits, before)
    assert not torch.equal(before, plain)


def test_head_level_add_edits_one_heads_slice_only(tiny_llama):
    model = tiny_llama[0]
    ids = torch.randint(3, 260, (2, 5), generator=torch.Generator().manual_seed(1))
    d_head = model.config.hidden_size // model.config.num_attention_heads
    v = torch.randn(d_head, generator=torch.Generator().manual_seed(4))
    seen = {}
    o_proj = model.model.layers[2].self_attn.o_proj  # a forward hook sees the input after the engine's pre-hook
    handle = o_proj.register_forward_hook(lambda m, a, out: seen.setdefault(len(seen), a[0].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
            with IntervenableModel(model, Binding("L2.H1.head_attention_value_output",
                                                  build_operator("add", v, 2.0))) as im:
                im(input_ids=ids)
    finally:
        handle.remove()
    base, steered = seen[0], seen[1]
    head = slice(d_head, 2 * d_head)
    assert_close(steered[..., head], base[..., head] + 2.0 * v)
    assert_identical(torch.cat([steered[..., :d_head], steered[..., 2 * d_head:]], -1),
                     torch.cat([base[..., :d_head], base[..., 2 * d_head:]], -1))


def test_spec_rebuilds_the_same_operator():
    r = _r()
    iv = build_operator("clamp", r, 0.5, {"bias": r * 0.1, "norm_preserving": True})
    rebuilt = build_intervention(iv.spec())
    rebuilt.load_state_dict(iv.state_dict())
    h = _h()
    assert_identical(rebuilt(h), iv(h))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_operators_compute_in_the_activations_dtype(dtype):
    h, r, b = _h().to(dtype), _r(), _h(5, (D,))
    u = _unit64(r)
    h64 = h.double()
    cases = {
        "ablate": (build_operator("ablate", r, 1.0), h64 - (h64 @ u)[..., None] * u),
        "clamp": (build_operator("clamp", r, 1.0, {"bias": b, "value": 2.0}),
                  h64 - ((h64 - b.double()) @ u)[..., None] * u + 2.0 * u),
        "ablate_then_add": (build_operator("ablate_then_add", r, 0.5), h64 - (h64 @ u)[..., None] * u + 0.5 * r.double()),
    }
    for name, (iv, want) in cases.items():
        got = iv(h)
        assert got.dtype == dtype, name
        assert_close(got, want, dtype=dtype, ulps=16, scale=float(want.abs().max()), msg=name)
