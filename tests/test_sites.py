"""Sites: every canonical component on every tiny family resolves, addresses the right vectors, and an edit
there changes exactly the positions it should; wrappers (PEFT, subclasses, torch.compile) resolve too."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close
from engine_util import ENCODERS, FAMILIES, main_output, plain, token_ids

from reftkit import archs
from reftkit.engine import Binding, IntervenableModel
from reftkit.errors import SiteError
from reftkit.interventions.basic import AddIntervention, CollectIntervention, ScaleIntervention, ZeroIntervention
from reftkit.models import build_tiny_model
from reftkit.sites import Site, model_dims, resolve_site

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

COMPONENTS = [c for c in archs.CANONICAL_COMPONENTS]
MOE_FAMILIES = {"qwen3-moe", "olmoe"}
# In an encoder's last layer, an edit at position p reaches other positions only through keys and values.
ENCODER_SPREADS = {"embedding", "block_input", "attention_input", "key_output", "value_output", "head_key_output",
                   "head_value_output"}


def _available(family: str, component: str) -> bool:
    if component.startswith("moe_"):
        return family in MOE_FAMILIES
    if component == "mlp_activation":
        return family not in MOE_FAMILIES  # sparse blocks have no single down projection
    return True


def _site(model, family: str, component: str) -> Site:
    dims = model_dims(model)
    layer = dims.n_layers - 1 if family in ENCODERS else 1
    if component == "embedding":
        return Site(component="embedding")
    head = None
    if component in archs.HEAD_COMPONENTS:
        kv = archs.HEAD_COMPONENTS[component] in ("key_output", "value_output")
        head = (dims.n_kv_heads if kv else dims.n_heads) - 1
    return Site(layer=layer, component=component, head=head)


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_component_edit_changes_expected_positions(tiny_model, family, component):
    model = tiny_model(family)[0]
    site = _site(model, family, component)
    if not _available(family, component):
        with pytest.raises(SiteError, match="valid"):
            resolve_site(model, site)
        return
    ids = token_ids()
    base = _base_output(model, family, ids)
    rs = resolve_site(model, site)

    p = 3
    identity = [Binding(site, CollectIntervention(), name="seen", positions="f1+l2"),
                Binding(site, ScaleIntervention(factor=1.0), positions="all")]
    with IntervenableModel(model, identity) as im, torch.no_grad():
        res = im.run({"input_ids": ids})
        assert torch.equal(main_output(res.output), base)  # scale 1 is bit-identical
        assert res.collected["seen"].shape == (2, 3, rs.width)
    with IntervenableModel(model, Binding(site, ZeroIntervention(), positions=[p])) as im, torch.no_grad():
        out = main_output(im(input_ids=ids))
    # sparse MoE blocks batch tokens per expert, so rows that route differently round differently (~1e-7)
    tolerance = 1e-5 if family in MOE_FAMILIES else 0.0
    changed = ((out - base).abs() > tolerance).flatten(2).any(-1)  # [batch, seq]
    assert changed[:, p].all(), f"{site.name}: the edited position did not change"
    if family in ENCODERS:
        if component not in ENCODER_SPREADS:
            others = torch.ones(ids.shape[1], dtype=torch.bool)
            others[p] = False
            assert not changed[:, others].any(), f"{site.name}: positions other than {p} changed"
    else:
        assert not changed[:, :p].any(), f"{site.name}: positions before {p} changed in a causal model"
    assert torch.equal(plain(model, input_ids=ids), base)  # hooks removed


_BASE: dict = {}


def _base_output(model, family, ids):
    if family not in _BASE:
        _BASE[family] = plain(model, input_ids=ids)
    return _BASE[family]


def _heads_view(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], n, -1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt-neox", "bert", "qwen3"])
def test_head_sites_match_the_models_own_split(tiny_model, family):
    """Collect each head's query/key/value and attention value output and compare with the model's own split of
    the whole projection (GQA for llama/qwen3, fused [q|k|v] for gpt2, per-head fused qkv for gpt-neox)."""
    model = tiny_model(family)[0]
    dims = model_dims(model)
    layer = 1
    ids = token_ids()
    bindings = []
    for comp, n in [("head_query_output", dims.n_heads), ("head_key_output", dims.n_kv_heads),
                    ("head_value_output", dims.n_kv_heads), ("head_attention_value_output", dims.n_heads)]:
        for h in range(n):
            bindings.append(Binding(Site(layer=layer, component=comp, head=h), CollectIntervention()))
    components = ["attention_value_output"]
    if family != "gpt-neox":
        components += ["query_output", "key_output", "value_output"]
    whole = {c: Binding(Site(layer=layer, component=c), CollectIntervention()) for c in components}
    raw_path = {"gpt2": "transformer.h.1.attn.c_attn", "gpt-neox": "gpt_neox.layers.1.attention.query_key_value"}
    if family in raw_path:
        whole["fused"] = Binding(Site(module=raw_path[family], side="output"), CollectIntervention())
    with IntervenableModel(model, bindings + list(whole.values())) as im:
        got = im.run({"input_ids": ids}, positions="all").collected
    if family == "gpt2":
        q, k, v = got[f"module:{raw_path[family]}:output"].split(dims.hidden, dim=-1)
    elif family == "gpt-neox":
        q, k, v = _heads_view(got[f"module:{raw_path[family]}:output"], dims.n_heads).chunk(3, dim=-1)
        for name, t in (("query_output", q), ("key_output", k), ("value_output", v)):
            with IntervenableModel(model, Binding(Site(layer=layer, component=name), CollectIntervention())) as im:
                full = im.run({"input_ids": ids}, positions="all").collected[f"L1.{name}"]
            assert torch.equal(_heads_view(full, dims.n_heads), t)
        q, k, v = (t.flatten(2) for t in (q, k, v))
    else:
        q, k, v = (got[f"L1.{c}"] for c in ("query_output", "key_output", "value_output"))
    for comp, t, n in [("head_query_output", q, dims.n_heads), ("head_key_output", k, dims.n_kv_heads),
                       ("head_value_output", v, dims.n_kv_heads),
                       ("head_attention_value_output", got["L1.attention_value_output"], dims.n_heads)]:
        for h in range(n):
            assert torch.equal(got[f"L1.H{h}.{comp}"], _heads_view(t, n)[:, :, h]), (comp, h)


def test_raw_module_sites_read_the_modules_input_and_output(tiny_llama):
    model = tiny_llama[0]
    seen = {}
    mod = model.model.layers[1].mlp.down_proj
    handle = mod.register_forward_hook(lambda m, a, o: seen.update(inp=a[0], out=o))
    ids = token_ids()
    sites = ["module:model.layers.1.mlp.down_proj:input", Site(module="model.layers.1.mlp.down_proj", side="output")]
    try:
        with IntervenableModel(model, [Binding(s, CollectIntervention()) for s in sites]) as im:
            got = im.run({"input_ids": ids}, positions="all").collected
    finally:
        handle.remove()
    assert torch.equal(got["module:model.layers.1.mlp.down_proj:input"], seen["inp"])
    assert torch.equal(got["module:model.layers.1.mlp.down_proj:output"], seen["out"])
    assert resolve_site(model, sites[0]).width == 128


def test_moe_sites_are_flat_token_tensors(tiny_model):
    model = tiny_model("qwen3-moe")[0]
    seen = {}
    block = model.model.layers[1].mlp
    handles = [block.gate.register_forward_hook(lambda m, a, o: seen.update(router=o[1])),
               block.experts.register_forward_hook(lambda m, a, o: seen.update(experts=o))]
    ids = token_ids()
    try:
        with IntervenableModel(model, [Binding("L1.moe_router", CollectIntervention()),
                                       Binding("L1.moe_experts_output", CollectIntervention())]) as im:
            got = im.run({"input_ids": ids}, positions="all").collected
    finally:
        for h in handles:
            h.remove()
    B, T = ids.shape
    assert seen["router"].shape == (B * T, 2) and seen["experts"].shape == (B * T, 64)
    assert torch.equal(got["L1.moe_router"], seen["router"].reshape(B, T, -1))
    assert torch.equal(got["L1.moe_experts_output"], seen["experts"].reshape(B, T, -1))


@pytest.mark.parametrize("text, expected", [
    ("L3.block_output", Site(layer=3, component="block_output")),
    ("L2.H1.head_query_output", Site(layer=2, component="head_query_output", head=1)),
    ("embedding", Site(component="embedding")),
    ("module:model.layers.0.mlp:input", Site(module="model.layers.0.mlp", side="input")),
    ("module:model.layers.0.mlp", Site(module="model.layers.0.mlp", side="output")),
    ({"layer": 1, "component": "mlp_output"}, Site(layer=1, component="mlp_output")),
])
def test_site_parse_and_round_trip(text, expected):
    site = Site.parse(text)
    assert site == expected
    assert Site.parse(site.name) == site
    assert Site.parse(site.to_dict()) == site


@pytest.mark.parametrize("spec, message", [
    ("L1.block_outptu", "unknown component 'block_outptu'; expected one of embedding, block_input"),
    ("block_output", "cannot parse site"),
    ("L1.H0.block_output", "head index goes with"),
    ("L1.head_query_output", "head index goes with"),
    ({"layer": 1, "component": "block_output", "colour": "red"}, "unknown site fields"),
    ({"layer": "1", "component": "block_output"}, "must be an integer"),
    (3, "cannot use int as a site"),
])
def test_bad_site_specs(spec, message):
    with pytest.raises(SiteError, match=message.replace("(", r"\(")):
        Site.parse(spec)


def test_resolution_errors_list_valid_choices(tiny_model):
    llama = tiny_model("llama")[0]
    with pytest.raises(SiteError, match=r"layer 4 is out of range for L4.block_output; valid layers are 0..3"):
        resolve_site(llama, "L4.block_output")
    with pytest.raises(SiteError, match=r"head 2 is out of range for head_key_output; valid heads are 0..1"):
        resolve_site(llama, "L1.H2.head_key_output")
    with pytest.raises(SiteError, match=r"head 4 is out of range.*0..3"):
        resolve_site(llama, "L1.H4.head_query_output")
    with pytest.raises(SiteError, match="no module at path 'model.layers.9.mlp'"):
        resolve_site(llama, "module:model.layers.9.mlp:output")
    with pytest.raises(SiteError, match=r"side must be 'input' or 'output'"):
        Site(module="model.layers.0.mlp", side="middle")
    with pytest.raises(SiteError, match="moe_router.*valid: block_input, block_output"):
        resolve_site(llama, "L1.moe_router")
    with pytest.raises(SiteError, match="valid:.*moe_router, moe_experts_output"):
        resolve_site(tiny_model("qwen3-moe")[0], "L1.mlp_activation")


def _edits(model):
    return IntervenableModel(model, [Binding("L1.block_output", AddIntervention(vector=torch.linspace(-1, 1, 64))),
                                     Binding("L2.H1.head_key_output", ZeroIntervention()),
                                     Binding("L0.value_output", ScaleIntervention(factor=0.5))],
                             default_positions="l1")


def test_peft_wrapped_model_resolves():
    peft = pytest.importorskip("peft")
    model = build_tiny_model("llama")
    ids = token_ids()
    with _edits(model) as im:
        reference_widths = [rs.width for rs in im.resolved]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                                      init_lora_weights=False))
    base = plain(lora, input_ids=ids)
    with _edits(lora) as im:
        assert [rs.width for rs in im.resolved] == reference_widths == [64, 16, 32]
        assert type(im.resolved[2].module).__name__ == "Linear" and hasattr(im.resolved[2].module, "lora_A")
        out = main_output(im(input_ids=ids))
    changed = (out != base).any(-1)
    assert changed[:, -1].all() and not changed[:, :-1].any()
    with IntervenableModel(lora, Binding("L1.key_output", ScaleIntervention(factor=1.0))) as im:
        assert torch.equal(main_output(im(input_ids=ids)), base)


def test_subclass_of_a_model_class_resolves():
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    reference = build_tiny_model("llama")
    model = MyLlama(reference.config).eval()
    model.load_state_dict(reference.state_dict())
    ids = token_ids()
    with _edits(reference) as im:
        expected = main_output(im(input_ids=ids))
    with _edits(model) as im:
        assert torch.equal(main_output(im(input_ids=ids)), expected)


def test_compiled_model_matches_eager_with_interventions():
    model = build_tiny_model("llama")
    ids = token_ids()
    with _edits(model) as im:
        expected = main_output(im(input_ids=ids))
    base = plain(model, input_ids=ids)
    compiled = torch.compile(model, backend="eager")  # dynamo graph capture, no C++ toolchain needed
    with _edits(compiled) as im:
        assert im.resolved[0].path == "_orig_mod.model.layers.1"
        assert_close(main_output(im(input_ids=ids)), expected)
        assert_close(plain(compiled, input_ids=ids), base)
