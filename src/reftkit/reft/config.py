"""`ReftConfig`: what a ReFT adapter is, as data.

A config names the method (a registry name from `interventions/reft.py`), where it acts (layers + component),
its size (rank), which prompt tokens it edits (`positions`, counted over the prompt's real tokens) and whether
the first and last positions share one intervention (`tied`) or get one each. It round-trips through JSON with a
format version; nothing in it is code.

Decisions:
- The common case is uniform: one method, rank and component on a list of layers. An adapter that is not uniform
  (a pyreft folder mixing types and components, say) lists its sites explicitly in `interventions`, each
  `{"layer", "component", "method", "config"}`; `config` holds further intervention fields (`low_rank_dimension`,
  `add_bias`, ...). Both forms expand to the same `SiteSpec` list, so the model builds them one way.
- `modules_to_save` names modules of the base model (a classification head, say) that are trained and saved with
  the adapter.
- Checks that need the model (layer range, rank against the hidden size) run when the adapter is built on it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import ConfigError
from ..positions import Positions

FORMAT_VERSION = 1
METHODS = ("loreft", "direft", "orthogonal_direft", "noreft", "consreft", "lobireft", "red")
SITE_FIELDS = ("layer", "component", "method", "config")


class SiteSpec(NamedTuple):
    """One site of an adapter: what to build there (before tying decides how many interventions)."""

    layer: int
    component: str
    method: str
    config: dict


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
    modules_to_save: list[str] = field(default_factory=list)
    interventions: list[dict] | None = None  # explicit sites; replaces method/layers/component when given
    extra: dict = field(default_factory=dict)  # further intervention config fields, passed through

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown ReFT method {self.method!r}; expected one of {', '.join(METHODS)}")
        if isinstance(self.layers, str) and self.layers != "all":
            try:
                self.layers = [int(x) for x in self.layers.replace(";", ",").split(",") if x.strip()]
            except ValueError:
                raise ConfigError(f"layers must be 'all' or a list of integers, got {self.layers!r}") from None
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if self.layers != "all":
            if not isinstance(self.layers, (list, tuple)) or not self.layers or \
                    not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers):
                raise ConfigError(f"layers must be 'all' or a non-empty list of integers, got {self.layers!r}")
            self.layers = list(self.layers)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.dropout_on not in ("edit", "output"):
            raise ConfigError(f"dropout_on must be 'edit' or 'output', got {self.dropout_on!r}")
        if not isinstance(self.positions, str):
            raise ConfigError(f"positions must be a string such as 'f1+l1', 'l1' or 'all', got {self.positions!r}")
        if not isinstance(self.component, str) or not self.component:
            raise ConfigError(f"component must be a component name such as 'block_output', got {self.component!r}")
        from ..archs import CANONICAL_COMPONENTS
        from ..errors import SiteError

        if self.component not in CANONICAL_COMPONENTS:  # the same error a Site gives, before any model is loaded
            raise SiteError(f"unknown component {self.component!r}; expected one of "
                              f"{', '.join(CANONICAL_COMPONENTS)}")
        if not isinstance(self.tied, bool):
            raise ConfigError(f"tied must be true or false, got {self.tied!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.act_fn is not None and not isinstance(self.act_fn, str):
            raise ConfigError(f"act_fn must be an activation name or null, got {self.act_fn!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a mapping of intervention config fields, got {self.extra!r}")
        if "modules_to_save" in self.extra:  # accepted where older configs put it
            self.modules_to_save = list(self.modules_to_save) + list(self.extra.pop("modules_to_save"))
        if not isinstance(self.modules_to_save, (list, tuple)) or \
                not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ConfigError(f"modules_to_save must be a list of module paths, got {self.modules_to_save!r}")
        self.modules_to_save = list(dict.fromkeys(self.modules_to_save))
        if self.interventions is not None:
            self.interventions = [_check_site(i, s) for i, s in enumerate(self.interventions)]
            if not self.interventions:
                raise ConfigError("interventions, when given, must list at least one site")
        self.position_spec()  # validates the string (PositionError)

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
        _check_range(layers, n_layers)
        if len(set(layers)) != len(layers):
            raise ConfigError(f"layers {layers} contain duplicates")
        return layers

    def sites(self, n_layers: int) -> list[SiteSpec]:
        """The sites of this adapter on a model with `n_layers` layers, in a fixed order."""
        if self.interventions is None:
            return [SiteSpec(layer, self.component, self.method, {}) for layer in self.resolve_layers(n_layers)]
        _check_range([s["layer"] for s in self.interventions], n_layers)
        keys = [(s["layer"], s["component"]) for s in self.interventions]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"interventions list a site twice: {keys}")
        return [SiteSpec(s["layer"], s["component"], s["method"], dict(s["config"])) for s in self.interventions]

    def intervention_config(self, spec: SiteSpec, width: int, site_name: str) -> dict:
        """The intervention config at one site of width `width`: the fields of this config its class has, then
        `extra`, then the site's own fields. Refuses a rank larger than the width."""
        from ..interventions import REGISTRY

        names = {f.name for f in dataclasses.fields(REGISTRY[spec.method].config_class)}
        cfg = {"embed_dim": width, "low_rank_dimension": self.rank, "dropout": self.dropout,
               "dropout_on": self.dropout_on, "act_fn": self.act_fn}
        cfg = {k: v for k, v in cfg.items() if k in names and (k != "act_fn" or v is not None)}
        cfg.update(self.extra)
        cfg.update(spec.config)
        if cfg.get("embed_dim", width) != width:  # a size read from a file must not allocate beyond the model
            raise ConfigError(f"embed_dim {cfg['embed_dim']!r} does not match the width {width} of {site_name}; "
                              "leave embed_dim out, it is the site's width")
        rank = cfg.get("low_rank_dimension")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise ConfigError(f"rank (low_rank_dimension) must be an integer, got {rank!r}")
        if "low_rank_dimension" in names and rank is not None and rank > width:
            raise ConfigError(f"rank {rank} is larger than the width {width} of {site_name} (the hidden size of "
                              f"this model); choose a rank of at most {width}")
        return cfg

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ReftConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a ReftConfig is a mapping of fields, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"ReftConfig format version {version} is not supported (expected {FORMAT_VERSION}); "
                              "save the adapter again with this reftkit version")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown ReftConfig fields {sorted(unknown)}; expected {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ReftConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"a ReftConfig must be a JSON object: {e}") from None


