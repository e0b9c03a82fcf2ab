"""Causal tracing over factual prompts on SmolLM2-135M-Instruct, averaged as in Meng et al. (2022), Figure 2.

Each candidate fact is (subject, prompt, one-token target). Only facts whose target is the model's greedy next
token are traced. Every trace uses 5 noise samples (3x the embedding std), single-layer restoration of the hidden
state and 10-layer windows for MLP and attention. Positions are grouped as in the paper (first / middle / last
subject token, first subsequent token, further tokens, last token) and the target probability is averaged over
facts, per group and layer. Writes benchmarks/results/tracing_facts.json and tracing_facts.png.

Run:  .venv/bin/python benchmarks/tracing_facts.py [--threads 1] [--samples 5]
"""

from __future__ import annotations

import argparse
import os
import sys

# On a shared machine, OpenMP threads that spin while waiting slow everything down; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GROUPS = ["first subject token", "middle subject tokens", "last subject token", "first subsequent token",
          "further tokens", "last token"]

FACTS = [
    ("Eiffel Tower", "The Eiffel Tower is located in the city of", " Paris"),
    ("Colosseum", "The Colosseum is located in the city of", " Rome"),
    ("Big Ben", "Big Ben is located in the city of", " London"),
    ("Statue of Liberty", "The Statue of Liberty is located in the city of", " New"),
    ("Brandenburg Gate", "The Brandenburg Gate is located in the city of", " Berlin"),
    ("Kremlin", "The Kremlin is located in the city of", " Moscow"),
    ("Acropolis", "The Acropolis is located in the city of", " Athens"),
    ("Sagrada Familia", "The Sagrada Familia is located in the city of", " Barcelona"),
    ("Golden Gate Bridge", "The Golden Gate Bridge is located in the city of", " San"),
    ("Taj Mahal", "The Taj Mahal is located in the country of", " India"),
    ("Great Pyramid of Giza", "The Great Pyramid of Giza is located in the country of", " Egypt"),
    ("Machu Picchu", "Machu Picchu is located in the country of", " Peru"),
    ("Great Wall", "The Great Wall is located in the country of", " China"),
    ("Leaning Tower of Pisa", "The Leaning Tower of Pisa is located in the country of", " Italy"),
    ("Louvre", "The Louvre is located in the city of", " Paris"),
    ("Vatican", "The Vatican is located in the city of", " Rome"),
    ("Toyota", "Toyota is a car company from the country of", " Japan"),
    ("Ferrari", "Ferrari is a car company from the country of", " Italy"),
    ("iPhone", "The iPhone is made by the company", " Apple"),
    ("Albert Einstein", "Albert Einstein was famous for the theory of", " relativity"),
    ("Romeo and Juliet", "Romeo and Juliet was written by William", " Shakespeare"),
    ("Mona Lisa", "The Mona Lisa was painted by Leonardo da", " Vinci"),
    ("France", "The capital of France is the city of", " Paris"),
    ("Germany", "The capital of Germany is the city of", " Berlin"),
    ("Italy", "The capital of Italy is the city of", " Rome"),
    ("Spain", "The capital of Spain is the city of", " Madrid"),
    ("Japan", "The capital of Japan is the city of", " Tokyo"),
    ("England", "The capital of England is the city of", " London"),
    ("Greece", "The capital of Greece is the city of", " Athens"),
    ("China", "The capital of China is the city of", " Beijing"),
    ("Canada", "The capital of Canada is the city of", " Ottawa"),
    ("Portugal", "The capital of Portugal is the city of", " Lisbon"),
    ("Austria", "The capital of Austria is the city of", " Vienna"),
    ("Nile", "The Nile river flows through the country of", " Egypt"),
    ("Barack Obama", "Barack Obama was the president of the United", " States"),
    ("Sushi", "Sushi is a traditional dish from the country of", " Japan"),
    ("Pizza", "Pizza is a traditional dish from the country of", " Italy"),
]


