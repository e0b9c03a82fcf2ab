"""DAS, Boundless DAS and IIT on hierarchical equality, a task whose algorithm is known.

Causal model: O = (W == X) == (Y == Z), intermediate variables WX and YZ. A tiny MLP (4 symbols of dimension 4
-> 3 ReLU layers of 16 units -> 2 classes) is trained on the task; DAS then looks for WX in its first hidden layer:
IIA (interchange intervention accuracy) is the share of interchanges whose output the causal model predicts.
1. Networks trained only on the task (5 seeds): how well does a learned rotation align WX?
2. A network trained with IIT to store WX in units 0-7 (ground truth by construction): DAS and Boundless DAS
   recover it; the untrained rotation and the last hidden layer stay near chance.

    .venv/bin/python examples/analysis/das_hierarchical_equality.py   (about a minute on one core)
"""

import torch

from reftkit import Binding, IntervenableModel, Site
from reftkit.analysis import (InterchangeData, SymbolMLP, hierarchical_equality, interchange_accuracy,
                              train_interchange, train_symbol_model)
from reftkit.analysis.synthetic import encode_inputs
from reftkit.interventions.basic import ReplaceIntervention
from reftkit.interventions.das import BoundlessRotatedSpaceIntervention, RotatedSpaceIntervention

torch.set_num_threads(1)  # a 16-unit network: one thread is fastest
H = 16
causal_model = hierarchical_equality(20)


def logits(output):
    return output.logits[:, 0]


def datasets(model):
    def encode(settings):
        return {"inputs_embeds": model.embed(encode_inputs(causal_model, settings))}

    train = InterchangeData.from_examples(causal_model.counterfactual_dataset(8000, "WX", seed=1), encode)
    test = InterchangeData.from_examples(causal_model.counterfactual_dataset(1000, "WX", seed=2), encode)
    return train, test


def iia(model, intervention, site, train=None, **kwargs):
    with IntervenableModel(model, Binding(Site(module=site), intervention)) as im:
        if train is not None:
            train_interchange(im, train, logits_fn=logits, epochs=10, lr=1e-2, **kwargs)
        return interchange_accuracy(im, test, logits_fn=logits)


print("1. task-trained networks: DAS on the first hidden layer (rotation, 8 of 16 dimensions)")
for seed in range(5):
    model = SymbolMLP(20, hidden=H, seed=seed)
    accuracy = train_symbol_model(causal_model, model, n_train=40000, epochs=4, seed=seed)
    train, test = datasets(model)
    torch.manual_seed(seed)
    found = iia(model, RotatedSpaceIntervention(embed_dim=H, interchange_dim=H // 2), "layers.0", train)
    print(f"   seed {seed}: task accuracy {accuracy:.3f}, IIA {found:.3f}")

print("2. IIT-trained network (WX in units 0-7 of layer 0)")
model = SymbolMLP(20, hidden=H, seed=2)
train, test = datasets(model)
iit = InterchangeData.from_examples(causal_model.counterfactual_dataset(20000, "WX", seed=12),
                                    lambda s: {"inputs_embeds": model.embed(encode_inputs(causal_model, s))})
with IntervenableModel(model, Binding(Site(module="layers.0"), ReplaceIntervention(interchange_dim=H // 2))) as im:
    train_interchange(im, iit, train="model", epochs=8, lr=3e-3, batch_size=128, logits_fn=logits)
    print(f"   IIA of the IIT alignment itself (units 0-7): {interchange_accuracy(im, test, logits_fn=logits):.3f}")
torch.manual_seed(0)
rows = [("untrained rotation, layer 0", RotatedSpaceIntervention(embed_dim=H, interchange_dim=H // 2), "layers.0", None, {}),
        ("DAS rotation, layer 0", RotatedSpaceIntervention(embed_dim=H, interchange_dim=H // 2), "layers.0", train, {}),
        ("Boundless DAS, layer 0", BoundlessRotatedSpaceIntervention(embed_dim=H), "layers.0", train,
         {"temperature": (5.0, 0.05), "boundary_penalty": 0.1}),
        ("DAS rotation, layer 2 (wrong site)", RotatedSpaceIntervention(embed_dim=H, interchange_dim=H // 2), "layers.2",
         train, {})]
for label, intervention, site, data, kwargs in rows:
    print(f"   {label:>36}: IIA {iia(model, intervention, site, data, **kwargs):.3f}")
