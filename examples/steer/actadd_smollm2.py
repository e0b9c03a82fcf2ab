"""ActAdd on SmolLM2 (Turner et al.): a topic steered in from one prompt pair.

The positional difference of " I talk about weddings constantly" and " I do not talk about weddings constantly"
at block 6 (ActAdd's [T, d] vector, space-padded to one length) is added to the first T tokens of each prompt (no
chat template, as ActAdd does). For 6 prompts and a few coefficients the script prints the share of greedy
30-token continuations that mention a wedding word, and one continuation.

    flock /tmp/reftkit-cpu.lock .venv/bin/python examples/steer/actadd_smollm2.py   (a few minutes on the CPU)
"""

import re

import torch

from reftkit import load_model
from reftkit.steer.extract import actadd

WEDDING = re.compile(r"\b(wedding|weddings|bride|groom|marri\w*|engaged|ceremony|honeymoon)\b", re.IGNORECASE)
PROMPTS = ["I went up to my best friend at the office and said to her that",
           "Yesterday after work I walked home through the park and thought about",
           "The best thing about a long weekend with nothing planned is that",
           "My favourite topic to talk about with my family over dinner is",
           "When I was young, my grandfather used to tell me stories about",
           "The main story in the local newspaper this morning was about"]
torch.set_num_threads(2)

model, tokenizer = load_model("smollm2-135m-instruct")
vector = actadd(model, tokenizer, " I talk about weddings constantly", " I do not talk about weddings constantly",
                layers=[6])
T = vector.directions["L6.block_output"].shape[0]
info = vector.report["sites"]["L6.block_output"]
print(f"ActAdd vector: T = {T} positions, per-position |v| {[round(n, 1) for n in info['norm']]}, "
      f"|h| {info['hidden_norm']:.0f}")
for c in (0.0, 2.0, 4.0, 8.0):
    texts = []
    for p in PROMPTS:  # one at a time: the vector edits the first T tokens of each prompt
        ids = tokenizer(p, return_tensors="pt")
        with torch.no_grad(), vector.apply(model, coefficient=c) as steered:
            out = steered.generate(**ids, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    rate = sum(bool(WEDDING.search(t)) for t in texts) / len(texts)
    print(f"c={c:g}: wedding words in {rate:.2f} of continuations; e.g. {PROMPTS[0]!r} -> {texts[0].strip()[:90]!r}")
