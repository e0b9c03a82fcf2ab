"""ITI on SmolLM2 (Li et al.): which attention heads tell a true answer from a false one, and what shifting them
does to the likelihood of true answers.

data/truth_pairs.jsonl holds 40 questions, each with a true and a false answer. The first 30 are the extraction
data: every head's output before `o_proj` is read at the answer's last token (through the chat template), a
logistic probe per head is fitted on 80% of those pairs and ranked by accuracy on the other 20%, and the top K
heads get the mass-mean shift σ·θ̂. On the 10 held-out questions the script prints, for α in a small grid, the
mean Δ log-likelihood log p(true answer) − log p(false answer) (summed over the answer tokens) and the share of
questions where the true answer is the more likely one, with ITI's edit on the last prompt token and every answer
token (the ITI scope under teacher forcing), and the same for a random-direction control with the same per-head
norms.

    flock /tmp/reftkit-cpu.lock .venv/bin/python examples/steer/iti_smollm2.py   (a few minutes on the CPU)

`reftkit steer extract examples/steer/iti.yaml` makes the same vector from the command line.
"""

import json
import time
from pathlib import Path

import torch

from reftkit import load_model
from reftkit.steer.iti import iti
from reftkit.steer.methods import VectorMethod
from reftkit.steer.metrics import likelihood

HERE = Path(__file__).parent
K = 16
ALPHAS = [0.0, 2.0, 5.0, 10.0, 15.0]
torch.set_num_threads(2)

rows = [json.loads(line) for line in (HERE / "data" / "truth_pairs.jsonl").read_text().splitlines() if line.strip()]
train, held = rows[:30], rows[30:]
model, tokenizer = load_model("smollm2-135m-instruct")

start = time.perf_counter()
vector = iti(model, tokenizer, train, heads=K, chat=True)
report = vector.report
probed = sum(len(a) for a in report["val_accuracy"].values())
print(f"extraction: {time.perf_counter() - start:.0f} s; {report['counts']['train']} training / "
      f"{report['counts']['val']} validation pairs, {probed} heads probed")
best_by_layer = {int(l): max(a) for l, a in report["val_accuracy"].items()}
print("best validation accuracy per layer: " + " ".join(f"L{l}:{a:.2f}" for l, a in best_by_layer.items()))
print(f"top {K} heads (layer.head: val accuracy, sigma, |theta|):")
print("  " + ", ".join(f"{h['layer']}.{h['head']}: {h['val_accuracy']:.2f}/{h['sigma']:.2f}/{h['mean_diff_norm']:.2f}"
                       for h in report["heads"]))
for w in report["warnings"]:
    print(f"warning: {w}")

g = torch.Generator().manual_seed(0)
control = vector._replace({s: torch.nn.functional.normalize(torch.randn(t.shape, generator=g), dim=0) * t.norm()
                           for s, t in vector.directions.items()}, method="random")
data = [{"prompt": r["prompt"], "target": r["positive"], "other": r["negative"]} for r in held]
for name, vec in (("ITI", vector), ("random control", control)):
    result = likelihood(model, tokenizer, VectorMethod(vec), data, ALPHAS)
    cells = []
    for alpha, entry in zip(ALPHAS, result["per_coefficient"]):
        right = sum(d > 0 for d in entry["delta"]) / len(entry["delta"])
        cells.append(f"a={alpha:g}: {entry['mean']:+.2f} ({right:.1f})")
    print(f"{name:>14}  mean dlogp(true - false) (share true more likely): " + "  ".join(cells))
