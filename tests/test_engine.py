"""Engine: hooks installed once and removed exactly, identities, gradient checkpointing, no device syncs in the
hooks, and typed errors on bad input."""

from __future__ import annotations

import sys

import pytest
import torch
from numerics import assert_close, assert_identical
from torch import nn
from torch.nn.utils import parametrize
from engine_util import main_output, plain, token_ids

from reftkit.engine import Binding, IntervenableModel
from reftkit.errors import InterventionError, PositionError, ReftkitError, SourceError
from reftkit.interventions import build_intervention
from reftkit.interventions.basic import (AddIntervention, CallableIntervention, CollectIntervention,
                                         ReplaceIntervention, ScaleIntervention)
from reftkit.models import build_tiny_model
from reftkit.sites import resolve_site

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path


def _hook_counts(model) -> dict:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks}


def test_hooks_are_installed_once_and_removed_exactly(tiny_llama):
    model = tiny_llama[0]
    before = _hook_counts(model)
    bindings = [Binding("L1.block_output", ScaleIntervention(factor=2.0)),
                Binding("L1.block_output", CollectIntervention()),  # same module: shares the hook
                Binding("L2.H0.head_query_output", ScaleIntervention(factor=0.5)),
                Binding("L2.H1.head_query_output", CollectIntervention()),  # same q_proj
                Binding("L0.mlp_input", CollectIntervention())]  # a pre-hook
    ids = token_ids()
    base = plain(model, input_ids=ids)
    im = IntervenableModel(model, bindings)
    assert len(im.hook_handles) == 3  # one per hooked module
    installed = _hook_counts(model)
    added = {k: (v[0] - before.get(k, (0, 0))[0], v[1] - before.get(k, (0, 0))[1]) for k, v in installed.items()}
    assert {k: v for k, v in added.items() if v != (0, 0)} == {
        "model.layers.1": (1, 0), "model.layers.2.self_attn.q_proj": (1, 0), "model.layers.0.mlp": (0, 1)}
    for _ in range(3):
        with torch.no_grad():
            im(input_ids=ids)
    assert _hook_counts(model) == installed  # calls add nothing
    im.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert _hook_counts(model) == installed  # generation's step tracker lives only while generate() runs
    assert torch.equal(plain(model, input_ids=ids), base)  # between calls the hooks pass through
    im.remove()
    assert _hook_counts(model) == before
    assert torch.equal(plain(model, input_ids=ids), base)
    with IntervenableModel(model, bindings) as im2:
        assert not torch.equal(main_output(im2(input_ids=ids)), base)
    assert _hook_counts(model) == before


def test_other_hooks_are_never_touched_and_still_fire(tiny_llama):
    model = tiny_llama[0]
    block = model.model.layers[1]
    seen = []
    mine_before = block.register_forward_hook(lambda m, a, o: seen.append(("before", o.clone())))
    ids = token_ids()
    base = plain(model, input_ids=ids)
    im = IntervenableModel(model, Binding("L1.block_output", ScaleIntervention(factor=3.0)), default_positions="l1")
    mine_after = block.register_forward_hook(lambda m, a, o: seen.append(("after", o.clone())))
    pre = block.register_forward_pre_hook(lambda m, a: seen.append(("pre", None)))
    seen.clear()
    try:
        with torch.no_grad():
            im(input_ids=ids)
        assert [s[0] for s in seen] == ["pre", "before", "after"]
        before, after = seen[1][1], seen[2][1]
        assert torch.equal(after[:, -1], 3 * before[:, -1]) and torch.equal(after[:, :-1], before[:, :-1])
        im.remove()
        seen.clear()
        assert torch.equal(plain(model, input_ids=ids), base)
        assert [s[0] for s in seen] == ["pre", "before", "after"]  # still registered, still firing
    finally:
        for h in (mine_before, mine_after, pre):
            h.remove()


@pytest.mark.parametrize("site", ["L1.block_output", "L2.attention_output", "L0.mlp_activation",
                                  "L3.H1.head_value_output", "embedding", "L1.block_input"])
