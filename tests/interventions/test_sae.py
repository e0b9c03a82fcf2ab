"""Sparse-autoencoder interventions: pyvene parity, Gemma-Scope-style weight loading, identities, configs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import assert_close, assert_identical
from safetensors.torch import load_file, save_file

from reftkit.errors import ConfigError, InterventionError
from reftkit.interventions import build_intervention
from reftkit.interventions.sae import SAE_WEIGHT_NAMES, AutoencoderIntervention, JumpReLUSAEIntervention

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pyvene"
PYVENE_ONLY = {"embed_dim", "interchange_dim"}
D, M = 16, 32


def load_fixture(name):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return meta, load_file(str(FIXTURES / f"{name}.safetensors"))


def pyvene_state(tensors):
    return {k[6:]: v for k, v in tensors.items() if k.startswith("state.") and k[6:] not in PYVENE_ONLY}


def all_cases():
    for name in ("autoencoder", "jumprelu_sae"):
        for case in load_fixture(name)[0]["cases"]:
            yield pytest.param(name, case["name"], id=f"{name}-{case['name']}")


@pytest.mark.parametrize("name,case_name", list(all_cases()))
def test_matches_pyvene(name, case_name):
    meta, t = load_fixture(name)
    case = next(c for c in meta["cases"] if c["name"] == case_name)
    iv = build_intervention({"type": meta["reftkit_type"],
                             "config": {**meta["reftkit_config"], **case["reftkit"]["config"]}})
    iv.load_state_dict(pyvene_state(t), strict=True)
    base = t["base"].clone()
    out = iv(base, t["source"], subspaces=case["reftkit"]["subspaces"])
    assert_close(out, t[f"out.{case_name}"])
    assert torch.equal(base, t["base"])


def gemma_scope_weights():
    _, t = load_fixture("jumprelu_sae")
    return {k: t[f"state.{k}"] for k in SAE_WEIGHT_NAMES}


def expected_first7():
    _, t = load_fixture("jumprelu_sae")
    return t["base"], t["source"], t["out.first7"]


@pytest.mark.parametrize("form", ["dict", "npz", "safetensors", "from_weights"])
def test_jumprelu_loads_gemma_scope_weights(form, tmp_path):
    weights = gemma_scope_weights()
    base, source, expected = expected_first7()
    if form == "npz":
        source_of_weights = tmp_path / "params.npz"
        np.savez(source_of_weights, **{k: v.numpy() for k, v in weights.items()})
    elif form == "safetensors":
        source_of_weights = tmp_path / "sae.safetensors"
        save_file(weights, str(source_of_weights))
    else:
        source_of_weights = weights
    if form == "from_weights":
        sae = JumpReLUSAEIntervention.from_weights(source_of_weights, interchange_dim=7)
    else:
        sae = JumpReLUSAEIntervention(embed_dim=D, latent_dim=M, interchange_dim=7).load_weights(source_of_weights)
    assert_close(sae(base, source), expected)


def test_jumprelu_weight_errors(tmp_path):
    weights = gemma_scope_weights()
    sae = JumpReLUSAEIntervention(embed_dim=D, latent_dim=M)
    with pytest.raises(ConfigError, match="missing"):
        sae.load_weights({k: v for k, v in weights.items() if k != "threshold"})
    with pytest.raises(ConfigError, match="unknown"):
        sae.load_weights({**weights, "log_threshold": weights["threshold"]})
    with pytest.raises(InterventionError, match="W_enc"):
        JumpReLUSAEIntervention(embed_dim=D, latent_dim=M + 1).load_weights(weights)
    with pytest.raises(ConfigError, match="does not exist"):
        sae.load_weights(tmp_path / "nope.npz")
    (tmp_path / "sae.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=".npz or .safetensors"):
        sae.load_weights(tmp_path / "sae.pt")
    before = sae.W_enc.detach().clone()
    with pytest.raises(InterventionError):
        sae.load_weights({**weights, "b_dec": torch.zeros(D + 1)})
    assert torch.equal(sae.W_enc, before), "a failed load must leave the weights untouched"


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 4, D, generator=g), torch.randn(3, 4, D, generator=g)


def make(kind, **kw):
    torch.manual_seed(0)
    return build_intervention({"type": kind, "config": {"embed_dim": D, "latent_dim": M, **kw}})


@pytest.mark.parametrize("kind", ["autoencoder", "jumprelu_sae"])
def test_interchange_identities(kind, pair):
    base, source = pair
    iv = make(kind)
    if kind == "jumprelu_sae":
        iv.load_weights(gemma_scope_weights())
    none = torch.tensor([], dtype=torch.long)
    recon = iv.decode(iv.encode(base))
    assert_close(iv(base, source, subspaces=none), recon)
    assert_close(iv(base, base.clone()), recon)
    assert_close(iv(base, source), iv.decode(iv.encode(source)))
    keep = make(kind, preserve_error=True)
    keep.load_state_dict(iv.state_dict())
    assert_close(keep(base, source, subspaces=none), base)
    assert_close(keep(base, source), iv(base, source) + (base - recon))


def test_latent_addressing_forms_agree(pair):
    base, source = pair
    iv = make("jumprelu_sae", subspace_partition=[[0, 8], [8, 32]])
    iv.load_weights(gemma_scope_weights())
    plain = make("jumprelu_sae", interchange_dim=8)
    plain.load_weights(gemma_scope_weights())
    assert_close(iv(base, source, subspaces=[0]), plain(base, source))
    assert_close(iv(base, source, subspaces=torch.tensor([[0], [0], [0]])), plain(base, source))


def test_jumprelu_gates_below_threshold():
    sae = make("jumprelu_sae")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(D, M))
        sae.threshold.fill_(0.5)
    z = sae.encode(torch.tensor([[0.4, 0.6, -1.0] + [0.0] * (D - 3)]))
    assert z[0, :3].tolist() == [0.0, pytest.approx(0.6), 0.0]


@pytest.mark.parametrize("kind", ["autoencoder", "jumprelu_sae"])
def test_config_round_trip(kind, pair):
    base, source = pair
    iv = make(kind, interchange_dim=5, subspace_partition=[[0, 5], [5, 9, 30]], preserve_error=True)
    spec = json.loads(json.dumps(iv.spec()))
    again = build_intervention(spec)
    again.load_state_dict(iv.state_dict())
    assert again.config == iv.config
    assert_identical(again(base, source), iv(base, source))
    torch.testing.assert_close(again(base, source, subspaces=[[1], [0], [0, 1]]),
                               iv(base, source, subspaces=[[1], [0], [0, 1]]), atol=0, rtol=0)


def test_autoencoder_state_dict_uses_pyvene_names():
    keys = set(AutoencoderIntervention(embed_dim=D, latent_dim=M).state_dict())
    assert keys == {"autoencoder.encoder.0.weight", "autoencoder.encoder.0.bias",
                    "autoencoder.decoder.0.weight", "autoencoder.decoder.0.bias"}
    assert set(JumpReLUSAEIntervention(embed_dim=D, latent_dim=M).state_dict()) == set(SAE_WEIGHT_NAMES)


def test_half_precision_and_bad_inputs(pair):
    base, source = pair
    for kind in ("autoencoder", "jumprelu_sae"):
        out = make(kind)(base.bfloat16(), source.bfloat16())
        assert out.dtype == torch.bfloat16 and out.shape == base.shape
    with pytest.raises(ConfigError, match="latent_dim"):
        AutoencoderIntervention(embed_dim=D)
    iv = make("autoencoder")
    with pytest.raises(InterventionError, match="source"):
        iv(base)
    with pytest.raises(InterventionError, match="!="):
        iv(base, source[:1])
    with pytest.raises(InterventionError, match="width"):
        iv(base[..., :8], source[..., :8])
    with pytest.raises(InterventionError, match="outside"):
        iv(base, source, subspaces=[M])
