"""The training loop: learning, gradient accumulation, resumable and atomic checkpoints, bf16, weight decay and
rotations, classification with a saved head, and DPO against the adapter-free model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from numerics import assert_close, assert_state_close

import reftkit.reft.train as train_module
from reftkit.errors import ConfigError, DataError
from reftkit.models import build_tiny_model, build_tiny_tokenizer
from reftkit.reft.config import ReftConfig
from reftkit.reft.data import Collator, encode
from reftkit.reft.model import ReftModel
from reftkit.reft.train import TrainArgs, evaluate, param_groups, sequence_logprobs, train

from .conftest import ANIMALS

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path


def sft_data(tok, n=8):
    rows = [{"prompt": p, "completion": c} for p, c in ANIMALS] * (n // len(ANIMALS) + 1)
    return encode(tok, rows[:n], "sft", chat=False)


def fresh(config, init=0.2):
    return ReftModel(build_tiny_model("llama", initializer_range=init), config)


def loss_on(reft, data, tok, task="sft"):
    return evaluate(reft, data, Collator(tok.pad_token_id, task), TrainArgs(batch_size=8, progress=False), task)


def test_sft_loss_drops_on_a_memorisable_dataset(tok):
    data = sft_data(tok)
    reft = fresh(ReftConfig(layers="all", rank=4))
    before = loss_on(reft, data, tok)
    result = train(reft, data, TrainArgs(max_steps=40, batch_size=8, lr=2e-2, progress=False), pad_token_id=tok.pad_token_id)
    after = loss_on(reft, data, tok)
    assert len(result["losses"]) == 40 and result["step"] == 40
    assert after < 0.25 * before, (before, after)
    assert not reft.training  # left in eval mode


def test_grad_accumulation_equals_one_large_batch(tok):
    data = sft_data(tok, 16)
    runs = {}
    for bs, ga in [(8, 1), (4, 2)]:
        reft = fresh(ReftConfig(layers=[0, 2], rank=4))
        result = train(reft, data, TrainArgs(epochs=3, batch_size=bs, grad_accum=ga, lr=1e-2, progress=False),
                       pad_token_id=tok.pad_token_id)
        runs[(bs, ga)] = (result["losses"], reft.adapter_state_dict("default"))
    (l1, w1), (l2, w2) = runs.values()
    assert len(l1) == len(l2) == 6
    assert_close(torch.tensor(l1), torch.tensor(l2))
    assert_state_close(w1, w2)
    assert l1[-1] < l1[0]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tok, tmp_path, monkeypatch, grad_accum):
    data = sft_data(tok, 12)  # 3 batches of 4 per epoch: the kill lands inside an epoch
    config = ReftConfig(layers=[1, 3], rank=4, dropout=0.2)  # dropout: the RNG state must be restored too

    def args(out):
        return TrainArgs(max_steps=7, batch_size=4, grad_accum=grad_accum, lr=1e-2, save_every=2,
                         output_dir=str(out), progress=False)

    whole = fresh(config)
    expected = train(whole, data, args(tmp_path / "whole"), pad_token_id=tok.pad_token_id)

    real_save = train_module._save_checkpoint

    def save_then_die(reft, opt, sched, state, directory):
        real_save(reft, opt, sched, state, directory)
        if state["step"] == 4:
            raise KeyboardInterrupt  # killed right after the step-4 checkpoint

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(config), data, args(tmp_path / "killed"), pad_token_id=tok.pad_token_id)
    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)

    resumed_model = fresh(config)
    resumed = train(resumed_model, data, args(tmp_path / "killed"), pad_token_id=tok.pad_token_id, resume=True)
    assert resumed["step"] == 7 and len(resumed["losses"]) == 7
    assert_close(torch.tensor(resumed["losses"]), torch.tensor(expected["losses"]))
    a, b = whole.adapter_state_dict("default"), resumed_model.adapter_state_dict("default")
    assert_state_close(b, a)
    with pytest.raises(ConfigError, match="resume with the same data, batch_size"):
        train(fresh(config), data[:8], args(tmp_path / "killed"), pad_token_id=tok.pad_token_id, resume=True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(fresh(config), data, args(tmp_path / "never"), pad_token_id=tok.pad_token_id, resume=True)


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tok, tmp_path, monkeypatch):
    import safetensors.torch

    data = sft_data(tok)
    out = tmp_path / "run"
    args = TrainArgs(max_steps=4, batch_size=4, lr=1e-2, save_every=2, output_dir=str(out), progress=False)
    real_save_file = safetensors.torch.save_file
    writes = []

    def failing_save_file(tensors, filename, *a, **kw):
        writes.append(filename)
        if len(writes) == 5:  # the 2nd checkpoint (3 files each), after one of its files was written
            raise OSError("disk full")
        return real_save_file(tensors, filename, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        train(fresh(ReftConfig(layers=[1], rank=4)), data, args, pad_token_id=tok.pad_token_id)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]  # no half-written folder left behind
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    # and the step-2 checkpoint is complete: a resumed run starts from it
    resumed = train(fresh(ReftConfig(layers=[1], rank=4)), data, args, pad_token_id=tok.pad_token_id, resume=True)
    assert resumed["step"] == 4 and resumed["losses"][:2] == state["losses"]


def test_gradient_checkpointing_trains_identically(tok):
    data = sft_data(tok, 10)
    runs = []
    for checkpointing in (False, True):
        model = build_tiny_model("llama", initializer_range=0.2)
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        reft = ReftModel(model, ReftConfig(layers=[1, 3], rank=4, dropout=0.1))
        result = train(reft, data, TrainArgs(max_steps=4, batch_size=4, lr=1e-2, progress=False),
                       pad_token_id=tok.pad_token_id)
        runs.append((result["losses"], reft.adapter_state_dict("default")))
    (l1, w1), (l2, w2) = runs
    assert_close(torch.tensor(l1), torch.tensor(l2))
    assert_state_close(w2, w1)
    assert max((w1[k] - fresh(ReftConfig(layers=[1, 3], rank=4)).adapter_state_dict("default")[k]).abs().max().item()
               for k in w1) > 1e-3


@pytest.mark.filterwarnings("ignore::reftkit.precision.SlowPrecisionWarning")
def test_bf16_autocast_trains(tok):
    data = sft_data(tok)
    reft = fresh(ReftConfig(layers="all", rank=4))
    result = train(reft, data, TrainArgs(max_steps=25, batch_size=8, lr=2e-2, bf16=True, progress=False),
                   pad_token_id=tok.pad_token_id)
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert all(p.dtype == torch.float32 for p in reft.adapters.parameters())



@pytest.mark.filterwarnings("ignore::reftkit.precision.SlowPrecisionWarning")
def test_bf16_on_cpu_trains_with_eager_attention_and_restores_the_models_own(tok, monkeypatch):
    data = sft_data(tok)
    reft = fresh(ReftConfig(layers=[1], rank=4))
    assert reft.model.config._attn_implementation == "sdpa"
    seen = []
    real = train_module.task_loss
    monkeypatch.setattr(train_module, "task_loss",
                        lambda r, *a, **k: seen.append(r.model.config._attn_implementation) or real(r, *a, **k))
    train(reft, data, TrainArgs(max_steps=2, batch_size=8, bf16=True, progress=False), pad_token_id=tok.pad_token_id)
    assert seen == ["eager", "eager"]
    assert reft.model.config._attn_implementation == "sdpa"
    seen.clear()
    train(reft, data, TrainArgs(max_steps=1, batch_size=8, bf16=False, progress=False), pad_token_id=tok.pad_token_id)
    assert seen == ["sdpa"]  # fp32 keeps the model's attention

def test_rotations_stay_orthonormal_under_weight_decay(tok):
    data = sft_data(tok)
    reft = fresh(ReftConfig(layers=[0, 2], rank=4))
    groups = param_groups(reft, 0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for iv in reft.adapters["default"]:
        assert id(iv.rotate_layer.parametrizations.weight.original) in no_decay
        assert id(iv.learned_source.weight) not in no_decay
    start = [iv.rotation.detach().clone() for iv in reft.adapters["default"]]
    train(reft, data, TrainArgs(max_steps=20, batch_size=8, lr=2e-2, weight_decay=0.1, progress=False),
          pad_token_id=tok.pad_token_id)
    for iv, r0 in zip(reft.adapters["default"], start):
        r = iv.rotation.detach()
        assert_close(r.T @ r, torch.eye(4))
        assert (r - r0).abs().max() > 1e-3  # it was trained, not frozen


def test_classification_learns_a_separable_task_and_saves_its_head(tmp_path):
    tok = build_tiny_tokenizer("encoder")
    rows = [{"text": w * n, "label": int(w == "b ")} for w in ("a ", "b ") for n in range(1, 7)]
    data = encode(tok, rows, "classification")

    def model():  # base-model dropout off (it would stay on in training, as with PEFT) so 40 steps suffice
        return build_tiny_model("bert", task="sequence-classification", num_labels=2, initializer_range=0.2,
                                hidden_dropout_prob=0.0)

    reft = ReftModel(model(), ReftConfig(layers="all", rank=4, modules_to_save=["classifier"]))
    assert reft.model.classifier.weight.requires_grad
    train(reft, data, TrainArgs(max_steps=40, batch_size=6, lr=5e-2, progress=False), task="classification",
          pad_token_id=tok.pad_token_id)
    batch = Collator(tok.pad_token_id, "classification")(data)
    with torch.no_grad():
        trained = reft(**{k: v for k, v in batch.items() if k != "labels"}).logits
    accuracy = (trained.argmax(-1) == batch["labels"]).float().mean().item()
    assert accuracy >= 0.95
    reft.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert {"modules.classifier.weight", "modules.classifier.bias"} <= set(load_file(str(tmp_path / "adapter_model.safetensors")))
    other = model()
    assert not torch.equal(other.classifier.weight, reft.model.classifier.weight)
    loaded = ReftModel.from_pretrained(other, tmp_path)
    with torch.no_grad():
        again = loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.equal(again, trained)
    assert not other.classifier.weight.requires_grad  # loaded for inference


def test_dpo_raises_the_margin_against_the_adapter_free_reference(tok, monkeypatch):
    rows = [{"prompt": p, "chosen": c, "rejected": c[::-1]} for p, c in ANIMALS] * 2
    data = encode(tok, rows, "dpo", chat=False)
    model = build_tiny_model("llama", initializer_range=0.2)
    reft = ReftModel(model, ReftConfig(layers="all", rank=4))
    batch = Collator(tok.pad_token_id, "dpo")(data)
    B = len(data)

    def margin():
        with torch.no_grad():
            policy = sequence_logprobs(reft, batch)
            with reft.disable_adapter():
                ref = sequence_logprobs(reft, batch)
        return ((policy[:B] - ref[:B]) - (policy[B:] - ref[B:])).mean().item(), ref

    before, ref = margin()
    with torch.no_grad():  # the reference is the plain model itself
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    lp = torch.log_softmax(plain[:, :-1].float(), -1).gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    assert_close(ref, (lp * (labels[:, 1:] != -100)).sum(1))

    n_params = sum(p.numel() for p in reft.parameters())

    real_deepcopy = copy.deepcopy

    def no_copies(obj, *a, **k):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError("DPO must not copy the model")
        return real_deepcopy(obj, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", no_copies)
    result = train(reft, data, TrainArgs(max_steps=20, batch_size=8, lr=1e-2, dpo_beta=0.5, progress=False),
                   task="dpo", pad_token_id=tok.pad_token_id)
    after, ref_after = margin()
    assert after > before + 1.0, (before, after)
    assert result["losses"][-1] < result["losses"][0]
    assert torch.equal(ref_after, ref)  # the reference never moved
    assert sum(p.numel() for p in reft.parameters()) == n_params


def test_train_refuses_bad_input(tok):
    reft = fresh(ReftConfig(layers=[1], rank=4))
    with pytest.raises(DataError, match="empty"):
        train(reft, [], TrainArgs(progress=False))
    with pytest.raises(ConfigError, match="unknown task"):
        train(reft, sft_data(tok), TrainArgs(progress=False), task="rl")
    frozen = fresh(ReftConfig(layers=[1], rank=4))
    frozen.adapters.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        train(frozen, sft_data(tok), TrainArgs(progress=False))
    for bad in (dict(batch_size=0), dict(lr=0), dict(lr="fast"), dict(max_steps=0), dict(padding_side="up"),
                dict(warmup_ratio=1.5), dict(max_grad_norm=0), dict(max_grad_norm="1")):
        with pytest.raises(ConfigError):
            TrainArgs(**bad)


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_max_grad_norm_clips_the_gradient_the_optimizer_steps_on(tok, monkeypatch, clip):
    norms = []
    real = torch.optim.AdamW

    class Spy(real):
        def step(self, *a, **k):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))
            return super().step(*a, **k)

    monkeypatch.setattr(train_module.torch.optim, "AdamW", Spy)
    reft = fresh(ReftConfig(layers=[1, 3], rank=4))
    train(reft, sft_data(tok), TrainArgs(max_steps=3, batch_size=8, max_grad_norm=clip, progress=False),
          pad_token_id=tok.pad_token_id)
    assert len(norms) == 3
    if clip is None:
        assert min(norms) > 1e-2  # the unclipped gradients of this set-up are far above the clip level below
    else:
        assert max(norms) <= clip * (1 + 1e-4)