def test_identities_give_the_base_output_bit_for_bit(tiny_llama, site):
    model = tiny_llama[0]
    ids = token_ids()
    base = plain(model, input_ids=ids)
    width = IntervenableModel(model, Binding(site, CollectIntervention())).resolved[0].width
    identities = [ScaleIntervention(factor=1.0), AddIntervention(vector=torch.zeros(width)), ReplaceIntervention()]
    for iv in identities:
        with IntervenableModel(model, Binding(site, iv)) as im, torch.no_grad():
            kwargs = {"sources": [{"input_ids": ids}]} if iv.source == "required" else {}
            for positions in ("all", "f2+l1", [[0, 5], [3, -1]]):
                assert torch.equal(main_output(im(input_ids=ids, positions=positions, **kwargs)), base), (iv, positions)
    with IntervenableModel(model, Binding(site, CollectIntervention())) as im, torch.no_grad():
        res = im.run({"input_ids": ids}, positions="f1+l1")
    assert torch.equal(main_output(res.output), base)
    assert res.collected[im.bindings[0].name].shape == (2, 2, width)
    assert torch.equal(plain(model, input_ids=ids), base)


def _loreft(seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_intervention({"type": "loreft", "config": {"embed_dim": 64, "low_rank_dimension": 4}})


def _grads(reentrant: bool | None):
    model = build_tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
    model.train()
    vector = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 64))
    add = AddIntervention(vector=vector.detach())
    add.vector.requires_grad_(True)
    ivs = [_loreft(1), _loreft(2), add]
    im = IntervenableModel(model, [Binding("L1.attention_output", ivs[0]),  # inside the checkpointed forward
                                   Binding("L2.block_output", ivs[1]),  # block hooks run outside it
                                   Binding("L0.mlp_output", ivs[2], positions="f1"),
                                   Binding("L2.mlp_output", CollectIntervention())], default_positions="f1+l1")
    ids = token_ids(2, 7)
    res = im.run({"input_ids": ids, "labels": ids})
    res.output.loss.backward()
    grads = [p.grad.clone() for iv in ivs for p in iv.parameters() if p.requires_grad]
    return res.output.loss.detach(), grads, res.collected["L2.mlp_output"].detach()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gradient_checkpointing_gives_the_same_gradients():
    loss, grads, collected = _grads(None)
    assert all(g.abs().sum() > 0 for g in grads)
    for reentrant in (True, False):
        l2, g2, c2 = _grads(reentrant)
        assert torch.equal(l2, loss)
        assert torch.equal(c2, collected)  # recomputation collects nothing twice
        for a, b in zip(g2, grads):
            assert_close(a, b)


def test_hooks_never_read_values_back_from_the_device(tiny_llama, monkeypatch):
    """Only shapes are checked inside hooks: no bool()/item()/int()/tolist() on tensors from engine hook code."""
    model = tiny_llama[0]
    calls = []
    hook_functions = {"hook", "_apply", "_edit", "_gather", "_step_hook"}

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, **k):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.endswith("reftkit/engine.py") and frame.f_code.co_name in hook_functions:
                calls.append((name, frame.f_code.co_name, frame.f_lineno))
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)

    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    im = IntervenableModel(model, [Binding("L1.block_output", _loreft(0), positions="f1+l1"),
                                   Binding("L2.H0.head_key_output", ScaleIntervention(factor=0.5)),
                                   Binding("L0.block_output", ReplaceIntervention(), positions="l1"),
                                   Binding("L3.mlp_output", CollectIntervention())])
    for name in ("__bool__", "item", "__int__", "__index__", "tolist", "__float__"):
        spy(name)
    with im, torch.no_grad():
        im(input_ids=ids, attention_mask=mask, sources=[{"input_ids": ids}], active={"L1.block_output": [True, False]})
    assert calls == []


