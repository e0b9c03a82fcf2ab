"""Attribution patching: gradients equal plain autograd through hooks; the estimate tracks exact patching."""

from __future__ import annotations

import torch
from numerics import assert_close

from reftkit.analysis.attribution import attribution_patching, attribution_vs_patching, pearson
from reftkit.analysis.patching import LogitDifference
from reftkit.sites import Site, resolve_site

from .reference import _get, record
import pytest

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path


def test_estimate_equals_hand_computed_gradient(tiny_model):
    model, _ = tiny_model("gpt2")
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 260, (2, 5), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(3, 260, (2,), generator=g)
    sites = [f"L{l}.{c}" for l in range(4) for c in ("block_output", "mlp_output")]
    clean_acts, _ = record(model, clean, sites)
    seen, handles = {}, []
    for name in sites:
        rs = resolve_site(model, Site.parse(name))

        def keep(mod, a, o, name=name, rs=rs):
            x = _get(o, rs.index)
            x.retain_grad()
            seen[name] = x

        handles.append(rs.module.register_forward_hook(keep))
    logits = model(input_ids=corrupted).logits[:, -1]
    for h in handles:
        h.remove()
    (logits[0, 5] - logits[0, 7] + logits[1, 6] - logits[1, 8]).backward()
    model.zero_grad(set_to_none=True)
    result = attribution_patching(model, clean, corrupted, LogitDifference([5, 6], [7, 8]),
                                  components=("block_output", "mlp_output"))
    for ci, c in enumerate(("block_output", "mlp_output")):
        for l in range(4):
            x = seen[f"L{l}.{c}"]
            want = ((clean_acts[f"L{l}.{c}"] - x.detach()) * x.grad).sum(-1)
            assert_close(result.delta()[:, ci, l], want)
    assert all(p.grad is None for p in model.parameters())  # only the probes' gradients were taken


def test_attribution_correlates_with_exact_patching(tiny_llama):
    model, _ = tiny_llama
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(3, 260, (3, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(3, 260, (3,), generator=g)
    comparison = attribution_vs_patching(model, clean, corrupted, LogitDifference([5, 6, 9], [7, 8, 10]),
                                         components=("block_output", "attention_output", "mlp_output"))
    assert comparison.exact.effects.shape == comparison.attribution.effects.shape == (3, 3, 4, 7)
    assert comparison.pearson > 0.9
    assert all(r > 0.9 for r in comparison.pearson_per_component.values())
    # sites before the corrupted token have no clean/corrupted difference: both say zero
    assert float(comparison.attribution.delta()[..., :2].abs().max()) < 1e-6
    assert abs(pearson(torch.arange(5.0), 2 * torch.arange(5.0) + 1) - 1) < 1e-12
