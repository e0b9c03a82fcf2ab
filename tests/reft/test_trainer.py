"""ReftTrainer: HF's Trainer on a ReftModel writes adapter-only checkpoints and resumes from them."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_state_close
from transformers import TrainerCallback, TrainingArguments

from reftkit.errors import ConfigError
from reftkit.models import build_tiny_model
from reftkit.reft.config import ReftConfig
from reftkit.reft.data import encode
from reftkit.reft.model import CONFIG_NAME, WEIGHTS_NAME, ReftModel
from reftkit.reft.trainer import TRAINABLE_STATE_NAME, ReftTrainer

from .conftest import ANIMALS

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

CONFIG = ReftConfig(layers=[1, 3], rank=4)


def args(out, **kw):
    return TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="steps", save_steps=2, logging_steps=100, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0, **kw)


def data(tok):
    return encode(tok, [{"prompt": p, "completion": c} for p, c in ANIMALS] * 3, "sft", chat=False)


def fresh():
    return ReftModel(build_tiny_model("llama", initializer_range=0.2), CONFIG)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_trainer_checkpoints_hold_the_adapter_only_and_resume(tok, tmp_path):
    whole = fresh()
    before = {k: v.clone() for k, v in whole.adapter_state_dict("default").items()}
    result = ReftTrainer(whole, args(tmp_path / "whole"), train_dataset=data(tok), pad_token_id=tok.pad_token_id).train()
    assert result.global_step == 6
    after = whole.adapter_state_dict("default")
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-3
    checkpoints = sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for name in checkpoints:
        files = {p.name for p in (tmp_path / "whole" / name).iterdir()}
        assert {CONFIG_NAME, WEIGHTS_NAME, TRAINABLE_STATE_NAME} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "training_args.bin"}
        assert sum(p.stat().st_size for p in (tmp_path / "whole" / name).glob("*.safetensors")) < 50_000
    # a checkpoint is a loadable adapter
    loaded = ReftModel.from_pretrained(build_tiny_model("llama", initializer_range=0.2), tmp_path / "whole" / "checkpoint-6")
    ids = torch.tensor([[1, 70, 71, 72]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, whole(input_ids=ids).logits)

    stopped = fresh()
    ReftTrainer(stopped, args(tmp_path / "run"), train_dataset=data(tok), pad_token_id=tok.pad_token_id,
                callbacks=[StopAt(4)]).train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = fresh()
    out = ReftTrainer(resumed, args(tmp_path / "run"), train_dataset=data(tok),
                      pad_token_id=tok.pad_token_id).train(resume_from_checkpoint=True)
    assert out.global_step == 6
    a, b = whole.adapter_state_dict("default"), resumed.adapter_state_dict("default")
    assert_state_close(b, a)


def test_trainer_refuses_what_it_cannot_train(tok, tmp_path):
    with pytest.raises(ConfigError, match="trains a ReftModel"):
        ReftTrainer(build_tiny_model("llama"), args(tmp_path), pad_token_id=0)
    with pytest.raises(ConfigError, match="supports the tasks"):
        ReftTrainer(fresh(), args(tmp_path), task="dpo", pad_token_id=0)
    with pytest.raises(ConfigError, match="pad_token_id"):
        ReftTrainer(fresh(), args(tmp_path))


@pytest.mark.filterwarnings("ignore::reftkit.precision.SlowPrecisionWarning")
def test_bf16_on_cpu_trains_with_eager_attention_and_restores_the_models_own(tok, tmp_path):
    reft = fresh()
    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.append(reft.model.config._attn_implementation)

    trainer = ReftTrainer(reft, args(tmp_path, bf16=True), train_dataset=data(tok),
                          pad_token_id=tok.pad_token_id, callbacks=[Watch()])
    trainer.train()
    assert seen and set(seen) == {"eager"}
    assert reft.model.config._attn_implementation == "sdpa"
