"""DAS-family interventions: pyvene parity on golden fixtures, identities, orthogonality, configs, subspaces,
errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from numerics import assert_close, assert_identical

from reftkit.errors import ConfigError, InterventionError
from reftkit.interventions import build_intervention
from reftkit.interventions.das import (
    BoundlessRotatedSpaceIntervention, LowRankRotatedSpaceIntervention, PCARotatedSpaceIntervention,
    RotatedSpaceIntervention, SigmoidMaskIntervention, SigmoidMaskRotatedSpaceIntervention,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pyvene"
NAMES = ["rotated", "rotated_partition", "low_rank_rotated", "low_rank_rotated_partition", "boundless_rotated",
         "sigmoid_mask_rotated", "sigmoid_mask", "pca_rotated"]
PYVENE_ONLY = {"embed_dim", "interchange_dim", "intervention_population"}
D = 16


def load_fixture(name):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return meta, load_file(str(FIXTURES / f"{name}.safetensors"))


def pyvene_state(tensors):
    return {k[6:]: v for k, v in tensors.items() if k.startswith("state.") and k[6:] not in PYVENE_ONLY}


def build(meta, case, state=None):
    """reftkit's equivalent of a fixture case: config overrides, then the weights, then boundary/temperature."""
    iv = build_intervention({"type": meta["reftkit_type"], "config": {**meta["reftkit_config"],
                                                                      **case["reftkit"]["config"]}})
    if state is not None:
        iv.load_state_dict(state, strict=True)
    if case["reftkit"].get("boundary") is not None:
        iv.set_intervention_boundaries(case["reftkit"]["boundary"])
    if case["reftkit"].get("temperature") is not None:
        iv.set_temperature(case["reftkit"]["temperature"])
    return iv


def all_cases(names):
    for name in names:
        for case in load_fixture(name)[0]["cases"]:
            yield pytest.param(name, case["name"], id=f"{name}-{case['name']}")


def get_case(meta, case_name):
    return next(c for c in meta["cases"] if c["name"] == case_name)


@pytest.mark.parametrize("name,case_name", list(all_cases(NAMES)))
def test_matches_pyvene_with_its_state_dict(name, case_name):
    meta, t = load_fixture(name)
    case = get_case(meta, case_name)
    iv = build(meta, case, pyvene_state(t))
    base = t["base"].clone()
    out = iv(base, t["source"], subspaces=case["reftkit"]["subspaces"])
    assert_close(out, t[f"out.{case_name}"])
    assert torch.equal(base, t["base"])


@pytest.mark.parametrize("name", ["rotated", "low_rank_rotated", "boundless_rotated", "sigmoid_mask_rotated"])
def test_matches_pyvene_with_the_computed_rotation(name):
    meta, t = load_fixture(name)
    case = meta["cases"][0]
    iv = build(meta, case)
    state = pyvene_state(t)
    iv.set_rotation(t["computed.rotate_layer.weight"])
    others = {k: v for k, v in state.items() if not k.startswith("rotate_layer.")}
    iv.load_state_dict({**iv.state_dict(), **others})
    out = iv(t["base"], t["source"], subspaces=case["reftkit"]["subspaces"])
    assert_close(out, t[f"out.{case['name']}"])


@pytest.mark.parametrize("case_name", ["all", "first3", "uniform"])
def test_pca_fit_reproduces_the_sklearn_basis(case_name):
    meta, t = load_fixture("pca_rotated")
    case = get_case(meta, case_name)
    iv = build(meta, case).fit(t["fit.activations"])
    out = iv(t["base"], t["source"], subspaces=case["reftkit"]["subspaces"])
    assert_close(out, t[f"out.{case_name}"])


def make(kind, **kw):
    torch.manual_seed(0)
    cfg = {"embed_dim": D, **kw}
    if kind == "low_rank_rotated":
        cfg.setdefault("low_rank_dimension", 4)
    return build_intervention({"type": kind, "config": cfg})


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 4, D, generator=g), torch.randn(3, 4, D, generator=g)


ALL = ["rotated", "low_rank_rotated", "boundless_rotated", "sigmoid_mask_rotated", "sigmoid_mask", "pca_rotated"]


@pytest.mark.parametrize("kind", ALL)
def test_interchange_with_itself_is_the_identity(kind, pair):
    base, _ = pair
    assert_close(make(kind)(base, base.clone()), base)


