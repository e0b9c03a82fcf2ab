"""Adapter folders as files: the record of the base model an adapter carries, the check of that record against a
model, and reading folders (JSON configs and safetensors headers) without torch.

Design decisions
- **Every save records its base** under `base_model` (in `adapter_config.json` of `ReftModel.save_pretrained` and
  in `config.json` of `IntervenableModel.save`): `source` (the built-in name, Hub id or absolute path
  `load_model` set as `model.reftkit_source`, else `config._name_or_path`), `architecture` (the model class),
  `model_type`, `hidden_size`, `num_layers` and `weights`, a fingerprint of the weights. The writer's version is
  the file's `reftkit_version`.
- **The weight fingerprint is a sample, compared with a tolerance**: 16 evenly spaced values of the input
  embedding (or the first parameter), with the tensor's name and shape. The same base loaded in bfloat16 or
  float16 must match, and a hash of rounded values would flip at rounding boundaries. Two checkpoints of one
  architecture (a base and its instruct variant) differ in every sampled value. A tensor the adapter itself
  trains (`modules_to_save`) is not fingerprinted.
- **Loading checks the record**: a different `model_type`, hidden size, layer count or fingerprint is an
  `IncompatibleModelError` naming the adapter's base and the model it is being loaded onto. Folders written before
  the record existed (no `base_model`) load as before, with the structural checks alone; unknown fields inside the
  record are ignored, so a newer writer's additions do not break this reader.
- **Reading needs no torch**: `read_adapter` and `find_adapters` parse the JSON config and the safetensors header
  (8 bytes of little-endian length, then a JSON table of dtype, shape and offsets), whose offsets are checked to
  tile the file exactly; parameter counts are the products of the shapes. `reftkit adapters` and the checks that
  `--adapter` runs before loading a model use these.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, IncompatibleModelError, SiteError

log = logging.getLogger(__name__)

REFT_CONFIG, REFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # ReftModel.save_pretrained
ENGINE_CONFIG, ENGINE_WEIGHTS = "config.json", "interventions.safetensors"  # IntervenableModel.save
METRICS_NAME = "metrics.json"
SAMPLE_SIZE = 16
_MAX_HEADER = 100 * 1024 * 1024
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


# ---------------------------------------------------------------------------------------- the base record

def model_source(model) -> str | None:
    """Where `model` was loaded from: `model.reftkit_source` (set by `load_model`), else the config's
    `_name_or_path`, else None."""
    source = getattr(model, "reftkit_source", None)
    if isinstance(source, str) and source:
        return source
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def base_model_record(model, skip_modules=()) -> dict[str, Any]:
    """What an adapter records about the model it was trained on (see the module docstring)."""
    from .sites import model_dims

    try:
        dims = model_dims(model)
        model_type, hidden, layers = dims.model_type, dims.hidden, dims.n_layers
    except SiteError:  # a model without a Hugging Face config
        model_type = hidden = layers = None
    return {"source": model_source(model), "architecture": type(model).__name__, "model_type": model_type,
            "hidden_size": hidden, "num_layers": layers, "weights": weights_fingerprint(model, skip_modules)}


def weights_fingerprint(model, skip_modules=()) -> dict[str, Any] | None:
    """`{"tensor", "shape", "sample"}`: 16 evenly spaced values of the input embedding (else the first parameter),
    or None when that tensor is one the adapter trains (`skip_modules`) or has no values here (meta device)."""
    import torch

    target = None
    try:
        embedding = model.get_input_embeddings()
        target = getattr(embedding, "weight", None)
    except (AttributeError, NotImplementedError):
        pass
    named = list(model.named_parameters())
    if not named:
        return None
    name, tensor = next(((n, p) for n, p in named if p is target), named[0])
    if any(name == m or name.startswith(m + ".") for m in skip_modules):
        return None
    if tensor.device.type == "meta" or tensor.numel() == 0 or not tensor.is_floating_point():
        return None
    flat = tensor.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, SAMPLE_SIZE, dtype=torch.float64).round().long().to(flat.device)
    sample = [float(f"{v:.6g}") for v in flat[index].float().cpu().tolist()]
    return {"tensor": name, "shape": list(tensor.shape), "sample": sample}


def _same_weights(saved: Any, current: dict | None) -> bool:
    """Whether two fingerprints sample the same values (within float16/bfloat16 rounding); unknown is the same."""
    if not isinstance(saved, dict) or current is None:
        return True
    sample, shape = saved.get("sample"), saved.get("shape")
    if not isinstance(sample, list) or len(sample) != len(current["sample"]) or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sample):
        return True  # a record this reader does not understand is not evidence of a different model
    if isinstance(shape, list) and shape != current["shape"]:
        return False
    scale = max([abs(v) for v in sample + current["sample"] if math.isfinite(v)] + [1e-12])
    return all(abs(a - b) <= 0.02 * max(abs(a), abs(b)) + 1e-3 * scale
               for a, b in zip(sample, current["sample"]) if math.isfinite(a) and math.isfinite(b))


def describe_base(record: Any) -> str:
    """One line for a base record (or a structural fingerprint): "tiny-llama (LlamaForCausalLM, llama, hidden
    64, 4 layers)"."""
    if not isinstance(record, dict):
        return "an unrecorded model"
    details = [str(record[k]) for k in ("architecture", "model_type") if record.get(k)]
    if record.get("hidden_size") is not None:
        details.append(f"hidden {record['hidden_size']}")
    if record.get("num_layers") is not None:
        details.append(f"{record['num_layers']} layers")
    source = record.get("source") if isinstance(record.get("source"), str) else None
    head = source or "an unnamed model"
    return f"{head} ({', '.join(details)})" if details else head


