"""Read folders saved by pyreft 0.1.0 (`ReftModel.save`, i.e. pyvene 0.1.8's `IntervenableModel.save`).

Such a folder holds
- `config.json`: pyvene's `IntervenableConfig`. `representations` is a list of `RepresentationConfig` named
  tuples written as JSON lists (field order in `REPRESENTATION_FIELDS`; dicts are accepted too);
  `intervention_types` is a parallel list of class strings such as
  `"<class 'pyreft.interventions.LoreftIntervention'>"`. The rank is `low_rank_dimension`; `dropout`, `act_fn`,
  `dtype` and `add_bias` are not saved at all, so they come back as reftkit's defaults (or, for `add_bias`, from
  the weights).
- one `intkey_<key>.bin` per intervention (a `torch.save`d state dict), `<key>` being pyvene's
  `layer_<l>_comp_<component>_unit_<unit>_nunit_<n>#<i>` (`comp_<path with dots as underscores>_...` for a
  module-path component), `#<i>` counting repeats of the same prefix. pyreft's `LoreftIntervention` overrides
  `state_dict`: its file has `weight`, `bias` (the learned source) and `rotate_layer`, the computed `[d, r]`
  rotation. Every other type saves its plain module state: `embed_dim` and `interchange_dim` buffers (dropped
  here), `learned_source*`, `proj_layer.*`, and torch's parametrization tensors
  `rotate_layer.parametrizations.weight.original [d, r]` and `...weight.0.base [d, d]`, which reftkit's modules
  accept as they are (same layout, same parametrization).

Classes are mapped by name through `PYREFT_TYPES`; nothing named in the folder is imported. The binaries are read
with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers, and only when they
are `torch.save` zip archives whose declared sizes fit the file. Floating weights are returned as float32
(pyreft's default learned source is bfloat16). Layers must be integers and components names or module paths
(letters, digits, `_`, `[]` and `.`), so a file name built from them never leaves the folder.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import ConfigError

PYREFT_TYPES: dict[str, str] = {
    "LoreftIntervention": "loreft",
    "NodireftIntervention": "direft",
    "DireftIntervention": "orthogonal_direft",
    "NoreftIntervention": "noreft",
    "ConsreftIntervention": "consreft",
    "LobireftIntervention": "lobireft",
}
"""pyreft class name -> reftkit registry name. pyreft's `NodireftIntervention` is the paper's DiReFT."""

REPRESENTATION_FIELDS = (
    "layer", "component", "unit", "max_number_of_units", "low_rank_dimension", "intervention_type",
    "intervention", "subspace_partition", "group_key", "intervention_link_key", "moe_key",
    "source_representation", "hidden_source_representation", "latent_dim",
)

_COMPONENT_RE = re.compile(r"[A-Za-z_][\w\[\]]*(?:\.[\w\[\]]+)*", re.ASCII)  # "block_output", "model.layers[0].mlp"
_LOREFT_COMPACT = {"weight": "learned_source.weight", "bias": "learned_source.bias", "rotate_layer": "rotate_layer.weight"}
_ROTATION_KEYS = ("rotate_layer.parametrizations.weight.original", "rotate_layer.parametrizations.weight.0.base")
_KEYS: dict[str, tuple[str, ...]] = {
    "loreft": ("learned_source.weight", "learned_source.bias", "rotate_layer.weight", *_ROTATION_KEYS),
    "orthogonal_direft": ("learned_source.weight", "learned_source.bias", "rotate_layer.weight", *_ROTATION_KEYS),
    "direft": ("learned_source.weight", "learned_source.bias", "proj_layer.weight"),
    "noreft": ("learned_source.weight", "learned_source.bias", "proj_layer.weight", "proj_layer.bias"),
    "consreft": ("learned_source", "rotate_layer.weight", *_ROTATION_KEYS),
    "lobireft": ("learned_source", "rotate_layer.weight", *_ROTATION_KEYS),
}


class PyreftIntervention(NamedTuple):
    """One intervention of a pyreft folder: where it sits, and what to build there.
    `build_intervention({"type": type_name, "config": config}).load_state_dict(state_dict)` restores it."""

    layer: int
    component: str
    type_name: str
    config: dict
    state_dict: dict[str, torch.Tensor]


def read_pyreft_folder(path: str | Path) -> list[PyreftIntervention]:
    """Read a pyreft 0.1.0 saved folder into `(layer, component, type_name, config, state_dict)` entries, in the
    order of its `representations`. `component` is pyvene's: a canonical name such as `block_output`, or a
    module path when the folder was saved with string access."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} is not a pyreft folder: it has no config.json (save one with ReftModel.save)")
    from .io import read_json

    saved = read_json(config_path, "pyvene's IntervenableConfig as pyreft saves it")
    if not isinstance(saved, dict):
        raise ConfigError(f"{config_path}: expected a JSON object (pyvene's IntervenableConfig), got "
                          f"{type(saved).__name__}")
    reps, types = saved.get("representations"), saved.get("intervention_types")
    if not isinstance(reps, list) or not isinstance(types, list) or len(reps) != len(types):
        raise ConfigError(
            f"{config_path}: expected parallel lists 'representations' and 'intervention_types' as pyvene writes "
            f"them, got {type(reps).__name__} and {type(types).__name__}"
        )
    collisions: dict[str, int] = {}
    out = []
    for rep, type_str in zip(reps, types):
        rep = _representation(rep, config_path)
        type_name = _type_name(type_str, config_path)
        key = _key(rep, collisions)
        binary = folder / f"intkey_{key}.bin"
        if not binary.is_file():
            found = sorted(p.name for p in folder.glob("intkey_*.bin"))
            raise ConfigError(f"{folder}: the weights of intervention {key!r} ({binary.name}) are missing; found {found}")
        state = _load_binary(binary)
        config, state_dict = _convert(type_name, dict(state), rep, binary)
        out.append(PyreftIntervention(rep["layer"], rep["component"], type_name, config, state_dict))
    return out