@pytest.mark.parametrize("kind", ["rotated", "pca_rotated"])
def test_full_and_empty_interchange(kind, pair):
    base, source = pair
    iv = make(kind)
    assert_close(iv(base, source), source)
    assert_close(iv(base, source, subspaces=torch.tensor([], dtype=torch.long)), base)


def test_low_rank_moves_base_along_the_subspace_only(pair):
    base, source = pair
    iv = make("low_rank_rotated")
    r = iv.rotation
    out = iv(base, source)
    assert_close(out @ r, source @ r)
    complement = torch.eye(D) - r @ r.T
    assert_close(out @ complement, base @ complement)
    assert torch.equal(iv(base, source, subspaces=torch.tensor([], dtype=torch.long)), base)


def test_boundless_boundary_covering_everything_is_the_source(pair):
    base, source = pair
    iv = make("boundless_rotated", init_boundary=1.0, lower_boundary=-0.5)
    iv.set_temperature(1e-3)
    assert_close(iv(base, source), source)
    pyvene_like = make("boundless_rotated", init_boundary=1.0)
    pyvene_like.set_temperature(1e-3)
    mask = pyvene_like.boundary_mask()
    assert mask[0].item() == pytest.approx(0.5)
    assert_close(mask[1:], torch.ones(D - 1))


def test_boundless_mask_follows_the_boundary():
    iv = make("boundless_rotated", init_boundary=0.25)
    iv.set_temperature(1e-3)
    mask = iv.boundary_mask()
    assert_close(mask[1:4], torch.ones(3))
    assert_close(mask[5:], torch.zeros(D - 5), scale=1.0)


def test_sigmoid_masks_saturate(pair):
    base, source = pair
    iv = make("sigmoid_mask_rotated")
    iv.set_temperature(1e-2)
    assert_close(iv(base, source), source)
    plain = make("sigmoid_mask")
    assert_close(plain(base, source), (base + source) / 2)
    with torch.no_grad():
        plain.mask.copy_(torch.tensor([5.0] * 4 + [-5.0] * (D - 4)))
    expect = torch.cat([source[..., :4], base[..., 4:]], dim=-1)
    assert_close(plain(base, source), expect)


