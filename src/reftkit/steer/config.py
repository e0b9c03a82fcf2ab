"""A steering-vector extraction described by one YAML file (`reftkit steer extract CONFIG.yaml`).

```yaml
model: smollm2-135m-instruct   # built-in name, local folder (relative to this file when it exists there) or .gguf
pairs: data/pairs.jsonl        # JSONL rows {"positive", "negative"} or {"prompt", "positive", "negative"}
method: mean_diff              # mean_diff (default) | pca | logistic | actadd | refusal | iti | lape
options: {}                    # method options, e.g. {variant: pair_centered} for pca, {l2: 0.001} for logistic
layers: [6]                    # optional: layers read at block_output (default every layer); or give `sites`
read: last                     # last (default) | answer | completion_mean | a positions selector ("l3", "f1")
chat: true                     # tokenise through the chat template (default true)
unit: raw                      # coefficient unit recorded in the vector: raw | mean_diff_norm | hidden_norm
batch_size: 16                 # pairs' sides per forward
output: runs/my_vector         # default runs/<file name without .yaml>, beside this file
device: cpu                    # optional (`--device` wins)
dtype: float32                 # optional (`--dtype` wins)
```

`refusal` reads `pairs` rows {"positive": harmful instruction, "negative": harmless instruction}; `iti` reads
pairs like the others (positive = the behaviour to move towards); `lape` reads `texts:` instead of `pairs:`, a
JSONL file of {"language", "text"} rows, and needs `options: {language: fr}` (the language whose neurons the
vector edits; `edit: deactivate | additive | replacement | diffmean`). These three take `unit: raw` only.

Decisions (the rules of `reft/recipe.py`):
- The file is read with `yaml.safe_load` (plain data only), must be UTF-8, and may not expand (through YAML
  aliases) to more than `yaml_config.MAX_VALUES` values. Unknown keys, wrong types and unknown methods or options are
  `ConfigError`s naming the file and the key.
- Relative paths (`pairs`, `output`, a local `model`) are relative to the folder the config file is in, as named,
  never to the current folder; `~` is expanded.
- The pairs file is read and every row checked (JSON, keys, string values, the read position, ActAdd's single
  pair) by `load_steer_config`, so a bad row is a `DataError` naming the file and line before any model loads.
- `check_output(folder, overwrite)` refuses a non-empty output folder unless `overwrite`, and probes that it is
  writable; `save_vector` writes an overwrite into a hidden sibling first and swaps it in when complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import ConfigError, DataError, OutputError, ReftkitError
from ..yaml_config import beside, model_beside, read_mapping

log = logging.getLogger(__name__)

TOP_KEYS = {"model", "pairs", "texts", "method", "options", "layers", "sites", "read", "chat", "unit", "batch_size",
            "output", "device", "dtype"}
METHODS = ("mean_diff", "pca", "logistic", "actadd", "refusal", "iti", "lape")
METHOD_OPTIONS = {"mean_diff": {"normalize", "norm_reference"}, "pca": {"variant", "sign"},
                  "logistic": {"l2", "steps"}, "actadd": {"pad", "pad_token_id"},
                  "refusal": {"val_ratio", "seed", "positions", "refusal_starts", "kl_threshold", "induce_threshold",
                              "prune_layer_fraction", "operator", "system"},
                  "iti": {"heads", "val_ratio", "seed", "l2", "steps"},
                  "lape": {"language", "edit", "value", "top_rate", "filter_rate", "activation_bar_ratio"}}
RAW_ONLY = ("actadd", "refusal", "iti", "lape")
UNITS = ("raw", "mean_diff_norm", "hidden_norm")
MAX_PAIRS = 1_000_000


def load_steer_config(path: "str | Path") -> dict:
    """Read and check an extraction config and its pairs file; returns the config with absolute paths, defaults
    filled in, and `pairs_rows` (the checked rows as dicts)."""
    path = Path(path).expanduser()
    cfg = read_mapping(path, TOP_KEYS, "config")
    data_key = "texts" if cfg.get("method") == "lape" else "pairs"
    for key in ("model", data_key):
        if key not in cfg:
            raise ConfigError(f"{path}: missing key {key!r}" + (" (lape reads texts: a JSONL file of "
                                                                 "{\"language\", \"text\"} rows)"
                                                                 if key == "texts" else ""))
    other = "pairs" if data_key == "texts" else "texts"
    if other in cfg:
        raise ConfigError(f"{path}: method {cfg.get('method', 'mean_diff')!r} reads {data_key}, not {other}")
    if data_key == "texts":
        cfg["pairs"] = cfg.pop("texts")  # the data file, whatever its rows are
    try:
        _check_values(cfg)
    except ReftkitError as e:
        raise type(e)(f"{path}: {e}") from None
    base = path.parent
    cfg["pairs"] = str(beside(base, cfg["pairs"]))
    if cfg.get("output") is None:
        cfg["output"] = str(base / "runs" / path.stem)
    else:
        cfg["output"] = str(beside(base, cfg["output"]))
    cfg["model"] = model_beside(base, cfg["model"])
    cfg["pairs_rows"] = read_texts_file(cfg["pairs"]) if data_key == "texts" else read_pairs_file(cfg["pairs"])
    _check_rows(cfg)
    return cfg


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_values(cfg: dict) -> None:
    for key in ("model", "pairs"):
        if not isinstance(cfg[key], str) or not cfg[key].strip():
            raise ConfigError(f"{key} must be a non-empty string, got {cfg[key]!r}")
    if cfg.get("output") is not None and (not isinstance(cfg["output"], str) or not cfg["output"].strip()):
        raise ConfigError(f"output must be a folder path (a string), got {cfg['output']!r}")
    cfg.setdefault("method", "mean_diff")
    if cfg["method"] not in METHODS:
        raise ConfigError(f"unknown method {cfg['method']!r}; expected one of {', '.join(METHODS)}")
    options = cfg.get("options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ConfigError(f"options must be a mapping of {cfg['method']} options, got {options!r}")
    bad = set(options) - METHOD_OPTIONS[cfg["method"]]
    if bad:
        raise ConfigError(f"method {cfg['method']!r} takes options {sorted(METHOD_OPTIONS[cfg['method']])}; got "
                          f"unknown {sorted(map(str, bad))}")
    cfg["options"] = options
    layers = cfg.get("layers")
    if layers is not None:
        if _is_int(layers):
            layers = [layers]
        if not isinstance(layers, list) or not layers or not all(_is_int(x) and x >= 0 for x in layers):
            raise ConfigError(f"layers must be a layer number or a non-empty list of layer numbers >= 0, got "
                              f"{cfg['layers']!r}")
        cfg["layers"] = layers
    sites = cfg.get("sites")
    if sites is not None:
        if isinstance(sites, str):
            sites = [sites]
        if not isinstance(sites, list) or not sites or not all(isinstance(s, str) for s in sites):
            raise ConfigError(f"sites must be a site name or a list of site names ('L6.block_output'), got {sites!r}")
        from ..sites import Site

        for s in sites:
            Site.parse(s)
        cfg["sites"] = sites
    if layers is not None and sites is not None:
        raise ConfigError("give layers or sites, not both")
    cfg.setdefault("read", "last")
    if not isinstance(cfg["read"], str) or not cfg["read"].strip():
        raise ConfigError(f"read must be a string (last, answer, completion_mean or a positions selector), got "
                          f"{cfg['read']!r}")
    cfg.setdefault("chat", True)
    if not isinstance(cfg["chat"], bool):
        raise ConfigError(f"chat must be true or false, got {cfg['chat']!r}")
    cfg.setdefault("unit", "raw")
    if cfg["unit"] not in UNITS:
        raise ConfigError(f"unknown unit {cfg['unit']!r}; expected one of {', '.join(UNITS)}")
    if cfg["method"] in RAW_ONLY and cfg["unit"] != "raw":
        raise ConfigError(f"{cfg['method']} vectors take raw coefficients: unit must be raw")
    if cfg["method"] in ("refusal", "lape") and cfg["read"] != "last":
        raise ConfigError(f"{cfg['method']} chooses the tokens it reads; leave out read")
    if cfg["method"] == "lape" and not isinstance(options.get("language"), str):
        raise ConfigError("lape needs options: {language: <a language of the texts file>}, the language whose "
                          "neurons the vector edits")
    cfg.setdefault("batch_size", 16)
    if not _is_int(cfg["batch_size"]) or cfg["batch_size"] < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {cfg['batch_size']!r}")
    for key in ("device", "dtype"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise ConfigError(f"{key} must be a string such as 'cuda' or 'bf16', got {cfg[key]!r}")


def _json_lines(path: Path, what: str):
    """`(line number, line, parsed JSON)` for every non-blank line of a UTF-8 JSONL file."""
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: byte {e.start} is not UTF-8 ({e.reason})") from None
    except OSError as e:
        raise DataError(f"cannot read {what} file {path}: {e}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{path}, line {number}: not a JSON object ({e})") from None
        yield number, line, row


def read_pairs_file(path: "str | Path") -> list[dict]:
    """The rows of a JSONL pairs file, each checked: a JSON object with string `positive` and `negative` (and
    optionally `prompt`). Blank lines are skipped. A bad row is a `DataError` naming the file and line."""
    path = Path(path)
    rows = []
    for number, line, row in _json_lines(path, "pairs"):
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected an object {{\"positive\", \"negative\"}} or "
                            f"{{\"prompt\", \"positive\", \"negative\"}}, got {type(row).__name__}")
        keys = set(row)
        if keys not in ({"positive", "negative"}, {"prompt", "positive", "negative"}):
            raise DataError(f"{path}, line {number}: expected keys positive, negative (and optionally prompt), got "
                            f"{sorted(keys)}")
        for key, value in row.items():
            if not isinstance(value, str):
                raise DataError(f"{path}, line {number}: {key} must be a string, got {type(value).__name__}")
        if "prompt" not in row and not (row["positive"].strip() and row["negative"].strip()):
            raise DataError(f"{path}, line {number}: an empty text has no token to read")
        rows.append(row)
        if len(rows) > MAX_PAIRS:
            raise DataError(f"{path}: more than {MAX_PAIRS:,} pairs")
    if not rows:
        raise DataError(f"{path} holds no pairs; extraction needs at least one {{\"positive\", \"negative\"}} row")
    if len({"prompt" in r for r in rows}) > 1:
        raise DataError(f"{path}: some rows have a prompt and some do not; use one shape for every row")
    return rows


def read_texts_file(path: "str | Path") -> list[dict]:
    """The rows of a JSONL texts file for `lape`: JSON objects {"language", "text"} with non-empty strings, at least
    two languages. A bad row is a `DataError` naming the file and line."""
    path = Path(path)
    rows = []
    for number, line, row in _json_lines(path, "texts"):
        if not isinstance(row, dict) or set(row) != {"language", "text"} \
                or not all(isinstance(v, str) and v.strip() for v in row.values()):
            raise DataError(f"{path}, line {number}: expected {{\"language\": ..., \"text\": ...}} with non-empty "
                            f"strings, got {line.strip()[:80]}")
        rows.append(row)
        if len(rows) > MAX_PAIRS:
            raise DataError(f"{path}: more than {MAX_PAIRS:,} texts")
    if len({r["language"] for r in rows}) < 2:
        raise DataError(f"{path}: LAPE compares languages; the file holds {len({r['language'] for r in rows})}")
    return rows


def _check_rows(cfg: dict) -> None:
    from .data import check_read, make_pairs

    where = cfg["pairs"]
    if cfg["method"] == "lape":
        languages = {r["language"] for r in cfg["pairs_rows"]}
        if cfg["options"]["language"] not in languages:
            raise DataError(f"{where}: options.language {cfg['options']['language']!r} is not one of the file's "
                            f"languages ({', '.join(sorted(languages))})")
        return
    if cfg["method"] == "refusal" and "prompt" in cfg["pairs_rows"][0]:
        raise DataError(f"{where}: refusal takes rows {{\"positive\": harmful, \"negative\": harmless}} without a "
                        "prompt")
    if cfg["method"] == "actadd":
        if len(cfg["pairs_rows"]) != 1 or "prompt" in cfg["pairs_rows"][0]:
            raise DataError(f"{where}: actadd takes exactly one {{\"positive\", \"negative\"}} prompt pair, got "
                            f"{len(cfg['pairs_rows'])} row(s)")
        return
    try:
        check_read(cfg["read"], make_pairs(pairs=cfg["pairs_rows"]))
    except ReftkitError as e:
        raise type(e)(f"{where}: {e}") from None


def check_output(folder: "str | Path", overwrite: bool) -> Path:
    """Refuse a non-empty `folder` unless `overwrite`; probe that files can be written beside it."""
    from ..atomic import check_writable

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} exists and is not a folder")
    if folder.is_dir() and any(not p.name.startswith(".reftkit-probe-") for p in folder.iterdir()) and not overwrite:
        raise OutputError(f"output folder {folder} is not empty (it holds an earlier vector); pass --overwrite "
                          "(overwrite=True) to replace it, or choose another output")
    return check_writable(folder.parent if overwrite and folder.is_dir() else folder)


def save_vector(vector, folder: "str | Path", overwrite: bool = False) -> Path:
    """`vector.save(folder)`, replacing what was there (when `overwrite`) only once the new folder is complete."""
    from ..atomic import replace_folder

    folder = Path(folder)
    check_output(folder, overwrite)
    if not folder.is_dir() or not any(folder.iterdir()):
        return vector.save(folder)
    staging = folder.with_name(f".{folder.name}.overwrite")
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    vector.save(staging)
    return replace_folder(staging, folder)


def extraction_kwargs(cfg: dict) -> dict:
    """The keyword arguments of `reftkit.steer.extract.extract` that a checked config stands for."""
    out = {"method": cfg["method"], "layers": cfg.get("layers"), "sites": cfg.get("sites"), "chat": cfg["chat"],
           **cfg["options"]}
    if cfg["method"] != "actadd":
        out.update(read=cfg["read"], unit=cfg["unit"], batch_size=cfg["batch_size"])
    if cfg["method"] in ("refusal", "lape"):
        del out["read"]
    return out


__all__ = ["check_output", "extraction_kwargs", "load_steer_config", "read_pairs_file", "read_texts_file",
           "save_vector"]
