"""Steering vectors in other tools' formats: llama.cpp control-vector GGUF and lm-evaluation-harness `steered` .pt.

**llama.cpp control vectors** (`export_gguf` / `import_gguf`). A GGUF file (version 3, little-endian) with
`general.architecture = "controlvector"`, `controlvector.model_hint` (the model type, e.g. `"llama"`),
`controlvector.layer_count` (uint32, the number of directions) and one 1-D F32 tensor `direction.{N}` per layer.

- **Index convention.** llama.cpp adds `direction.N` to the output of graph layer `N` (after the FFN residual add),
  which is reftkit's 0-based `block_output[N]`: `direction.N` <-> `"L{N}.block_output"`, the same number. llama.cpp
  rejects `direction.0` (its layer buffers start at 1), so block 0 cannot be expressed and is refused on export;
  a file holding `direction.0` is refused on import.
- **What can be exported:** only `L{N}.block_output` sites (the residual stream), `[d]` directions (not positional
  `[T, d]` ones), the `add` operator without `norm_preserving`, and the scope `all@all` (llama.cpp adds the vector
  at every position, prompt and generated). Anything else is a `ConfigError`: the file could not express it.
- **Coefficients.** The directions are written as stored; llama.cpp's `--control-vector-scaled FILE S` adds
  `S * direction`, i.e. reftkit's coefficient `S` in unit `raw` (use `vector.in_raw_units()` first to make
  `S = 1` mean one unit of another unit). What reftkit knows beyond the format is kept in
  `controlvector.reftkit.*` keys (version, method, unit, scales, hidden size and layer count of the model), which
  llama.cpp ignores and `import_gguf` reads back, so a reftkit file round-trips exactly.
- **Reading.** `import_gguf` first checks the header with `gguf_header.check_gguf_header` (bounded by the file
  size), then reads it with `gguf.GGUFReader`; a file that is not a control vector, has other tensors than
  `direction.N` (N >= 1), non-F32 or non-1-D tensors, widths that differ, a `layer_count` that is not the number of
  directions, or malformed reftkit keys is a `ConfigError` naming the file and the field.

**lm-evaluation-harness** (`export_lm_eval` / `import_lm_eval`). A `.pt` file loaded with
`torch.load(weights_only=True)`: a dict keyed by hookpoint, a module name in `model.base_model.named_modules()`
(relative to the base model: `"layers.6"` is `block_output[6]` of a Llama), each entry
`{"steering_vector": Tensor[d], "steering_coefficient": float, "action": "add" | "clamp", "bias": Tensor[d] | None,
"head_index": None}`. lm-eval hooks the module's output (`output[0]` of a tuple) at every position: `add` is
`h + c * v`, `clamp` is `h - v̂v̂ᵀ(h - b) + c * v̂` with `v̂ = v / ‖v‖`. Exports write the raw multiplier
`k` of the coefficient (converted from the vector's unit) per site: `add` vectors export as `add` (`c = k`), `clamp`
vectors as `clamp` (`c = k * value`, the bias from `bias=` or the vector's operator config). Without a model the
hookpoints are `layers.{l}` (Llama, Mistral, Qwen, Gemma); `model=` names that model's own blocks.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from ..errors import ConfigError, IncompatibleModelError, SiteError
from ..positions import Positions
from ..sites import Site
from .vector import SCALE_KINDS, UNITS, SteeringVector, _config_for_site

log = logging.getLogger(__name__)

ARCHITECTURE = "controlvector"
_PREFIX = "controlvector.reftkit."
_DIRECTION_RE = re.compile(r"direction\.([0-9]+)")
_HOOK_RE = re.compile(r"layers\.([0-9]+)")
_LM_EVAL_KEYS = {"steering_vector", "steering_coefficient", "action", "bias", "head_index"}


# ---- shared checks -----------------------------------------------------------------------------------------

def _block_layers(vector: SteeringVector, fmt: str) -> dict[int, torch.Tensor]:
    """{layer: direction [d]} of a vector whose sites are all `L{l}.block_output`, else a `ConfigError`."""
    if not isinstance(vector, SteeringVector):
        raise ConfigError(f"{fmt} export needs a SteeringVector, got {type(vector).__name__}")
    out = {}
    for name, t in vector.directions.items():
        site = Site.parse(name)
        if site.module is not None or site.component != "block_output" or site.head is not None:
            raise ConfigError(f"{fmt} holds residual-stream vectors only (L<l>.block_output sites); site {name} "
                              "cannot be expressed")
        if t.dim() != 1:
            raise ConfigError(f"{fmt} holds one [d] direction per layer; the positional [T, d] direction at {name} "
                              "cannot be expressed")
        out[site.layer] = t
    widths = {t.shape[0] for t in out.values()}
    if len(widths) != 1:
        raise ConfigError(f"{fmt} needs one width for every layer, got widths {sorted(widths)}")
    return dict(sorted(out.items()))


def _check_all_positions(vector: SteeringVector, fmt: str) -> None:
    everywhere = Positions.parse("all@all").cache_key()
    if Positions.parse(vector.scope).cache_key() != everywhere:
        raise ConfigError(f"{fmt} applies a vector at every position, prompt and generated; this vector's scope "
                          f"is {vector.scope!r} (use dataclasses.replace(vector, scope='all@all') to export it "
                          "anyway)")
    if vector.operator_config.get("norm_preserving", False):
        raise ConfigError(f"{fmt} cannot express operator_config norm_preserving=true")


def _model_hint_record(model) -> dict:
    from ..adapters import base_model_record

    return base_model_record(model)


def _describe(model) -> str:
    from ..adapters import describe_base

    return describe_base(_model_hint_record(model))


# ---- llama.cpp control-vector GGUF -------------------------------------------------------------------------

def export_gguf(vector: SteeringVector, path, *, model_hint: str | None = None) -> Path:
    """Write `vector` as a llama.cpp control-vector GGUF at `path`, atomically (see the module docstring).
    `model_hint` (a model type such as `"llama"`) defaults to the vector's recorded `model_type`."""
    import numpy as np
    from gguf import GGUFValueType, GGUFWriter

    from .. import __version__
    from ..atomic import write_file

    fmt = "a llama.cpp control vector"
    if not isinstance(vector, SteeringVector):
        raise ConfigError(f"export_gguf needs a SteeringVector, got {type(vector).__name__}")
    if vector.operator != "add":
        raise ConfigError(f"{fmt} is added to the hidden states; operator {vector.operator!r} cannot be expressed "
                          "(only 'add')")
    layers = _block_layers(vector, fmt)
    if 0 in layers:
        raise ConfigError(f"{fmt} cannot steer block_output[0]: direction.N is applied at block_output[N] and "
                          "llama.cpp rejects direction.0; drop site L0.block_output")
    _check_all_positions(vector, fmt)
    hint = model_hint if model_hint is not None else vector.model_hint.get("model_type")
    if not isinstance(hint, str) or not hint:
        raise ConfigError(f"{fmt} records the model type (controlvector.model_hint); the vector has none, pass "
                          "model_hint='llama' (the model's config.model_type)")
    path = Path(path)
    writer = GGUFWriter(None, ARCHITECTURE)
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(layers))
    writer.add_string(_PREFIX + "version", str(__version__))
    writer.add_string(_PREFIX + "method", vector.method)
    writer.add_string(_PREFIX + "unit", vector.unit)
    for key in ("architecture", "source"):
        value = vector.model_hint.get(key)
        if isinstance(value, str) and value:
            writer.add_string(_PREFIX + f"model.{key}", value)
    for key in ("hidden_size", "num_layers"):
        value = vector.model_hint.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            writer.add_uint32(_PREFIX + f"model.{key}", value)
    for key, value in vector.scales.items():
        site, _, kind = key.rpartition("/")
        writer.add_key_value(_PREFIX + f"scale.{Site.parse(site).layer}.{kind}", float(value),
                             GGUFValueType.FLOAT64)
    for layer, t in layers.items():
        writer.add_tensor(f"direction.{layer}", t.numpy().astype(np.float32, copy=True))
    data = _gguf_bytes(writer)
    write_file(path, data)
    log.info("exported a control vector (%d layers, model hint %r) to %s", len(layers), hint, path)
    return path


