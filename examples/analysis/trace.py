"""Causal tracing on SmolLM2: where does the model recall that the Eiffel Tower is in Paris?

Corrupts the subject's embeddings with noise (5 samples, 3x the embedding std), restores one clean hidden state
(or a 10-layer window of MLP / attention outputs) at a time and measures p(" Paris"). Writes three heatmaps.

    .venv/bin/python examples/analysis/trace.py [--out outputs/analysis]
The same from the command line:
    reftkit trace --model smollm2-135m-instruct --prompt "The Eiffel Tower is located in the city of" \\
        --subject "Eiffel Tower" --target " Paris" --out outputs/analysis
"""

import argparse

from reftkit import load_model
from reftkit.analysis import causal_trace

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="outputs/analysis")
args = parser.parse_args()

model, tokenizer = load_model("smollm2-135m-instruct")
result = causal_trace(model, tokenizer, "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris",
                      samples=5, window=10, progress=True)
print(f"p(' Paris'): clean {result.clean_prob:.3f}, subject corrupted {result.corrupted_prob:.3f} "
      f"({result.seconds:.0f} s)")
for component, grid in result.grids.items():
    layer, position = divmod(int(grid.argmax()), grid.shape[1])
    print(f"{component:>17}: best restoration {float(grid.max()):.3f} at layer {layer}, token {result.tokens[position]!r}")
for path in result.save_plots(args.out, prefix="eiffel"):
    print("wrote", path)