def test_bad_input_raises_typed_errors_naming_the_site(tiny_llama):
    model = tiny_llama[0]
    ids = token_ids()
    loreft32 = build_intervention({"type": "loreft", "config": {"embed_dim": 32, "low_rank_dimension": 4}})
    with pytest.raises(InterventionError, match=r"'L1.block_output'.*expects width 32 but site .* has width 64"):
        IntervenableModel(model, Binding("L1.block_output", loreft32))
    with pytest.raises(InterventionError, match="expected Binding"):
        IntervenableModel(model, [Binding("L1.block_output", lambda h: h)])
    with IntervenableModel(model, Binding("L1.block_output", ScaleIntervention(factor=2.0))) as im:
        with pytest.raises(PositionError, match=r"must lie in 0..5"):
            im(input_ids=ids, positions=[[7], [0]])
        with pytest.raises(PositionError, match="batch=2"):
            im(input_ids=ids, positions=[[1]] * 3)
        with pytest.raises(PositionError, match="no binding named 'L9.block_output'"):
            im(input_ids=ids, positions={"L9.block_output": "l1"})
        with pytest.raises(ReftkitError, match=r"active mask for L1.block_output must be a bool tensor \[2\]"):
            im(input_ids=ids, active={"L1.block_output": [True, False, True]})
        with pytest.raises(ReftkitError, match=r"bool tensor \[batch=2, bindings=1\]"):
            im(input_ids=ids, active=torch.ones(2, 3, dtype=torch.bool))
        with pytest.raises(PositionError, match="mask has shape"):
            im(input_ids=ids, attention_mask=torch.ones(2, 4))
    double = torch.nn.Linear(64, 64).double()
    with IntervenableModel(model, Binding("L2.mlp_output", CallableIntervention(lambda b, s: double(b)))) as im:
        with pytest.raises(InterventionError, match=r"callable at L2.mlp_output failed on vectors \(2, 6, 64\)"):
            im(input_ids=ids)
    with IntervenableModel(model, Binding("L2.mlp_output", CallableIntervention(lambda b, s: b[..., :3]))) as im:
        with pytest.raises(InterventionError, match=r"expected a tensor of shape \(2, 6, 64\)"):
            im(input_ids=ids)
    on_meta = AddIntervention(vector=torch.ones(64)).to("meta")
    with IntervenableModel(model, Binding("L1.block_output", on_meta)) as im:
        with pytest.raises(InterventionError, match="add at L1.block_output lives on meta.*activations are on cpu"):
            im(input_ids=ids)
    with IntervenableModel(model, Binding("L1.block_output", ReplaceIntervention(), positions="l1")) as im:
        with pytest.raises(SourceError, match="replace at L1.block_output needs a source"):
            im(input_ids=ids)
        with pytest.raises(SourceError, match=r"read source 0, but only 0 source"):
            im(input_ids=ids, sources=[])
        with pytest.raises(SourceError, match="source 0 has batch 3 but the base has batch 2"):
            im(input_ids=ids, sources=[{"input_ids": token_ids(3, 6)}])
        with pytest.raises(InterventionError, match=r"replace at L1.block_output: source vectors \(2, 2, 64\)"):
            im(input_ids=ids, source_representations={"L1.block_output": torch.zeros(2, 2, 64)})
    assert torch.equal(plain(model, input_ids=ids), plain(model, input_ids=ids))


def test_parametrized_weights_carried_over_only_while_unchanged(tiny_llama):
    """Gradient-free calls reuse a LoReFT rotation computed by the previous call only while its tensors are
    unchanged: optimizer steps, load_state_dict and set_rotation all invalidate it."""
    model = tiny_llama[0]
    ids = token_ids()
    iv = _loreft(0)
    im = IntervenableModel(model, Binding("L1.block_output", iv), default_positions="f1+l1")

    def fresh():  # a new engine computes everything from scratch
        with IntervenableModel(model, Binding("L1.block_output", iv), default_positions="f1+l1") as other:
            with torch.no_grad():
                return main_output(other(input_ids=ids))

    with im:
        with torch.no_grad():
            first = main_output(im(input_ids=ids))
            assert torch.equal(main_output(im(input_ids=ids)), first)
        opt = torch.optim.SGD(iv.parameters(), lr=0.5)
        main_output(im(input_ids=ids)).sum().backward()
        opt.step()
        with torch.no_grad():
            stepped = main_output(im(input_ids=ids))
        assert not torch.equal(stepped, first) and torch.equal(stepped, fresh())
        iv.load_state_dict(_loreft(5).state_dict())
        with torch.no_grad():
            loaded = main_output(im(input_ids=ids))
        assert not torch.equal(loaded, stepped) and torch.equal(loaded, fresh())
        iv.set_rotation(_loreft(6).rotation.detach())
        with torch.no_grad():
            rotated = main_output(im(input_ids=ids))
        assert not torch.equal(rotated, loaded) and torch.equal(rotated, fresh())
        original = iv.rotate_layer.parametrizations.weight.original
        original.data[1:, 0] += 0.1  # invisible to autograd's version counter: refresh() is needed
        im.refresh()
        with torch.no_grad():
            assert torch.equal(main_output(im(input_ids=ids)), fresh())