def groups_of(start: int, end: int, length: int) -> list[list[int]]:
    """Token indices of each position group (a group may be empty)."""
    return [[start], list(range(start + 1, end - 1)), [end - 1], [end] if end < length - 1 else [],
            list(range(end + 1, length - 1)), [length - 1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from reftkit.analysis.plots import heatmaps
    from reftkit.analysis.text import single_token
    from reftkit.analysis.tracing import causal_trace
    from reftkit.models import load_model

    hf_logging.set_verbosity_error()
    model, tokenizer = load_model("smollm2-135m-instruct")
    n_layers = model.config.num_hidden_layers
    kept, skipped = [], []
    for subject, prompt, target in FACTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(model(input_ids=ids).logits[0, -1].argmax())
        (kept if top == single_token(tokenizer, target) else skipped).append((subject, prompt, target))
    print(f"{len(kept)} of {len(FACTS)} facts predicted correctly; tracing them", file=sys.stderr)

    sums = {c: torch.zeros(len(GROUPS), n_layers) for c in ("block_output", "mlp_output", "attention_output")}
    counts = torch.zeros(len(GROUPS))
    per_fact, started = [], time.perf_counter()
    for k, (subject, prompt, target) in enumerate(kept):
        r = causal_trace(model, tokenizer, prompt, subject, target, samples=args.samples, window=args.window)
        groups = groups_of(*r.subject_range, len(r.tokens))
        entry = {"subject": subject, "prompt": prompt, "target": target, "clean_prob": r.clean_prob,
                 "corrupted_prob": r.corrupted_prob, "seconds": round(r.seconds, 2), "tokens": r.tokens,
                 "subject_range": list(r.subject_range), "groups": {}}
        for g, idx in enumerate(groups):
            if not idx:
                continue
            counts[g] += 1
            for c, grid in r.grids.items():
                avg = grid[:, idx].mean(1)
                sums[c][g] += avg
                entry["groups"].setdefault(c, {})[GROUPS[g]] = [round(float(v), 5) for v in avg]
        per_fact.append(entry)
        print(f"[{k + 1}/{len(kept)}] {subject!r}: clean {r.clean_prob:.3f}, corrupted {r.corrupted_prob:.3f}, "
              f"{r.seconds:.1f} s", file=sys.stderr)
    total = time.perf_counter() - started
    mean = {c: s / counts[:, None] for c, s in sums.items()}
    clean = sum(f["clean_prob"] for f in per_fact) / len(per_fact)
    corrupted = sum(f["corrupted_prob"] for f in per_fact) / len(per_fact)

    def recovered(c, group, layers):
        row = mean[c][GROUPS.index(group), layers]
        best = int(row.argmax())
        return {"layer": layers[best], "prob": round(float(row[best]), 4),
                "fraction_of_clean": round(float((row[best] - corrupted) / (clean - corrupted)), 3)}

    half = n_layers // 2
    early, late = list(range(0, half + 3)), list(range(half + 3, n_layers))
    summary = {
        "clean_prob": round(clean, 4), "corrupted_prob": round(corrupted, 4),
        "block_output": {"last subject token, layers 0-%d" % early[-1]: recovered("block_output", "last subject token", early),
                         "last token, layers %d-%d" % (late[0], late[-1]): recovered("block_output", "last token", late),
                         "further tokens, all layers": recovered("block_output", "further tokens", list(range(n_layers)))},
        "mlp_output": {"last subject token, all layers": recovered("mlp_output", "last subject token", list(range(n_layers))),
                       "last token, all layers": recovered("mlp_output", "last token", list(range(n_layers)))},
        "attention_output": {"last subject token, all layers": recovered("attention_output", "last subject token",
                                                                         list(range(n_layers))),
                             "last token, all layers": recovered("attention_output", "last token", list(range(n_layers)))},
    }
    result = {
        "model": "smollm2-135m-instruct", "samples": args.samples, "window": args.window, "noise": "3x embedding std",
        "facts_traced": len(kept), "facts_skipped": [s for s, _, _ in skipped], "seconds_total": round(total, 1),
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "platform": platform.platform(), "groups": GROUPS, "summary": summary,
        "average": {c: [[round(float(v), 5) for v in row] for row in m] for c, m in mean.items()},
        "facts": per_fact,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tracing_facts.json").write_text(json.dumps(result, indent=1))
    titles = {"block_output": "hidden state", "mlp_output": f"MLP (window {args.window})",
              "attention_output": f"attention (window {args.window})"}
    heatmaps({c: m.T for c, m in mean.items()}, RESULTS / "tracing_facts.png", tokens=GROUPS,
             titles={c: f"avg p(target), {titles[c]}\n{len(kept)} facts, clean {clean:.2f}, corrupted {corrupted:.2f}"
                     for c in mean},
             cmaps={"block_output": "Purples", "mlp_output": "Greens", "attention_output": "Reds"},
             colorbar="p(target)")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
