"""`SteeringVector`: a steering direction per site, what it was made from, and how it is applied.

A steering vector is data: per canonical site name (`"L6.block_output"`) a float32 CPU tensor `[d]` (or `[T, d]` for
positional ActAdd vectors, added to the first T real prompt tokens), the operator that applies it (an entry of
`steer/operators.py`), the token scope (a `Positions` string), the unit its coefficients are given in, and the record
of where it came from (method, counts, the base model, an extraction report). Applying it builds one engine
`Binding` per site (`to_bindings`), so steering runs through the same hooks as every other intervention.

Decisions:
- **Units.** A coefficient `c` is converted to the raw multiplier `k` of the directions per site:
  `raw`: `k = c`; `mean_diff_norm` / `hidden_norm`: `k = c * scales[f"{site}/{unit}"] / scales[f"{site}/direction_norm"]`,
  i.e. at `c = 1` the edit has the length of the mean difference (CAA's multiplier) or of a typical hidden state
  (a relative strength), along the direction. `direction_norm` is the norm of the direction as extracted; it is
  recorded at construction when the maker did not record it, and arithmetic keeps it, so `2 * v` doubles the edit
  and `v * 0` is no edit at all in every unit. Scale keys are always `"<site>/<kind>"` with kind one of
  `SCALE_KINDS`; a key of another shape is an error, so a scale is never read under the wrong meaning.
- **Arithmetic** (`+ - * /`, negation) acts on the directions and needs the same sites, shapes, operator, unit,
  scope and operator config; sums and differences in a unit other than `raw` also need equal scales (convert with
  `in_raw_units()` first to combine vectors of different scales); a sum keeps only the scales both vectors share.
  Anything else is a `ConfigError` naming the
  field, never a silent broadcast.
- **Files.** `save(folder)` writes `vector_config.json` (a format version and every field but the tensors) and
  `vectors.safetensors` (`direction.<site>`, and tensors of the operator config under `config.<path>`), atomically
  through `atomic.write_folder`. `load` reads strictly: unknown or missing fields, another dtype than float32,
  wrong shapes, non-finite values and unknown versions are `ConfigError`s that name the file.
- **The model.** `check_model` compares the sites' widths and the recorded `model_hint` (architecture, model type,
  hidden size, layer count, a weight fingerprint) with the model and raises `IncompatibleModelError` naming both.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, IncompatibleModelError, PositionError, SiteError
from ..positions import Positions
from ..sites import Site, resolve_site
from .coefficients import check_coefficient

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "vector_config.json"
WEIGHTS_NAME = "vectors.safetensors"
UNITS = ("raw", "mean_diff_norm", "hidden_norm")
SCALE_KINDS = ("mean_diff_norm", "hidden_norm", "direction_norm")
_FIELDS = ("method", "operator", "operator_config", "scope", "unit", "scales", "counts", "model_hint", "report")
_FILE_FIELDS = {"format_version", "reftkit_version", "sites", *_FIELDS}
_TENSOR_MARK = "$tensor"


def _operators():
    from .operators import OPERATORS

    return OPERATORS


@dataclass
class SteeringVector:
    directions: dict[str, torch.Tensor]
    method: str = "mean_diff"
    operator: str = "add"
    operator_config: dict = field(default_factory=dict)
    scope: str = "all@all"
    unit: str = "raw"
    scales: dict[str, float] = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    model_hint: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.directions, dict) or not self.directions:
            raise ConfigError("a SteeringVector needs directions: a non-empty {site name: tensor [d]} dict")
        clean = {}
        for name, t in self.directions.items():
            try:
                site = Site.parse(name).name
            except (SiteError, TypeError) as e:
                raise ConfigError(f"direction key {name!r} is not a site name ('L6.block_output'): {e}") from None
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (1, 2) or not t.numel():
                what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ConfigError(f"direction {site}: expected a float tensor [d] or [T, d], got {what}")
            t = t.detach().to("cpu", torch.float32).contiguous()
            if not bool(torch.isfinite(t).all()):
                raise ConfigError(f"direction {site} holds NaN or infinite values")
            if site in clean:
                raise ConfigError(f"direction {site} is given twice (as {name!r})")
            clean[site] = t
        self.directions = clean
        for name in ("method", "operator", "scope", "unit"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"SteeringVector.{name} must be a string, got {getattr(self, name)!r}")
        if self.operator not in _operators():
            raise ConfigError(f"unknown steering operator {self.operator!r}; expected one of {', '.join(_operators())}")
        if self.unit not in UNITS:
            raise ConfigError(f"unknown coefficient unit {self.unit!r}; expected one of {', '.join(UNITS)}")
        try:
            Positions.parse(self.scope)
        except PositionError as e:
            raise ConfigError(f"SteeringVector.scope {self.scope!r} is not a positions string: {e}") from None
        for name in ("operator_config", "scales", "counts", "model_hint", "report"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"SteeringVector.{name} must be a dict, got {type(getattr(self, name)).__name__}")
        positional = [s for s, t in self.directions.items() if t.dim() == 2]
        if positional and self.unit != "raw":
            raise ConfigError(f"positional directions ({positional[0]}: [T, d]) take raw coefficients, not {self.unit!r}")
        if positional and self.operator != "add":
            raise ConfigError(f"positional directions ({positional[0]}) work with the 'add' operator only, "
                              f"not {self.operator!r}")
        scales = {}
        for key, value in self.scales.items():
            site, _, kind = str(key).rpartition("/")
            if site not in self.directions or kind not in SCALE_KINDS:
                raise ConfigError(f"scale key {key!r}: expected '<site>/<kind>' with a site of this vector "
                                  f"({', '.join(self.directions)}) and kind one of {', '.join(SCALE_KINDS)}")
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"scale {key!r} must be a finite number >= 0, got {value!r}")
            scales[key] = float(value)
        for site, t in self.directions.items():
            scales.setdefault(f"{site}/direction_norm", float(t.norm()))
        self.scales = scales
        if self.unit != "raw":
            missing = [s for s in self.directions if f"{s}/{self.unit}" not in self.scales]
            if missing:
                raise ConfigError(f"unit {self.unit!r} needs scales['{missing[0]}/{self.unit}'] (the norm that one "
                                  "unit of coefficient stands for)")

    # ---- description ------------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.directions)

    @property
    def positional(self) -> bool:
        return any(t.dim() == 2 for t in self.directions.values())

    def norms(self) -> dict[str, float]:
        """The L2 norm of each site's direction (over all of its values for a positional `[T, d]` one)."""
        return {s: float(t.norm()) for s, t in self.directions.items()}

    def raw_multipliers(self, coefficient: float, unit: str | None = None) -> dict[str, float]:
        """Per site, the multiplier `k` of the stored direction that `coefficient` in `unit` stands for (see the
        module docstring)."""
        unit = self.unit if unit is None else unit
        if unit not in UNITS:
            raise ConfigError(f"unknown coefficient unit {unit!r}; expected one of {', '.join(UNITS)}")
        c = check_coefficient(coefficient)
        if unit == "raw":
            return {s: c for s in self.directions}
        out = {}
        for s in self.directions:
            scale, norm = self.scales.get(f"{s}/{unit}"), self.scales[f"{s}/direction_norm"]
            if scale is None:
                raise ConfigError(f"coefficients in {unit!r} need scales['{s}/{unit}'], which this vector lacks")
            out[s] = 0.0 if norm == 0 else c * scale / norm
        return out

    def in_raw_units(self) -> "SteeringVector":
        """The same edits with `unit='raw'`: each direction multiplied by its unit's conversion factor."""
        k = self.raw_multipliers(1.0)
        return self._replace({s: t * k[s] for s, t in self.directions.items()}, unit="raw",
                             scales={key: v for key, v in self.scales.items() if not key.endswith("/direction_norm")})

    def _replace(self, directions, **changes) -> "SteeringVector":
        values = {name: getattr(self, name) for name in _FIELDS}
        values.update(changes)
        return SteeringVector(directions, **values)

    # ---- arithmetic ---------------------------------------------------------------------------------------
    def _check_same(self, other: "SteeringVector", op: str) -> None:
        if not isinstance(other, SteeringVector):
            raise ConfigError(f"cannot {op} a SteeringVector and a {type(other).__name__}")
        if set(self.directions) != set(other.directions):
            raise ConfigError(f"cannot {op} vectors on different sites: {sorted(self.directions)} vs "
                              f"{sorted(other.directions)}")
        for s, t in self.directions.items():
            if t.shape != other.directions[s].shape:
                raise ConfigError(f"cannot {op} vectors of different shapes at {s}: {tuple(t.shape)} vs "
                                  f"{tuple(other.directions[s].shape)}")
        for name in ("operator", "unit", "scope"):
            if getattr(self, name) != getattr(other, name):
                raise ConfigError(f"cannot {op} vectors with different {name}: {getattr(self, name)!r} vs "
                                  f"{getattr(other, name)!r}")
        if not _same_data(self.operator_config, other.operator_config):
            raise ConfigError(f"cannot {op} vectors with different operator_config")
        if self.unit != "raw":
            keys = [k for k in set(self.scales) | set(other.scales)]
            if any(self.scales.get(k) != other.scales.get(k) for k in keys):
                raise ConfigError(f"cannot {op} vectors in unit {self.unit!r} with different scales; convert both "
                                  "with in_raw_units() first")

    def _combine(self, other: "SteeringVector", sign: float, op: str) -> "SteeringVector":
        self._check_same(other, op)
        method = self.method if self.method == other.method else f"{self.method}{'+' if sign > 0 else '-'}{other.method}"
        directions = {s: t - other.directions[s] if sign < 0 else t + other.directions[s]
                      for s, t in self.directions.items()}
        scales = {k: v for k, v in self.scales.items() if other.scales.get(k) == v}  # what still describes the sum
        return self._replace(directions, method=method, scales=scales, counts={}, report={})

    def __add__(self, other):
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self._combine(other, 1.0, "add")

    def __sub__(self, other):
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self._combine(other, -1.0, "subtract")

    def __mul__(self, factor):
        f = _factor(factor, "multiply a SteeringVector by")
        return self._replace({s: t * f for s, t in self.directions.items()})

    __rmul__ = __mul__

    def __truediv__(self, divisor):
        d = _factor(divisor, "divide a SteeringVector by")
        if d == 0:
            raise ConfigError("cannot divide a SteeringVector by 0")
        return self._replace({s: t / d for s, t in self.directions.items()})

    def __neg__(self):
        return self._replace({s: -t for s, t in self.directions.items()})

    def __eq__(self, other):
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return (set(self.directions) == set(other.directions)
                and all(torch.equal(t, other.directions[s]) for s, t in self.directions.items())
                and all(_same_data(getattr(self, n), getattr(other, n)) for n in _FIELDS))

    __hash__ = None

    # ---- the model ----------------------------------------------------------------------------------------
    def check_model(self, model, *, check_weights: bool = True) -> None:
        """Raise `IncompatibleModelError`, naming both, when `model` is not one this vector fits: a site missing or of
        another width, or another architecture, model type, hidden size, layer count or (with `check_weights`)
        weights than `model_hint` records."""
        from ..adapters import _same_weights, base_model_record, describe_base

        current = base_model_record(model)
        hint = self.model_hint if self.model_hint else None
        both = f"the vector was made on {describe_base(hint)}; this model is {describe_base(current)}"
        diffs = []
        if hint:
            for key in ("architecture", "model_type", "hidden_size", "num_layers"):
                saved, now = hint.get(key), current.get(key)
                if saved is not None and now is not None and saved != now:
                    diffs.append(f"{key.replace('_', ' ')} {saved!r} vs {now!r}")
            if not diffs and check_weights and not _same_weights(hint.get("weights"), current["weights"]):
                diffs.append(f"the weights differ (sampled from {current['weights']['tensor']})")
        if diffs:
            raise IncompatibleModelError(f"steering vector does not fit this model: {'; '.join(diffs)} ({both})")
        for s, t in self.directions.items():
            try:
                width = resolve_site(model, Site.parse(s)).width
            except SiteError as e:
                raise IncompatibleModelError(f"steering vector site {s} does not exist on this model: {e} ({both})") \
                    from None
            if width is not None and width != t.shape[-1]:
                raise IncompatibleModelError(f"steering vector at {s} has width {t.shape[-1]} but the model's site "
                                             f"has width {width} ({both})")

    def to_bindings(self, model, coefficient: float = 1.0, scope=None, *, unit: str | None = None,
                    name: str | None = None, check_weights: bool = True) -> list:
        """One engine `Binding` per site applying this vector with `coefficient` (in `unit`, default the vector's)
        on the tokens `scope` selects (default the vector's scope)."""
        from ..engine import Binding
        from .operators import build_operator

        self.check_model(model, check_weights=check_weights)
        multipliers = self.raw_multipliers(coefficient, unit)
        positions = resolve_scope(self, scope)
        prefix = name or "steer"
        out = []
        for s, t in self.directions.items():
            iv = build_operator(self.operator, t, multipliers[s], _config_for_site(self.operator_config, s, self.sites), site=s)
            device = next((p.device for p in model.parameters()), None)
            if device is not None:
                iv.to(device)
            out.append(Binding(s, iv, name=f"{prefix}:{s}", positions=positions))
        return out

    def apply(self, model, coefficient: float = 1.0, scope=None, **kwargs):
        """`with vector.apply(model, coefficient=2.0) as steered:` (see `steer/apply.py`)."""
        from .apply import steer

        return steer(model, [(self, coefficient)], scope=scope, **kwargs)

    # ---- files --------------------------------------------------------------------------------------------
    def save(self, folder) -> Path:
        """Write `vector_config.json` and `vectors.safetensors` into `folder`, atomically."""
        from .. import __version__
        from ..atomic import write_folder

        target = Path(folder)
        if target.exists() and not target.is_dir():
            raise ConfigError(f"cannot save a steering vector into {target}: it exists and is not a directory")
        tensors = {f"direction.{s}": t.clone().contiguous() for s, t in self.directions.items()}
        operator_config = _encode(self.operator_config, "config", tensors)
        doc = {"format_version": FORMAT_VERSION, "reftkit_version": __version__, "sites": self.sites,
               "method": self.method, "operator": self.operator, "operator_config": operator_config,
               "scope": self.scope, "unit": self.unit, "scales": self.scales, "counts": self.counts,
               "model_hint": self.model_hint, "report": self.report}
        try:
            text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise ConfigError(f"steering vector fields are not JSON data (method, counts, model_hint, report, "
                              f"operator_config may hold numbers, strings, lists, dicts and tensors): {e}") from None
        write_folder(target, {CONFIG_NAME: text}, {WEIGHTS_NAME: tensors})
        log.info("saved a steering vector (%s, %d site(s)) to %s", self.method, len(self.directions), target)
        return target

    @classmethod
    def load(cls, folder) -> "SteeringVector":
        """Read a folder written by `save`; any deviation is a `ConfigError` naming the file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ..io import read_json

        folder = Path(folder)
        path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not path.is_file():
            raise ConfigError(f"no {CONFIG_NAME} in {folder}; expected a folder written by SteeringVector.save")
        doc = read_json(path, "a steering vector config written by SteeringVector.save")
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        unknown, missing = set(doc) - _FILE_FIELDS, _FILE_FIELDS - set(doc)
        if unknown or missing:
            raise ConfigError(f"{path}: unknown field(s) {sorted(unknown)}, missing field(s) {sorted(missing)}; "
                              f"expected {sorted(_FILE_FIELDS)}")
        version = doc["format_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(f"{path}: format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ConfigError(f"{path}: format_version {version} was written by a newer reftkit "
                              f"({doc.get('reftkit_version')}); this one reads up to {FORMAT_VERSION}")
        sites = doc["sites"]
        if not isinstance(sites, list) or not sites or not all(isinstance(s, str) for s in sites):
            raise ConfigError(f"{path}: 'sites' must be a non-empty list of site names")
        if not weights.is_file():
            raise ConfigError(f"no {WEIGHTS_NAME} in {folder}")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"{weights} is not a readable safetensors file: {e}") from None
        for key, t in tensors.items():
            if t.dtype != torch.float32:
                raise ConfigError(f"{weights}: tensor {key!r} is {t.dtype}; steering vectors are stored as float32")
        expected = {f"direction.{s}" for s in sites}
        found = {k for k in tensors if k.startswith("direction.")}
        if found != expected:
            raise ConfigError(f"{weights}: direction tensors {sorted(found)} do not match the sites {sites} listed "
                              f"in {path.name}")
        used: set = set(expected)
        try:
            operator_config = _decode(doc["operator_config"], tensors, used, f"{path}: operator_config")
        except RecursionError:
            raise ConfigError(f"{path}: operator_config is nested too deeply") from None
        extra = set(tensors) - used
        if extra:
            raise ConfigError(f"{weights}: unexpected tensor(s) {sorted(extra)}; keys are 'direction.<site>' and "
                              f"the 'config.<path>' tensors that {path.name} names")
        fields = {n: doc[n] for n in _FIELDS if n != "operator_config"}
        try:
            return cls({s: tensors[f"direction.{s}"] for s in sites}, operator_config=operator_config, **fields)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


# ---- helpers ------------------------------------------------------------------------------------------------

def _factor(value, what: str) -> float:
    try:
        return check_coefficient(value)
    except ConfigError as e:
        raise ConfigError(f"cannot {what} {value!r}: {e}") from None


def resolve_scope(vector: SteeringVector, scope=None):
    """The `Positions` a vector is applied at: `scope` if given, else the vector's; positional vectors default to
    (and only accept) the first T real prompt tokens."""
    try:
        positions = Positions.parse(scope if scope is not None else vector.scope)
    except PositionError as e:
        raise ConfigError(f"steering scope {scope!r}: {e}") from None
    if vector.positional:
        lengths = {t.shape[0] for t in vector.directions.values() if t.dim() == 2}
        if len(lengths) != 1 or any(t.dim() == 1 for t in vector.directions.values()):
            raise ConfigError("a positional vector needs [T, d] directions of one length T at every site")
        T = lengths.pop()
        front = Positions.first_last(T, 0, scope="prompt")
        if scope is None:
            return front
        if positions.cache_key() != front.cache_key():
            raise ConfigError(f"a positional [T={T}, d] vector edits the first {T} prompt tokens (scope "
                              f"'f{T}@prompt'); got {positions!r}")
    return positions


def _same_data(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same_data(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_data(x, y) for x, y in zip(a, b))
    return a == b


def _config_for_site(config: dict, site: str, sites: list) -> dict:
    """The operator config one site sees: a dict value keyed by this vector's sites (`{"bias": {site: t}}`) is
    narrowed to this site's entry (and left out where the site has none)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and set(value) <= set(sites):
            if site in value:
                out[key] = value[site]
            continue
        out[key] = value
    return out


def _encode(value, path: str, tensors: dict):
    if isinstance(value, torch.Tensor):
        key = path
        tensors[key] = value.detach().to("cpu", torch.float32).contiguous().clone()
        return {_TENSOR_MARK: key}
    if isinstance(value, dict):
        if _TENSOR_MARK in value:
            raise ConfigError(f"operator_config key {_TENSOR_MARK!r} is reserved")
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(f"operator_config keys must be strings, got {k!r} at {path}")
        return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _decode(value, tensors: dict, used: set, where: str):
    if isinstance(value, dict):
        if _TENSOR_MARK in value:
            key = value[_TENSOR_MARK]
            if set(value) != {_TENSOR_MARK} or not isinstance(key, str) or key not in tensors \
                    or not key.startswith("config."):
                raise ConfigError(f"{where}: {value!r} names no 'config.<path>' tensor of the weights file")
            used.add(key)
            return tensors[key]
        return {k: _decode(v, tensors, used, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, used, where) for v in value]
    return value
