"""Language neurons on SmolLM2 (LAPE, Tang et al.) and language arithmetics on them (Gurgurov et al.).

data/languages.jsonl holds 15 everyday sentences in each of English, French, German and Spanish (the same
contents); data/languages_heldout.jsonl 5 more of each. LAPE counts, per MLP neuron (the output of `act_fn`),
how often it is active (> 0) on each language's tokens, and keeps the low-entropy neurons that are active often
enough (Tang et al.'s thresholds, with top_rate 0.01 of the 30 × 1536 neurons). The script prints each language's
neuron count and where they sit, then the mean per-token NLL of the held-out sentences of every language when one
language's neurons are deactivated (set to 0), next to a control that deactivates as many random neurons in the
same layers; and a greedy reply to an English question with English deactivated and French activated
(replacement: the French mean activation), as Gurgurov et al. force the output language.

    flock /tmp/reftkit-cpu.lock .venv/bin/python examples/steer/lape_smollm2.py   (a few minutes on the CPU)

`reftkit steer extract examples/steer/lape.yaml` writes the French deactivation vector from the command line.
"""

import json
import time
from collections import Counter
from pathlib import Path

import torch

from reftkit import load_model
from reftkit.steer.apply import steer
from reftkit.steer.lape import lape

HERE = Path(__file__).parent
torch.set_num_threads(2)
STOP = {"en": {"the", "and", "is", "of", "to", "in", "it", "you", "that", "a"},
        "fr": {"le", "la", "les", "et", "est", "de", "des", "un", "une", "il", "je", "que", "en"},
        "de": {"der", "die", "das", "und", "ist", "ein", "eine", "ich", "nicht", "zu", "mit", "es"},
        "es": {"el", "la", "los", "las", "y", "es", "de", "un", "una", "que", "en", "por"}}


def read(name):
    rows = [json.loads(line) for line in (HERE / "data" / name).read_text().splitlines() if line.strip()]
    out = {}
    for r in rows:
        out.setdefault(r["language"], []).append(r["text"])
    return out


def language_of(text: str) -> str:
    words = Counter(w.strip(".,;:!?¿¡'\"()").lower() for w in text.split())
    scores = {lang: sum(words[w] for w in stop) for lang, stop in STOP.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else "?"


model, tokenizer = load_model("smollm2-135m-instruct")
train, held = read("languages.jsonl"), read("languages_heldout.jsonl")
start = time.perf_counter()
neurons = lape(model, tokenizer, train)
print(f"LAPE: {time.perf_counter() - start:.0f} s over {sum(neurons.tokens.values())} tokens "
      f"({', '.join(f'{k} {v}' for k, v in neurons.tokens.items())})")
for lang in neurons.languages:
    per_layer = {l: len(v) for l, v in neurons.neurons[lang].items() if v}
    print(f"  {lang}: {neurons.count(lang):3d} neurons; by layer {per_layer}")
for w in neurons.warnings:
    print(f"warning: {w}")


def nll(texts, vector=None):
    """Mean per-token NLL (nats) of the texts, plain or steered."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            if vector is None:
                logits = model(ids).logits
            else:
                with steer(model, [(vector, 1.0)]) as steered:
                    logits = steered(ids).logits
        lp = torch.log_softmax(logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])
        total -= float(lp.sum())
        count += lp.numel()
    return total / count


def random_control(vector, seed=0):
    """The same number of neurons per layer, chosen at random, deactivated."""
    g = torch.Generator().manual_seed(seed)
    picked = {}
    for site, idx in vector.operator_config["neurons"].items():
        picked[site] = sorted(torch.randperm(vector.directions[site].numel(), generator=g)[:len(idx)].tolist())
    return vector._replace(dict(vector.directions), operator_config={"neurons": picked}, method="random")


base = {lang: nll(texts) for lang, texts in held.items()}
print("\nheld-out NLL per token (nats); rows: whose neurons are deactivated")
print("  " + " " * 22 + "  ".join(f"{lang:>6}" for lang in held))
print("  " + f"{'none':<22}" + "  ".join(f"{base[lang]:6.3f}" for lang in held))
for lang in neurons.languages:
    vector = neurons.vector(lang, "deactivate")
    for name, vec in ((lang, vector), (f"{lang}: random control", random_control(vector))):
        row = {k: nll(texts, vec) for k, texts in held.items()}
        print("  " + f"{name:<22}" + "  ".join(f"{row[k]:6.3f}" for k in held) +
              f"   ({row[lang] - base[lang]:+.3f} on {lang})")

question = "What do you like to do on a sunny day?"
batch = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
print(f"\nreplies to {question!r} (greedy, 40 tokens):")
for name, entries in (("base", []),
                      ("en deactivated + fr replacement", [(neurons.vector("en", "deactivate"), 1.0),
                                                           (neurons.vector("fr", "replacement"), 1.0)]),
                      ("fr replacement only", [(neurons.vector("fr", "replacement"), 1.0)]),
                      ("fr additive x3", [(neurons.vector("fr", "additive"), 3.0)])):
    with torch.no_grad():
        if entries:
            with steer(model, entries) as steered:
                out = steered.generate(**batch, max_new_tokens=40, do_sample=False, repetition_penalty=1.1)
        else:
            out = model.generate(**batch, max_new_tokens=40, do_sample=False, repetition_penalty=1.1)
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"  {name:<32} [{language_of(text)}] {text[:110]!r}")