@pytest.mark.parametrize("kind", ["rotated", "low_rank_rotated", "boundless_rotated", "sigmoid_mask_rotated"])
def test_rotation_stays_orthonormal_under_training(kind, pair):
    base, source = pair
    iv = make(kind)
    opt = torch.optim.SGD(iv.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        iv(base, source).pow(2).sum().backward()
        opt.step()
    r = iv.rotation
    assert_close(r.T @ r, torch.eye(r.shape[1]))


def test_learned_masks_get_gradients_and_temperature_does_not(pair):
    base, source = pair
    for kind, name in (("boundless_rotated", "intervention_boundaries"), ("sigmoid_mask_rotated", "masks"),
                       ("sigmoid_mask", "mask")):
        iv = make(kind)
        iv.set_temperature(50.0)
        iv(base, source).sum().backward()
        assert getattr(iv, name).grad is not None and getattr(iv, name).grad.abs().sum() > 0
        assert "temperature" not in dict(iv.named_parameters()) and "temperature" in iv.state_dict()


CONFIGS = [
    ("rotated", {"interchange_dim": 5, "subspace_partition": [[0, 3], [3, 9, 12], [10, 16]]}),
    ("low_rank_rotated", {"low_rank_dimension": 6, "interchange_dim": 2}),
    ("boundless_rotated", {"init_boundary": 0.3, "init_temperature": 2.0, "lower_boundary": -0.5}),
    ("sigmoid_mask_rotated", {"init_mask": 1.5, "init_temperature": 3.0}),
    ("sigmoid_mask", {"init_mask": 0.5, "init_temperature": 0.2}),
    ("pca_rotated", {"n_components": 8, "interchange_dim": 3}),
]


@pytest.mark.parametrize("kind,config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_config_round_trip(kind, config, pair):
    base, source = pair
    iv = make(kind, **config)
    if kind == "pca_rotated":
        iv.fit(torch.randn(50, D))
    if any(True for _ in iv.parameters()):
        opt = torch.optim.SGD(iv.parameters(), lr=0.3)
        for _ in range(2):
            opt.zero_grad()
            iv(base, source).pow(2).sum().backward()
            opt.step()
    assert set(k for k in iv.state_dict() if k.startswith("rotate_layer")) <= {"rotate_layer.weight"}
    spec = json.loads(json.dumps(iv.spec()))
    assert spec["type"] == kind and spec["config"] == {"embed_dim": D, **iv.config.to_dict(), **config}
    again = build_intervention(spec)
    again.load_state_dict(iv.state_dict())
    assert_identical(again(base, source), iv(base, source))


def test_subspace_forms_agree(pair):
    base, source = pair
    iv = make("rotated", subspace_partition=[[0, 4], [4, 10], [10, 16]])
    per_example = iv(base, source, subspaces=[[0], [1, 2], [2]])
    for i, dims in enumerate([[0, 1, 2, 3], list(range(4, 16)), list(range(10, 16))]):
        plain = make("rotated")
        assert_close(per_example[i], plain(base, source, subspaces=torch.tensor(dims))[i])
    plain = make("rotated")
    torch.testing.assert_close(plain(base, source, subspaces=torch.tensor([[0, 1, 2]] * 3)),
                               make("rotated", interchange_dim=3)(base, source))
    assert_close(plain(base, source, subspaces=[0, 1, 2]), plain(base, source, subspaces=torch.arange(3)))


def test_half_precision_inputs_keep_their_dtype(pair):
    base, source = pair
    for kind in ALL:
        out = make(kind)(base.bfloat16(), source.bfloat16())
        assert out.dtype == torch.bfloat16 and out.shape == base.shape


def test_bad_inputs_raise_typed_errors(pair):
    base, source = pair
    with pytest.raises(ConfigError, match="embed_dim"):
        RotatedSpaceIntervention()
    with pytest.raises(ConfigError, match="low_rank_dimension"):
        LowRankRotatedSpaceIntervention(embed_dim=D, low_rank_dimension=D + 1)
    with pytest.raises(ConfigError, match="empty range"):
        RotatedSpaceIntervention(embed_dim=D, subspace_partition=[[4, 2]])
    with pytest.raises(ConfigError, match="outside"):
        RotatedSpaceIntervention(embed_dim=D, subspace_partition=[[0, 20]])
    with pytest.raises(ConfigError, match="n_components"):
        PCARotatedSpaceIntervention(embed_dim=D, n_components=D + 1)
    iv = make("rotated")
    with pytest.raises(InterventionError, match="source"):
        iv(base)
    with pytest.raises(InterventionError, match="!="):
        iv(base, source[:2])
    with pytest.raises(InterventionError, match="outside"):
        iv(base, source, subspaces=torch.tensor([D]))
    with pytest.raises(InterventionError, match="rows"):
        iv(base, source, subspaces=[[0], [1]])
    with pytest.raises(InterventionError, match="integer"):
        iv(base, source, subspaces=torch.tensor([0.5]))
    with pytest.raises(InterventionError, match="parts"):
        make("rotated", subspace_partition=[[0, 8], [8, 16]])(base, source, subspaces=[2])
    with pytest.raises(InterventionError, match="orthonormal"):
        iv.set_rotation(torch.ones(D, D))
    with pytest.raises(InterventionError, match="shape"):
        iv.set_rotation(torch.eye(D)[:, :4])
    for kind in ("boundless_rotated", "sigmoid_mask_rotated", "sigmoid_mask"):
        with pytest.raises(InterventionError, match="no subspaces"):
            make(kind)(base, source, subspaces=[0])
    with pytest.raises(InterventionError, match="positive"):
        BoundlessRotatedSpaceIntervention(embed_dim=D).set_temperature(0.0)
    pca = PCARotatedSpaceIntervention(embed_dim=D, n_components=8)
    with pytest.raises(InterventionError, match="n_components"):
        pca.fit(torch.randn(4, D))
    with pytest.raises(InterventionError, match="width"):
        pca.fit(torch.randn(40, D + 1))
    with pytest.raises(InterventionError, match="zeros"):
        pca.set_basis(std=torch.zeros(D))


def test_constructor_tensors_and_sigmoid_defaults():
    comps = torch.linalg.qr(torch.randn(D, D))[0][:5]
    pca = PCARotatedSpaceIntervention(components=comps, mean=torch.ones(D), std=2 * torch.ones(D))
    assert pca.config.embed_dim == D and pca.config.n_components == 5
    assert torch.equal(pca.pca_components, comps) and torch.equal(pca.pca_std, 2 * torch.ones(D))
    assert SigmoidMaskIntervention(embed_dim=D).temperature.item() == pytest.approx(0.01)
    assert SigmoidMaskRotatedSpaceIntervention(embed_dim=D).masks[0].item() == 100.0