def check_base_model(record: Any, model, where, *, check_weights: bool = True,
                     skip_modules=()) -> None:
    """Refuse `model` when it is not the base the adapter in `where` recorded (see the module docstring). A
    missing or malformed record is not checked."""
    if not isinstance(record, dict):
        return
    current = base_model_record(model, skip_modules)
    diffs = []
    for key, label in (("model_type", "model type"), ("hidden_size", "hidden size"), ("num_layers", "layers")):
        saved, now = record.get(key), current[key]
        if saved is not None and now is not None and saved != now:
            diffs.append(f"{label} {saved!r} vs {now!r}")
    if not diffs and check_weights and not _same_weights(record.get("weights"), current["weights"]):
        tensor = current["weights"]["tensor"]
        diffs.append(f"the weights differ (sampled from {tensor})")
    if diffs:
        fix = f"load it onto {record['source']}" if isinstance(record.get("source"), str) else \
            "load it onto the model it was trained on"
        raise IncompatibleModelError(
            f"the adapter in {where} was saved for {describe_base(record)}, but it is being loaded onto "
            f"{describe_base(current)}: {'; '.join(diffs)}; {fix}")


def naming_bases(error: IncompatibleModelError, record: Any, model) -> IncompatibleModelError:
    """`error` (from a structural check) with the adapter's recorded base and `model` named at its end."""
    if not isinstance(record, dict):
        return error
    return IncompatibleModelError(f"{error} (the adapter's base model: {describe_base(record)}; the model it is "
                                  f"being loaded onto: {describe_base(base_model_record(model))})")


def check_base_config(info: dict, config, model_name: str) -> None:
    """Before any weights are loaded: refuse a model whose transformers `config` has another model type, hidden
    size or layer count than the adapter `info` (from `read_adapter`) records."""
    from types import SimpleNamespace

    from .sites import model_dims

    record = info.get("base_model") or info.get("model_fingerprint")
    if not isinstance(record, dict) or config is None:
        return
    try:
        dims = model_dims(SimpleNamespace(config=config))
    except SiteError:
        return
    current = {"source": model_name, "model_type": dims.model_type, "hidden_size": dims.hidden,
               "num_layers": dims.n_layers}
    diffs = [f"{key.replace('_', ' ')} {record[key]!r} vs {current[key]!r}" for key in current
             if key != "source" and record.get(key) is not None and current[key] is not None
             and record[key] != current[key]]
    if diffs:
        fix = f"pass --model {record['source']}" if isinstance(record.get("source"), str) else \
            "pass the --model it was trained on"
        raise IncompatibleModelError(
            f"the adapter in {info['path']} was saved for {describe_base(record)}, but --model is "
            f"{describe_base(current)}: {'; '.join(diffs)}; {fix}")


# ----------------------------------------------------------------------------------- reading without torch

def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets), checked against the file's
    size; a `ConfigError` for a file that is truncated or not safetensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= length <= min(size - 8, _MAX_HEADER):
                raise ConfigError(f"{path} is not a safetensors file (its header length is missing or larger than "
                                  "the file); save the adapter again")
            table = json.loads(handle.read(length).decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path} is not a safetensors file (its header is not JSON: {e}); save the adapter "
                          "again") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{path} is not a safetensors file (its header is not a table of tensors)")
    table.pop("__metadata__", None)
    end = 0
    for name, entry in table.items():
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            valid = (dtype in _ITEM_BYTES and isinstance(shape, list) and
                     all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) and
                     isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop and
                     stop - start == math.prod(shape) * _ITEM_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise ConfigError(f"{path}: the header entry for {name!r} is malformed (dtype, shape and offsets do not "
                              "agree); save the adapter again")
        end = max(end, stop)
    if 8 + length + end != size:
        raise ConfigError(f"{path} is truncated or has trailing bytes: its header describes {end} bytes of "
                          f"tensors, the file holds {size - 8 - length}; save the adapter again")
    return table


