"""Activation patching, path patching and ablation on SmolLM2.

Clean: "The Eiffel Tower is located in the city of" (-> Paris); corrupted: "The Colosseum is located in the city
of" (-> Rome); both 10 tokens. Metric: logit(" Paris") - logit(" Rome").
1. Denoising patching of block / attention / MLP outputs at every layer x position (batched), heatmap.
2. Path patching: which late attention layers act on the logits directly (noising, direct path)?
3. Mean ablation of MLP outputs at the subject's last token and the last token, over prompts of one length.

    .venv/bin/python examples/analysis/patching.py [--out outputs/analysis]
"""

import argparse

from reftkit import load_model
from reftkit.analysis import LogitDifference, TargetProbability, ablation, activation_patching, path_patching

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="outputs/analysis")
args = parser.parse_args()

model, tokenizer = load_model("smollm2-135m-instruct")
clean = "The Eiffel Tower is located in the city of"
corrupted = "The Colosseum is located in the city of"
metric = LogitDifference(" Paris", " Rome", tokenizer=tokenizer)

result = activation_patching(model, clean, corrupted, metric, tokenizer=tokenizer,
                             components=("block_output", "attention_output", "mlp_output"), progress=True)
print(f"logit diff Paris - Rome: clean {float(result.clean[0]):.2f}, corrupted {float(result.corrupted[0]):.2f}")
grid = result.mean(normalized=True)  # [component, layer, position], 1 = fully restored
for i, component in enumerate(result.components):
    layer, position = divmod(int(grid[i].nan_to_num(-1).argmax()), grid.shape[2])
    print(f"{component:>17}: max restored fraction {float(grid[i, layer, position]):.2f} at layer {layer}, "
          f"token {result.tokens[position]!r}")
print("wrote", result.save_plot(f"{args.out}/patching_eiffel.png"))

senders = [f"L{layer}.attention_output" for layer in range(20, 30)]
paths = path_patching(model, clean, corrupted, metric, senders, tokenizer=tokenizer)
print("direct effect on the logit difference of corrupting each late attention layer (clean = "
      f"{float(paths.clean[0]):.2f}):")
for sender, value in zip(paths.senders, paths.effects[0, :, 0].tolist()):
    print(f"  {sender:>22}: {value:+.2f}")

prompts = ["The Eiffel Tower is located in the city of", "The Colosseum is located in the city of",
           "The Brandenburg Gate is located in the city of", "The Golden Gate Bridge is located in the city of"]
targets = [" Paris", " Rome", " Berlin", " San"]  # all four prompts are 10 tokens
ablated = ablation(model, prompts, TargetProbability(targets, tokenizer=tokenizer), kind="mean", tokenizer=tokenizer,
                   components=("mlp_output",), positions=[3, 9])
drop = ablated.delta().mean(0)[0]  # [layer, position]
for column, where in enumerate(("token 3 (in the subject)", "last token")):
    layer = int(drop[:, column].argmin())
    print(f"mean-ablating the MLP at the {where} hurts most at layer {layer} "
          f"(p(target) {float(drop[layer, column]):+.3f} on average)")
