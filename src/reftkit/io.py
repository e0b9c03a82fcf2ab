"""Saving and loading bound interventions: `config.json` (data) + `interventions.safetensors` (weights).

Design decisions:
- **Configs are data.** `config.json` holds a format version, the reftkit version that wrote it, a fingerprint
  of the model (type, hidden size, layer count, head counts), every binding (name, site, intervention index,
  positions, source, source site, source positions) and every distinct intervention's `spec()`. Interventions
  are rebuilt through the registry of names (`build_intervention`); nothing is imported by a name read from a
  file and nothing is unpickled.
- **Weights are tensors only.** Each distinct intervention's `state_dict()` is stored under `"{index}.{key}"`.
  An intervention bound several times (weight tying) is saved once and rebound to every binding. Tensors that
  share memory (tied parameters inside one intervention) are stored as separate copies, which safetensors
  requires; loading copies them back into the rebuilt module, whose own ties are structural. Parametrized
  weights (orthogonal rotations) are saved as their state dict defines them, which reproduces outputs exactly.
- **Writes are atomic** (`atomic.write_folder`): both files are written into a temporary folder beside the
  target, which is then renamed into place; an existing save is replaced only once the new one is complete.
- **Strict reading.** Unknown or missing fields and unknown format versions are `ConfigError`s; a model that does
  not match the saved fingerprint is an `IncompatibleModelError` naming what differs.
- **The base model is recorded** (`base_model`: source, architecture, widths, a weight fingerprint; see
  `reftkit.adapters`). It is the one optional top-level field: folders written before it existed load, and a
  model other than the recorded one is an `IncompatibleModelError` naming both.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .adapters import base_model_record, check_base_model, naming_bases
from .atomic import write_folder
from .binding import Binding
from .errors import ConfigError, IncompatibleModelError, InterventionError, PositionError, SiteError
from .interventions import build_intervention
from .positions import Positions
from .sites import Site, model_dims, resolve_site

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "interventions.safetensors"
_TOP_FIELDS = {"format_version", "reftkit_version", "model", "default_positions", "bindings", "interventions"}
_OPTIONAL_TOP_FIELDS = {"base_model"}  # absent from folders written before it was recorded
_BINDING_FIELDS = {"name", "site", "intervention", "positions", "source", "source_site", "source_positions"}
_FINGERPRINT_FIELDS = {"model_type", "hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
                       "model_class"}
_SPEC_FIELDS = {"type", "config"}
_SUBSPACE_FIELDS = ("low_rank_dimension", "interchange_dim", "n_components")
"""Config fields that size a subspace of the edited vectors: at most the width of the site."""


def model_fingerprint(model: nn.Module) -> dict:
    """What a saved intervention set must match: type, hidden size, layer count and head counts (or the class
    name for a model without a Hugging Face config)."""
    if getattr(model, "config", None) is None:
        return {"model_class": type(model).__name__}
    dims = model_dims(model)
    return {"model_type": dims.model_type, "hidden_size": dims.hidden, "num_layers": dims.n_layers,
            "num_attention_heads": dims.n_heads, "num_key_value_heads": dims.n_kv_heads}


def _positions_dict(value, what: str):
    if value is None:
        return None
    try:
        return Positions.parse(value).to_dict()
    except PositionError as e:
        raise ConfigError(f"{what}: {e}; bind string or span positions to save them, pass tensors per call") from e


def build_config(im) -> dict:
    from . import __version__

    bindings = []
    for i, b in enumerate(im.bindings):
        bindings.append({
            "name": b.name,
            "site": Site.parse(b.site).to_dict(),
            "intervention": im._iv_index[i],
            "positions": _positions_dict(b.positions, f"binding {b.name!r} positions"),
            "source": b.source,
            "source_site": None if b.source_site == b.site else Site.parse(b.source_site).to_dict(),
            "source_positions": _positions_dict(b.source_positions, f"binding {b.name!r} source_positions"),
        })
    specs = []
    for k, iv in enumerate(im.interventions):
        spec = iv.spec()  # raises ConfigError for types that are code rather than data (callable)
        try:
            json.dumps(spec, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"intervention {k} ({iv.type_name}) has a config that is not JSON data: {e}") from e
        specs.append(spec)
    return {"format_version": FORMAT_VERSION, "reftkit_version": __version__, "model": model_fingerprint(im.model),
            "default_positions": _positions_dict(im.default_positions, "default positions"),
            "bindings": bindings, "interventions": specs, "base_model": base_model_record(im.model)}


def _state_tensors(im) -> dict[str, torch.Tensor]:
    tensors = {}
    for k, iv in enumerate(im.interventions):
        for key, value in iv.state_dict().items():
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"intervention {k} ({iv.type_name}): state entry {key!r} is not a tensor")
            # a private contiguous copy: safetensors refuses tensors that share memory
            tensors[f"{k}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def save_intervenable(im, directory) -> Path:
    """Write `config.json` and `interventions.safetensors` for `im` into `directory`, atomically."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"cannot save into {target}: it exists and is not a directory")
    config = build_config(im)
    tensors = _state_tensors(im)
    write_folder(target, {CONFIG_NAME: json.dumps(config, indent=2, allow_nan=False) + "\n"}, {WEIGHTS_NAME: tensors})
    log.info("saved %d binding(s) and %d intervention(s) to %s", len(im.bindings), len(im.interventions), target)
    return target


