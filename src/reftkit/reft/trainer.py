"""`ReftTrainer`: Hugging Face's `transformers.Trainer` for a `ReftModel`, for users who prefer its loop
(callbacks, logging integrations, evaluation strategies) to `reftkit.reft.train`.

Decisions:
- The model is the `ReftModel` itself and the batches come from the reft `Collator`, so positions are counted
  over `prompt_mask` exactly as in reftkit's own loop. `compute_loss` is the ReftModel's loss, normalised by the
  Trainer's `num_items_in_batch`: gradient accumulation equals one large batch.
- Tasks: `sft` and `classification` (the model's own head and loss; list the head in `modules_to_save`). DPO
  needs a reference forward per batch and is trained with `reftkit.reft.train`.
- With `bf16=True` on a CPU the run uses eager attention, as reftkit's loop does (`bf16_training_attention`).
- The optimizer's parameter groups keep rotations out of weight decay (`param_groups`), as reftkit's loop does.
- `_save` writes what `save_pretrained` writes (adapter config + safetensors, never the base weights) plus
  `trainable_state.safetensors`, the trainable tensors as the optimizer sees them. The adapter format stores the
  computed rotation, not its raw parametrization; resuming copies the raw tensors back in place, so the
  optimizer moments the Trainer restores still belong to the parameters they were computed for, and a resumed run
  continues where it stopped. `training_args.bin` (a pickle) is not written.
- Optimizer, scheduler and RNG files are the Trainer's own (`torch.save`, read back with `weights_only=True`).
- Under `accelerate launch` / `torchrun` the Trainer's own DDP/FSDP applies. The launcher trap is refused: when the
  launcher started several processes (`WORLD_SIZE` > 1) but the Trainer sees a world of size 1 (on a machine
  without GPUs, `TrainingArguments(use_cpu=True)` is needed for the processes to join one gloo group), each
  process would train alone, so `ReftTrainer` raises `ConfigError` saying so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file
from transformers import Trainer
from transformers.utils import is_accelerate_available

from ..atomic import write_folder
from ..errors import ConfigError, MissingDependencyError
from ..precision import resolve_bf16
from .data import Collator
from .distributed import check_launcher
from .model import ReftModel
from .checkpoint import load_raw_state, raw_state
from .train import bf16_training_attention, param_groups

log = logging.getLogger(__name__)
TRAINABLE_STATE_NAME = "trainable_state.safetensors"
TRAINER_TASKS = ("sft", "classification")


class ReftTrainer(Trainer):
    """`Trainer(model=reft_model, args=TrainingArguments(...), train_dataset=encode(...), pad_token_id=...)`.

    `train_dataset` / `eval_dataset` are lists of `Example`s from `reftkit.reft.data.encode`; the collator is the
    reft `Collator` for `task` unless `data_collator` is given."""

    def __init__(self, model: ReftModel, args=None, data_collator=None, *, task: str = "sft",
                 pad_token_id: int | None = None, padding_side: str = "right", **kwargs):
        if not is_accelerate_available():
            raise MissingDependencyError("ReftTrainer needs accelerate, which transformers' Trainer runs on: "
                                         "pip install accelerate")
        if not isinstance(model, ReftModel):
            raise ConfigError(f"ReftTrainer trains a ReftModel (get_reft_model(model, config)), got {type(model).__name__}")
        if task not in TRAINER_TASKS:
            raise ConfigError(f"ReftTrainer supports the tasks {TRAINER_TASKS}, got {task!r}; train DPO with "
                              "reftkit.reft.train.train(..., task='dpo')")
        if data_collator is None:
            if pad_token_id is None:
                raise ConfigError("pass pad_token_id (the tokenizer's) or a data_collator to ReftTrainer")
            data_collator = Collator(pad_token_id, task, padding_side)
        self.task = task
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        # `accelerate launch --multi_gpu` / torchrun without GPUs and without use_cpu=True: N lone runs
        check_launcher(self.args.world_size, "the Trainer (TrainingArguments.world_size)")

    @property
    def reft_model(self) -> ReftModel:
        return self.accelerator.unwrap_model(self.model)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.reft_model)
            self.optimizer = optimizer_cls(param_groups(self.reft_model, self.args.weight_decay), **optimizer_kwargs)
        return self.optimizer

    def train(self, *args, **kwargs):
        if self.args.bf16:  # transformers' own flag: warn where bf16 is emulated, as reftkit's loop does
            resolve_bf16(True, next(self.reft_model.parameters()).device)
        with bf16_training_attention(self.reft_model, self.args):  # see there: CPU bf16 trains faster on eager
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        directory = Path(output_dir if output_dir is not None else self.args.output_dir)
        reft = self.reft_model
        reft.save_pretrained(directory)
        write_folder(directory, tensors={TRAINABLE_STATE_NAME: raw_state(reft)})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(directory))
        log.info("saved the ReFT adapter to %s", directory)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trainable_state(self.reft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_trainable_state(self.reft_model, self.state.best_model_checkpoint)


def load_trainable_state(reft: ReftModel, directory) -> None:
    """Restore the trainable tensors `ReftTrainer` saved in `directory` (a Trainer checkpoint) in place."""
    path = Path(directory) / TRAINABLE_STATE_NAME
    if not path.is_file():
        raise ConfigError(f"{directory} holds no {TRAINABLE_STATE_NAME}: it is not a checkpoint written by ReftTrainer")
    load_raw_state(reft, load_file(str(path)), directory)
