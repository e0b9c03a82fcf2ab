"""DAS on SmolLM2: where is "which country" carried on the way to the capital?

Prompts "The capital of <country> is the city of" (8 tokens). The causal model is capital = f(country): an
interchange of the country variable makes the answer the source country's capital. DAS learns an 8-dimensional
subspace (`low_rank_rotated`) of the block output at one layer and one position - the country token or the last
token - and is scored by IIA on held-out country pairs (the label is always the source's capital, so an
intervention that does nothing scores 0). Early layers carry the country at its own token only; after attention
has moved it, the last token carries it.

    .venv/bin/python examples/analysis/das_smollm2.py   (a few minutes on the CPU)
"""

import itertools
import random

import torch

from reftkit import Binding, IntervenableModel, Site, load_model
from reftkit.analysis import InterchangeData, interchange_accuracy, train_interchange
from reftkit.analysis.text import single_token
from reftkit.interventions.das import LowRankRotatedSpaceIntervention

model, tokenizer = load_model("smollm2-135m-instruct")
capitals = {"France": " Paris", "Germany": " Berlin", "Italy": " Rome", "Japan": " Tokyo", "England": " London",
            "Greece": " Athens", "China": " Beijing", "Canada": " Ottawa", "Portugal": " Lisbon", "Austria": " Vienna"}
prompt = "The capital of {} is the city of"
RANK = 8
COUNTRY = tokenizer(prompt.format("France"))["input_ids"].index(tokenizer(" France", add_special_tokens=False)
                                                                   ["input_ids"][0])  # the country's position

pairs = [(a, b) for a, b in itertools.permutations(capitals, 2)]
random.Random(0).shuffle(pairs)
train_pairs, test_pairs = pairs[:60], pairs[60:]
capital_ids = torch.tensor([single_token(tokenizer, c) for c in capitals.values()])
index = {c: i for i, c in enumerate(capitals)}


def data(rows):
    base = tokenizer([prompt.format(a) for a, _ in rows], return_tensors="pt")
    source = tokenizer([prompt.format(b) for _, b in rows], return_tensors="pt")
    labels = torch.tensor([index[b] for _, b in rows])  # the answer becomes the source country's capital
    return InterchangeData(dict(base), [dict(source)], labels)


def capital_logits(output):  # scores over the ten capitals only
    return output.logits[:, -1, capital_ids]


train, test = data(train_pairs), data(test_pairs)
LAST = len(tokenizer(prompt.format("France"))["input_ids"]) - 1
for layer in (2, 8, 14, 20, 26):
    for where, position in (("country", COUNTRY), ("last token", LAST)):
        torch.manual_seed(0)
        iv = LowRankRotatedSpaceIntervention(embed_dim=576, low_rank_dimension=RANK)
        with IntervenableModel(model, Binding(Site(layer=layer), iv, positions=[position])) as im:
            before = interchange_accuracy(im, test, logits_fn=capital_logits)
            log = train_interchange(im, train, epochs=4, batch_size=12, lr=1e-2, logits_fn=capital_logits)
            after = interchange_accuracy(im, test, logits_fn=capital_logits)
        print(f"layer {layer:2d}, {where:>10}: IIA untrained {before:.2f} -> DAS {after:.2f} "
              f"({log.steps} steps, {log.seconds:.0f} s)")