def adapter_kind(folder: Path) -> str | None:
    """"reft" (ReftModel.save_pretrained), "intervenable" (IntervenableModel.save), "pyreft" (a pyreft 0.1.0
    folder) or None (not an adapter folder)."""
    folder = Path(folder)
    if (folder / REFT_CONFIG).is_file():
        return "reft"
    if (folder / ENGINE_CONFIG).is_file():
        if (folder / ENGINE_WEIGHTS).exists():
            return "intervenable"
        if any(folder.glob("intkey_*.bin")):
            return "pyreft"
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); save the adapter again") from None


def _site_name(site: Any) -> str:
    if not isinstance(site, dict):
        return str(site)
    if site.get("module") is not None:
        return f"module:{site['module']}:{site.get('side', 'output')}"
    if site.get("component") == "embedding":
        return "embedding"
    head = "" if site.get("head") is None else f"H{site['head']}."
    return f"L{site.get('layer')}.{head}{site.get('component', 'block_output')}"


def _positions_text(positions: Any) -> str | None:
    if not isinstance(positions, dict):
        return None if positions is None else str(positions)
    if positions.get("kind") == "first_last":
        parts = [f"f{positions['first']}" if positions.get("first") else "",
                 f"l{positions['last']}" if positions.get("last") else ""]
        text = "+".join(p for p in parts if p)
    elif positions.get("kind") == "span":
        text = f"{positions.get('start')}:{positions.get('end')}"
    else:
        text = str(positions.get("kind"))
    return text if positions.get("scope") in (None, "prompt") else f"{text} ({positions['scope']})"


def _reft_details(meta: dict) -> dict:
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    fingerprint = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    explicit = config.get("interventions")
    if isinstance(explicit, list) and explicit:
        spots = [s for s in explicit if isinstance(s, dict)]
        methods = sorted({str(s.get("method")) for s in spots})
        sites = [f"L{s.get('layer')}.{s.get('component')}" for s in spots]
        ranks = sorted({(s["config"] if isinstance(s.get("config"), dict) else {}).get(
            "low_rank_dimension", config.get("rank")) for s in spots} - {None}, key=str)
    else:
        methods = [str(config.get("method", "loreft"))]
        layers = config.get("layers", "all")
        if layers == "all" and isinstance(fingerprint.get("num_layers"), int):
            layers = list(range(fingerprint["num_layers"]))
        component = config.get("component", "block_output")
        sites = [f"L{layer}.{component}" for layer in layers] if isinstance(layers, list) else \
            [f"all layers.{component}"]
        ranks = [config.get("rank")] if config.get("rank") is not None else []
    return {"adapter_name": meta.get("adapter_name"), "method": ",".join(methods), "sites": sites,
            "positions": config.get("positions"), "tied": config.get("tied"),
            "rank": ranks[0] if len(ranks) == 1 else (ranks or None),
            "modules_to_save": list(config.get("modules_to_save") or [])}


def _engine_details(config: dict) -> dict:
    specs = [s for s in config.get("interventions") or [] if isinstance(s, dict)]
    bindings = [b for b in config.get("bindings") or [] if isinstance(b, dict)]
    ranks = sorted({v for s in specs if isinstance(s.get("config"), dict) for k, v in s["config"].items()
                    if k in ("low_rank_dimension", "interchange_dim", "n_components") and v is not None}, key=str)
    positions = sorted({p for b in bindings for p in [_positions_text(b.get("positions"))] if p}) or \
        [_positions_text(config.get("default_positions")) or "all"]
    return {"adapter_name": None, "method": ",".join(sorted({str(s.get("type")) for s in specs})),
            "sites": [_site_name(b.get("site")) for b in bindings],
            "positions": positions[0] if len(positions) == 1 else positions, "tied": None,
            "rank": ranks[0] if len(ranks) == 1 else (ranks or None), "modules_to_save": []}