def _check_range(layers: list[int], n_layers: int) -> None:
    bad = [l_ for l_ in layers if not 0 <= l_ < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} are out of range; this model has layers 0..{n_layers - 1}")


def _check_site(i: int, s) -> dict:
    if not isinstance(s, dict) or set(s) - set(SITE_FIELDS) or not {"layer", "method"} <= set(s):
        raise ConfigError(f"interventions[{i}] must be a mapping with keys {SITE_FIELDS} (layer and method "
                          f"required), got {s!r}")
    s = {"component": "block_output", "config": {}, **s}
    if isinstance(s["layer"], bool) or not isinstance(s["layer"], int):
        raise ConfigError(f"interventions[{i}]: layer must be an integer, got {s['layer']!r}")
    if s["method"] not in METHODS:
        raise ConfigError(f"interventions[{i}]: unknown method {s['method']!r}; expected one of {', '.join(METHODS)}")
    if not isinstance(s["component"], str) or not isinstance(s["config"], dict):
        raise ConfigError(f"interventions[{i}]: component must be a string and config a mapping")
    return s


def config_from_pyreft(entries: list, positions: str, where) -> tuple[ReftConfig, list[dict]]:
    """The `ReftConfig` of a pyreft 0.1.0 folder (read by `io_pyreft.read_pyreft_folder`) and its state dicts in
    the order `ReftModel` builds the interventions.

    pyreft folders do not record positions, so the caller names them. A folder that lists every site twice was
    saved untied (pyreft's `share_weights=False`): its first half edits the first positions and its second half
    the last ones, which is `tied=False` here. A folder mixing types, ranks or components lists its sites
    explicitly in `interventions`. pyreft applies dropout to `h + edit` (`dropout_on="output"`)."""
    keys = [(e.layer, e.component) for e in entries]
    tied = len(set(keys)) == len(keys)
    ordered = list(entries)
    if not tied:
        n = len(entries) // 2
        p = Positions.parse(positions)
        if len(entries) % 2 or keys[:n] != keys[n:] or len(set(keys[:n])) != n:
            raise ConfigError(f"{where}: sites {keys} repeat, but not as pyreft's untied layout (every site twice, "
                              "first half for the first positions, second half for the last)")
        if p.kind != "first_last" or not (p.first and p.last):
            raise ConfigError(f"{where} was saved untied (share_weights=False), which pyreft only uses with first "
                              f"and last positions; pass positions like 'f1+l1', not {positions!r}")
        ordered = [e for pair in zip(entries[:n], entries[n:]) for e in pair]
        entries = entries[:n]
    site_configs = [{k: v for k, v in e.config.items() if k != "embed_dim"} for e in entries]
    uniform = all(e.type_name == entries[0].type_name and e.component == entries[0].component for e in entries) \
        and all(c == site_configs[0] for c in site_configs)
    first = site_configs[0]
    extra = {k: v for k, v in first.items() if k != "low_rank_dimension"}
    common = dict(method=entries[0].type_name, component=entries[0].component, positions=positions, tied=tied,
                  rank=int(first.get("low_rank_dimension", 1)), dropout_on="output")
    if uniform:
        config = ReftConfig(layers=[e.layer for e in entries], extra=extra, **common)
    else:
        sites = [{"layer": e.layer, "component": e.component, "method": e.type_name, "config": c}
                 for e, c in zip(entries, site_configs)]
        config = ReftConfig(layers=sorted({e.layer for e in entries}), interventions=sites, **common)
    return config, [e.state_dict for e in ordered]


def read_pyreft_adapter(directory, positions: str | None) -> tuple[ReftConfig, dict]:
    """A pyreft 0.1.0 folder as `(config, state)` in the layout `ReftModel.save_pretrained` writes."""
    from ..io_pyreft import read_pyreft_folder

    if positions is None:
        raise ConfigError(f"{directory} is a pyreft folder, which does not record the positions it was trained on; "
                          "pass them, e.g. ReftModel.from_pretrained(model, folder, positions='f1+l1')")
    entries = read_pyreft_folder(directory)
    if not entries:
        raise ConfigError(f"{directory}: the pyreft folder has no interventions")
    config, states = config_from_pyreft(entries, positions, directory)
    return config, {f"interventions.{i}.{k}": v for i, state in enumerate(states) for k, v in state.items()}