def read_config(directory) -> dict:
    """Read and validate `config.json` (structure only; the model is checked by `load_intervenable`)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"no {CONFIG_NAME} in {directory}; expected a folder written by IntervenableModel.save")
    config = read_json(path, "a folder written by IntervenableModel.save")
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    _exact_fields({k: v for k, v in config.items() if k not in _OPTIONAL_TOP_FIELDS}, _TOP_FIELDS, str(path))
    if not isinstance(config.get("base_model", {}), (dict, type(None))):
        raise ConfigError(f"{path}: 'base_model' must be an object or null, got {config['base_model']!r}")
    version = config["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ConfigError(f"{path}: format_version {version} was written by a newer reftkit "
                          f"({config.get('reftkit_version')}); this one reads up to {FORMAT_VERSION}")
    fingerprint = config["model"]
    if not isinstance(fingerprint, dict) or not set(fingerprint) <= _FINGERPRINT_FIELDS:
        raise ConfigError(f"{path}: 'model' must be an object with fields among {sorted(_FINGERPRINT_FIELDS)}")
    specs, bindings = config["interventions"], config["bindings"]
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
        raise ConfigError(f"{path}: 'interventions' must be a non-empty list of {{'type', 'config'}} objects")
    for k, spec in enumerate(specs):
        _exact_fields(spec, _SPEC_FIELDS, f"{path}: intervention {k}")
        if not isinstance(spec["type"], str) or not isinstance(spec["config"], dict):
            raise ConfigError(f"{path}: intervention {k} needs a registry name in 'type' and an object in 'config', "
                              f"got {spec['type']!r} and {type(spec['config']).__name__}")
    if not isinstance(bindings, list) or not bindings:
        raise ConfigError(f"{path}: 'bindings' must be a non-empty list")
    for j, b in enumerate(bindings):
        if not isinstance(b, dict):
            raise ConfigError(f"{path}: binding {j} must be an object")
        _exact_fields(b, _BINDING_FIELDS, f"{path}: binding {j}")
        k = b["intervention"]
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(specs):
            raise ConfigError(f"{path}: binding {j} names intervention {k!r}; expected an index 0..{len(specs) - 1}")
        if not isinstance(b["source"], int) or isinstance(b["source"], bool) or b["source"] < 0:
            raise ConfigError(f"{path}: binding {j} has source {b['source']!r}; expected an index >= 0")
        if not isinstance(b["name"], str) or not isinstance(b["site"], dict):
            raise ConfigError(f"{path}: binding {j} needs a string name and a site object")
    return config


def read_json(path: Path, expected: str):
    """The JSON document in `path` (UTF-8, a byte order mark allowed), or a `ConfigError` naming the file."""
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: byte {e.start} is not UTF-8 ({e.reason}); expected a JSON text, {expected}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an int too long to convert, deep nesting
        raise ConfigError(f"{path} is not valid JSON ({e}); expected {expected}") from None


def check_weight_dtypes(module: nn.Module, state: dict, where: str) -> None:
    """Refuse saved tensors of another kind than the module's own (integers or booleans for a floating weight, and
    the reverse), which `load_state_dict` would silently cast. Floating dtypes may differ (float16 -> float32)."""
    expected = module.state_dict()
    for name, value in state.items():
        want = expected.get(name)
        if want is None or not isinstance(value, torch.Tensor):
            continue
        same_kind = value.is_floating_point() == want.is_floating_point() and value.is_complex() == want.is_complex()
        if not same_kind or (not want.is_floating_point() and value.dtype != want.dtype):
            raise ConfigError(f"{where}: tensor {name!r} is {value.dtype}, expected {want.dtype} "
                              f"(shape {tuple(want.shape)}); save the weights again with reftkit")


def _check_sizes(spec: dict, widths: list[int], declared: int, where: str) -> None:
    """Refuse sizes in an intervention config that do not fit its sites, before anything is allocated: a config
    read from a file must not make the loader build a tensor larger than the model or the weights file."""
    config = spec["config"]
    for name in ("embed_dim", *_SUBSPACE_FIELDS, "latent_dim"):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{where}: {name} must be a non-negative integer or null, got {value!r}")
    width = config.get("embed_dim")
    known = sorted({w for w in widths if w})  # None: a raw module whose width is read at its first activation
    if width is not None and known and known != [width]:
        raise ConfigError(f"{where}: embed_dim {width} does not match the width of its site(s) on this model "
                          f"({', '.join(map(str, known))}); load the folder onto the model it was saved from")
    width = width if width is not None else (known[0] if known else None)
    if width is None:
        return
    for name in _SUBSPACE_FIELDS:
        value = config.get(name)
        if value is not None and value > width:
            raise ConfigError(f"{where}: {name} {value} is larger than the width {width} of the vectors it edits")
    latent = config.get("latent_dim")
    if latent is not None and latent * width > declared:
        raise ConfigError(f"{where}: latent_dim {latent} at width {width} needs at least {latent * width} weights, but "
                          f"the weights file holds {declared} values for it")


def _exact_fields(d: dict, expected: set, where: str) -> None:
    unknown, missing = set(d) - expected, expected - set(d)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(expected)}")
    if missing:
        raise ConfigError(f"{where}: missing field(s) {sorted(missing)}")


def check_fingerprint(model: nn.Module, saved: dict, where: str) -> None:
    try:
        current = model_fingerprint(model)
    except SiteError as e:
        raise IncompatibleModelError(f"{where}: cannot describe the target model: {e}") from e
    diffs = [f"{k}: saved {saved[k]!r}, model has {current.get(k)!r}"
             for k in sorted(saved) if current.get(k) != saved[k]]
    if diffs:
        raise IncompatibleModelError(f"{where} was saved for a different model ({'; '.join(diffs)}); load it onto a "
                                     "model of the same architecture, hidden size and layer count")


def _parse_site(d, where: str) -> Site:
    try:
        return Site.parse(d)
    except (SiteError, TypeError) as e:
        raise ConfigError(f"{where}: bad site {d!r}: {e}") from e


def _parse_positions(d, where: str):
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: positions must be an object or null, got {d!r}")
    try:
        return Positions.from_dict(d)
    except (PositionError, TypeError) as e:
        raise ConfigError(f"{where}: bad positions {d!r}: {e}") from e


def read_bindings(model: nn.Module, directory, *, check_base: bool = True):
    """The bindings saved in `directory`, rebuilt for `model`, which must be the recorded base model (its weights
    too, unless `check_base=False`): `(bindings, default_positions, where)`. `IntervenableModel.load` builds the
    model from them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file


    config = read_config(directory)
    where = str(Path(directory))
    try:
        check_fingerprint(model, config["model"], where)
    except IncompatibleModelError as e:
        raise naming_bases(e, config.get("base_model"), model) from None
    check_base_model(config.get("base_model"), model, where, check_weights=check_base)
    specs = config["interventions"]
    sites = [_parse_site(b["site"], f"{where}: binding {j} ({b['name']!r})") for j, b in enumerate(config["bindings"])]
    widths: list[list[int]] = [[] for _ in specs]
    for j, (b, site) in enumerate(zip(config["bindings"], sites)):
        try:
            widths[b["intervention"]].append(resolve_site(model, site).width)
        except SiteError as e:
            raise IncompatibleModelError(f"{where}: binding {j} ({b['name']!r}) does not fit this model: {e}") from e
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ConfigError(f"no {WEIGHTS_NAME} in {where}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{weights_path} is not a readable safetensors file: {e}") from e
    per: list[dict] = [{} for _ in specs]
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not (index.isascii() and index.isdigit()) or int(index) >= len(specs) or not name:
            raise ConfigError(f"{weights_path}: unexpected tensor {key!r}; keys are '<intervention index>.<name>'")
        per[int(index)][name] = value
    interventions = []
    for k, spec in enumerate(specs):
        _check_sizes(spec, widths[k], sum(t.numel() for t in per[k].values()), f"{where}: intervention {k}")
        try:
            interventions.append(build_intervention(spec))
        except ConfigError as e:
            raise ConfigError(f"{where}: intervention {k}: {e}") from e
        except (TypeError, ValueError, InterventionError) as e:
            raise ConfigError(f"{where}: intervention {k} ({spec.get('type')!r}) cannot be built from {spec!r}: "
                              f"{e}") from e
    for k, (iv, state) in enumerate(zip(interventions, per)):
        check_weight_dtypes(iv, state, f"{weights_path}: intervention {k} ({iv.type_name})")
        try:
            iv.load_state_dict(state, strict=True)
        except (RuntimeError, InterventionError) as e:
            raise ConfigError(f"{weights_path}: weights of intervention {k} ({iv.type_name}) do not fit its "
                              f"config: {e}") from e
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        for iv in interventions:
            iv.to(device)
    bindings = []
    for j, b in enumerate(config["bindings"]):
        at = f"{where}: binding {j} ({b['name']!r})"
        bindings.append(Binding(
            site=sites[j], intervention=interventions[b["intervention"]], name=b["name"],
            positions=_parse_positions(b["positions"], at), source=b["source"],
            source_site=None if b["source_site"] is None else _parse_site(b["source_site"], at),
            source_positions=_parse_positions(b["source_positions"], at)))
    default = _parse_positions(config["default_positions"], f"{where}: default_positions") or "all"
    return bindings, default, where
