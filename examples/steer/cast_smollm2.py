"""CAST on SmolLM2 (Lee et al.): steer only the rows of a batch whose prompt is about animals.

The condition direction is the mean difference, at block 6, of the mean hidden state of animal questions and of
other questions (8 each); its threshold is fitted by grid search for F1 on those prompts. On SmolLM2 the
similarities cos(h, tanh(P h)) come out small and negative (the block-6 state is dominated by a few large
coordinates, so tanh saturates), so the grid spans the whole cosine range [−1, 1] in steps of 0.005 rather than
CAST's [0, 1]. On a held-out batch of 8
questions (4 about animals) the decision is made per row; the behaviour (the formal-register CAA vector of
caa_smollm2.py at 1 mean difference) is applied to the rows that fire only. The script prints each row's
similarity and decision, the held-out F1, and checks that the rows that did not fire get exactly the base reply.

    flock /tmp/reftkit-cpu.lock .venv/bin/python examples/steer/cast_smollm2.py   (a few minutes on the CPU)
"""

import json
from pathlib import Path

import torch

from reftkit import load_model
from reftkit.chat import left_padded
from reftkit.steer.condition import Condition, conditional_steer, fit_threshold
from reftkit.steer.extract import extract

HERE = Path(__file__).parent
torch.set_num_threads(2)
ANIMALS = ["How long do elephants live?", "What do rabbits eat?", "Why do cats purr?", "How fast can a horse run?",
           "Where do penguins live?", "How do bees make honey?", "Are dolphins smart?", "What do owls hunt at night?"]
OTHER = ["How do I boil an egg?", "What is the capital of Peru?", "How does a bicycle work?", "Why is the sky blue?",
         "How do I write a cover letter?", "What is a prime number?", "When was the printing press invented?",
         "How do airplanes stay in the air?"]
HELD = [("What do giraffes eat?", True), ("How do I fix a flat tyre?", False), ("Why do dogs bark?", True),
        ("What is the tallest building in the world?", False), ("How big is a blue whale?", True),
        ("How do I make pancakes?", False), ("Do snakes have ears?", True), ("What causes rain?", False)]

model, tokenizer = load_model("smollm2-135m-instruct")
# the condition reads the mean over the prompt, so the direction is read the same way (every prompt token)
topic = extract(model, tokenizer, list(zip(ANIMALS, OTHER)), "mean_diff", layers=[6], read="all", chat=True)
GRID = [round(i / 200, 3) for i in range(-200, 201)]
condition, fit = fit_threshold(model, tokenizer, Condition.from_vector(topic, aggregate="mean"), ANIMALS, OTHER,
                               grid=GRID)
print(f"condition at L6: threshold {fit.threshold:.2f} ({fit.fire}), training F1 {fit.f1:.2f}")
formal = extract(model, tokenizer, [json.loads(line) for line in
                                    (HERE / "data" / "formal_pairs.jsonl").read_text().splitlines() if line.strip()],
                 "mean_diff", layers=[6], read="answer", chat=True, unit="mean_diff_norm")
prompts = [p for p, _ in HELD]
labels = [y for _, y in HELD]
batch = left_padded(tokenizer, prompts)
with torch.no_grad():
    base = model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with conditional_steer(model, tokenizer, prompts, formal, 1.0, condition, scope="l1@all") as cast:
        out = cast.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=24, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
tp = sum(d and y for d, y in zip(cast.decisions, labels))
fp = sum(d and not y for d, y in zip(cast.decisions, labels))
fn = sum(not d and y for d, y in zip(cast.decisions, labels))
print(f"held-out: F1 {2 * tp / max(2 * tp + fp + fn, 1):.2f} ({tp} animal rows fired, {fp} others fired, {fn} missed)")
T = batch["input_ids"].shape[1]
for i, (p, y) in enumerate(HELD):
    same = torch.equal(out[i], base[i])
    reply = tokenizer.decode(out[i, T:], skip_special_tokens=True).strip()
    print(f"  sim {float(cast.similarities[i]):.3f} {'fires' if cast.decisions[i] else 'quiet'} "
          f"({'animal' if y else 'other '}) {'= base' if same else 'steered'}: {p!r} -> {reply[:70]!r}")
unfired_equal = all(torch.equal(out[i], base[i]) for i, d in enumerate(cast.decisions) if not d)
print(f"rows that did not fire give the base reply exactly: {unfired_equal}")
