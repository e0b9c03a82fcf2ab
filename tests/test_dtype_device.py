"""Devices and dtypes: `load_model` accepts them as strings, and every tensor reftkit makes during a forward, a
training step and generation follows the model's device and the activations' dtype (intervention parameters stay
float32 by design). Each check runs on the CPU in bfloat16, and again on CUDA when a GPU is present."""

from __future__ import annotations

import pytest
import torch

from reftkit.engine import Binding, IntervenableModel
from reftkit.errors import ConfigError
from reftkit.interventions.basic import AddIntervention
from reftkit.models import build_tiny_model, build_tiny_tokenizer, load_model, resolve_device, resolve_dtype
from reftkit.reft.config import ReftConfig
from reftkit.reft.data import Collator, encode
from reftkit.reft.model import ReftModel
from reftkit.reft.train import TrainArgs, train

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]
ROWS = [{"prompt": "the cat says", "completion": " meow"}, {"prompt": "a dog says", "completion": " woof"}]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("text, expected", [
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("BF16", torch.bfloat16), ("float16", torch.float16),
    ("fp16", torch.float16), ("float32", torch.float32), ("torch.float32", torch.float32), (None, torch.float32),
    (torch.bfloat16, torch.bfloat16), ("auto", "auto")])
def test_dtype_names(text, expected):
    assert resolve_dtype(text) == expected


@pytest.mark.parametrize("bad", ["int8", "bfloat", "", torch.int64, 3])
def test_a_bad_dtype_is_a_config_error_naming_the_choices(bad):
    with pytest.raises(ConfigError, match="expected (one of )?float32, bfloat16"):
        resolve_dtype(bad)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "", "tpu"])
def test_a_bad_device_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device(bad)


def test_device_auto_and_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else resolve_device("auto").type)
    assert resolve_device("CPU") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused_before_loading(monkeypatch):
    import reftkit.models as models

    monkeypatch.setattr(models, "build_tiny_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match="'cuda' is not available.*use device 'cpu' or 'auto'"):
        load_model("tiny-llama", device="cuda")


def test_load_model_dtype_strings_for_tiny_names_and_folders(tiny_folder):
    for source in ("tiny-llama", tiny_folder):
        model, _ = load_model(source, dtype="bf16")
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        auto, _ = load_model(source, dtype="auto")
        assert auto.dtype == torch.float32  # what the folder's config records, and the tiny default
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(tiny_folder, dtype="int4")


@pytest.mark.parametrize("device", DEVICES)
def test_engine_with_an_intervention_in_bfloat16(device, tiny_folder):
    model, tok = load_model(tiny_folder, dtype=torch.bfloat16, device=device)
    batch = dict(tok(["hello there", "hi"], return_tensors="pt", padding=True).to(device))
    vector = torch.linspace(-1, 1, 64)
    with IntervenableModel(model, Binding("L1.block_output", AddIntervention(vector=vector), positions="l1")) as im:
        assert next(im.interventions[0].parameters()).dtype == torch.float32  # parameters keep their own dtype
        out = im(batch)
        base = model(**batch)
    assert out.logits.dtype == torch.bfloat16 and out.logits.device.type == device
    assert torch.isfinite(out.logits).all()
    assert not torch.equal(out.logits, base.logits)  # the edit reached the output


@pytest.mark.parametrize("device", DEVICES)
def test_a_reft_training_step_on_a_bfloat16_model(device, tiny_folder):
    """bf16=False: no autocast; the model itself computes in bfloat16 and the LoReFT parameters in float32."""
    model, tok = load_model(tiny_folder, dtype="bfloat16", device=device)
    reft = ReftModel(model, ReftConfig(layers=[1, 2], rank=2))
    before = {k: v.detach().clone() for k, v in reft.adapters.state_dict().items()}
    data = encode(tok, ROWS, "sft", chat=False)
    result = train(reft, data, TrainArgs(max_steps=1, batch_size=2, lr=1e-2, bf16=False, progress=False),
                   pad_token_id=tok.pad_token_id)
    assert result["step"] == 1 and all(torch.isfinite(torch.tensor(result["losses"])))
    after = reft.adapters.state_dict()
    assert {v.dtype for v in after.values()} == {torch.float32} and {v.device.type for v in after.values()} == {device}
    assert any(not torch.equal(before[k], after[k].to(before[k].device)) for k in before)  # the step moved them
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = Collator(tok.pad_token_id, "sft", device=model.device)(data)
    out = reft(**batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_generate_with_an_adapter_on_a_bfloat16_model(device, tiny_folder, tmp_path):
    from reftkit.chat import generate_replies

    trained, tok = load_model(tiny_folder)
    reft = ReftModel(trained, ReftConfig(layers=[1], rank=2, positions="l1"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an edit large enough to change the greedy tokens (R stays orthonormal)
        for name, p in reft.adapters.named_parameters():
            if "learned_source" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 5)
    reft.save_pretrained(tmp_path / "adapter")
    model, tok = load_model(tiny_folder, dtype="bf16", device=device)
    adapted = ReftModel.from_pretrained(model, tmp_path / "adapter")
    ids = tok(["the cat"], return_tensors="pt").to(device)
    out = adapted.generate(**ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.device.type == device and out.sequences.shape[1] == ids["input_ids"].shape[1] + 4
    assert all(s.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(s).all() for s in out.scores)
    replies = generate_replies(adapted, tok, ["the cat", "a dog"], max_new_tokens=4, chat=False)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    with adapted.disable_adapter():
        base = adapted.generate(**ids, max_new_tokens=4, do_sample=False)
    assert not torch.equal(base, out.sequences)
