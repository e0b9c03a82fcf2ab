"""Representation metrics: matrix entropy and effective rank, per layer.

- `matrix_entropy(x)` (Wei et al. 2024, "Large Language Model Evaluation via Matrix Entropy"): centre the
  vectors, scale each to unit length, form the covariance `Sigma = Z^T Z / N` (trace 1), and take the entropy of
  its eigenvalues, `-sum(l log l)`, divided by `log(d)` so it lies in [0, 1]. Low values mean the vectors share
  few directions (compression). Computed from the smaller of `Z Z^T` and `Z^T Z`, which share their non-zero
  eigenvalues.
- `effective_rank(x)` (Roy & Vetterli 2007): `exp` of the entropy of the normalised singular values
  `p_k = s_k / sum(s)`; between 1 and min(N, d). Not centred by default, as in the definition.
- `layer_metrics(model, texts)`: per layer, the matrix entropy of each text's token vectors averaged over the
  texts (the paper's per-sentence measure) and the effective rank of all token vectors pooled. Padding is never
  counted: token vectors come from the attention mask. `skip_first=k` leaves out each text's first k tokens:
  many models give the first token a "massive activation" (SmolLM2: norm ~22,700 against ~200 for other tokens
  in layers 11-27) that dominates the mean and the spectrum of everything else.
"""

from __future__ import annotations

import math

import torch

from ..engine import Binding, IntervenableModel
from ..errors import DataError
from ..interventions.basic import CollectIntervention
from ..sites import Site, model_dims


def _matrix(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] == 0:
        raise DataError(f"expected vectors [N, d] with N >= 1, got {tuple(x.shape)}")
    return x.detach().double()


def matrix_entropy(x: torch.Tensor, *, center: bool = True) -> float:
    """Normalised matrix entropy of vectors `x [N, d]` (see the module docstring)."""
    z = _matrix(x)
    n, d = z.shape
    if center:
        z = z - z.mean(0)
    norms = z.norm(dim=1, keepdim=True)
    z = z[norms[:, 0] > 1e-12] / norms[norms[:, 0] > 1e-12]
    if z.shape[0] == 0 or d < 2:
        return 0.0
    gram = z @ z.T if z.shape[0] <= d else z.T @ z
    eig = torch.linalg.eigvalsh(gram / z.shape[0]).clamp(min=0)
    eig = eig / eig.sum()
    eig = eig[eig > 0]
    return float(-(eig * eig.log()).sum() / math.log(d))


def effective_rank(x: torch.Tensor, *, center: bool = False) -> float:
    """Roy & Vetterli's effective rank of `x [N, d]`."""
    z = _matrix(x)
    if center:
        z = z - z.mean(0)
    s = torch.linalg.svdvals(z)
    if float(s.sum()) <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def layer_metrics(model, texts, *, tokenizer=None, layers=None, component: str = "block_output",
                  skip_first: int = 0, batch_size: int = 16) -> dict:
    """`{"layers", "matrix_entropy", "effective_rank"}` per layer (see the module docstring)."""
    if isinstance(texts, dict):
        enc = dict(texts)
    else:
        if tokenizer is None:
            raise DataError("texts are strings; pass tokenizer=... to tokenize them")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise DataError("no texts given")
        enc = dict(tokenizer(texts, return_tensors="pt", padding=True))
    ids = enc["input_ids"]
    mask = enc.get("attention_mask", torch.ones_like(ids)).bool()
    layers = list(range(model_dims(model).n_layers)) if layers is None else list(layers)
    bindings = [Binding(Site(layer=l, component=component), CollectIntervention(), name=f"L{l}") for l in layers]
    per_text = {l: [] for l in layers}
    pooled = {l: [] for l in layers}
    with IntervenableModel(model, bindings) as im:
        for i in range(0, ids.shape[0], batch_size):
            batch = {"input_ids": ids[i: i + batch_size], "attention_mask": mask[i: i + batch_size].long()}
            out = im.run(batch, positions="all")
            counts = batch["attention_mask"].sum(1).tolist()
            for l in layers:
                vectors = out.collected[f"L{l}"]  # [B, K, d]: each row's real tokens first
                for row, n in enumerate(counts):
                    if n <= skip_first:
                        raise DataError(f"a text has {n} tokens, not more than skip_first={skip_first}")
                    tokens = vectors[row, skip_first:n].float()
                    per_text[l].append(matrix_entropy(tokens))
                    pooled[l].append(tokens)
    return {"layers": layers,
            "matrix_entropy": [sum(per_text[l]) / len(per_text[l]) for l in layers],
            "effective_rank": [effective_rank(torch.cat(pooled[l])) for l in layers]}
