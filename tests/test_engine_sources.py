"""Engine: sources -> base (several sources, grouping, early stop, weight tying, cross-site, precomputed, serial
chains) and per-example routing with `active`."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close
from engine_util import main_output, plain, token_ids

from reftkit.engine import Binding, IntervenableModel
from reftkit.interventions import build_intervention
from reftkit.interventions.basic import AddIntervention, CollectIntervention, ReplaceIntervention

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path


def _collect(model, site, ids, positions="all"):
    with IntervenableModel(model, Binding(site, CollectIntervention())) as im, torch.no_grad():
        return im.run({"input_ids": ids}, positions=positions).collected[im.bindings[0].name]


class _Counter:
    """Counts forwards of a module via a hook of our own."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.n += 1


def test_several_sources_and_grouped_bindings(tiny_llama):
    model = tiny_llama[0]
    base_ids, s0, s1 = token_ids(seed=0), token_ids(seed=1), token_ids(seed=2)
    bindings = [Binding("L1.block_output", ReplaceIntervention(), name="a", source=0, positions="l1"),
                Binding("L2.block_output", ReplaceIntervention(), name="b", source=0, positions="f1"),
                Binding("L2.mlp_output", ReplaceIntervention(), name="c", source=1, positions="l2"),
                Binding("L1.block_output", CollectIntervention(), name="seen_a", positions="l1"),
                Binding("L2.block_output", CollectIntervention(), name="seen_b", positions="f1"),
                Binding("L2.mlp_output", CollectIntervention(), name="seen_c", positions="l2")]
    layers = [_Counter(model.model.layers[i]) for i in range(4)]
    try:
        with IntervenableModel(model, bindings) as im, torch.no_grad():
            res = im.run({"input_ids": base_ids}, sources=[{"input_ids": s0}, {"input_ids": s1}])
    finally:
        for c in layers:
            c.handle.remove()
    # one run per source, stopped after the last needed site (layer 2), and one base run
    assert [c.n for c in layers] == [3, 3, 3, 1]
    assert torch.equal(res.collected["seen_a"], _collect(model, "L1.block_output", s0, "l1"))
    assert torch.equal(res.collected["seen_c"], _collect(model, "L2.mlp_output", s1, "l2"))
    # b's source vectors come from the unpatched source run, but the base at L2 already carries a's patch
    assert torch.equal(res.collected["seen_b"], _collect(model, "L2.block_output", s0, "f1"))


def test_full_interchange_gives_the_source_output(tiny_llama):
    model = tiny_llama[0]
    base_ids, src = token_ids(seed=0), token_ids(seed=5)
    with IntervenableModel(model, Binding("L0.block_input", ReplaceIntervention())) as im, torch.no_grad():
        out = main_output(im(input_ids=base_ids, sources=[{"input_ids": src}]))
    assert torch.equal(out, plain(model, input_ids=src))


def test_cross_site_and_precomputed_sources(tiny_llama):
    model = tiny_llama[0]
    base_ids, src = token_ids(seed=0), token_ids(seed=3)
    binding = Binding("L2.block_output", ReplaceIntervention(), name="x", positions="l1",
                      source_site="L0.block_output", source_positions="f1")
    probe = Binding("L2.block_output", CollectIntervention(), name="probe", positions="l1")
    with IntervenableModel(model, [binding, probe]) as im, torch.no_grad():
        res = im.run({"input_ids": base_ids}, sources=[{"input_ids": src}])
        source_vectors = _collect(model, "L0.block_output", src, "f1")
        assert torch.equal(res.collected["probe"], source_vectors)
        pre = im.run({"input_ids": base_ids}, source_representations={"x": source_vectors})
    assert torch.equal(main_output(pre.output), main_output(res.output))
    # per-call source positions override the binding's
    with IntervenableModel(model, [binding, probe]) as im, torch.no_grad():
        res = im.run({"input_ids": base_ids}, sources=[{"input_ids": src}], source_positions={"x": [[2], [4]]})
    whole = _collect(model, "L0.block_output", src)
    assert torch.equal(res.collected["probe"][:, 0], whole[[0, 1], [2, 4]])


