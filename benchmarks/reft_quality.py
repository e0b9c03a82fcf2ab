"""Reduced-scale check of the ReFT paper's quality claim on SmolLM2-135M-Instruct, on a CPU.

Wu et al. 2024 (arXiv 2404.03592) report that LoReFT matches or beats LoRA while training 10-50x fewer
parameters. This script checks that claim at small scale on generated tasks with held-out test sets. Core tasks:

- `arithmetic`: one-step word problems ("Tom has 3 apples and buys 4 more. ..." -> "3 + 4 = 7"), answered with
  the calculation; the arithmetic facts (operation, a, b) of the test set never occur in training.
- `commonsense`: two-option questions on a property ("Which is heavier: a feather or a brick?" -> "a brick"),
  built from object lists ordered by that property; the object pairs of the test set never occur in training.
- `json_format`: short questions answered as the JSON object {"answer": "..."}; success is a rule on the format,
  with content correctness reported alongside. Test questions never occur in training.
- `categories`: two-option category questions ("Which one is a tool: a violin or a spanner?" -> "a spanner"); a
  third of each category's members are kept for the test, so test questions ask about words never trained on.
- `sentiment`: short reviews labelled "positive" or "negative"; test reviews use held-out adjectives and subjects.

Answer-format variants of the first two (`--tasks all`), on the same items:

- `arithmetic_direct`: the bare number ("7"), without writing the sum out;
- `commonsense_mc`: the options labelled A/B and the answer a letter ("... A: a feather B: a brick" -> "B").

Methods: LoReFT and DiReFT (reftkit's training loop) and LoRA (peft, attention projections of every layer, trained
by a plain PyTorch loop that mirrors reftkit's: same examples, the same `Collator`, loss on completion tokens only,
same batch order, epochs, optimizer and schedule). Each method tries a small learning-rate grid; the learning rate
is chosen on a validation split taken from the training items, and the test accuracy of that run is reported
(test accuracies of the other grid points are kept in the JSON). The base model zero-shot is a reference row.

A second experiment measures memorisation: how many random tokens a rank-1 LoReFT on one layer, editing one
position of a fixed prompt, can make the model reproduce exactly by greedy decoding within a fixed step budget
(a doubling sweep that stops at the first length not reproduced).

Results go to `benchmarks/results/reft_quality.json` (every finished cell is cached there with a hash of its data,
so an interrupted run resumes where it stopped) and `reft_quality.png`; a markdown table is printed. `--quick`
runs a tiny smoke version into `reft_quality_quick.{json,png}`.

    python benchmarks/reft_quality.py                # core tasks + memorisation
    python benchmarks/reft_quality.py --tasks all    # also the two answer-format variants
    python benchmarks/reft_quality.py --quick        # smoke run (a few minutes)
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

MODEL_NAME = "smollm2-135m-instruct"
HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------- settings

FULL = {
    "seed": 0,
    "threads": 2,
    "n_train": 128,          # per task, of which n_val are held out for choosing the learning rate
    "n_val": 24,
    "n_test": 64,
    "epochs": 5,
    "batch_size": 16,
    "gen_batch_size": 40,
    "max_new_tokens": 32,
    "reft": {"layers": [3, 9, 15, 21], "rank": 8, "positions": "f3+l3", "tied": True, "dropout": 0.0},
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "lr_grid": {"loreft": [2e-3, 4e-3], "direft": [2e-3, 4e-3], "lora": [1e-3, 2e-3]},
    "weight_decay": 0.0,
    "memorisation": {"layer": 15, "rank": 1, "positions": "l1", "prompt": "Recite the secret sequence:",
                     "lengths": [16, 32, 64, 128, 256, 512, 1024, 2048], "max_steps": 1500, "lr": 5e-2,
                     "warmup_steps": 10},
}

QUICK = {
    **FULL,
    "n_train": 24, "n_val": 8, "n_test": 8, "epochs": 1, "batch_size": 8, "max_new_tokens": 12,
    "lr_grid": {"loreft": [4e-3], "direft": [4e-3], "lora": [1e-3]},
    "memorisation": {**FULL["memorisation"], "lengths": [8, 16], "max_steps": 20},
}

CORE_TASKS = ("arithmetic", "commonsense", "json_format", "categories", "sentiment")
EXTRA_TASKS = ("arithmetic_direct", "commonsense_mc")  # answer-format variants of the first two
TASKS = CORE_TASKS + EXTRA_TASKS
METHODS = ("loreft", "direft", "lora")
METHOD_LABELS = {"base": "base (zero-shot)", "loreft": "LoReFT", "direft": "DiReFT", "lora": "LoRA"}


# ----------------------------------------------------------------------------------------------- task data

NAMES = ["Tom", "Anna", "Ben", "Maria", "Leo", "Sara", "Omar", "Lily", "Jack", "Nina", "Raj", "Emma", "Ivan",
         "Zoe", "Sam", "Mia", "Paul", "Aisha", "Noah", "Kate"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards", "shells", "balloons",
          "stamps", "oranges"]
ADD_TEMPLATES = [
    "{n} has {a} {t} and buys {b} more. How many {t} does {n} have now?",
    "{n} has {a} {t}. A friend gives {n} {b} more. How many {t} does {n} have?",
    "{n} picks {a} {t} in the morning and {b} {t} in the afternoon. How many {t} did {n} pick in total?",
    "There are {a} {t} in a box. {n} puts in {b} more. How many {t} are in the box?",
]
SUB_TEMPLATES = [
    "{n} has {a} {t} and gives {b} to a friend. How many {t} does {n} have left?",
    "{n} had {a} {t} but lost {b} of them. How many {t} does {n} have now?",
    "There are {a} {t} on a table. {n} takes {b} away. How many {t} are left on the table?",
    "{n} buys {a} {t} and uses {b} of them. How many {t} are left?",
]
ARITH_SUFFIX = {"arithmetic": " Reply with the calculation and its result, for example 2 + 3 = 5.",
                "arithmetic_direct": " Reply with just the number."}

# Each list is ordered by the property, from least to most. Only pairs at least two places apart are used, so
# every question has a clear answer.
PROPERTIES = {
    "weight": (("Which is heavier?", "Which weighs more?"), ("Which is lighter?", "Which weighs less?"),
               ["a feather", "a paper clip", "a coin", "a pencil", "an apple", "a book", "a brick", "a chair",
                "a bicycle", "a piano", "a car", "an elephant"]),
    "size": (("Which is bigger?", "Which is larger?"), ("Which is smaller?", "Which is tinier?"),
             ["a grain of sand", "an ant", "a button", "a mouse", "a rabbit", "a dog", "a horse", "a bus",
              "a house", "a stadium", "a mountain"]),
    "speed": (("Which is faster?", "Which moves more quickly?"), ("Which is slower?", "Which moves more slowly?"),
              ["a snail", "a tortoise", "a walking person", "a running child", "a bicycle", "a horse", "a car",
               "a high-speed train", "a jet plane", "a rocket"]),
    "temperature": (("Which is hotter?", "Which is warmer?"), ("Which is colder?", "Which is cooler?"),
                    ["an ice cube", "snow", "cold tap water", "a glass of lemonade", "a person's skin",
                     "a cup of hot tea", "boiling water", "a candle flame", "lava", "the surface of the sun"]),
    "hardness": (("Which is harder?", "Which is more rigid?"), ("Which is softer?", "Which is more squishy?"),
                 ["a marshmallow", "a pillow", "a sponge", "butter", "cheese", "a rubber ball", "wood",
                  "a brick", "steel", "a diamond"]),
}
MC_SUFFIX = " Answer with the letter A or B only."
TEXT_SUFFIX = " Answer with one of the two options only."

ANTONYMS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
            ("up", "down"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
            ("young", "old"), ("rich", "poor"), ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"),
            ("tall", "short"), ("thick", "thin"), ("clean", "dirty"), ("day", "night"), ("win", "lose"),
            ("push", "pull"), ("in", "out"), ("first", "last"), ("high", "low"), ("near", "far")]
PLURALS = [("cat", "cats"), ("dog", "dogs"), ("child", "children"), ("mouse", "mice"), ("box", "boxes"),
           ("foot", "feet"), ("tooth", "teeth"), ("man", "men"), ("woman", "women"), ("baby", "babies"),
           ("leaf", "leaves"), ("knife", "knives"), ("bus", "buses"), ("city", "cities"), ("goose", "geese"),
           ("sheep", "sheep"), ("fish", "fish"), ("house", "houses"), ("book", "books"), ("glass", "glasses"),
           ("party", "parties"), ("wolf", "wolves"), ("person", "people"), ("apple", "apples"), ("hero", "heroes")]
COLOURS = [("the sky on a clear day", "blue"), ("fresh grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"),
           ("coal", "black"), ("a ripe tomato", "red"), ("a carrot", "orange"), ("milk", "white"),
           ("a lemon", "yellow"), ("a lime", "green"), ("blood", "red"), ("a crow", "black"),
           ("a pumpkin", "orange"), ("the ocean", "blue"), ("chocolate", "brown"), ("an eggplant", "purple")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"), ("England", "London"),
            ("Greece", "Athens"), ("Canada", "Ottawa"), ("Portugal", "Lisbon"), ("Norway", "Oslo"),
            ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Cuba", "Havana"), ("Thailand", "Bangkok")]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
JSON_SUFFIX = ' Reply only with JSON of the form {"answer": "..."}.'

# Category membership (commonsense-style two-option questions on word knowledge). Each category's members are
# split into training and test members, so a test question asks about words never seen in training.
CATEGORIES = {
    "fruit": ["an apple", "a banana", "a cherry", "a grape", "a lemon", "a mango", "a peach", "a pear",
              "a plum", "a strawberry", "a watermelon", "an orange"],
    "animal": ["a cat", "a dog", "a horse", "a lion", "a rabbit", "a tiger", "an elephant", "a cow", "a sheep",
               "a monkey", "a bear", "a zebra"],
    "vehicle": ["a car", "a bus", "a truck", "a bicycle", "a train", "a motorcycle", "a taxi", "a van", "a tractor",
                "a scooter", "a tram", "an airplane"],
    "musical instrument": ["a piano", "a guitar", "a violin", "a drum", "a flute", "a trumpet", "a harp", "a cello",
                           "a saxophone", "a clarinet", "a trombone", "a banjo"],
    "tool": ["a hammer", "a screwdriver", "a wrench", "a saw", "a drill", "pliers", "a chisel", "a shovel",
             "a rake", "an axe", "a spanner", "a crowbar"],
    "piece of furniture": ["a chair", "a table", "a sofa", "a bed", "a desk", "a wardrobe", "a bookshelf",
                           "a stool", "a bench", "a dresser", "a cupboard", "an armchair"],
    "piece of clothing": ["a shirt", "a jacket", "a skirt", "a sweater", "a coat", "a scarf", "a dress", "a sock",
                          "a glove", "trousers", "a hat", "a blouse"],
    "vegetable": ["a carrot", "a potato", "an onion", "a cabbage", "a cucumber", "a pea", "broccoli", "spinach",
                  "a radish", "lettuce", "a turnip", "celery"],
    "body part": ["an arm", "a leg", "a hand", "a foot", "an elbow", "a knee", "a shoulder", "a finger", "an ear",
                  "a nose", "an eye", "a toe"],
    "kitchen utensil": ["a spoon", "a fork", "a knife", "a ladle", "a whisk", "a spatula", "a kettle", "a pan",
                        "a colander", "a grater", "a rolling pin", "a peeler"],
}
CATEGORY_QUESTIONS = ("Which of these is {c}: {x} or {y}?", "Which one is {c}: {x} or {y}?")

# Sentiment of a short review (a GLUE-style classification answered in words). Test reviews use adjectives and
# subjects that never occur in training.
SENTIMENT_WORDS = {
    "positive": ["wonderful", "excellent", "delightful", "fantastic", "superb", "lovely", "brilliant", "pleasant",
                 "outstanding", "charming", "marvellous", "terrific", "amazing", "great", "enjoyable", "perfect"],
    "negative": ["terrible", "awful", "dreadful", "horrible", "disappointing", "boring", "poor",
                 "miserable", "unpleasant", "disgusting", "mediocre", "dull", "annoying", "bad", "horrendous"],
}
SENTIMENT_SUBJECTS = ["The food", "The service", "The hotel room", "The film", "The concert", "The book",
                      "The coffee", "The staff", "The trip", "The show", "The game", "The museum", "The lesson",
                      "The pizza", "The flight", "The party"]
SENTIMENT_TEMPLATES = ("{s} was {a}.", "{s} was really {a}.", "Honestly, {s_l} was {a}.",
                       "{s} was {a}, and I would say so again.")
SENTIMENT_SUFFIX = " Is this review positive or negative? Answer with one word."


def _arithmetic(cfg: dict, rng: random.Random, worked: bool = True) -> tuple[list[dict], list[dict]]:
    """Both arithmetic variants draw the same problems; only the instruction and the completion differ."""
    facts = [("+", a, b) for a in range(2, 20) for b in range(1, 10)]
    facts += [("-", a, b) for a in range(3, 20) for b in range(1, min(10, a))]
    rng.shuffle(facts)
    need = cfg["n_train"] + cfg["n_test"]
    if len(facts) < need:
        raise SystemExit(f"arithmetic: only {len(facts)} distinct facts for {need} examples")
    rows = []
    for op, a, b in facts[:need]:
        template = rng.choice(ADD_TEMPLATES if op == "+" else SUB_TEMPLATES)
        suffix = ARITH_SUFFIX["arithmetic" if worked else "arithmetic_direct"]
        prompt = template.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b) + suffix
        answer = str(a + b if op == "+" else a - b)
        completion = f"{a} {op} {b} = {answer}" if worked else answer
        rows.append({"prompt": prompt, "completion": completion, "answer": answer, "item": f"{op}{a},{b}"})
    return rows[: cfg["n_train"]], rows[cfg["n_train"]:]


def _mc_row(rng: random.Random, prop: str, lo: str, hi: str, direction: int, letters: bool) -> dict:
    more, less, _ = PROPERTIES[prop]
    question = rng.choice(more if direction else less)
    right = hi if direction else lo
    options = [lo, hi]
    rng.shuffle(options)
    if letters:
        letter = "AB"[options.index(right)]
        prompt = f"{question} A: {options[0]} B: {options[1]}.{MC_SUFFIX}"
        return {"prompt": prompt, "completion": letter, "answer": letter, "options": options,
                "item": f"{prop}:{lo}|{hi}"}
    prompt = f"{question[:-1]}: {options[0]} or {options[1]}?{TEXT_SUFFIX}"
    return {"prompt": prompt, "completion": right, "answer": right, "options": options, "item": f"{prop}:{lo}|{hi}"}


def _commonsense(cfg: dict, rng: random.Random, letters: bool = False) -> tuple[list[dict], list[dict]]:
    """Both commonsense variants draw the same questions; `letters` asks for A/B instead of the option."""
    pairs = []
    for prop, (_, _, objects) in PROPERTIES.items():
        for i in range(len(objects)):
            for j in range(i + 2, len(objects)):
                pairs.append((prop, objects[i], objects[j]))
    rng.shuffle(pairs)
    n_test_pairs = max(1, math.ceil(len(pairs) / 3))
    test_pairs, train_pairs = pairs[:n_test_pairs], pairs[n_test_pairs:]
    items = lambda ps: [(p, d) for p in ps for d in (0, 1)]  # noqa: E731  (both question directions per pair)
    train_items, test_items = items(train_pairs), items(test_pairs)
    rng.shuffle(train_items)
    rng.shuffle(test_items)
    if len(train_items) < cfg["n_train"] or len(test_items) < cfg["n_test"]:
        raise SystemExit("commonsense: not enough object pairs for the requested sizes")
    train = [_mc_row(rng, *p, d, letters) for p, d in train_items[: cfg["n_train"]]]
    test = [_mc_row(rng, *p, d, letters) for p, d in test_items[: cfg["n_test"]]]
    return train, test


def _json_task(cfg: dict, rng: random.Random) -> tuple[list[dict], list[dict]]:
    qa = [(f'What is the opposite of "{a}"?', b) for a, b in ANTONYMS]
    qa += [(f'What is the opposite of "{b}"?', a) for a, b in ANTONYMS]
    qa += [(f'What is the plural of "{s}"?', p) for s, p in PLURALS]
    qa += [(f"What colour is {thing}?", c) for thing, c in COLOURS]
    qa += [(f"What is the capital of {country}?", city) for country, city in CAPITALS]
    qa += [(f"What is {a} plus {b}?", str(a + b)) for a in range(1, 13) for b in range(a, 13)]
    qa += [(f"Which day comes after {d}?", WEEKDAYS[(i + 1) % 7]) for i, d in enumerate(WEEKDAYS)]
    qa += [(f"Which month comes after {m}?", MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)]
    qa += [(f'What is the first letter of the word "{w}"?', w[0]) for pair in ANTONYMS for w in pair]
    qa = sorted(set(qa))
    rng.shuffle(qa)
    need = cfg["n_train"] + cfg["n_test"]
    if len(qa) < need:
        raise SystemExit(f"json_format: only {len(qa)} distinct questions for {need} examples")
    rows = [{"prompt": q + JSON_SUFFIX, "completion": json.dumps({"answer": a}), "answer": a, "item": q}
            for q, a in qa[:need]]
    return rows[: cfg["n_train"]], rows[cfg["n_train"]:]


def _categories(cfg: dict, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Two options, one a member of the category and one of another category; train and test members differ."""
    train_m, test_m = {}, {}
    for cat, members in CATEGORIES.items():
        ms = list(members)
        rng.shuffle(ms)
        cut = len(ms) * 2 // 3
        train_m[cat], test_m[cat] = ms[:cut], ms[cut:]

    def rows(members: dict, n: int) -> list[dict]:
        cands = [(c, m, o, oc) for c in members for m in members[c] for oc in members if oc != c for o in members[oc]]
        rng.shuffle(cands)
        out, asked = [], collections.Counter()
        for c, m, o, _ in cands:
            if asked[m] == 2:  # each member is asked about at most twice
                continue
            asked[m] += 1
            options = [m, o]
            rng.shuffle(options)
            q = rng.choice(CATEGORY_QUESTIONS).format(c=("an " if c[0] in "aeiou" else "a ") + c, x=options[0],
                                                      y=options[1])
            out.append({"prompt": q + TEXT_SUFFIX, "completion": m, "answer": m, "options": options,
                        "member": m, "item": f"{c}:{m}|{o}"})
            if len(out) == n:
                break
        if len(out) < n:
            raise SystemExit(f"categories: only {len(out)} questions for {n} examples")
        return out

    return rows(train_m, cfg["n_train"]), rows(test_m, cfg["n_test"])