def test_inference_mode_then_gradients(tiny_llama):
    """Index tensors and weights made under inference_mode never leak into a later call that records autograd."""
    model = tiny_llama[0]
    ids = token_ids()
    iv = _loreft(3)
    with IntervenableModel(model, Binding("L1.block_output", iv), default_positions="f1+l1") as im:
        with torch.inference_mode():
            first = main_output(im(input_ids=ids))
        with torch.no_grad():
            assert torch.equal(main_output(im(input_ids=ids)), first)
        out = main_output(im(input_ids=ids))
        out.sum().backward()
    assert torch.equal(out.detach(), first) and iv.learned_source.weight.grad.abs().sum() > 0


def test_without_torchs_private_cache_every_call_computes_its_rotation_once_with_identical_results(
        tiny_llama, monkeypatch):
    """Reuse across gradient-free calls reads torch's private `parametrize._cache`. Where a torch release moves it,
    the engine falls back to public `parametrize.cached()`: the same outputs, bit for bit, and each rotation is
    still computed once per forward (never per binding, position or layer that shares it)."""
    import types

    import reftkit.calls as calls

    model = tiny_llama[0]
    ids = token_ids()
    iv = _loreft(0)
    computed = []
    iv.rotate_layer.parametrizations.weight[0].register_forward_hook(lambda *a: computed.append(1))
    bindings = [Binding("L1.block_output", iv), Binding("L2.block_output", iv)]  # one rotation, two sites

    def outputs():
        computed.clear()
        with IntervenableModel(model, bindings, default_positions="f2+l2") as im, torch.no_grad():
            return [main_output(im(input_ids=ids)) for _ in range(4)], len(computed)

    reused, reused_count = outputs()
    public_only = types.SimpleNamespace(is_parametrized=parametrize.is_parametrized)  # no `_cache` attribute
    monkeypatch.setattr(calls, "parametrize", public_only)
    fallback, fallback_count = outputs()
    assert reused_count == 1  # computed by the first call, reused by the next three
    assert fallback_count == 4  # once per forward
    for a, b in zip(fallback, reused):
        assert_identical(a, b)


def test_a_raw_module_without_a_declared_width_is_checked_at_its_first_activation():
    """A module site whose module declares no width (an activation, a custom block) on a model without a config:
    the width is not guessed; the intervention is checked against the first vectors it sees."""
    class Act(nn.Module):
        def forward(self, x):
            return torch.tanh(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(8, 24), Act(), nn.Linear(24, 8)

        def forward(self, input_ids=None, attention_mask=None):
            return self.down(self.act(self.up(input_ids)))

    torch.manual_seed(0)
    net = Net()
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    assert resolve_site(net, "module:act").width is None
    assert resolve_site(net, "module:up").width == 24
    fits = build_intervention({"type": "loreft", "config": {"embed_dim": 24, "low_rank_dimension": 2}})
    with IntervenableModel(net, Binding("module:act", fits), default_positions="l1") as im:
        with torch.no_grad():
            edited = im(input_ids=x, attention_mask=mask)
    assert edited.shape == (2, 5, 8) and not torch.equal(edited, net(x))
    wrong = build_intervention({"type": "loreft", "config": {"embed_dim": 16, "low_rank_dimension": 2}})
    with IntervenableModel(net, Binding("module:act", wrong), default_positions="l1") as im:
        with pytest.raises(InterventionError, match="expects vectors of width 16, got 24"):
            im(input_ids=x, attention_mask=mask)
