"""Linear probes on collected activations, with control tasks (Hewitt & Liang 2019) and selectivity.

`probe_layers(model, inputs, labels)` collects one vector per example at every layer (a `collect` binding per
layer, one forward per batch), splits the examples into train and test sets once (seeded), fits a multinomial
logistic-regression probe per layer and reports train / test accuracy. With `types` (the word type of each
example, e.g. the word itself), it also fits the *control task*: every type gets a random label drawn from the
empirical label distribution, and a probe that reaches high accuracy on it is memorising types rather than
reading a property; selectivity = test accuracy - control test accuracy.

Decisions:
- The probe is logistic regression in torch: standardised features (train statistics), L2 penalty, full-batch
  L-BFGS (`steps` iterations, strong-Wolfe line search), deterministic for a given seed and input.
- Inputs may be padded (strings are tokenized with padding): positions come from the attention mask, so
  `positions="last"` is each example's last real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine import Binding, IntervenableModel
from ..errors import DataError
from ..interventions.basic import CollectIntervention
from ..positions import Positions
from ..sites import Site, model_dims


@torch.no_grad()
def collect_vectors(model, inputs, *, tokenizer=None, layers=None, component: str = "block_output",
                    positions="last", batch_size: int = 32) -> torch.Tensor:
    """One vector per example per layer: `[layer, example, width]`. `positions`: a selector picking one token
    per example ("last", "first", ...) or an index tensor `[N]`."""
    inputs = _tokenized(inputs, tokenizer)
    n = inputs["input_ids"].shape[0]
    layers = list(range(model_dims(model).n_layers)) if layers is None else list(layers)
    if isinstance(positions, torch.Tensor) or isinstance(positions, (list, tuple)):
        per_example = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if per_example.shape[0] != n:
            raise DataError(f"got {per_example.shape[0]} positions for {n} examples; give one per example")
    else:
        per_example = None
    bindings = [Binding(Site(layer=l, component=component), CollectIntervention(), name=f"L{l}") for l in layers]
    chunks = []
    with IntervenableModel(model, bindings) as im:
        for i in range(0, n, batch_size):
            batch = {k: v[i: i + batch_size] for k, v in inputs.items()}
            pos = (Positions.indices(per_example[i: i + batch_size, None]) if per_example is not None
                   else Positions.parse(positions))
            out = im.run(batch, positions=pos)
            grabbed = torch.stack([out.collected[f"L{l}"] for l in layers])  # [L, B, K, d]
            if grabbed.shape[2] != 1:
                raise DataError(f"positions {positions!r} select {grabbed.shape[2]} tokens per example; a probe reads "
                                "one vector per example (e.g. positions='last')")
            chunks.append(grabbed[:, :, 0].float())
    return torch.cat(chunks, dim=1)


def _tokenized(inputs, tokenizer) -> dict:
    if isinstance(inputs, dict):
        if "input_ids" not in inputs:
            raise DataError("inputs need input_ids")
        return dict(inputs)
    if isinstance(inputs, torch.Tensor):
        return {"input_ids": inputs}
    if tokenizer is None:
        raise DataError("inputs are strings; pass tokenizer=... to tokenize them")
    if not inputs:
        raise DataError("no inputs given")
    enc = tokenizer(list(inputs), return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@dataclass
class LinearProbe:
    weight: torch.Tensor  # [classes, width]
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(-1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y).float().mean()) if len(y) else float("nan")


def fit_probe(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3, steps: int = 100,
              n_classes: int | None = None) -> LinearProbe:
    """Multinomial logistic regression on `x [N, d]`, labels `y [N]` (see the module docstring)."""
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise DataError(f"a probe needs vectors [N, d] and labels [N]; got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.float()
    y = y.long()
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    mean, std = x.mean(0), x.std(0, correction=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    z = (x - mean) / std
    weight = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, std)


def control_labels(types, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang's control task: every distinct type gets one label, drawn from the empirical label
    distribution; each example takes its type's label."""
    types = list(types.tolist() if isinstance(types, torch.Tensor) else types)
    if len(types) != len(labels):
        raise DataError(f"got {len(types)} types for {len(labels)} labels; give one type per example")
    gen = torch.Generator().manual_seed(seed)
    distinct = list(dict.fromkeys(types))
    draws = labels[torch.randint(len(labels), (len(distinct),), generator=gen)]
    table = dict(zip(distinct, draws.tolist()))
    return torch.tensor([table[t] for t in types], dtype=torch.long)


@dataclass
class ProbeResult:
    layers: list
    train_accuracy: list
    test_accuracy: list
    control_accuracy: list | None
    majority: float

    @property
    def selectivity(self) -> list | None:
        if self.control_accuracy is None:
            return None
        return [a - c for a, c in zip(self.test_accuracy, self.control_accuracy)]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "train_accuracy": self.train_accuracy, "test_accuracy": self.test_accuracy,
                "control_accuracy": self.control_accuracy, "selectivity": self.selectivity,
                "majority": self.majority}

    def save_plot(self, path):
        from .plots import line_plot

        series = {"test accuracy": self.test_accuracy, "train accuracy": self.train_accuracy}
        if self.control_accuracy is not None:
            series["control task (test)"] = self.control_accuracy
            series["selectivity"] = self.selectivity
        return line_plot(series, path, ylabel="accuracy", title=f"linear probes (majority {self.majority:.2f})")


def probe_layers(model, inputs, labels, *, tokenizer=None, types=None, layers=None, component: str = "block_output",
                 positions="last", test_fraction: float = 0.25, seed: int = 0, l2: float = 1e-3,
                 steps: int = 100, batch_size: int = 32) -> ProbeResult:
    """Per-layer probe accuracies (and control-task accuracy and selectivity with `types`)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    vectors = collect_vectors(model, inputs, tokenizer=tokenizer, layers=layers, component=component,
                              positions=positions, batch_size=batch_size)
    if vectors.shape[1] != len(labels):
        raise DataError(f"got {len(labels)} labels for {vectors.shape[1]} examples; give one label per example")
    n = len(labels)
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < 2:
        raise DataError(f"{n} examples are too few to split into train and test sets")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    control = None if types is None else control_labels(types, labels, seed)
    n_classes = int(labels.max()) + 1
    train_acc, test_acc, control_acc = [], [], []
    for x in vectors:
        probe = fit_probe(x[train], labels[train], l2=l2, steps=steps, n_classes=n_classes)
        train_acc.append(probe.accuracy(x[train], labels[train]))
        test_acc.append(probe.accuracy(x[test], labels[test]))
        if control is not None:
            cprobe = fit_probe(x[train], control[train], l2=l2, steps=steps, n_classes=n_classes)
            control_acc.append(cprobe.accuracy(x[test], control[test]))
    majority = float(torch.bincount(labels[test], minlength=n_classes).max()) / n_test
    used = list(range(model_dims(model).n_layers)) if layers is None else list(layers)
    return ProbeResult(used, train_acc, test_acc, control_acc if control is not None else None, majority)
