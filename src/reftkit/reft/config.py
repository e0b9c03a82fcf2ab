"""`ReftConfig`: what a ReFT adapter is, as data.

A config names the method (a registry name from `interventions/reft.py`), where it acts (layers + component),
its size (rank), which prompt tokens it edits (`positions`, counted over the prompt's real tokens) and whether
the first and last positions share one intervention (`tied`) or get one each. It round-trips through JSON with a
format version; nothing in it is code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..positions import Positions

FORMAT_VERSION = 1
METHODS = ("loreft", "direft", "noreft", "consreft", "lobireft", "red")


@dataclass
class ReftConfig:
    method: str = "loreft"
    layers: "str | list[int]" = "all"
    component: str = "block_output"
    rank: int = 4
    positions: str = "f1+l1"
    tied: bool = True
    dropout: float = 0.0
    dropout_on: str = "edit"  # "output" reproduces pyreft's dropout(h + edit)
    act_fn: str | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)  # further intervention config fields, passed through

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown ReFT method {self.method!r}; expected one of {', '.join(METHODS)}")
        if isinstance(self.layers, str) and self.layers != "all":
            try:
                self.layers = [int(x) for x in self.layers.replace(";", ",").split(",") if x.strip()]
            except ValueError:
                raise ConfigError(f"layers must be 'all' or a list of integers, got {self.layers!r}") from None
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dropout_on not in ("edit", "output"):
            raise ConfigError(f"dropout_on must be 'edit' or 'output', got {self.dropout_on!r}")
        self.position_spec()  # validates the string

    def position_spec(self) -> Positions:
        return Positions.parse(self.positions)

    def split_positions(self) -> list[tuple[str, Positions]]:
        """[(suffix, positions)] — one entry when tied (or only first/last is used), else first and last apart."""
        p = self.position_spec()
        if self.tied or p.kind != "first_last" or not (p.first and p.last):
            return [("", p)]
        return [("first", Positions.first_last(p.first, 0, p.scope)), ("last", Positions.first_last(0, p.last, p.scope))]

    def resolve_layers(self, n_layers: int) -> list[int]:
        layers = list(range(n_layers)) if self.layers == "all" else list(self.layers)
        bad = [l_ for l_ in layers if not 0 <= l_ < n_layers]
        if bad:
            raise ConfigError(f"layers {bad} are out of range; this model has layers 0..{n_layers - 1}")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"layers {layers} contain duplicates")
        return layers

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ReftConfig":
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"ReftConfig format version {version} is not supported (expected {FORMAT_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown ReftConfig fields {sorted(unknown)}; expected {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
