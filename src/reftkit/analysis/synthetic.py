"""A tiny neural network trained on a causal model's task: ground truth for validating alignment methods.

`SymbolMLP` reads a tuple of symbols (each a fixed random vector) as one concatenated vector and classifies it
with a stack of ReLU layers. It takes `inputs_embeds [batch, 1, width]` and returns an object with
`logits [batch, 1, classes]`, so the engine treats it like any model with one token: its layers are raw module
sites (`Site(module="layers.0")`). `train_symbol_model` fits it to a `CausalModel`'s output in seconds.

Decisions: the symbol vectors are a seeded buffer (not trained), so what the hidden layers compute is the only
thing that learns; everything is seeded and runs on the CPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DataError
from .causal_model import CausalModel


@dataclass
class SymbolOutput:
    logits: torch.Tensor


class ReLULinear(nn.Linear):
    """`relu(x @ W.T + b)`: a linear layer with its activation, so the layer's output width is `out_features`
    (what the engine reads to size interventions at a raw module site)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class SymbolMLP(nn.Module):
    def __init__(self, n_symbols: int, n_inputs: int = 4, embed_dim: int = 4, hidden: int = 16, n_layers: int = 3,
                 n_classes: int = 2, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.register_buffer("symbols", torch.rand(n_symbols, embed_dim) - 0.5)
            widths = [n_inputs * embed_dim] + [hidden] * n_layers
            self.layers = nn.ModuleList(ReLULinear(a, b) for a, b in zip(widths, widths[1:]))
            self.head = nn.Linear(hidden, n_classes)
        self.n_inputs = n_inputs

    def embed(self, symbols: torch.Tensor) -> torch.Tensor:
        """`[batch, n_inputs]` symbol ids -> `inputs_embeds [batch, 1, n_inputs * embed_dim]`."""
        if symbols.dim() != 2 or symbols.shape[1] != self.n_inputs:
            raise DataError(f"expected symbol ids [batch, {self.n_inputs}], got {tuple(symbols.shape)}")
        return self.symbols[symbols].reshape(symbols.shape[0], 1, -1)

    def forward(self, inputs_embeds: torch.Tensor) -> SymbolOutput:
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h)
        return SymbolOutput(self.head(h))


def encode_inputs(causal_model: CausalModel, settings: list[dict], order: list[str] | None = None) -> torch.Tensor:
    """Input settings -> symbol ids `[n, n_inputs]` in `order` (default: the causal model's inputs)."""
    order = order or causal_model.inputs
    return torch.tensor([[int(s[v]) for v in order] for s in settings], dtype=torch.long)


def train_symbol_model(causal_model: CausalModel, model: SymbolMLP, *, n_train: int = 40000, epochs: int = 4,
                       batch_size: int = 128, lr: float = 3e-3, seed: int = 0, n_test: int = 2000) -> float:
    """Fit `model` to the causal model's (single, boolean or integer) output; returns held-out accuracy."""
    rng = random.Random(seed)
    settings = [causal_model.sample_input(rng) for _ in range(n_train + n_test)]
    x = model.embed(encode_inputs(causal_model, settings))
    y = torch.tensor([int(causal_model.output(s)) for s in settings], dtype=torch.long)
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train, batch_size):
            b = perm[i: i + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[b]).logits[:, 0], y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(x_test).logits[:, 0].argmax(-1) == y_test).float().mean())
