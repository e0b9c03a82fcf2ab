"""pyreft side of benchmarks/reft_speed.py: the per-step training losses of pyreft 0.1.0 on the benchmark's setup.

Runs in pyreft's own virtualenv (transformers 4.45.1): `python train_losses.py GGUF_DIR`. Prints one JSON line.
The setup is the shared anchor's (SmolLM2-135M-Instruct float32, LoReFT rank 4 at layers 8/16/24, f1+l1 tied,
batch 8, 3 epochs, lr 4e-3, the 32 "What is a plus b?" pairs), with these differences. Every step's loss is kept, so
the loss curve can be laid beside reftkit's step by step. And pyreft trains on exactly the token sequences reftkit
trains on: transformers 4.45's GGUF tokenizer reads SmolLM2's end-of-sequence token as `<|im_start|>` (the chat
turn ends with `<|im_end|>`) and prepends a BOS `<|im_start|>` to text whose chat template already starts with it.
The anchor keeps those, so its examples start with two `<|im_start|>` and end with a third, and the base model's
loss on its answers is 3.9 nats per token instead of 2.9; here the tokenizer is set as SmolLM2's own. The GGUF
tokenizer also pads on the left, which moves pyreft's hand-computed first/last positions off the prompt in padded
rows; pyreft's own examples pad on the right, as here.
"""
import json
import os
import sys

import pyreft
import torch
import transformers

torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
gguf_dir, gguf_file = sys.argv[1], "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, torch_dtype=torch.float32)
model.lm_head.weight = model.model.embed_tokens.weight  # the 4.45 GGUF loader leaves the tied head untied
tok.model_max_length = 2048
tok.add_bos_token = False  # the chat template writes the leading <|im_start|> itself
tok.eos_token = tok.pad_token = "<|im_end|>"  # SmolLM2's end of turn (and reftkit's pad)
tok.padding_side = "right"  # pyreft's positions are counted from the left edge of the unpadded prompt
width, layers = model.config.hidden_size, [8, 16, 24]
reps = [{"layer": layer, "component": f"model.layers[{layer}].output", "low_rank_dimension": 4,
         "intervention": pyreft.LoreftIntervention(embed_dim=width, low_rank_dimension=4, dtype=torch.float32)}
        for layer in layers]
reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
reft.set_device("cpu")
questions = [f"What is {a} plus {b}?" for a in range(1, 9) for b in range(1, 5)]
answers = [f"The answer is {a + b}. 🙂" for a in range(1, 9) for b in range(1, 5)]
prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
           for q in questions]
data = pyreft.make_multiple_position_supervised_data_module(
    tok, model, prompts, answers, positions="f1+l1", num_interventions=len(layers), share_weights=True, nonstop=False)
args = transformers.TrainingArguments(num_train_epochs=3, output_dir="/tmp/pyreft_losses", per_device_train_batch_size=8,
                                      learning_rate=4e-3, logging_steps=1, report_to=[], save_strategy="no",
                                      use_cpu=True, disable_tqdm=True)
trainer = pyreft.ReftTrainerForCausalLM(model=reft, tokenizer=tok, args=args, **data)
trainer.train()
losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
print(json.dumps({"losses": losses, "final_loss": losses[-1], "mean_loss": sum(losses) / len(losses)}))