def _sentiment(cfg: dict, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """A review made of a subject, a template and a sentiment adjective; test adjectives and subjects are new."""
    words = {k: sorted(v) for k, v in SENTIMENT_WORDS.items()}
    subjects = list(SENTIMENT_SUBJECTS)
    rng.shuffle(subjects)
    split_w = {}
    for k, ws in words.items():
        rng.shuffle(ws)
        cut = len(ws) * 2 // 3
        split_w[k] = (ws[:cut], ws[cut:])
    cut = len(subjects) * 2 // 3

    def rows(part: int, subs: list[str], n: int) -> list[dict]:
        cands = [(lab, a, s, t) for lab in split_w for a in split_w[lab][part] for s in subs
                 for t in SENTIMENT_TEMPLATES]
        rng.shuffle(cands)
        out = []
        for lab, a, s, t in cands[:n]:
            review = t.format(s=s, s_l=s[0].lower() + s[1:], a=a)
            out.append({"prompt": f'Review: "{review}"{SENTIMENT_SUFFIX}', "completion": lab, "answer": lab,
                        "options": ["positive", "negative"], "item": review})
        return out

    return rows(0, subjects[:cut], cfg["n_train"]), rows(1, subjects[cut:], cfg["n_test"])


BUILDERS = {"arithmetic": _arithmetic, "arithmetic_direct": lambda cfg, rng: _arithmetic(cfg, rng, worked=False),
            "commonsense": _commonsense, "commonsense_mc": lambda cfg, rng: _commonsense(cfg, rng, letters=True),
            "json_format": _json_task, "categories": _categories, "sentiment": _sentiment}
SEED_KEYS = {"arithmetic_direct": "arithmetic", "commonsense": "commonsense_mc"}  # the variants share their items


def make_task(task: str, cfg: dict) -> dict:
    """{"fit", "val", "test"} rows; seeded, deterministic, and the test items never occur in fit or val."""
    seed = int(hashlib.sha256(f"{cfg['seed']}:{SEED_KEYS.get(task, task)}".encode()).hexdigest()[:8], 16)
    train, test = BUILDERS[task](cfg, random.Random(seed))
    seen = {r["item"] for r in train}
    assert not any(r["item"] in seen for r in test), f"{task}: a test item occurs in training"
    return {"fit": train[cfg["n_val"]:], "val": train[: cfg["n_val"]], "test": test}


# ----------------------------------------------------------------------------------------------- scoring

_INT = re.compile(r"-?\d+")


def score(task: str, row: dict, reply: str) -> dict:
    """{"correct": bool, ...}: the exact-answer rule of each task."""
    reply = reply.strip()
    if task == "arithmetic":
        # the last number of the reply ("6 + 8 = 14", "So he has 14 apples.")
        nums = _INT.findall(reply)
        got = nums[-1] if nums else None
        return {"correct": got == row["answer"], "extracted": got}
    if task == "arithmetic_direct":
        # the number the reply starts with, else the last number in it (lenient to a sentence-style answer)
        lead = re.match(r"^\s*(-?\d+)\b", reply)
        nums = _INT.findall(reply)
        got = lead.group(1) if lead else (nums[-1] if nums else None)
        return {"correct": got == row["answer"], "extracted": got}
    if task in ("commonsense", "categories", "sentiment"):
        # the option the reply is, else the option it names first ("The elephant is heavier" -> "an elephant")
        cores = [re.sub(r"^(a|an|the) ", "", o.lower()) for o in row["options"]]
        text = reply.lower().strip(" .!\"'")
        text = re.sub(r"^(a|an|the) ", "", text)
        got = None
        if text in cores:
            got = row["options"][cores.index(text)]
        else:
            hits = [(m.start(), i) for i, c in enumerate(cores) if (m := re.search(rf"\b{re.escape(c)}\b", text))]
            if hits:
                got = row["options"][min(hits)[1]]
        return {"correct": got == row["answer"], "extracted": got}
    if task == "commonsense_mc":
        # "the answer is B" first; a reply listing both options ("A: ... B: ...") is a repetition, not an
        # answer; then a leading letter ("B", "B.", "(B)", but not the article in "A brick is ..."); then the
        # option text when exactly one option is named
        got = None
        m = re.search(r"\b(?:answer|option)(?: is)?:?\s*\(?([AB])\b", reply, re.I)
        if m:
            got = m.group(1).upper()
        elif re.search(r"\bA:", reply) and re.search(r"\bB:", reply):
            got = None
        elif (m := re.match(r"^\(?([AB])\)?(?:[\s.:)]|$)", reply)) and not re.match(r"^A\s+[a-z]", reply, re.I):
            got = m.group(1)
        if got is None and not (re.search(r"\bA:", reply) and re.search(r"\bB:", reply)):
            named = [i for i, o in enumerate(row["options"]) if o.lower() in reply.lower()]
            if len(named) == 1:
                got = "AB"[named[0]]
        return {"correct": got == row["answer"], "extracted": got}
    if task == "json_format":
        try:
            obj = json.loads(reply)
        except ValueError:
            return {"correct": False, "content_correct": False, "extracted": None}
        ok = (isinstance(obj, dict) and list(obj) == ["answer"] and isinstance(obj["answer"], (str, int, float))
              and not isinstance(obj["answer"], bool) and str(obj["answer"]).strip() != "")
        content = ok and str(obj["answer"]).strip().lower() == row["answer"].lower()
        return {"correct": ok, "content_correct": content, "extracted": obj.get("answer") if ok else None}
    raise ValueError(task)


# ----------------------------------------------------------------------------------------------- models

def load_base():
    from reftkit.models import load_model

    model, tok = load_model(MODEL_NAME)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def replies(model, tok, prompts: list[str], cfg: dict) -> list[str]:
    """Greedy replies through `reftkit.chat.generate_replies` (a base model, a `ReftModel` or a peft model), in
    batches."""
    from reftkit.chat import generate_replies

    out = []
    for s in range(0, len(prompts), cfg["gen_batch_size"]):
        out += generate_replies(model, tok, prompts[s: s + cfg["gen_batch_size"]],
                                max_new_tokens=cfg["max_new_tokens"])
    return out


def evaluate(model, tok, task: str, rows: list[dict], cfg: dict) -> dict:
    t0 = time.perf_counter()
    outs = replies(model, tok, [r["prompt"] for r in rows], cfg)
    scored = [score(task, r, o) for r, o in zip(rows, outs)]
    res = {"n": len(rows), "accuracy": sum(s["correct"] for s in scored) / len(rows),
           "eval_seconds": round(time.perf_counter() - t0, 2),
           "samples": [{"prompt": r["prompt"], "target": r["answer"], "reply": o, "correct": s["correct"]}
                       for r, o, s in list(zip(rows, outs, scored))[:4]]}
    if task == "json_format":
        res["content_accuracy"] = sum(s["content_correct"] for s in scored) / len(rows)
    return res


def _order(n: int, seed: int, epoch: int) -> list[int]:
    """The batch order reftkit's training loop uses (a seeded permutation per epoch), so LoRA sees the same
    batches in the same order as the ReFT runs."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_lora(model, data, cfg: dict, lr: float, pad: int) -> tuple[object, dict]:
    """LoRA on the attention projections, trained like reftkit trains an adapter: AdamW, linear decay to zero
    without warm-up, per-epoch seeded batch order, cross-entropy on completion tokens only (LM head applied only
    where a completion token is predicted)."""
    from peft import LoraConfig, get_peft_model

    from reftkit.reft.data import Collator

    torch.manual_seed(cfg["seed"])
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **cfg["lora"]))
    lm = peft_model.get_base_model()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    collator = Collator(pad, "sft")
    bs = cfg["batch_size"]
    steps_per_epoch = math.ceil(len(data) / bs)
    total = max(1, math.ceil(steps_per_epoch * cfg["epochs"]))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
    losses, step, epoch = [], 0, 0
    lm.train()
    t0 = time.perf_counter()
    while step < total:
        order = _order(len(data), cfg["seed"], epoch)
        for s in range(0, len(order), bs):
            batch = collator([data[i] for i in order[s: s + bs]])
            labels = batch["labels"]
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100
            hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            logits = lm.lm_head(hidden[keep]).float()
            loss = F.cross_entropy(logits, labels[:, 1:][keep[:, :-1]])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if step >= total:
                break
        epoch += 1
    seconds = time.perf_counter() - t0
    lm.eval()
    trainable = sum(p.numel() for p in params)
    return peft_model, {"steps": step, "losses": losses, "train_seconds": seconds, "trainable": trainable}


def val_loss(model_fn, data, pad: int, bs: int) -> float:
    from reftkit.reft.data import Collator

    collator = Collator(pad, "sft")
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data), bs):
            chunk = data[s: s + bs]
            total += float(model_fn(collator(chunk))) * len(chunk)
            n += len(chunk)
    return total / max(n, 1)


def lora_loss(peft_model):
    lm = peft_model.get_base_model()

    def fn(batch):
        labels = batch["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return F.cross_entropy(lm.lm_head(hidden[keep]).float(), labels[:, 1:][keep[:, :-1]])

    return fn


def run_one(task: str, method: str, lr: float, splits: dict, cfg: dict) -> dict:
    """Train one adapter on the fit split; accuracy on val and test, validation loss."""
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.data import encode
    from reftkit.reft.model import ReftModel
    from reftkit.reft.train import TrainArgs, train

    model, tok = load_base()
    n_base = sum(p.numel() for p in model.parameters())
    pad = pad_id(tok)
    fit = encode(tok, splits["fit"], "sft", where=f"{task}/fit")
    val = encode(tok, splits["val"], "sft", where=f"{task}/val")
    cpu0 = time.process_time()
    if method == "lora":
        gen_model, info = train_lora(model, fit, cfg, lr, pad)
        loss_fn = lora_loss(gen_model)
    else:
        gen_model = ReftModel(model, ReftConfig(method=method, seed=cfg["seed"], **cfg["reft"]))
        args = TrainArgs(epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=lr, weight_decay=cfg["weight_decay"],
                         seed=cfg["seed"], progress=False)
        state = train(gen_model, fit, args, task="sft", pad_token_id=pad)
        info = {"steps": state["step"], "losses": state["losses"], "train_seconds": state["train_seconds"],
                "trainable": gen_model.trainable_parameters()[0]}
        gen_model.eval()
        loss_fn = lambda b: gen_model(**b).loss  # noqa: E731
    cpu_seconds = time.process_time() - cpu0
    v_loss = val_loss(loss_fn, val, pad, cfg["batch_size"])
    res = {
        "task": task, "method": method, "lr": lr, "trainable_parameters": info["trainable"],
        "base_parameters": n_base, "trainable_percent": 100 * info["trainable"] / n_base,
        "train_seconds": round(info["train_seconds"], 2), "train_cpu_seconds": round(cpu_seconds, 2),
        "steps": info["steps"],
        "first_loss": round(info["losses"][0], 4), "final_loss": round(info["losses"][-1], 4),
        "losses": [round(x, 4) for x in info["losses"]],
        "val_loss": round(v_loss, 4),
        "val": evaluate(gen_model, tok, task, splits["val"], cfg),
        "test": evaluate(gen_model, tok, task, splits["test"], cfg),
    }
    if method != "lora":
        gen_model.unload()
    return res


def run_base(task: str, splits: dict, cfg: dict) -> dict:
    model, tok = load_base()
    return {"task": task, "method": "base", "trainable_parameters": 0,
            "base_parameters": sum(p.numel() for p in model.parameters()),
            "test": evaluate(model, tok, task, splits["test"], cfg)}


# ----------------------------------------------------------------------------------------------- memorisation

def memorise(n_tokens: int, cfg: dict) -> dict:
    """Train a rank-1 LoReFT (one layer, one prompt position) to make the model continue a fixed prompt with
    `n_tokens` seeded random vocabulary tokens; stop as soon as greedy decoding reproduces them exactly."""
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.data import Collator, Example
    from reftkit.reft.model import ReftModel
    from reftkit.reft.train import param_groups

    mc = cfg["memorisation"]
    model, tok = load_base()
    special = set(tok.all_special_ids)
    g = torch.Generator().manual_seed(cfg["seed"] * 7919 + n_tokens)
    pool = torch.tensor([i for i in range(len(tok)) if i not in special and i < model.config.vocab_size])
    target = pool[torch.randint(len(pool), (n_tokens,), generator=g)].tolist()
    prompt = tok(mc["prompt"], add_special_tokens=False)["input_ids"]
    reft = ReftModel(model, ReftConfig(method="loreft", layers=[mc["layer"]], rank=mc["rank"],
                                       positions=mc["positions"], seed=cfg["seed"]))
    batch = Collator(pad_id(tok), "sft")([Example(prompt, completion=target)])
    opt = torch.optim.AdamW(param_groups(reft, 0.0), lr=mc["lr"])
    budget, warm = mc["max_steps"], mc["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm) * max(0.0, (budget - k) / budget))
    want = torch.tensor(target)
    t0 = time.perf_counter()
    steps, exact, best, first_exact_step = 0, False, 0.0, None
    prompt_t = torch.tensor([prompt])

    def greedy_matches() -> int:
        """How many leading tokens greedy decoding reproduces."""
        reft.eval()
        out = reft.generate(input_ids=prompt_t, attention_mask=torch.ones_like(prompt_t), max_new_tokens=n_tokens,
                            min_new_tokens=n_tokens, do_sample=False, pad_token_id=pad_id(tok))
        reft.train()
        got = out[0, len(prompt):].tolist()
        return next((i for i, (a, b) in enumerate(zip(got, target)) if a != b), min(len(got), n_tokens))

    reft.train()
    while steps < mc["max_steps"]:
        out = reft(**batch)
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        with torch.no_grad():  # logits of the forward just done (before this step's update)
            acc = float((out.logits.argmax(-1) == want).float().mean())
        best = max(best, acc)
        # teacher-forced argmax all right is necessary for an exact greedy reproduction; then confirm by decoding
        if acc == 1.0 and greedy_matches() == n_tokens:
            exact, first_exact_step = True, steps
            break
    seconds = time.perf_counter() - t0
    matched = greedy_matches() if not exact else n_tokens
    reft.unload()
    return {"n_tokens": n_tokens, "exact": exact, "steps": steps, "steps_to_exact": first_exact_step,
            "greedy_prefix_matched": matched, "best_teacher_forced_accuracy": round(best, 4),
            "final_loss": round(float(out.loss.detach()), 4), "seconds": round(seconds, 2),
            "trainable_parameters": reft.trainable_parameters()[0]}


# ----------------------------------------------------------------------------------------------- bookkeeping

def machine_info() -> dict:
    import peft
    import transformers

    import reftkit

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "reftkit": reftkit.__version__}


def quality_settings(cfg: dict) -> dict:
    """The settings the task cells depend on (the thread count changes only the speed)."""
    return {k: v for k, v in cfg.items() if k not in ("threads", "memorisation")}


def save_json(path: Path, doc: dict) -> None:
    session = doc.get("sessions", [{}])[-1]
    if "started" in session and "finished" not in session:  # so an interrupted session still has its time
        session["last_saved"] = now()
        session["seconds"] = round((_dt.datetime.fromisoformat(session["last_saved"])
                                    - _dt.datetime.fromisoformat(session["started"])).total_seconds(), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _load() -> list[float] | None:
    """1/5/15-minute load averages: the timings are only comparable when the machine was not shared."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _backfill_session_times(doc: dict) -> None:
    """An interrupted session written before sessions kept their time: its last finished cell ends it."""
    sessions = doc.get("sessions", [])
    stamps = [r["finished"] for r in doc["runs"].values() if "finished" in r]
    stamps += [b["finished"] for b in doc["base"].values() if "finished" in b]
    stamps += [m["finished"] for m in doc.get("memorisation", {}).get("sweep", []) if "finished" in m]
    for i, sess in enumerate(sessions):
        if "seconds" in sess:
            continue
        end = sessions[i + 1]["started"] if i + 1 < len(sessions) else now()
        inside = [t for t in stamps if sess["started"] <= t <= end]
        if inside:
            sess["seconds"] = round((_dt.datetime.fromisoformat(max(inside))
                                     - _dt.datetime.fromisoformat(sess["started"])).total_seconds(), 1)
            sess["seconds_from"] = "last finished cell"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def select(runs: list[dict]) -> dict:
    """The grid point with the best validation accuracy; ties go to the lower validation loss."""
    return min(runs, key=lambda r: (-r["val"]["accuracy"], r["val_loss"]))


def chance(rows: list[dict]) -> float:
    """Accuracy of a uniform guess: 1/len(options) for multiple-choice rows, 0 for open answers."""
    return sum(1 / len(r["options"]) if "options" in r else 0.0 for r in rows) / len(rows)


def shown_tasks(doc: dict) -> list[str]:
    """The tasks with results, in the fixed order."""
    return [t for t in TASKS if t in doc["base"] or any(k.startswith(f"{t}/") for k in doc["runs"])]


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of an accuracy p measured on n items (64 items: about +-11 points at 75%)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def summarise(doc: dict, cfg: dict) -> None:
    cells, claim = {}, {}
    for task in shown_tasks(doc):
        for method in METHODS:
            runs = [doc["runs"][k] for k in sorted(doc["runs"]) if k.startswith(f"{task}/{method}/")]
            if len(runs) == len(cfg["lr_grid"][method]):
                best = select(runs)
                cells[f"{task}/{method}"] = {
                    "lr": best["lr"], "test_accuracy": best["test"]["accuracy"],
                    "test_ci95": wilson(best["test"]["accuracy"], best["test"]["n"]),
                    "val_accuracy": best["val"]["accuracy"],
                    "trainable_parameters": best["trainable_parameters"],
                    "trainable_percent": best["trainable_percent"], "train_seconds": best["train_seconds"],
                    **({"test_content_accuracy": best["test"]["content_accuracy"]}
                       if "content_accuracy" in best["test"] else {}),
                }
        lo, lr_ = cells.get(f"{task}/loreft"), cells.get(f"{task}/lora")
        if lo and lr_:
            gap = 100 * (lo["test_accuracy"] - lr_["test_accuracy"])
            ratio = lr_["trainable_parameters"] / lo["trainable_parameters"]
            level = doc.get("data", {}).get(task, {}).get("chance_accuracy", 0.0)
            claim[task] = {"loreft_minus_lora_points": round(gap, 2), "parameter_ratio": round(ratio, 1),
                           "holds": bool(gap >= -2.0 and ratio >= 10.0), "chance_accuracy": level,
                           # when neither method clears chance by 5 points the comparison says little
                           "above_chance": bool(max(lo["test_accuracy"], lr_["test_accuracy"]) > level + 0.05)}
    doc["cells"], doc["claim"] = cells, claim
    mem = doc.get("memorisation", {}).get("sweep", [])
    exact = [m["n_tokens"] for m in mem if m["exact"]]
    if mem:
        # the sweep stops at the first failure, so the largest exact length is the last success before it
        doc["memorisation"]["largest_exact_n_tokens"] = max(exact) if exact else 0


def table(doc: dict) -> str:
    tasks = shown_tasks(doc)
    lines = ["| method | params (trainable) | % of base | " + " | ".join(tasks) + " | train s (sum) | lr |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: | --- |"]
    base_row = ["base (zero-shot)", "0", "0"]
    for task in tasks:
        b = doc["base"].get(task)
        base_row.append(f"{100 * b['test']['accuracy']:.1f}" if b else "-")
    lines.append("| " + " | ".join(base_row + ["-", "-"]) + " |")
    for method in METHODS:
        cells = [doc["cells"].get(f"{t}/{method}") for t in tasks]
        have = [c for c in cells if c]
        if not have:
            continue
        row = [METHOD_LABELS[method], f"{have[0]['trainable_parameters']:,}", f"{have[0]['trainable_percent']:.4f}"]
        row += [f"{100 * c['test_accuracy']:.1f}" if c else "-" for c in cells]
        row.append(f"{sum(c['train_seconds'] for c in have):.0f}")
        row.append(", ".join(f"{c['lr']:g}" if c else "-" for c in cells))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = shown_tasks(doc)
    rows = ["base"] + list(METHODS)
    fig, ax = plt.subplots(figsize=(2.2 * len(tasks) + 2, 4.2))
    width = 0.8 / len(rows)
    for i, m in enumerate(rows):
        vals, lows, highs = [], [], []
        for t in tasks:
            c = doc["base"].get(t) if m == "base" else doc["cells"].get(f"{t}/{m}")
            acc = (c["test"]["accuracy"] if m == "base" else c["test_accuracy"]) if c else 0.0
            n = (c["test"]["n"] if m == "base" else doc["runs"][f"{t}/{m}/lr={c['lr']:g}"]["test"]["n"]) if c else 1
            lo, hi = wilson(acc, n)
            vals.append(100 * acc)
            lows.append(100 * (acc - lo))
            highs.append(100 * (hi - acc))
        label = METHOD_LABELS[m]
        c0 = next((doc["cells"][f"{t}/{m}"] for t in tasks if f"{t}/{m}" in doc["cells"]), None)
        if c0:
            label += f" ({c0['trainable_parameters']:,} params, {c0['trainable_percent']:.3f}%)"
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(tasks))]
        bars = ax.bar(xs, vals, width, label=label, yerr=[lows, highs], error_kw={"elinewidth": 0.6, "capsize": 1.5,
                                                                                    "ecolor": "dimgrey"})
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    for j, t in enumerate(tasks):
        if t.startswith("commonsense") or t in ("categories", "sentiment"):  # two options: 50% is chance
            ax.hlines(50, j - 0.45, j + 0.45, colors="grey", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("held-out test accuracy (%)")
    ax.set_ylim(0, 110)
    title = f"{MODEL_NAME}: accuracy on held-out items (bars: 95% Wilson interval; dashed: chance)"
    mem = doc.get("memorisation", {})
    if mem.get("sweep"):
        title += (f"\nrank-1 LoReFT memorisation: {mem.get('largest_exact_n_tokens', 0)} random tokens reproduced "
                  f"exactly (budget {mem['config']['max_steps']} steps)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=2, bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run into reft_quality_quick.{json,png}")
    ap.add_argument("--out-dir", default=str(HERE / "results"), help="where the JSON and PNG go")
    ap.add_argument("--fresh", action="store_true", help="ignore cached cells and recompute everything")
    ap.add_argument("--tasks", default="core",
                    help=f"'core' ({', '.join(CORE_TASKS)}), 'all' (adds {', '.join(EXTRA_TASKS)}) or a comma list")
    ap.add_argument("--skip-memorisation", action="store_true")
    ap.add_argument("--memorisation-steps", type=int, default=None,
                    help=f"step budget per memorisation length (default {FULL['memorisation']['max_steps']})")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 2; on a machine shared with other jobs 1 can be faster)")
    a = ap.parse_args(argv)
    tasks = {"core": CORE_TASKS, "all": TASKS}.get(a.tasks) or tuple(t.strip() for t in a.tasks.split(","))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown tasks {unknown}; expected {', '.join(TASKS)}")

    cfg = dict(QUICK if a.quick else FULL)
    if a.threads:
        cfg["threads"] = a.threads
    if a.memorisation_steps:
        cfg["memorisation"] = {**cfg["memorisation"], "max_steps": a.memorisation_steps}
    torch.set_num_threads(cfg["threads"])
    out_dir = Path(a.out_dir)
    stem = "reft_quality_quick" if a.quick else "reft_quality"
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    fresh = {"benchmark": "reft_quality", "model": MODEL_NAME, "quick": a.quick, "config": cfg, "started": now(),
             "runs": {}, "base": {}, "memorisation": {"config": cfg["memorisation"], "sweep": []}}
    doc = fresh
    if json_path.is_file() and not a.fresh:
        old = json.loads(json_path.read_text())
        # cached cells are reused only when made with the same settings; each part is checked on its own
        if quality_settings(old.get("config", {})) == json.loads(json.dumps(quality_settings(cfg))):
            doc = {**old, "config": cfg}
            print(f"resuming task cells from {json_path}", file=sys.stderr)
        else:
            print(f"{json_path} holds task cells made with other settings; recomputing them", file=sys.stderr)
            doc = {**fresh, "memorisation": old.get("memorisation", fresh["memorisation"])}
        if doc["memorisation"].get("config") != json.loads(json.dumps(cfg["memorisation"])):
            doc["memorisation"] = {"config": cfg["memorisation"], "sweep": []}
    doc["machine"] = machine_info()
    t_start = time.perf_counter()
    # sessions that only re-summarised cached cells (no time between start and finish) are not kept
    session = doc["sessions"] = [x for x in doc.get("sessions", []) if x.get("finished") != x["started"]]
    session.append({"started": now(), "threads": cfg["threads"], "load_average_at_start": _load()})

    splits = {t: make_task(t, cfg) for t in tasks}
    # a cached cell is reused only if it was made on exactly these rows
    sha = {t: hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16] for t, s in splits.items()}
    doc.setdefault("data", {}).update({t: {k: len(v) for k, v in s.items()} | {
        "sha256_16": sha[t], "chance_accuracy": chance(s["test"]), "example": s["test"][0]} for t, s in splits.items()})

    for task in tasks:
        if doc["base"].get(task, {}).get("data_sha") != sha[task]:
            print(f"[{task}] base zero-shot", file=sys.stderr)
            doc["base"][task] = {**run_base(task, splits[task], cfg), "data_sha": sha[task], "finished": now()}
            save_json(json_path, doc)
        for method in METHODS:
            for lr in cfg["lr_grid"][method]:
                key = f"{task}/{method}/lr={lr:g}"
                if doc["runs"].get(key, {}).get("data_sha") == sha[task]:
                    continue
                print(f"[{key}] training", file=sys.stderr)
                res = run_one(task, method, lr, splits[task], cfg)
                res["data_sha"], res["finished"] = sha[task], now()
                doc["runs"][key] = res
                print(f"[{key}] val {res['val']['accuracy']:.3f} test {res['test']['accuracy']:.3f} "
                      f"loss {res['first_loss']}->{res['final_loss']} ({res['train_seconds']} s)", file=sys.stderr)
                summarise(doc, cfg)
                save_json(json_path, doc)

    if not a.skip_memorisation:
        sweep = doc["memorisation"]["sweep"]
        for m in list(sweep):  # entries from before the prefix count: exact ones have the full prefix
            if "greedy_prefix_matched" not in m:
                if m["exact"]:
                    m["greedy_prefix_matched"] = m.pop("greedy_tokens_matched", m["n_tokens"])
                else:
                    sweep.remove(m)
        done = {m["n_tokens"]: m for m in sweep}
        for n in cfg["memorisation"]["lengths"]:
            if n not in done:
                print(f"[memorisation] {n} tokens", file=sys.stderr)
                m = memorise(n, cfg)
                m["finished"] = now()
                sweep.append(m)
                done[n] = m
                print(f"[memorisation] {n}: exact={m['exact']} steps={m['steps']} "
                      f"prefix={m['greedy_prefix_matched']} ({m['seconds']} s)", file=sys.stderr)
                summarise(doc, cfg)
                save_json(json_path, doc)
            if not done[n]["exact"]:
                break  # doubling sweep: stop at the first length not memorised

    summarise(doc, cfg)
    if session[-1].get("last_saved") is None:  # nothing computed: only the summary and the plot were redone
        session.pop()
    else:
        session[-1]["finished"] = now()
        session[-1]["load_average_at_end"] = _load()
        session[-1]["seconds"] = round(time.perf_counter() - t_start, 1)
    _backfill_session_times(doc)
    doc["total_seconds"] = round(sum(s.get("seconds", 0) for s in session), 1)
    doc["finished"] = now()
    save_json(json_path, doc)
    plot(doc, png_path)
    print(table(doc))
    print()
    for task, c in doc["claim"].items():
        print(f"- {task}: LoReFT - LoRA = {c['loreft_minus_lora_points']:+.1f} points at "
              f"{c['parameter_ratio']:.0f}x fewer parameters -> claim {'holds' if c['holds'] else 'does not hold'}"
              + ("" if c["above_chance"] else " (neither method is above chance: not informative)"))
    mem = doc["memorisation"]
    if mem.get("sweep"):
        print(f"- memorisation: rank-1 LoReFT at layer {cfg['memorisation']['layer']} reproduces "
              f"{mem.get('largest_exact_n_tokens', 0)} random tokens exactly "
              f"(budget {cfg['memorisation']['max_steps']} steps)")
    print(f"- total time: {doc['total_seconds']:.0f} s; results in {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
