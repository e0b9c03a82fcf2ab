"""Linear probes on SmolLM2, per layer, with Hewitt & Liang's control task.

Property: is a word an animal, a food or a tool? Each word appears in four sentences; the probe reads the
word's last token. The control task gives every word type a random label; selectivity = accuracy - control
accuracy. High selectivity means the layer makes the category linearly readable beyond memorising word types.
With 36 word types in 576 dimensions a weakly regularised probe memorises the types (control accuracy 1.0,
selectivity 0); a strong L2 penalty limits the probe's capacity, and selectivity appears, as Hewitt & Liang found.

    .venv/bin/python examples/analysis/probes.py [--out outputs/analysis]
"""

import argparse

from reftkit import load_model
from reftkit.analysis import probe_layers

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="outputs/analysis")
args = parser.parse_args()

categories = {
    "animal": ["dog", "cat", "horse", "rabbit", "tiger", "sheep", "mouse", "eagle", "whale", "goat", "fox", "lion"],
    "food": ["bread", "apple", "cheese", "rice", "soup", "pasta", "cake", "salad", "egg", "banana", "pizza", "butter"],
    "tool": ["hammer", "knife", "saw", "drill", "wrench", "shovel", "axe", "needle", "ladder", "rake", "chisel", "rope"],
}
templates = ["I saw a {}", "There is a {}", "She talked about the {}", "We found the {}"]
texts, labels, types = [], [], []
for label, (name, words) in enumerate(categories.items()):
    for word in words:
        for template in templates:
            texts.append(template.format(word))
            labels.append(label)
            types.append(word)

model, tokenizer = load_model("smollm2-135m-instruct")
for l2 in (1e-3, 10.0):
    result = probe_layers(model, texts, labels, tokenizer=tokenizer, types=types, layers=range(0, 30, 3), l2=l2)
    print(f"L2 penalty {l2:g} (majority baseline {result.majority:.2f})")
    for layer, acc, control, sel in zip(result.layers, result.test_accuracy, result.control_accuracy,
                                        result.selectivity):
        print(f"  layer {layer:2d}: accuracy {acc:.2f}, control {control:.2f}, selectivity {sel:+.2f}")
    print("wrote", result.save_plot(f"{args.out}/probes_l2_{l2:g}.png"))