def test_linked_intervention_counts_parameters_once_and_accumulates_gradients(tiny_llama):
    model = tiny_llama[0]
    ids = token_ids()

    def loreft(seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build_intervention({"type": "loreft", "config": {"embed_dim": 64, "low_rank_dimension": 4}})

    shared = loreft(0)
    im = IntervenableModel(model, [Binding("L1.block_output", shared), Binding("L2.block_output", shared)],
                           default_positions="f1+l1")
    assert len(im.interventions) == 1
    n = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in im.interventions.parameters()) == n
    main_output(im(input_ids=ids)).sum().backward()
    im.remove()
    # the same with two separate copies: the tied gradient is their sum
    a, b = loreft(0), loreft(0)
    with IntervenableModel(model, [Binding("L1.block_output", a), Binding("L2.block_output", b)],
                           default_positions="f1+l1") as im2:
        main_output(im2(input_ids=ids)).sum().backward()
    for ps, pa, pb in zip(shared.parameters(), a.parameters(), b.parameters()):
        assert_close(ps.grad, pa.grad + pb.grad)
    model.zero_grad(set_to_none=True)


def test_serial_chain_patches_source_into_source_then_base(tiny_llama):
    model = tiny_llama[0]
    base_ids, s0, s1 = token_ids(seed=0), token_ids(seed=1), token_ids(seed=2)
    first = Binding("L1.block_output", ReplaceIntervention(), name="s0->s1", source=0, positions="l1")
    second = Binding("L3.block_output", ReplaceIntervention(), name="s1->base", source=1, positions="l1")
    probe1 = Binding("L1.block_output", CollectIntervention(), name="probe1", positions="l1")
    probe3 = Binding("L3.block_output", CollectIntervention(), name="probe3", positions="l1")
    with IntervenableModel(model, [first, second, probe1, probe3]) as im, torch.no_grad():
        res = im.run({"input_ids": base_ids}, sources=[{"input_ids": s0}, {"input_ids": s1}], serial=True)
    # expected by hand: s1 patched at L1 with s0's vectors, then its L3 vectors patch the base
    v0 = _collect(model, "L1.block_output", s0, "l1")
    chain = [Binding("L1.block_output", ReplaceIntervention(), name="p", positions="l1"),
             Binding("L3.block_output", CollectIntervention(), name="c", positions="l1")]
    with IntervenableModel(model, chain) as im, torch.no_grad():
        v1 = im.run({"input_ids": s1}, source_representations={"p": v0}).collected["c"]
    assert torch.equal(res.collected["probe3"], v1)
    # the first link does not touch the base
    assert torch.equal(res.collected["probe1"], _collect(model, "L1.block_output", base_ids, "l1"))
    assert not torch.equal(v1, _collect(model, "L3.block_output", s1, "l1"))


@pytest.mark.parametrize("form", ["dict", "tensor"])
def test_active_routes_bindings_per_example(tiny_llama, form):
    model = tiny_llama[0]
    ids = token_ids(3, 6)
    adds = [AddIntervention(vector=torch.linspace(-1, 1, 64)), AddIntervention(vector=torch.linspace(1, -2, 64))]
    bindings = [Binding("L1.block_output", adds[0], name="A"), Binding("L2.mlp_output", adds[1], name="B")]
    table = torch.tensor([[True, False], [False, False], [True, True]])
    active = {"A": table[:, 0], "B": table[:, 1]} if form == "dict" else table
    base = plain(model, input_ids=ids)
    with IntervenableModel(model, bindings, default_positions="f1+l2") as im, torch.no_grad():
        mixed = main_output(im(input_ids=ids, active=active))
        assert torch.equal(mixed[1], base[1])  # no binding active: exactly the plain model
        everything = main_output(im(input_ids=ids))
        assert torch.equal(mixed[2], everything[2])
    for row in range(3):
        on = [b for b, flag in zip(bindings, table[row]) if flag]
        if not on:
            continue
        with IntervenableModel(model, on, default_positions="f1+l2") as im, torch.no_grad():
            alone = main_output(im(input_ids=ids[row: row + 1]))
        assert_close(mixed[row: row + 1], alone)
