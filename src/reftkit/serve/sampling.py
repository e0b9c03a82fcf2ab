"""Per-row sampling inside one batched `generate`: each row keeps its own temperature, top-p and seed.

transformers samples a whole batch with one temperature and the global random generator, so a seeded request
would depend on whatever else shares its batch. Here a logits processor draws each sampled row's token itself,
from the row's own `torch.Generator` (seeded from the request's `seed`, choice `i` from `seed + i`), and leaves
only that token possible; `generate` runs greedy (`do_sample=False`) and its argmax picks it. Greedy rows
(temperature 0) are left untouched, so their argmax is exactly the plain greedy one. A seeded request is
reproducible whatever it is batched with (up to the numerics of its logits).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class RowSampler(LogitsProcessor):
    def __init__(self, rows):
        self.rows = [(i, r) for i, r in enumerate(rows) if r.temperature > 0]
        self.generators = {}
        for i, r in self.rows:
            g = torch.Generator()
            g.manual_seed(r.seed if r.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item()))
            self.generators[i] = g

    def __bool__(self) -> bool:
        return bool(self.rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.rows:
            return scores
        scores = scores.clone()
        for i, r in self.rows:
            logits = scores[i].float() / r.temperature
            probs = torch.softmax(logits, dim=-1)
            if r.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < r.top_p  # the smallest prefix whose mass reaches top_p
                keep[0] = True
                filtered = torch.zeros_like(probs)
                filtered[order[keep]] = probs[order[keep]]
                probs = filtered / filtered.sum()
            token = torch.multinomial(probs.cpu(), 1, generator=self.generators[i]).item()
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores
