"""ReftModel: freezing, modes, identities, padding, tying, named adapters, routing, save/load, pyreft folders,
generation and the Hub upload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from numerics import assert_close
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from reftkit.chat import left_padded
from reftkit.errors import ConfigError, IncompatibleModelError, ReftkitError
from reftkit.models import build_tiny_model
from reftkit.positions import Positions
from reftkit.reft.config import ReftConfig
from reftkit.reft.data import Collator, encode
from reftkit.reft.model import CONFIG_NAME, WEIGHTS_NAME, ReftModel, get_reft_model

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

PYREFT = Path(__file__).resolve().parents[1] / "fixtures" / "pyreft"
PROMPTS = ["hello there", "hi", "a much longer prompt"]


def batch_of(tok, texts=PROMPTS):
    return dict(tok(texts, padding=True, return_tensors="pt"))


def logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


def real_tokens(batch):
    return batch["attention_mask"].bool()


# ---- freezing, parameter counts, modes ------------------------------------------------------------------

def test_get_reft_model_freezes_the_base_and_trains_the_adapter(llama):
    reft = get_reft_model(llama, ReftConfig(layers=[1, 3], rank=4))
    assert not any(p.requires_grad for p in llama.parameters())
    params = list(reft.adapters.parameters())
    assert params and all(p.requires_grad for p in params)
    assert {n for n, p in reft.named_parameters() if p.requires_grad} == \
        {f"adapters.{n}" for n, _ in reft.adapters.named_parameters()}


def test_print_trainable_parameters(llama, capsys):
    reft = get_reft_model(llama, ReftConfig(layers=[1, 3], rank=4))
    base = sum(p.numel() for p in llama.parameters())
    per_site = 64 * 4 + (4 * 64 + 4)  # rotation [d, r] + learned source W [r, d], b [r]
    assert reft.trainable_parameters() == (2 * per_site, base + 2 * per_site)
    line = reft.print_trainable_parameters()
    total = base + 2 * per_site
    expected = f"trainable params: {2 * per_site:,} || all params: {total:,} || trainable%: " \
               f"{100 * 2 * per_site / total:.4f}"
    assert line == expected
    assert capsys.readouterr().out == expected + "\n"


def test_train_and_eval_reach_the_interventions_and_dropout_follows(llama, tok):
    reft = get_reft_model(llama, ReftConfig(layers=[1], rank=4, dropout=0.5))
    iv = reft.adapters["default"][0]
    batch = batch_of(tok)
    reft.train()
    assert iv.training and iv.dropout.training and llama.training
    torch.manual_seed(0)
    a, b = logits(reft, batch), logits(reft, batch)
    assert not torch.equal(a, b)  # dropout on the edit is active
    reft.eval()
    assert not iv.training and not iv.dropout.training and not llama.training
    assert torch.equal(logits(reft, batch), logits(reft, batch))


# ---- identities ------------------------------------------------------------------------------------------

def test_loreft_whose_source_equals_the_projection_is_the_identity(llama, tok):
    batch = batch_of(tok)
    base = logits(llama, batch)
    reft = get_reft_model(llama, ReftConfig(layers="all", rank=4, positions="all"))
    assert (logits(reft, batch) - base)[real_tokens(batch)].abs().max() > 1e-3  # a fresh adapter edits
    with torch.no_grad():
        for iv in reft.adapters["default"]:
            iv.learned_source.weight.copy_(iv.rotation.T)  # W h + b = R h: the edit R^T(Wh + b - Rh) is 0
            iv.learned_source.bias.zero_()
    assert_close(logits(reft, batch), base)  # an edit of zero, up to the rounding of R^T(Rh - Rh)


def test_disabled_adapters_give_the_base_model_bit_for_bit(llama, tok):
    batch = batch_of(tok)
    base = logits(llama, batch)
    reft = get_reft_model(llama, ReftConfig(layers=[0, 2], rank=4))
    with reft.disable_adapter():
        assert torch.equal(logits(reft, batch), base)
    assert not torch.equal(logits(reft, batch), base)
    reft.disable_adapters()
    assert torch.equal(logits(reft, batch), base)
    reft.enable_adapters()
    assert not torch.equal(logits(reft, batch), base)
    assert torch.equal(logits(reft, batch, adapter_names=[None] * 3), base)
    reft.unload()
    assert torch.equal(logits(llama, batch), base)


# ---- positions and padding ---------------------------------------------------------------------------------

def test_left_and_right_padding_give_the_same_logits_at_real_tokens(llama, tok):
    rows = [{"prompt": "a b c d e", "completion": "xy"}, {"prompt": "q", "completion": "z"},
            {"prompt": "long prompt here", "completion": "done and more"}]
    data = encode(tok, rows, "sft", chat=False)
    right = Collator(tok.pad_token_id, "sft", "right")(data)
    left = Collator(tok.pad_token_id, "sft", "left")(data)
    assert not torch.equal(right["input_ids"], left["input_ids"])
    reft = get_reft_model(llama, ReftConfig(layers=[0, 2], rank=4, positions="f2+l2", tied=False))
    strip = lambda b: {k: v for k, v in b.items() if k != "labels"}  # noqa: E731
    lr, ll = logits(reft, strip(right)), logits(reft, strip(left))
    with reft.disable_adapter():
        base = logits(reft, strip(right))
    mr, ml = right["attention_mask"].bool(), left["attention_mask"].bool()
    assert_close(lr[mr], ll[ml])
    assert (lr[mr] - base[mr]).abs().max() > 1e-3


def test_positions_override_a_call(llama, tok):
    batch = batch_of(tok, ["abcdef", "abcdef"])
    reft = get_reft_model(llama, ReftConfig(layers=[1], rank=4, positions="l1"))
    as_saved = logits(reft, batch)
    assert torch.equal(logits(reft, batch, positions=torch.tensor([[6], [6]])), as_saved)  # the last token
    moved = logits(reft, batch, positions=Positions.parse("f1"))
    assert not torch.equal(moved, as_saved)
    with reft.disable_adapter():
        base = logits(reft, batch)
    assert (moved[:, 0] - base[:, 0]).abs().max() > 1e-4  # the first token is edited now
    assert (as_saved[:, :-1] - base[:, :-1]).abs().max() == 0  # before: only the last (causal model)


# ---- tying ----------------------------------------------------------------------------------------------------

def test_untied_first_and_last_get_one_intervention_each(llama, tok):
    tied = get_reft_model(llama, ReftConfig(layers=[1, 3], positions="f1+l1"))
    assert len(tied.adapters["default"]) == 2
    tied.unload()
    untied = ReftModel(llama, ReftConfig(layers=[1, 3], positions="f1+l1", tied=False))
    assert len(untied.adapters["default"]) == 4
    assert untied._engine.binding_names() == ["default/L1.block_output.first", "default/L1.block_output.last",
                                              "default/L3.block_output.first", "default/L3.block_output.last"]
    ivs = untied.adapters["default"]
    assert not torch.equal(ivs[0].learned_source.weight, ivs[1].learned_source.weight)
    # identity on the "last" interventions leaves only the first-position edit
    batch = batch_of(tok, ["abcdef", "ghijkl"])
    with torch.no_grad():
        for iv in ivs[1::2]:
            iv.learned_source.weight.copy_(iv.rotation.T)
            iv.learned_source.bias.zero_()
    first_only = logits(untied, batch)
    with untied.disable_adapter():
        base = logits(untied, batch)
    assert (first_only[:, 0] - base[:, 0]).abs().max() > 1e-4


# ---- named adapters and routing ---------------------------------------------------------------------------------

def test_add_set_disable_delete_adapters(llama, tok):
    batch = batch_of(tok)
    reft = get_reft_model(llama, ReftConfig(layers=[1], rank=4, seed=0))
    reft.add_adapter("other", ReftConfig(layers=[2], rank=2, seed=1), activate=False)
    assert reft.active_adapter == "default" and reft.adapter_names == ["default", "other"]
    out_default = logits(reft, batch)
    reft.set_adapter("other")
    out_other = logits(reft, batch)
    assert not torch.equal(out_default, out_other)
    assert torch.equal(logits(reft, batch, adapter_names="default"), out_default)
    with reft.disable_adapter():
        base = logits(reft, batch)
    assert torch.equal(base, logits(llama, batch))  # the hooks pass through outside a ReftModel call
    reft.delete_adapter("other")
    assert reft.active_adapter == "default" and reft.adapter_names == ["default"]
    assert torch.equal(logits(reft, batch), out_default)
    with pytest.raises(ConfigError, match="no adapter named 'other'"):
        reft.set_adapter("other")
    with pytest.raises(ConfigError, match="exists already"):
        reft.add_adapter("default", ReftConfig())
    with pytest.raises(ConfigError, match="cannot be empty or contain"):
        reft.add_adapter("a/b", ReftConfig())
    reft.delete_adapter("default")
    assert reft.active_adapter is None
    assert torch.equal(logits(reft, batch), base)  # no adapter left: the base model


def test_per_example_adapter_names_equal_separate_runs(llama, tok):
    reft = get_reft_model(llama, ReftConfig(layers=[1, 3], rank=4, seed=0), adapter_name="a")
    reft.add_adapter("b", ReftConfig(layers=[0, 2], rank=4, positions="l2", seed=1))
    batch = batch_of(tok)
    names = ["a", "b", None]
    mixed = logits(reft, batch, adapter_names=names)
    for i, name in enumerate(names):
        one = {k: v[i: i + 1, : int(batch["attention_mask"][i].sum())] for k, v in batch.items()}
        alone = logits(reft, one, adapter_names=[name])
        assert_close(mixed[i, : alone.shape[1]], alone[0], msg=str(name))
    with pytest.raises(ReftkitError, match="2 entries for a batch of 3"):
        logits(reft, batch, adapter_names=["a", "b"])
    with pytest.raises(ConfigError, match="no adapter named 'c'"):
        logits(reft, batch, adapter_names=["a", "b", "c"])


def test_per_example_adapter_names_in_generate(tok):
    reft = get_reft_model(build_tiny_model("llama", initializer_range=0.2),
                          ReftConfig(layers=[1, 3], rank=4, seed=0), adapter_name="a")
    reft.add_adapter("b", ReftConfig(layers=[0, 2], rank=4, seed=1))
    batch = left_padded(tok, PROMPTS, chat=False)
    names = ["a", "b", None]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    mixed = reft.generate(**batch, adapter_names=names, **kw)
    T = batch["input_ids"].shape[1]
    for i, (prompt, name) in enumerate(zip(PROMPTS, names)):
        one = left_padded(tok, [prompt], chat=False)
        alone = reft.generate(**one, adapter_names=[name], **kw)
        assert mixed[i, T:].tolist() == alone[0, one["input_ids"].shape[1]:].tolist(), name
    replies = {name: mixed[i, T:].tolist() for i, name in enumerate(names)}
    base = reft.model.generate(**batch, **kw)[:, T:].tolist()
    assert replies[None] == base[2]
    assert replies["a"] != base[0] or replies["b"] != base[1]  # the adapters change what is generated


# ---- generation ---------------------------------------------------------------------------------------------------

def test_batched_left_padded_generation_equals_one_by_one(tok):
    reft = get_reft_model(build_tiny_model("llama", initializer_range=0.2), ReftConfig(layers=[0, 2], rank=4))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    batch = left_padded(tok, PROMPTS, chat=True)
    out = reft.generate(**batch, **kw)
    T = batch["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        one = left_padded(tok, [prompt], chat=True)
        alone = reft.generate(**one, **kw)
        assert out[i, T:].tolist() == alone[0, one["input_ids"].shape[1]:].tolist()
    with reft.disable_adapter():
        base = reft.generate(**batch, **kw)
    assert not torch.equal(out, base)


def test_beam_search_runs_with_the_adapter(tok):
    reft = get_reft_model(build_tiny_model("llama", initializer_range=0.2), ReftConfig(layers=[1], rank=4))
    batch = left_padded(tok, PROMPTS[:2], chat=False)
    out = reft.generate(**batch, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False,
                        pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 4 and out.shape[1] <= batch["input_ids"].shape[1] + 5
    with reft.disable_adapter():
        base = reft.generate(**batch, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert not torch.equal(out, base)


# ---- save / load ------------------------------------------------------------------------------------------------

def test_save_and_load_reproduce_logits_exactly(llama, tok, tmp_path):
    config = ReftConfig(method="loreft", layers=[0, 3], rank=4, positions="f2+l1", tied=False, act_fn="gelu")
    reft = get_reft_model(llama, config)
    with torch.no_grad():  # move away from the initialisation so the check means something
        for name, p in reft.adapters.named_parameters():
            if "rotate_layer" not in name:  # the raw rotation parameter holds signs on its diagonal
                p.add_(0.01 * torch.randn_like(p))
    batch = batch_of(tok)
    expected = logits(reft, batch)
    reft.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    size = sum(p.stat().st_size for p in (tmp_path / "adapter").iterdir())
    assert size < 20_000  # 4 interventions of 64 x 4: kilobytes, no base weights
    loaded = ReftModel.from_pretrained(build_tiny_model("llama"), tmp_path / "adapter")
    assert loaded.configs["default"] == config
    assert torch.equal(logits(loaded, batch), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = ReftModel.from_pretrained(build_tiny_model("llama"), tmp_path / "adapter", is_trainable=True)
    assert all(p.requires_grad for p in trainable.adapters.parameters())


def test_several_adapters_save_in_sub_folders(llama, tok, tmp_path):
    reft = get_reft_model(llama, ReftConfig(layers=[1], rank=2))
    reft.add_adapter("caps", ReftConfig(method="direft", layers=[2], rank=3), activate=False)
    reft.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / "caps" / WEIGHTS_NAME).is_file()
    other = ReftModel.from_pretrained(build_tiny_model("llama"), tmp_path)
    other.load_adapter(tmp_path / "caps", "caps")
    batch = batch_of(tok)
    for name in ("default", "caps"):
        assert torch.equal(logits(other, batch, adapter_names=name), logits(reft, batch, adapter_names=name))


@pytest.mark.parametrize("other,match", [
    (dict(family="llama", hidden_size=32), "hidden_size=64, but this model has hidden_size=32"),
    (dict(family="llama", num_hidden_layers=2), "num_layers=4, but this model has num_layers=2"),
    (dict(family="qwen2"), "trained on a llama model, not on this qwen2 model"),
])
def test_loading_onto_another_model_is_refused(llama, tmp_path, other, match):
    get_reft_model(llama, ReftConfig(layers=[1], rank=4)).save_pretrained(tmp_path)
    other = dict(other)
    model = build_tiny_model(other.pop("family"), **other)
    with pytest.raises(IncompatibleModelError, match=match):
        ReftModel.from_pretrained(model, tmp_path)


def test_corrupt_or_missing_adapter_files_raise_config_error(llama, tmp_path):
    with pytest.raises(ConfigError, match="holds no adapter_config.json"):
        ReftModel.from_pretrained(llama, tmp_path)
    get_reft_model(build_tiny_model("llama"), ReftConfig(layers=[1], rank=4)).save_pretrained(tmp_path / "a")
    config_path, weights_path = tmp_path / "a" / CONFIG_NAME, tmp_path / "a" / WEIGHTS_NAME
    good_config, good_weights = config_path.read_text(), weights_path.read_bytes()

    config_path.write_text("{ truncated")
    with pytest.raises(ConfigError, match="is not a valid adapter config"):
        ReftModel.from_pretrained(llama, tmp_path / "a")
    config_path.write_text(json.dumps({"adapter_name": "default"}))
    with pytest.raises(ConfigError, match="is not a valid adapter config"):
        ReftModel.from_pretrained(llama, tmp_path / "a")
    meta = json.loads(good_config)
    meta["config"]["method"] = "lora"
    config_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="unknown ReFT method"):
        ReftModel.from_pretrained(llama, tmp_path / "a")
    config_path.write_text(good_config)

    weights_path.write_bytes(good_weights[:100])
    with pytest.raises(ConfigError, match="cannot read the adapter weights"):
        ReftModel.from_pretrained(llama, tmp_path / "a")
    weights_path.unlink()
    with pytest.raises(ConfigError, match="cannot read the adapter weights"):
        ReftModel.from_pretrained(llama, tmp_path / "a")
    weights_path.write_bytes(good_weights)
    reft = ReftModel.from_pretrained(llama, tmp_path / "a")  # the good files still load
    assert reft.adapter_names == ["default"]


def test_weights_that_do_not_fit_the_config_are_refused_and_rolled_back(llama, tmp_path):
    get_reft_model(build_tiny_model("llama"), ReftConfig(layers=[1], rank=4)).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["config"]["rank"] = 3
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    reft = ReftModel(llama)
    with pytest.raises(IncompatibleModelError, match="do not fit intervention 0"):
        reft.load_adapter(tmp_path)
    assert reft.adapter_names == [] and reft._engine is None


# ---- pyreft folders -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["saved_adapter", "saved_adapter_mixed"])
def test_pyreft_folder_reproduces_pyreft_logits(folder, tmp_path):
    recorded = load_file(str(PYREFT / f"{folder}_logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(PYREFT / "tiny_llama", dtype=torch.float32).eval()
    batch = {"input_ids": recorded["input_ids"], "attention_mask": recorded["attention_mask"]}
    mask = batch["attention_mask"].bool()
    reft = ReftModel.from_pretrained(model, PYREFT / folder, positions="f1+l1")  # pyreft's "f1+l1"
    got = logits(reft, batch)
    assert_close(got[mask], recorded["logits"][mask])
    assert (recorded["logits"] - recorded["base_logits"])[mask].abs().max() > 0.1  # the adapter matters
    # pyreft's own [batch, K] locations, passed through as they are
    assert_close(logits(reft, batch, positions=recorded["positions"])[mask], recorded["logits"][mask])
    # and the adapter survives a reftkit save / load cycle
    reft.save_pretrained(tmp_path)
    again = ReftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(PYREFT / "tiny_llama").eval(), tmp_path)
    assert torch.equal(logits(again, batch), got)


def test_pyreft_folder_needs_positions():
    model = AutoModelForCausalLM.from_pretrained(PYREFT / "tiny_llama").eval()
    with pytest.raises(ConfigError, match="does not record the positions"):
        ReftModel.from_pretrained(model, PYREFT / "saved_adapter")


def test_untied_pyreft_layout_maps_halves_to_first_and_last(tmp_path):
    """pyreft's share_weights=False lists every layer twice: first half for first positions, second for last."""
    import shutil

    folder = tmp_path / "untied"
    shutil.copytree(PYREFT / "saved_adapter", folder)
    config = json.loads((folder / "config.json").read_text())
    config["representations"] = config["representations"] * 2
    config["intervention_types"] = config["intervention_types"] * 2
    (folder / "config.json").write_text(json.dumps(config))
    for layer in (1, 3):  # the "last" copies (#1) get the other layer's weights, so they differ from "#0"
        other = 4 - layer
        shutil.copy(PYREFT / "saved_adapter" / f"intkey_layer_{other}_comp_block_output_unit_pos_nunit_1#0.bin",
                    folder / f"intkey_layer_{layer}_comp_block_output_unit_pos_nunit_1#1.bin")
    model = AutoModelForCausalLM.from_pretrained(PYREFT / "tiny_llama").eval()
    reft = ReftModel.from_pretrained(model, folder, positions="f1+l1")
    cfg = reft.configs["default"]
    assert not cfg.tied and cfg.layers == [1, 3]
    first_l1, last_l1 = reft.adapters["default"][0], reft.adapters["default"][1]
    saved = torch.load(folder / "intkey_layer_3_comp_block_output_unit_pos_nunit_1#0.bin", weights_only=True)
    assert torch.equal(last_l1.rotation, saved["rotate_layer"])
    assert not torch.equal(first_l1.rotation, last_l1.rotation)
    with pytest.raises(ConfigError, match="untied"):
        ReftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(PYREFT / "tiny_llama"), folder,
                                  positions="all")


# ---- the Hub -----------------------------------------------------------------------------------------------------

def test_push_to_hub_uploads_the_adapter_folder(llama, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, exist_ok=False, private=None):
            calls.append(("create_repo", repo_id, exist_ok, private))

        def upload_folder(self, repo_id, folder_path, commit_message=None):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            meta = json.loads((Path(folder_path) / CONFIG_NAME).read_text())
            calls.append(("upload_folder", repo_id, files, meta["config"]["rank"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    reft = get_reft_model(llama, ReftConfig(layers=[1], rank=3))
    assert reft.push_to_hub("me/caps-adapter", private=True, token="t") == "me/caps-adapter"
    assert calls == [("init", "t"), ("create_repo", "me/caps-adapter", True, True),
                     ("upload_folder", "me/caps-adapter", [CONFIG_NAME, WEIGHTS_NAME], 3)]
