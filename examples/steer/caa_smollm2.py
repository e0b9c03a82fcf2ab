"""A CAA behaviour vector on SmolLM2: formal versus casual register (examples/steer/formal.yaml's data).

The mean difference of the formal and casual replies' first token at layer 6 (8 pairs of data/formal_pairs.jsonl),
added from the last prompt token on, in units of that mean difference. On 6 held-out prompts
(data/formal_heldout.jsonl) the script prints the Δ log-likelihood log p(formal reply) − log p(casual reply) over
a coefficient grid, the per-example steerability (slope, anti-steerable share, Spearman ρ, Tan et al.), and one
greedy reply at a few coefficients.

    flock /tmp/reftkit-cpu.lock .venv/bin/python examples/steer/caa_smollm2.py   (a few minutes on the CPU)
"""

import json
from pathlib import Path

import torch

from reftkit import load_model
from reftkit.steer.extract import extract
from reftkit.steer.methods import VectorMethod
from reftkit.steer.metrics import likelihood, replies, steerability

HERE = Path(__file__).parent
GRID = [-2.0, -1.0, 0.0, 1.0, 2.0, 4.0]
torch.set_num_threads(2)


def rows(name):
    return [json.loads(line) for line in (HERE / "data" / name).read_text().splitlines() if line.strip()]


model, tokenizer = load_model("smollm2-135m-instruct")
vector = extract(model, tokenizer, rows("formal_pairs.jsonl"), "mean_diff", layers=[6], read="answer", chat=True,
                 unit="mean_diff_norm")
site = vector.report["sites"]["L6.block_output"]
print(f"mean difference at L6: |v| = {site['norm']:.1f}, |v|/|h| = {site['relative_norm']:.2f}, pair consistency "
      f"{site['consistency']:.2f}")
method = VectorMethod(vector, scope="l1@all")  # the last prompt token, then every generated token
held = [{"prompt": r["prompt"], "target": r["positive"], "other": r["negative"]} for r in rows("formal_heldout.jsonl")]
result = likelihood(model, tokenizer, method, held, GRID, per_token=True)
print("mean dlogp per token (formal - casual): " + "  ".join(f"c={c:g}: {m:+.2f}" for c, m in
                                                             zip(GRID, result["mean"])))
s = steerability(GRID, result["per_example"])
print(f"steerability: mean slope {s['mean_slope']:+.3f} per unit, anti-steerable {s['anti_steerable_fraction']:.2f}, "
      f"Spearman {s['spearman']:+.2f}")
prompt = held[0]["prompt"]
for c in (0.0, 2.0, 4.0):
    text = replies(model, tokenizer, method, [prompt], c, max_new_tokens=30)[0]
    print(f"  c={c:g}: {prompt!r} -> {text[:100]!r}")
