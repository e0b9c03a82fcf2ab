"""Parity of the basic interventions with pyvene 0.1.8 on golden fixtures (tools/make_pyvene_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from numerics import assert_close
from safetensors.torch import load_file

from reftkit.interventions import build_intervention
from reftkit.interventions.basic import AddIntervention, SubtractIntervention

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pyvene"
NAMES = ["replace", "add", "subtract", "zero", "collect", "skip", "add_vector", "subtract_vector"]


def load_fixture(name):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return meta, load_file(str(FIXTURES / f"{name}.safetensors"))


def cases():
    for name in NAMES:
        meta, _ = load_fixture(name)
        for case in meta["cases"]:
            yield pytest.param(name, case["name"], id=f"{name}-{case['name']}")


def build(meta, tensors, case):
    config = {**meta["reftkit_config"], **case["reftkit"]["config"]}
    if "vector" in tensors:
        cls = {"add": AddIntervention, "subtract": SubtractIntervention}[meta["reftkit_type"]]
        return cls(vector=tensors["vector"], **config)
    return build_intervention({"type": meta["reftkit_type"], "config": config})


def run(iv, base, source, subspaces):
    """Rectangular subspaces go in as one LongTensor; ragged per-example ones run example by example."""
    if subspaces is None:
        return iv(base, source)
    if len({len(row) for row in subspaces}) == 1:
        return iv(base, source, subspaces=torch.tensor(subspaces))
    return torch.cat([
        iv(base[i:i + 1], None if source is None else source[i:i + 1], subspaces=torch.tensor(row))
        for i, row in enumerate(subspaces)
    ])


@pytest.mark.parametrize("name,case_name", list(cases()))
def test_basic_matches_pyvene(name, case_name):
    meta, t = load_fixture(name)
    case = next(c for c in meta["cases"] if c["name"] == case_name)
    iv = build(meta, t, case)
    source = None if meta["constant_source"] else t["source"]
    base = t["base"].clone()
    out = run(iv, base, source, case["reftkit"]["subspaces"])
    assert_close(out, t[f"out.{case_name}"])
    assert torch.equal(base, t["base"]), "interventions must not modify their inputs"


def test_fixtures_are_small_and_complete():
    for name in NAMES:
        assert (FIXTURES / f"{name}.safetensors").stat().st_size < 16_000
        meta, t = load_fixture(name)
        assert meta["pyvene_version"] == "0.1.8"
        assert t["base"].shape == (3, 4, 16) and t["source"].shape == (3, 4, 16)
        assert all(f"out.{c['name']}" in t for c in meta["cases"])
