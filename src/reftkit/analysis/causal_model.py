"""Causal models: the high-level hypotheses that interchange interventions test.

A `CausalModel` is a small program over named variables: input variables (no parents) take values from their
domains, every other variable is computed by its mechanism from its parents' values. It answers the questions
that DAS and IIT ask of a neural network:
- `run(inputs, interventions)`: the value of every variable, with some variables fixed (interventions);
- `interchange(base, sources)`: the values when variable `v` takes the value it has on input `sources[v]`
  (an interchange intervention), and `counterfactual_dataset(...)`: many (base, sources, counterfactual
  output) examples to train and score alignments on.

Decisions:
- Variables are named by strings and values are plain Python values; mechanisms are ordinary functions of the
  parents' values, called in topological order (checked acyclic at construction).
- Sampling is seeded (`random.Random(seed)`), so a dataset is reproducible; a custom `sampler(rng) -> inputs`
  (e.g. one that balances equalities) and a `keep(example) -> bool` filter shape the data.
- `hierarchical_equality()` builds the standard example of Geiger et al.: `O = (W == X) == (Y == Z)` with the
  intermediate variables `WX = (W == X)` and `YZ = (Y == Z)`, and a sampler that makes both equalities true half
  of the time.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from ..errors import ConfigError, DataError


class CausalModel:
    def __init__(self, values: dict[str, list], parents: dict[str, list[str]],
                 mechanisms: dict[str, Callable[..., Any]], *, sampler: Callable[[random.Random], dict] | None = None):
        """`values`: variable -> domain (for inputs, the values sampled; for others, documentation and checks);
        `parents`: variable -> parent names (absent or [] for inputs); `mechanisms`: non-input variable ->
        function of its parents' values, in the order of `parents[v]`."""
        self.values = {v: list(d) for v, d in values.items()}
        self.parents = {v: list(parents.get(v, [])) for v in self.values}
        unknown = sorted({p for ps in self.parents.values() for p in ps} - set(self.values)
                         | set(parents) - set(self.values) | set(mechanisms) - set(self.values))
        if unknown:
            raise ConfigError(f"variables {unknown} are used but have no domain in `values`; add them there")
        self.inputs = [v for v in self.values if not self.parents[v]]
        self.outputs = [v for v in self.values if not any(v in ps for ps in self.parents.values())]
        missing = [v for v in self.values if self.parents[v] and v not in mechanisms]
        if missing:
            raise ConfigError(f"variables {missing} have parents but no mechanism; give mechanisms[v] = f(*parents)")
        self.mechanisms = dict(mechanisms)
        self.order = self._topological_order()
        self.sampler = sampler

    def _topological_order(self) -> list[str]:
        order, state = [], {}

        def visit(v, path):
            if state.get(v) == "done":
                return
            if state.get(v) == "open":
                raise ConfigError(f"the causal graph has a cycle through {' -> '.join(path + [v])}")
            state[v] = "open"
            for p in self.parents[v]:
                visit(p, path + [v])
            state[v] = "done"
            order.append(v)

        for v in self.values:
            visit(v, [])
        return order

    # ---- evaluation -------------------------------------------------------------------------------------
    def run(self, inputs: dict, interventions: dict | None = None) -> dict:
        """Every variable's value on `inputs`, with `interventions` ({variable: value}) fixed."""
        interventions = interventions or {}
        unknown = set(interventions) - set(self.values)
        if unknown:
            raise DataError(f"interventions on unknown variables {sorted(unknown)}; variables are {list(self.values)}")
        missing = [v for v in self.inputs if v not in inputs and v not in interventions]
        if missing:
            raise DataError(f"inputs are missing values for {missing}")
        setting = {}
        for v in self.order:
            if v in interventions:
                setting[v] = interventions[v]
            elif not self.parents[v]:
                setting[v] = inputs[v]
            else:
                setting[v] = self.mechanisms[v](*(setting[p] for p in self.parents[v]))
        return setting

    def output(self, inputs: dict, interventions: dict | None = None, variable: str | None = None):
        variable = variable or self._single_output()
        return self.run(inputs, interventions)[variable]

    def _single_output(self) -> str:
        if len(self.outputs) != 1:
            raise DataError(f"the model has outputs {self.outputs}; name the one to read (variable=...)")
        return self.outputs[0]

    def interchange(self, base: dict, sources: dict[str, dict]) -> dict:
        """The setting on `base` where each variable `v` in `sources` takes its value on input `sources[v]`."""
        fixed = {v: self.run(src)[v] for v, src in sources.items()}
        return self.run(base, fixed)

    # ---- data -------------------------------------------------------------------------------------------
    def sample_input(self, rng: random.Random) -> dict:
        if self.sampler is not None:
            return dict(self.sampler(rng))
        return {v: rng.choice(self.values[v]) for v in self.inputs}

    def counterfactual_dataset(self, n: int, variables: "str | list[str]", *, seed: int = 0,
                               keep: Callable[[dict], bool] | None = None, max_tries: int = 100) -> list[dict]:
        """`n` examples `{"base", "sources" (one input per variable), "base_output", "counterfactual_output",
        "variables"}` for interchanging `variables` (each from its own source input)."""
        variables = [variables] if isinstance(variables, str) else list(variables)
        unknown = [v for v in variables if v not in self.values]
        if unknown:
            raise DataError(f"unknown variables {unknown}; the causal model has {list(self.values)}")
        out_var = self._single_output()
        rng = random.Random(seed)
        examples, tries = [], 0
        while len(examples) < n:
            base = self.sample_input(rng)
            sources = [self.sample_input(rng) for _ in variables]
            example = {"base": base, "sources": sources, "variables": variables,
                       "base_output": self.run(base)[out_var],
                       "counterfactual_output": self.interchange(base, dict(zip(variables, sources)))[out_var]}
            if keep is None or keep(example):
                examples.append(example)
                tries = 0
            else:
                tries += 1
                if tries > max_tries * max(n, 1):
                    raise DataError("`keep` rejects almost every sampled example; loosen the filter")
        return examples


def hierarchical_equality(n_symbols: int = 20) -> CausalModel:
    """`O = (W == X) == (Y == Z)` over `n_symbols` symbols, with a sampler balancing both equalities."""
    if n_symbols < 2:
        raise ConfigError("hierarchical equality needs at least two symbols")
    symbols = list(range(n_symbols))

    def sampler(rng: random.Random) -> dict:
        w, y = rng.choice(symbols), rng.choice(symbols)
        x = w if rng.random() < 0.5 else rng.choice([s for s in symbols if s != w])
        z = y if rng.random() < 0.5 else rng.choice([s for s in symbols if s != y])
        return {"W": w, "X": x, "Y": y, "Z": z}

    return CausalModel(
        values={"W": symbols, "X": symbols, "Y": symbols, "Z": symbols, "WX": [False, True], "YZ": [False, True],
                "O": [False, True]},
        parents={"WX": ["W", "X"], "YZ": ["Y", "Z"], "O": ["WX", "YZ"]},
        mechanisms={"WX": lambda w, x: w == x, "YZ": lambda y, z: y == z, "O": lambda a, b: a == b},
        sampler=sampler)
