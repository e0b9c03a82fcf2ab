"""Attribution patching on SmolLM2: a gradient estimate of every patch from one forward + backward, compared
with exact activation patching of the same sites (Pearson's r).

    .venv/bin/python examples/analysis/attribution.py
"""

from reftkit import load_model
from reftkit.analysis import LogitDifference, attribution_vs_patching

model, tokenizer = load_model("smollm2-135m-instruct")
cases = [("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of", " Paris", " Rome"),
         ("The capital of Germany is the city of", "The capital of Japan is the city of", " Berlin", " Tokyo")]
for clean, corrupted, right, wrong in cases:
    comparison = attribution_vs_patching(model, clean, corrupted, LogitDifference(right, wrong, tokenizer=tokenizer),
                                         tokenizer=tokenizer,
                                         components=("block_output", "attention_output", "mlp_output"))
    per = ", ".join(f"{c} {r:.2f}" for c, r in comparison.pearson_per_component.items())
    print(f"{clean!r}: Pearson r (attribution vs exact) {comparison.pearson:.3f} ({per})")