def read_adapter(folder: "str | os.PathLike", *, metrics: bool = False) -> dict[str, Any]:
    """Describe the adapter in `folder` from its files alone: kind, method, sites, positions, rank, parameter
    count, base model record, reftkit version (and, with `metrics`, a summary of the training run's
    `metrics.json` beside or above it). A `ConfigError` when the folder is missing, is no adapter, or its config
    or weights file is missing or unreadable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"adapter folder {str(folder)!r} does not exist; pass a folder written by "
                          "ReftModel.save_pretrained (such as <output_dir>/adapter of a training run)")
    kind = adapter_kind(folder)
    if kind is None:
        raise ConfigError(f"{folder} is not an adapter folder: it holds no {REFT_CONFIG} (ReftModel.save_pretrained) "
                          f"nor {ENGINE_CONFIG} with {ENGINE_WEIGHTS} (IntervenableModel.save)")
    info: dict[str, Any] = {"path": str(folder), "kind": kind}
    if kind == "pyreft":
        config = _read_json(folder / ENGINE_CONFIG)
        types = config.get("intervention_types") if isinstance(config, dict) else None
        info.update({"adapter_name": None, "method": ",".join(map(str, types)) if isinstance(types, list) else None,
                     "sites": [], "positions": None, "tied": None, "rank": None, "modules_to_save": [],
                     "parameters": None, "weights_file": None, "base_model": None, "model_fingerprint": None,
                     "reftkit_version": None})
    else:
        config_path, weights = (folder / REFT_CONFIG, folder / REFT_WEIGHTS) if kind == "reft" else \
            (folder / ENGINE_CONFIG, folder / ENGINE_WEIGHTS)
        meta = _read_json(config_path)
        if not isinstance(meta, dict) or (kind == "reft" and not isinstance(meta.get("config"), dict)):
            raise ConfigError(f"{config_path} is not an adapter config: expected the JSON object "
                              f"{'ReftModel.save_pretrained' if kind == 'reft' else 'IntervenableModel.save'} writes")
        if not weights.is_file():
            raise ConfigError(f"{folder} has {config_path.name} but no weights file {weights.name}; copy the whole "
                              "adapter folder, or save the adapter again")
        table = safetensors_header(weights)
        info.update(_reft_details(meta) if kind == "reft" else _engine_details(meta))
        record = meta.get("base_model")
        fingerprint = meta.get("model")
        info.update({"parameters": sum(math.prod(e["shape"]) for e in table.values()), "tensors": len(table),
                     "weights_file": weights.name, "base_model": record if isinstance(record, dict) else None,
                     "model_fingerprint": fingerprint if isinstance(fingerprint, dict) else None,
                     "reftkit_version": meta.get("reftkit_version")})
    if metrics:
        info["metrics"] = read_metrics(folder)
    return info


def base_source(info: dict) -> str | None:
    """The model an adapter (described by `read_adapter`) records as its base, or None."""
    record = info.get("base_model")
    source = record.get("source") if isinstance(record, dict) else None
    return source if isinstance(source, str) and source else None


def read_metrics(folder: Path) -> dict | None:
    """A summary of the `metrics.json` of the training run that wrote the adapter in `folder`: the file in the
    folder, its parent (`<run>/adapter`) or grandparent (`<run>/adapter/<name>`); None when there is none."""
    folder = Path(folder)
    for candidate in (folder, folder.parent, folder.parent.parent):
        path = candidate / METRICS_NAME
        if not path.is_file():
            continue
        try:
            data = _read_json(path)
        except ConfigError as e:
            log.warning("ignoring %s: %s", path, e)
            return None
        if not isinstance(data, dict):
            return None
        losses = data.get("losses") if isinstance(data.get("losses"), list) else []
        evals = data.get("eval") if isinstance(data.get("eval"), list) else []
        last_eval = evals[-1] if evals and isinstance(evals[-1], list) and len(evals[-1]) == 2 else None
        summary = {"path": str(path), "task": data.get("task"), "model": data.get("model"),
                   "steps": data.get("steps"), "final_loss": losses[-1] if losses else None,
                   "eval_loss": last_eval[1] if last_eval else None, "train_seconds": data.get("train_seconds"),
                   "examples_per_second": data.get("examples_per_second"),
                   "trainable_parameters": data.get("trainable_parameters")}
        return {k: v for k, v in summary.items() if v is not None}
    return None


def find_adapters(root: "str | os.PathLike") -> list[dict[str, Any]]:
    """`read_adapter` for every adapter folder under `root` (itself included), in path order; hidden folders
    (temporary and replaced runs) are skipped, symlinks are not followed, and a folder that cannot be read gets
    an `error` entry instead of stopping the search."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not a folder; pass the folder to search for adapters")
    found = []
    for current, subfolders, _ in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        folder = Path(current)
        if adapter_kind(folder) is None:
            continue
        try:
            found.append(read_adapter(folder))
        except ConfigError as e:
            found.append({"path": str(folder), "kind": adapter_kind(folder), "error": str(e)})
    return found