def _gguf_bytes(writer) -> bytes:
    """The file `writer` would write, as bytes (it writes to a path only, so through a private temporary one)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="reftkit-gguf-") as tmp:
        target = Path(tmp) / "vector.gguf"
        try:
            writer.write_header_to_file(target)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        return target.read_bytes()


def import_gguf(path, *, model=None) -> SteeringVector:
    """Read a control-vector GGUF (reftkit, repeng, EasySteer or llama.cpp's cvector-generator) as a
    `SteeringVector` with sites `L{N}.block_output`; with `model`, check that it fits (layers and width)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

    from ..gguf_header import check_gguf_header

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no control-vector GGUF file at {path}")
    check_gguf_header(path)
    try:
        reader = GGUFReader(path)
        fields = {name: (f.types[0] if f.types else None, f.contents()) for name, f in reader.fields.items()}
        raw = [(t.name, t.tensor_type, [int(d) for d in t.shape], t.data) for t in reader.tensors]
        tensors = []
        for name, kind, shape, data in raw:
            values = np.array(data, dtype=np.float32) if kind == GGMLQuantizationType.F32 else None
            tensors.append((name, kind, shape, values))
        del reader, raw
    except (ValueError, KeyError, IndexError, TypeError, OSError, UnicodeDecodeError, OverflowError) as e:
        raise ConfigError(f"{path} is not a readable GGUF file: {e}") from None

    def field(key, types, what):
        if key not in fields:
            return None
        kind, value = fields[key]
        if kind not in types:
            raise ConfigError(f"{path}: key {key!r} must be {what}, got GGUF value type "
                              f"{getattr(kind, 'name', kind)}")
        return value

    ints = (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
            GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)
    strings = (GGUFValueType.STRING,)
    arch = field("general.architecture", strings, "a string")
    if arch is None:
        raise ConfigError(f"{path} has no general.architecture; a control-vector file has "
                          f"general.architecture = {ARCHITECTURE!r}")
    if arch != ARCHITECTURE:
        raise ConfigError(f"{path}: general.architecture is {arch!r}, not {ARCHITECTURE!r}; this is not a "
                          "control-vector file")
    directions, width = {}, None
    for name, kind, shape, values in tensors:
        m = _DIRECTION_RE.fullmatch(name)
        if m is None:
            raise ConfigError(f"{path}: tensor {name!r} is not a control-vector direction ('direction.<layer>')")
        layer = int(m.group(1))
        if layer == 0:
            raise ConfigError(f"{path}: tensor direction.0 cannot be applied (llama.cpp numbers directions from 1, "
                              "direction.N steering block_output[N])")
        if kind != GGMLQuantizationType.F32:
            raise ConfigError(f"{path}: tensor {name!r} is {getattr(kind, 'name', kind)}; control-vector directions "
                              "are F32")
        if len(shape) != 1 or shape[0] < 1:
            raise ConfigError(f"{path}: tensor {name!r} has shape {shape}; control-vector directions are 1-D")
        if width is not None and shape[0] != width:
            raise ConfigError(f"{path}: tensor {name!r} has width {shape[0]}, the other directions {width}")
        width = shape[0]
        site = f"L{layer}.block_output"
        if site in directions:
            raise ConfigError(f"{path}: layer {layer} has two direction tensors")
        directions[site] = torch.from_numpy(values.reshape(-1).copy())
    if not directions:
        raise ConfigError(f"{path}: the file holds no direction tensors")
    count = field("controlvector.layer_count", ints, "an integer")
    if count is not None and count != len(directions):
        raise ConfigError(f"{path}: controlvector.layer_count is {count} but the file holds {len(directions)} "
                          "direction tensors")
    hint = field("controlvector.model_hint", strings, "a string")
    if hint is None:
        log.warning("%s has no controlvector.model_hint; the model type is not checked", path)
    model_hint = {} if hint is None else {"model_type": hint}
    for key in ("architecture", "source"):
        value = field(_PREFIX + f"model.{key}", strings, "a string")
        if value is not None:
            model_hint[key] = value
    for key in ("hidden_size", "num_layers"):
        value = field(_PREFIX + f"model.{key}", ints, "an integer")
        if value is not None:
            model_hint[key] = int(value)
    model_hint.setdefault("hidden_size", width)
    method = field(_PREFIX + "method", strings, "a string")
    if method is None:
        method = field("controlvector.method", strings, "a string") or "imported"
    unit = field(_PREFIX + "unit", strings, "a string") or "raw"
    if unit not in UNITS:
        raise ConfigError(f"{path}: {_PREFIX}unit is {unit!r}; expected one of {', '.join(UNITS)}")
    scales = {}
    for key, (kind, value) in fields.items():
        if not key.startswith(_PREFIX + "scale."):
            continue
        parts = key[len(_PREFIX + "scale."):].split(".")
        if (len(parts) != 2 or not parts[0].isdigit() or parts[1] not in SCALE_KINDS
                or f"L{int(parts[0])}.block_output" not in directions):
            raise ConfigError(f"{path}: key {key!r} is not '{_PREFIX}scale.<layer of a direction>.<kind>' with kind "
                              f"one of {', '.join(SCALE_KINDS)}")
        if kind not in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
            raise ConfigError(f"{path}: key {key!r} must be a float")
        scales[f"L{int(parts[0])}.block_output/{parts[1]}"] = float(value)
    try:
        vector = SteeringVector(dict(sorted(directions.items(), key=lambda kv: Site.parse(kv[0]).layer)),
                                method=method, unit=unit, scales=scales, model_hint=model_hint)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if model is not None:
        _check_fits(vector, model, path)
    log.info("imported a control vector (%d layers, width %d) from %s", len(directions), width, path)
    return vector


def _check_fits(vector: SteeringVector, model, path: Path) -> None:
    """`IncompatibleModelError` naming the file and the model when the vector's layers or width do not fit."""
    record = _model_hint_record(model)
    both = f"{path} vs {_describe(model)}"
    n_layers, hidden = record.get("num_layers"), record.get("hidden_size")
    layers = [Site.parse(s).layer for s in vector.sites]
    if n_layers is not None and max(layers) >= n_layers:
        raise IncompatibleModelError(f"the steering vector steers block_output[{max(layers)}] but the model has "
                                     f"{n_layers} layers (block_output[0..{n_layers - 1}]): {both}")
    width = next(iter(vector.directions.values())).shape[-1]
    if hidden is not None and width != hidden:
        raise IncompatibleModelError(f"the steering vector has width {width} but the model's hidden size is "
                                     f"{hidden}: {both}")
    try:
        vector.check_model(model, check_weights=False)
    except IncompatibleModelError as e:
        raise IncompatibleModelError(f"{path}: {e}") from None


# ---- lm-evaluation-harness `steered` .pt -------------------------------------------------------------------

def _hookpoint_prefix(model) -> str:
    """The block list's name relative to `model.base_model` (`"layers"` for a Llama), with a trailing dot."""
    from ..sites import find_blocks

    try:
        _, blocks = find_blocks(model)
    except SiteError as e:
        raise IncompatibleModelError(f"cannot find the blocks of {_describe(model)}: {e}") from None
    base = getattr(model, "base_model", model)
    for name, module in base.named_modules():
        if module is blocks:
            return f"{name}." if name else ""
    raise IncompatibleModelError(f"the blocks of {_describe(model)} are not inside its base_model, where "
                                 "lm-eval looks up hookpoints")


def export_lm_eval(vector: SteeringVector, path, *, coefficient: float = 1.0, action: str = "add", bias=None,
                   model=None) -> Path:
    """Write `vector` applied with `coefficient` (in the vector's unit) as an lm-eval `steered` .pt at `path`,
    atomically (see the module docstring). `action` must match the vector's operator (`add` or `clamp`); `bias`
    (a tensor [d], or {site: tensor}) is for `clamp` only and defaults to the vector's operator config. Hookpoints
    are `layers.{l}` unless `model` is given, in which case they are that model's block names relative to its
    base model (and the vector is checked against it)."""
    import io

    from ..atomic import write_file

    fmt = "an lm-eval steered file"
    if action not in ("add", "clamp"):
        raise ConfigError(f"lm-eval actions are 'add' and 'clamp', got {action!r}")
    if not isinstance(vector, SteeringVector):
        raise ConfigError(f"export_lm_eval needs a SteeringVector, got {type(vector).__name__}")
    if vector.operator != action:
        raise ConfigError(f"the vector's operator is {vector.operator!r} but action={action!r}; lm-eval's "
                          f"{action!r} would apply another edit (export 'add' vectors as 'add', 'clamp' as 'clamp')")
    layers = _block_layers(vector, fmt)
    _check_all_positions(vector, fmt)
    if action == "add" and bias is not None:
        raise ConfigError("lm-eval's 'add' action takes no bias (bias must be None)")
    prefix = "layers."
    if model is not None:
        vector.check_model(model, check_weights=False)
        prefix = _hookpoint_prefix(model)
    multipliers = vector.raw_multipliers(coefficient)
    out = {}
    for layer, v in layers.items():
        site = f"L{layer}.block_output"
        entry = {"steering_vector": v.clone(), "action": action, "bias": None, "head_index": None}
        if action == "add":
            entry["steering_coefficient"] = float(multipliers[site])
        else:
            config = _config_for_site(vector.operator_config, site, vector.sites)
            norm = float(v.norm())
            if norm == 0:
                raise ConfigError(f"lm-eval's clamp divides by the direction's norm; the direction at {site} is 0")
            value = config.get("value", norm)
            entry["steering_coefficient"] = float(multipliers[site] * value)
            b = bias.get(site) if isinstance(bias, dict) else bias
            if b is None and not isinstance(bias, dict):
                b = config.get("bias")
            if b is not None:
                if not isinstance(b, torch.Tensor) or b.shape != v.shape:
                    raise ConfigError(f"the clamp bias at {site} must be a tensor {tuple(v.shape)}, got "
                                      f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
                entry["bias"] = b.detach().to("cpu", torch.float32).contiguous().clone()
        out[f"{prefix}{layer}"] = entry
    buffer = io.BytesIO()
    torch.save(out, buffer)
    path = Path(path)
    write_file(path, buffer.getvalue())
    log.info("exported an lm-eval steering file (%s, %d hookpoints) to %s", action, len(out), path)
    return path


def import_lm_eval(path, *, model=None) -> SteeringVector:
    """Read an lm-eval `steered` .pt (loaded with `weights_only=True`, never unpickling objects) as a
    `SteeringVector`. Hookpoints `layers.{l}` (or, with `model`, that model's block names) become
    `L{l}.block_output`; `add` entries fold their coefficient into the direction, `clamp` entries keep it as the
    clamp value (coefficient 1 reproduces the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no lm-eval steering file at {path}")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the file's fault, reported as such
        if type(e).__name__ == "UnpicklingError":  # what weights_only=True raises for anything but plain data
            raise ConfigError(f"{path}: the file holds objects other than tensors and plain data (torch.load with "
                              "weights_only=True refuses them; they are never unpickled)") from None
        raise ConfigError(f"{path} is not a readable lm-eval steering file (torch.load with weights_only=True): "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"{path}: expected a non-empty dict keyed by hookpoint, got {type(doc).__name__}")
    hook_re = _HOOK_RE if model is None else re.compile(re.escape(_hookpoint_prefix(model)) + r"([0-9]+)")
    actions, directions, values, biases = set(), {}, {}, {}
    for hook, entry in doc.items():
        where = f"{path}: hookpoint {hook!r}"
        m = hook_re.fullmatch(hook) if isinstance(hook, str) else None
        if m is None:
            raise ConfigError(f"{where} is not a block output ({hook_re.pattern}); only residual-stream "
                              "hookpoints are read")
        if not isinstance(entry, dict) or "steering_vector" not in entry or not set(entry) <= _LM_EVAL_KEYS:
            raise ConfigError(f"{where}: expected a dict with 'steering_vector' and some of {sorted(_LM_EVAL_KEYS)}")
        action = entry.get("action", "add")
        if action not in ("add", "clamp"):
            raise ConfigError(f"{where}: action must be 'add' or 'clamp', got {action!r}")
        actions.add(action)
        if entry.get("head_index") is not None:
            raise ConfigError(f"{where}: head_index steering is not read (per-head 4-D outputs only)")
        v = entry["steering_vector"]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 1:
            raise ConfigError(f"{where}: steering_vector must be a 1-D float tensor")
        c = entry.get("steering_coefficient", 1.0)
        if isinstance(c, torch.Tensor) and c.numel() == 1:
            c = c.item()
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ConfigError(f"{where}: steering_coefficient must be a finite number, got {c!r}")
        b = entry.get("bias")
        if b is not None and (not isinstance(b, torch.Tensor) or b.shape != v.shape):
            raise ConfigError(f"{where}: bias must be None or a tensor {tuple(v.shape)}")
        if action == "add" and b is not None:
            raise ConfigError(f"{where}: the 'add' action takes no bias")
        site = f"L{int(m.group(1))}.block_output"
        if site in directions:
            raise ConfigError(f"{where}: another hookpoint already names {site}")
        v = v.detach().to("cpu", torch.float32)
        if action == "add":
            directions[site] = v if float(c) == 1.0 else v * float(c)
        else:
            if float(v.norm()) == 0:
                raise ConfigError(f"{where}: a clamp direction of norm 0 has no direction")
            directions[site], values[site] = v, float(c)
            if b is not None:
                biases[site] = b.detach().to("cpu", torch.float32)
    if len(actions) != 1:
        raise ConfigError(f"{path}: entries mix actions {sorted(actions)}; one SteeringVector has one operator")
    action = actions.pop()
    config = {} if action == "add" else {"value": values, **({"bias": biases} if biases else {})}
    order = sorted(directions, key=lambda s: Site.parse(s).layer)
    try:
        vector = SteeringVector({s: directions[s] for s in order}, method="lm_eval", operator=action,
                                operator_config=config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if model is not None:
        try:
            vector.check_model(model, check_weights=False)
        except IncompatibleModelError as e:
            raise IncompatibleModelError(f"{path}: {e}") from None
    log.info("imported an lm-eval steering file (%s, %d hookpoints) from %s", action, len(order), path)
    return vector


__all__ = ["export_gguf", "import_gguf", "export_lm_eval", "import_lm_eval"]
