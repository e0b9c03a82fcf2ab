"""A steering evaluation described by one YAML file (`reftkit steer eval CONFIG.yaml`).

```yaml
model: smollm2-135m-instruct      # built-in name, local folder (relative to this file when it exists there) or .gguf
behaviour: all_caps               # the reply check (reftkit.behaviours spec: all_caps, contains:TEXT, regex:..., json)
data:
  prompts: data/prompts.jsonl     # held-out prompts: JSONL rows {"prompt"} (required)
  facts: data/facts.jsonl         # rows {"prompt", "answer"}: content retention (optional)
  neutral: data/neutral.jsonl     # rows {"text"}: KL and NLL on neutral text (optional; needed for kl_budget)
  pairs: data/pairs.jsonl         # rows {"prompt", "target", "other"}: Δ log-likelihood, steerability (optional)
methods:                          # evaluated one after the other, on the same halves
  - base: true                    # the model as it is
  - name: prompting               # a label (default: the kind of method, numbered when repeated)
    prompt: "Answer in capital letters."
    role: system                  # system (default) | user
  - name: caa
    vector: runs/caps             # a steering-vector folder
    coefficients: [0, 0.5, 1, 2]  # the grid (required for a vector)
    scope: last_prompt_token_then_generated   # optional: a steering scope or positions string
    unit: hidden_norm             # optional: raw | mean_diff_norm | hidden_norm
    layers: [3, 6]                # optional: layers x strengths, each of these block_output sites alone
    condition:                    # optional: CAST, steer only the prompts whose condition fires
      vector: runs/topic
      threshold: 0.3
      site: L6.block_output       # optional when the condition vector has one site
      aggregate: mean             # mean (default) | last
      fire: above                 # above (default) | below
  - name: loreft
    adapter: runs/caps_adapter    # a ReFT adapter folder (ReftModel.save_pretrained)
seed: 0                           # the validation/test split
fluency: nll                      # nll (default) | distinct2
kl_budget: 1.0                    # optional: nats per token of KL to the base on the neutral texts
max_new_tokens: 32
batch_size: 8
chat: true
output: runs/eval                 # default runs/<file name without .yaml>, beside this file
device: cpu                       # optional (`--device` wins)
dtype: float32                    # optional (`--dtype` wins)
```

Decisions:
- The rules of `steer/config.py`: `yaml_config.read_mapping` (safe YAML, unknown keys refused), paths relative to
  the config's folder, and every check (keys, types, data rows, that each vector and adapter folder holds a
  readable artefact, the coefficient grids, the behaviour spec) done by `load_eval_config` before a model
  loads, as `ConfigError`/`DataError` naming the file and the key or method.
- Vector and condition folders are read here (small JSON + safetensors files); adapters are checked from their
  config and weights header (`adapters.read_adapter`), and loaded only once the model is.
- The output folder is refused when it is not empty unless `overwrite`; it is written complete or not at all
  (`write_report`: a staging sibling, then `atomic.replace_folder`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

from ..errors import ConfigError, DataError, OutputError, ReftkitError
from ..yaml_config import beside, model_beside, read_mapping

log = logging.getLogger(__name__)

TOP_KEYS = {"model", "behaviour", "data", "methods", "seed", "fluency", "kl_budget", "max_new_tokens", "batch_size",
            "chat", "output", "device", "dtype"}
DATA_KEYS = {"prompts", "facts", "neutral", "pairs"}
KINDS = ("base", "prompt", "vector", "adapter")
METHOD_KEYS = {"base": {"name", "base"}, "prompt": {"name", "prompt", "role"},
               "vector": {"name", "vector", "coefficients", "scope", "unit", "layers", "condition"},
               "adapter": {"name", "adapter"}}
CONDITION_KEYS = {"vector", "threshold", "site", "aggregate", "fire"}
UNITS = ("raw", "mean_diff_norm", "hidden_norm")
REPORT_NAME = "report.json"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_eval_config(path: "str | Path") -> dict:
    """Read and check an evaluation config, its data files and its methods' folders; returns the config with
    absolute paths, defaults filled in, `data_rows` (the rows per data key) and per method its `kind` and, for
    vectors, the loaded `vector_object` (and `condition_object`)."""
    path = Path(path).expanduser()
    cfg = read_mapping(path, TOP_KEYS, "steering evaluation config")
    base = path.parent
    try:
        _check_top(cfg)
        cfg["data"] = {k: str(beside(base, v)) for k, v in cfg["data"].items()}
        cfg["data_rows"] = {k: read_data_file(v, k) for k, v in cfg["data"].items()}
        _check_data(cfg["data_rows"], cfg["behaviour"])
        names = set()
        cfg["methods"] = [_check_method(i, m, base, names, cfg) for i, m in enumerate(cfg["methods"])]
    except ReftkitError as e:
        raise type(e)(f"{path}: {e}") from None
    cfg["output"] = str(base / "runs" / path.stem) if cfg.get("output") is None else str(beside(base, cfg["output"]))
    cfg["model"] = model_beside(base, cfg["model"])
    return cfg


def _check_top(cfg: dict) -> None:
    for key in ("model", "data", "methods"):
        if key not in cfg:
            raise ConfigError(f"missing key {key!r}")
    if not isinstance(cfg["model"], str) or not cfg["model"].strip():
        raise ConfigError(f"model must be a non-empty string, got {cfg['model']!r}")
    cfg.setdefault("behaviour", "all_caps")
    from ..behaviours import behaviour

    if not isinstance(cfg["behaviour"], str):
        raise ConfigError(f"behaviour must be a spec string (all_caps, contains:TEXT, regex:PATTERN, json), got "
                          f"{cfg['behaviour']!r}")
    behaviour(cfg["behaviour"])
    data = cfg["data"]
    if not isinstance(data, dict) or "prompts" not in data:
        raise ConfigError("data must be a mapping with prompts (and optionally facts, neutral, pairs): JSONL files")
    unknown = set(data) - DATA_KEYS
    if unknown:
        raise ConfigError(f"data: unknown keys {sorted(map(str, unknown))}; expected {sorted(DATA_KEYS)}")
    for key, value in data.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"data.{key} must be a file path, got {value!r}")
    if not isinstance(cfg["methods"], list) or not cfg["methods"]:
        raise ConfigError("methods must be a non-empty list (base, prompt, vector or adapter entries)")
    cfg.setdefault("seed", 0)
    if not _is_int(cfg["seed"]):
        raise ConfigError(f"seed must be an integer, got {cfg['seed']!r}")
    cfg.setdefault("fluency", "nll")
    if cfg["fluency"] not in ("nll", "distinct2"):
        raise ConfigError(f"fluency must be nll or distinct2, got {cfg['fluency']!r}")
    budget = cfg.get("kl_budget")
    if budget is not None and (not _number(budget) or budget < 0):
        raise ConfigError(f"kl_budget must be a number >= 0 (nats per token), got {budget!r}")
    if budget is not None and "neutral" not in data:
        raise ConfigError("kl_budget needs data.neutral (the texts the KL to the base model is measured on)")
    if cfg["fluency"] == "nll" and "neutral" not in data:
        cfg["fluency"] = "distinct2"
        log.info("no neutral texts: fluency is the replies' distinct-2")
    for key, default in (("max_new_tokens", 32), ("batch_size", 8)):
        cfg.setdefault(key, default)
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    cfg.setdefault("chat", True)
    if not isinstance(cfg["chat"], bool):
        raise ConfigError(f"chat must be true or false, got {cfg['chat']!r}")
    if cfg.get("output") is not None and (not isinstance(cfg["output"], str) or not cfg["output"].strip()):
        raise ConfigError(f"output must be a folder path (a string), got {cfg['output']!r}")
    for key in ("device", "dtype"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise ConfigError(f"{key} must be a string such as 'cuda' or 'bf16', got {cfg[key]!r}")


def read_data_file(path: "str | Path", key: str) -> list:
    """The rows of one data file (JSONL, or a JSON list), in the shape `sweep` takes: prompts, facts and pairs as
    objects, neutral texts as strings."""
    from ..reft.data import read_rows

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.{key}: file {path} does not exist")
    rows = read_rows(path)
    fields = {"prompts": ("prompt",), "facts": ("prompt", "answer"), "pairs": ("prompt", "target", "other"),
              "neutral": ("text",)}[key]
    out = []
    for n, row in enumerate(rows, 1):
        if key == "neutral" and isinstance(row, dict) and "text" not in row and "prompt" in row:
            row = {"text": row["prompt"]}
        if not isinstance(row, dict) or any(f not in row for f in fields):
            raise DataError(f"{path}, row {n}: expected an object with {', '.join(fields)}, got "
                            f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
        for f in fields:
            if f != "answer" and (not isinstance(row[f], str) or not row[f].strip()):
                raise DataError(f"{path}, row {n}: {f} must be a non-empty string, got {row[f]!r}")
        out.append(row["text"] if key == "neutral" else row)
    return out


def _check_data(rows: dict, spec: str) -> None:
    from ..behaviours import behaviour

    if len(rows["prompts"]) < 2:
        raise DataError("data.prompts: at least 2 prompts are needed (a validation and a test half)")
    behaviour(spec).validate_rows(rows["prompts"], "data.prompts")
    if "facts" in rows:
        if len(rows["facts"]) < 2:
            raise DataError("data.facts: at least 2 facts are needed (a validation and a test half)")
        behaviour("answer").validate_rows(rows["facts"], "data.facts")


def _kind(entry: dict) -> str:
    found = [k for k, key in (("base", "base"), ("prompt", "prompt"), ("vector", "vector"), ("adapter", "adapter"))
             if key in entry]
    if len(found) != 1:
        raise ConfigError(f"expected exactly one of base, prompt, vector, adapter; got {found or sorted(entry)}")
    return found[0]


def _check_method(i: int, entry, base: Path, names: set, cfg: dict) -> dict:
    if not isinstance(entry, dict):
        raise ConfigError(f"methods[{i}]: expected a mapping (base: true, prompt: TEXT, vector: DIR or adapter: DIR), "
                          f"got {entry!r}")
    try:
        kind = _kind(entry)
        unknown = set(entry) - METHOD_KEYS[kind]
        if unknown:
            raise ConfigError(f"unknown keys {sorted(map(str, unknown))} for a {kind} method; expected "
                              f"{sorted(METHOD_KEYS[kind])}")
        name = entry.get("name", kind)
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\\0"):
            raise ConfigError(f"name must be a non-empty string without slashes, got {name!r}")
        if "name" not in entry:
            k = 2
            while name in names:
                name, k = f"{kind}{k}", k + 1
        if name in names:
            raise ConfigError(f"the name {name!r} is used twice; give each method its own name")
        names.add(name)
        out = {"name": name, "kind": kind}
        if kind == "base":
            if entry["base"] is not True:
                raise ConfigError(f"base must be true, got {entry['base']!r}")
        elif kind == "prompt":
            if not isinstance(entry["prompt"], str) or not entry["prompt"].strip():
                raise ConfigError(f"prompt must be a non-empty instruction, got {entry['prompt']!r}")
            role = entry.get("role", "system")
            if role not in ("system", "user"):
                raise ConfigError(f"role must be system or user, got {role!r}")
            out.update(prompt=entry["prompt"], role=role)
        elif kind == "adapter":
            out["adapter"] = _folder(base, entry["adapter"], "adapter")
            from ..adapters import read_adapter

            info = read_adapter(out["adapter"])
            if info["kind"] == "intervenable":
                raise ConfigError(f"{out['adapter']} holds interventions saved by IntervenableModel.save; adapter "
                                  "takes a ReFT adapter folder written by ReftModel.save_pretrained")
        else:
            out.update(_check_vector(entry, base, cfg))
        return out
    except ReftkitError as e:
        label = entry.get("name") if isinstance(entry.get("name"), str) else None
        raise type(e)(f"methods[{i}]{f' ({label})' if label else ''}: {e}") from None


def _folder(base: Path, value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what} must be a folder path, got {value!r}")
    folder = beside(base, value)
    if not folder.is_dir():
        raise ConfigError(f"{what} folder {folder} does not exist")
    return str(folder)


def _check_vector(entry: dict, base: Path, cfg: dict) -> dict:
    from .vector import SteeringVector, check_coefficient

    folder = _folder(base, entry["vector"], "vector")
    vector = SteeringVector.load(folder)
    grid = entry.get("coefficients")
    if not isinstance(grid, list) or not grid:
        raise ConfigError(f"coefficients must be a non-empty list of numbers (the grid), got {grid!r}")
    grid = [check_coefficient(c) for c in grid]
    unit = entry.get("unit")
    if unit is not None:
        if unit not in UNITS:
            raise ConfigError(f"unknown unit {unit!r}; expected one of {', '.join(UNITS)}")
        vector.raw_multipliers(1.0, unit)
    scope = entry.get("scope")
    if scope is not None:
        from ..errors import PositionError
        from .apply import _as_positions
        from .vector import resolve_scope

        if not isinstance(scope, str):
            raise ConfigError(f"scope must be a string, got {scope!r}")
        try:
            resolve_scope(vector, _as_positions(scope))
        except PositionError as e:
            raise ConfigError(f"scope {scope!r}: {e}") from None
    out = {"vector": folder, "vector_object": vector, "coefficients": grid, "scope": scope, "unit": unit}
    layers = entry.get("layers")
    if layers is not None:
        if _is_int(layers):
            layers = [layers]
        if not isinstance(layers, list) or not layers or not all(_is_int(x) and x >= 0 for x in layers):
            raise ConfigError(f"layers must be a layer number or a non-empty list of them, got {entry['layers']!r}")
        sites = [f"L{x}.block_output" for x in layers]
        missing = [s for s in sites if s not in vector.directions]
        if missing:
            raise ConfigError(f"layers {layers}: the vector has no {', '.join(missing)}; it has "
                              f"{', '.join(vector.sites)}")
        out["sites"] = sites
    condition = entry.get("condition")
    if condition is not None:
        if layers is not None:
            raise ConfigError("give layers or condition, not both (a layer sweep steers every prompt)")
        out["condition"], out["condition_object"] = _check_condition(condition, base)
    return out


def _check_condition(condition, base: Path):
    from .condition import Condition
    from .vector import SteeringVector

    if not isinstance(condition, dict) or "vector" not in condition or "threshold" not in condition:
        raise ConfigError(f"condition must be a mapping with vector and threshold, got {condition!r}")
    unknown = set(condition) - CONDITION_KEYS
    if unknown:
        raise ConfigError(f"condition: unknown keys {sorted(map(str, unknown))}; expected {sorted(CONDITION_KEYS)}")
    folder = _folder(base, condition["vector"], "condition vector")
    try:
        made = Condition.from_vector(SteeringVector.load(folder), condition.get("site"),
                                     threshold=condition["threshold"], aggregate=condition.get("aggregate", "mean"),
                                     fire=condition.get("fire", "above"))
    except ConfigError as e:
        raise ConfigError(f"condition: {e}") from None
    return {**condition, "vector": folder}, made


def check_output(folder: "str | Path", overwrite: bool) -> Path:
    """Refuse an output that is a file, or a non-empty folder unless `overwrite`; probe that it is writable."""
    from ..atomic import check_writable

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} exists and is not a folder")
    if folder.is_dir() and any(not p.name.startswith(".reftkit-probe-") for p in folder.iterdir()) and not overwrite:
        raise OutputError(f"output folder {folder} is not empty (it holds an earlier report); pass --overwrite to "
                          "replace it, or choose another output")
    return check_writable(folder.parent if folder.is_dir() else folder)


def write_report(report: dict, folder: "str | Path", plots: dict) -> Path:
    """Write `report.json` and one sweep plot per entry of `plots` (file name -> sweep report) as `folder`,
    complete or not at all: into a staging sibling, then swapped in (`atomic.replace_folder`)."""
    from ..atomic import output_error, replace_folder
    from .sweep import plot_sweep

    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.eval-", dir=folder.parent))
    except OSError as e:
        raise output_error(folder, e) from e
    try:
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False))
        for name, sweep_report in plots.items():
            plot_sweep(sweep_report, staging / name)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes a private folder; give it a plain mkdir's mode
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace_folder(staging, folder)


__all__ = ["check_output", "load_eval_config", "read_data_file", "write_report"]