def _load_binary(binary: Path) -> dict:
    """A `torch.save`d state dict of tensors. The zip archive is checked first (torch writes its records
    uncompressed, so no record can declare more bytes than the file has); then `weights_only=True` refuses
    anything but tensors and plain containers: nothing named in the file is imported or run."""
    try:
        with zipfile.ZipFile(binary) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ConfigError(f"{binary} is not a torch.save archive ({e}); expected the intkey_*.bin state dict pyreft "
                          "writes") from None
    size = binary.stat().st_size
    if any(r.compress_type != zipfile.ZIP_STORED or r.file_size > size for r in records) or \
            sum(r.file_size for r in records) > size:
        raise ConfigError(f"{binary}: its records declare more bytes than the file holds ({size}) or are compressed; "
                          "expected an archive written by torch.save")
    try:
        state = torch.load(binary, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - whatever torch's reader raises, the file is not a state dict
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(f"{binary} is not a plain state dict of tensors ({type(e).__name__}: {reason}); expected "
                          "the intkey_*.bin pyreft writes (read with weights_only=True, which loads no code)") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConfigError(f"{binary} does not hold a state dict of tensors (names -> tensors)")
    return state


def _representation(rep, where: Path) -> dict:
    if isinstance(rep, list):
        if len(rep) > len(REPRESENTATION_FIELDS):
            raise ConfigError(f"{where}: a representation has {len(rep)} fields, pyvene 0.1.8 writes "
                              f"{len(REPRESENTATION_FIELDS)}")
        rep = dict(zip(REPRESENTATION_FIELDS, rep))
    if not isinstance(rep, dict):
        raise ConfigError(f"{where}: a representation must be a list or an object, got {rep!r}")
    rep = {"layer": 0, "component": "block_output", "unit": "pos", "max_number_of_units": 1, **rep}
    for name in ("layer", "max_number_of_units"):
        if isinstance(rep[name], bool) or not isinstance(rep[name], int) or rep[name] < 0:
            raise ConfigError(f"{where}: a representation has {name} {rep[name]!r}; expected a non-negative integer")
    rank = rep.get("low_rank_dimension")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise ConfigError(f"{where}: a representation has low_rank_dimension {rank!r}; expected an integer or null")
    component = rep["component"]
    if not isinstance(component, str) or not _COMPONENT_RE.fullmatch(component):
        raise ConfigError(f"{where}: a representation has component {component!r}; expected a component name such "
                          "as 'block_output' or a module path such as 'model.layers.0.mlp'")
    if rep["unit"] != "pos" or rep["max_number_of_units"] != 1:
        raise ConfigError(
            f"{where}: unit {rep['unit']!r} with max_number_of_units {rep['max_number_of_units']} is not supported; "
            "reftkit reads ReFT folders that intervene on token positions (unit 'pos', one unit)"
        )
    if rep.get("intervention_link_key") is not None or rep.get("subspace_partition") is not None:
        raise ConfigError(f"{where}: linked interventions and subspace partitions are not supported in pyreft folders")
    return rep


def _type_name(type_str, where: Path) -> str:
    match = re.fullmatch(r"(?:<class ')?([\w.]+?)(?:'>)?", str(type_str).strip())
    cls = match.group(1).rsplit(".", 1)[-1] if match else str(type_str)
    if cls not in PYREFT_TYPES:
        raise ConfigError(
            f"{where}: pyreft intervention type {type_str!r} is not supported; reftkit reads "
            f"{', '.join(sorted(PYREFT_TYPES))}"
        )
    return PYREFT_TYPES[cls]


def _key(rep: dict, collisions: dict[str, int]) -> str:
    """pyvene's `_get_representation_key`."""
    component, unit = str(rep["component"]), str(rep["unit"]).replace(".", "_")
    n = rep["max_number_of_units"]
    if "." in component:
        proposal = f"comp_{component.replace('.', '_')}_unit_{unit}_nunit_{n}"
    else:
        proposal = f"layer_{rep['layer']}_comp_{component}_unit_{unit}_nunit_{n}"
    collisions[proposal] = collisions.get(proposal, -1) + 1
    return f"{proposal}#{collisions[proposal]}"


def _convert(type_name: str, state: dict, rep: dict, where: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """pyreft's state dict -> (reftkit config, reftkit state dict)."""
    embed_dim = state.pop("embed_dim", None)
    state.pop("interchange_dim", None)
    if type_name == "loreft" and "rotate_layer" in state:
        state = {_LOREFT_COMPACT.get(k, k): v for k, v in state.items()}
    if type_name == "direft":
        state.pop("proj_layer.bias", None)  # created by pyreft's add_bias, never used by its forward
    unknown = sorted(set(state) - set(_KEYS[type_name]))
    if unknown:
        raise ConfigError(f"{where}: unexpected weights {unknown} for a pyreft {type_name}; expected {_KEYS[type_name]}")
    for key, value in state.items():
        if not value.is_floating_point():
            raise ConfigError(f"{where}: weight {key!r} is {value.dtype}; pyreft's weights are floating point")
    state = {k: v.float().contiguous() for k, v in state.items()}

    key = next((k for k in ("learned_source.weight", "rotate_layer.weight", _ROTATION_KEYS[0]) if k in state), None)
    if key is None:
        raise ConfigError(f"{where}: no weights to infer the width and rank of a pyreft {type_name} from")
    if state[key].dim() != 2:
        raise ConfigError(f"{where}: weight {key!r} has shape {tuple(state[key].shape)}; expected a matrix")
    rank, width = state[key].shape if key == "learned_source.weight" else reversed(state[key].shape)
    if embed_dim is not None and (not isinstance(embed_dim, torch.Tensor) or embed_dim.numel() != 1):
        raise ConfigError(f"{where}: embed_dim must be a single number, got shape {tuple(embed_dim.shape)}")
    if embed_dim is not None and int(embed_dim) != width:
        raise ConfigError(f"{where}: embed_dim {int(embed_dim)} does not match the weights' width {width}")
    saved_rank = rep.get("low_rank_dimension")
    if saved_rank is not None and int(saved_rank) != rank:
        raise ConfigError(f"{where}: low_rank_dimension {saved_rank} does not match the weights' rank {rank}")
    config: dict = {"embed_dim": int(width), "low_rank_dimension": int(rank)}
    if type_name == "noreft":
        config["add_bias"] = "proj_layer.bias" in state
    return config, state
