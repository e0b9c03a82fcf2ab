"""Reading the YAML files users write (training recipes, steering configs): one safe reader and one path rule.

- `read_mapping` reads UTF-8 text (a byte order mark is allowed) with `yaml.safe_load`, which builds plain data
  only (a `!!python/...` tag is an error, never an object); refuses anything but a mapping, a file that expands
  past `MAX_VALUES` values (YAML aliases can make a few lines stand for billions) and unknown top-level keys.
- Relative paths in a file are relative to the file's folder (`beside`); a `model` is a path beside the file only
  when one exists there (`model_beside`), otherwise a model name passed on as written.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

MAX_VALUES = 100_000


def read_mapping(path: "str | Path", keys: set[str], what: str = "config") -> dict:
    """The top-level mapping of the YAML file `path`, every key one of `keys`."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: byte {e.start} is not UTF-8 ({e.reason}); a {what} is UTF-8 YAML text") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: an int too long to convert
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping with keys {sorted(keys)}")
    _check_expanded_size(cfg, path, what)
    unknown = set(cfg) - keys
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(map(str, unknown))}; expected {sorted(keys)}")
    return cfg


def _check_expanded_size(cfg: dict, path: Path, what: str) -> None:
    stack, seen = [cfg], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{path} expands to more than {MAX_VALUES:,} values (YAML aliases repeating one "
                              f"another?); a {what} is a few dozen keys, write the values out")
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def beside(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def model_beside(base: Path, model):
    from .models import builtin_names

    if not isinstance(model, str) or model in builtin_names() or Path(model).expanduser().is_absolute():
        return model
    local = beside(base, model)
    return str(local) if local.exists() else model
