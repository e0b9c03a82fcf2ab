"""Hostile files: every reader a user can point at a file (intervention folders, adapter folders, pyreft folders,
YAML recipes, GGUF files and the converted-model cache) turns truncated, random, empty, mistyped, oversized or
code-naming input into a typed `ReftkitError` whose message names the file and what was expected. Nothing named
in a file is imported or run, nothing is allocated from a size a header merely declares, a failed load leaves no
hook on the model, and nothing is written outside the test's folder.

Each table row is `(id, change, error, match)`: `change(folder_or_file)` damages a good copy, `error` is the
exception expected (None: the input must be accepted) and `match` a regex for what the message says was expected.
Data files (JSONL/CSV/JSON) are in tests/reft/test_hostile_data.py."""

from __future__ import annotations

import ast
import io
import json
import os
import random
import re
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from reftkit import models
from reftkit.cli import main
from reftkit.engine import Binding, IntervenableModel
from reftkit.errors import ConfigError, IncompatibleModelError, ReftkitError, SiteError
from reftkit.interventions import build_intervention
from reftkit.io_pyreft import read_pyreft_folder
from reftkit.models import build_tiny_model, load_model, verify_cache_entry
from reftkit.reft.config import ReftConfig
from reftkit.reft.model import ReftModel
from reftkit.reft.recipe import load_recipe

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pyreft"
SRC = Path(__file__).resolve().parents[1] / "src" / "reftkit"
EB8 = 8 * 2**60  # eight exbibytes


def noise(n: int, salt: str) -> bytes:
    """Deterministic random bytes (the same on every run)."""
    return random.Random(f"hostile-{salt}").randbytes(n)


# ------------------------------------------------------------------------------------------------ helpers

def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(root.rglob("*"))}


@contextmanager
def untouched(tmp_path: Path, monkeypatch, *, allow: tuple[str, ...] = ()):
    """Run a reader with the current folder, HOME and the model cache inside `tmp_path`; afterwards nothing in
    `tmp_path` (but the `allow`ed sub-folders) and nothing beside it has changed."""
    for name in ("cwd", "home", "cache"):
        (tmp_path / name).mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REFTKIT_CACHE", str(tmp_path / "cache"))
    before, beside = tree(tmp_path), sorted(os.listdir(tmp_path.parent))
    yield
    after = tree(tmp_path)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert {k for k in changed if not k.startswith(allow) or not allow} == set(), sorted(changed)
    assert sorted(os.listdir(tmp_path.parent)) == beside
    assert not list((tmp_path / "cwd").iterdir()) and not list((tmp_path / "home").iterdir())


def expect(load, error, match, *, names: str):
    """Call `load()`; check that it raises `error` (a ReftkitError) naming `names` and matching `match`, or,
    with `error` None, that it succeeds. Returns the result or the exception."""
    if error is None:
        return load()
    with pytest.raises(ReftkitError) as info:
        load()
    e = info.value
    assert isinstance(e, error), f"{type(e).__name__} (expected {error.__name__}): {e}"
    message = str(e)
    assert names in message, f"the message does not name {names}: {message}"
    assert re.search(match, message, re.S), f"{match!r} not in: {message}"
    assert len(message) < 2000, f"an unbounded message ({len(message)} characters)"
    return e


def edit_json(name: str, change):
    """A change that rewrites the JSON file `name` of a folder through `change(obj) -> obj | None`."""
    def apply(folder: Path):
        path = folder / name
        obj = json.loads(path.read_text())
        result = change(obj)
        path.write_text(json.dumps(obj if result is None else result))
    return apply


def write(name: str, data: bytes | str | None):
    """A change that replaces the file `name` of a folder (None deletes it)."""
    def apply(folder: Path):
        path = folder / name
        if data is None:
            path.unlink()
        elif isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
    return apply


def transform(name: str, change):
    """A change that rewrites the bytes of the file `name` through `change(bytes) -> bytes`."""
    def apply(folder: Path):
        path = folder / name
        path.write_bytes(change(path.read_bytes()))
    return apply


def edit_tensors(name: str, change):
    """A change that rewrites the safetensors file `name` through `change(dict of tensors) -> dict | None`."""
    def apply(folder: Path):
        path = folder / name
        tensors = load_file(str(path))
        result = change(tensors)
        save_file(tensors if result is None else result, str(path))
    return apply


def safetensors_bytes(header, *, declared: int | None = None, body: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + body


def deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def set_in(path: tuple, value):
    """A change to a JSON object: set the value at the key path `path`."""
    def change(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def non_utf8(text: bytes) -> bytes:
    return text.replace(b'"', b'"\xff', 1)  # one byte that cannot start a UTF-8 sequence


WEIGHT_FILE_CASES = [  # (id, bytes) for any safetensors file
    ("weights-empty", b""),
    ("weights-random-bytes", noise(4096, "safetensors")),
    ("weights-header-claims-8-EB", safetensors_bytes(b"{}", declared=EB8)),
    ("weights-header-longer-than-file", safetensors_bytes(b"{}", declared=1 << 20)),
    ("weights-header-not-json", safetensors_bytes(b"not json at all")),
    ("weights-header-is-a-list", safetensors_bytes([])),
    ("weights-data-beyond-file", safetensors_bytes({"0.x": {"dtype": "F32", "shape": [1 << 20],
                                                            "data_offsets": [0, 4 << 20]}})),
    ("weights-dtype-names-code", safetensors_bytes({"0.x": {"dtype": "os.system", "shape": [1],
                                                            "data_offsets": [0, 4]}}, body=bytes(4))),
    ("weights-shape-overflows", safetensors_bytes({"0.x": {"dtype": "F32", "shape": [2**40, 2**40],
                                                           "data_offsets": [0, 4]}}, body=bytes(4))),
]


# ------------------------------------------------------------------------------------- the tiny model & folders

@pytest.fixture(scope="module")
def llama():
    """The tiny Llama `load_model("tiny-llama")` builds (seed 0), so adapters saved here fit the CLI's model."""
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def good_interventions(llama, tmp_path_factory):
    """An intervention folder with a LoReFT at L1 and a sparse autoencoder at L2 (latent_dim 8)."""
    folder = tmp_path_factory.mktemp("good") / "interventions"
    loreft = build_intervention({"type": "loreft", "config": {"embed_dim": 64, "low_rank_dimension": 2}})
    sae = build_intervention({"type": "autoencoder", "config": {"embed_dim": 64, "latent_dim": 8}})
    im = IntervenableModel(llama, [Binding("L1.block_output", loreft, "edit", positions="l1"),
                                   Binding("L2.block_output", sae, "sae", positions="l1")])
    im.save(folder)
    im.remove()
    return folder


@pytest.fixture(scope="module")
def good_adapter(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "adapter"
    reft = ReftModel(llama, ReftConfig(layers=[1], rank=2))
    reft.save_pretrained(folder)
    reft.unload()
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "in" / folder.name
    shutil.copytree(folder, target)
    return target


# ---------------------------------------------------------------------------------- intervention folders

CONFIG, WEIGHTS = "config.json", "interventions.safetensors"
ic = lambda *path_and_value: edit_json(CONFIG, set_in(path_and_value[:-1], path_and_value[-1]))  # noqa: E731

INTERVENTION_CASES = [
    ("config-missing", write(CONFIG, None), ConfigError, "no config.json.*expected a folder written by"),
    ("config-empty", write(CONFIG, b""), ConfigError, "is not valid JSON"),
    ("config-random-bytes", write(CONFIG, noise(2048, "ic")), ConfigError, "is not UTF-8"),
    ("config-truncated", transform(CONFIG, lambda b: b[: len(b) // 2]), ConfigError, "is not valid JSON"),
    ("config-non-utf8-byte", transform(CONFIG, non_utf8), ConfigError, "byte 5 is not UTF-8"),
    ("config-with-utf8-bom", transform(CONFIG, lambda b: b"\xef\xbb\xbf" + b), None, ""),
    ("config-nested-100000-deep", write(CONFIG, deep_json()), ConfigError, "is not valid JSON"),
    ("config-int-of-5000-digits", write(CONFIG, '{"format_version": 1' + "0" * 5000 + "}"), ConfigError,
     "is not valid JSON"),
    ("config-is-a-list", write(CONFIG, "[1, 2]"), ConfigError, "expected a JSON object"),
    ("config-is-a-string", write(CONFIG, '"os.system"'), ConfigError, "expected a JSON object"),
    ("format-version-string", ic("format_version", "1"), ConfigError, "format_version must be a positive integer"),
    ("format-version-nan", ic("format_version", float("nan")), ConfigError, "format_version must be a positive"),
    ("format-version-future", ic("format_version", 99), ConfigError, "newer reftkit"),
    ("unknown-top-field-class", ic("class", "os.system"), ConfigError, r"unknown field\(s\) \['class'\]"),
    ("type-names-os-system", ic("interventions", 0, "type", "os.system"), ConfigError,
     "unknown intervention type 'os.system'; registered:"),
    ("type-names-dunder-import", ic("interventions", 0, "type", "__import__"), ConfigError,
     "unknown intervention type '__import__'"),
    ("type-is-a-list", ic("interventions", 0, "type", ["loreft"]), ConfigError, "needs a registry name"),
    ("spec-with-class-field", ic("interventions", 0, "class", "os.system"), ConfigError,
     r"intervention 0: unknown field\(s\) \['class'\]"),
    ("spec-config-is-a-string", ic("interventions", 0, "config", "embed_dim=64"), ConfigError,
     "an object in 'config'"),
    ("config-field-dunder-class", ic("interventions", 0, "config", "__class__", "os.system"), ConfigError,
     r"unknown fields \['__class__'\]"),
    ("act-fn-names-os-system", ic("interventions", 0, "config", "act_fn", "os.system"), ConfigError,
     "unknown act_fn 'os.system'"),
    ("dtype-names-torch-object", ic("interventions", 0, "config", "dtype", "torch.Tensor"), ConfigError,
     "dtype must be one of"),
    ("embed-dim-string", ic("interventions", 0, "config", "embed_dim", "64"), ConfigError,
     "embed_dim must be a non-negative integer"),
    ("embed-dim-10e12", ic("interventions", 0, "config", "embed_dim", 10**12), ConfigError,
     "embed_dim 1000000000000 does not match the width of its site"),
    ("rank-10e12", ic("interventions", 0, "config", "low_rank_dimension", 10**12), ConfigError,
     "low_rank_dimension 1000000000000 is larger than the width 64"),
    ("rank-nan", ic("interventions", 0, "config", "low_rank_dimension", float("nan")), ConfigError,
     "low_rank_dimension must be a non-negative integer"),
    ("latent-dim-10e9", ic("interventions", 1, "config", "latent_dim", 10**9), ConfigError,
     "latent_dim 1000000000 at width 64 needs at least 64000000000 weights"),
    ("site-is-a-path-string", ic("bindings", 0, "site", "../../etc/passwd"), ConfigError,
     "needs a string name and a site object"),
    ("site-layer-is-a-path", ic("bindings", 0, "site", "layer", "../../etc"), ConfigError,
     "bad site.*must be an integer"),
    ("site-field-names-code", ic("bindings", 0, "site", "__class__", "os.system"), ConfigError,
     r"bad site.*unknown site fields \['__class__'\]"),
    ("site-module-outside-model", ic("bindings", 0, "site", {"module": "../../x"}), IncompatibleModelError,
     "does not fit this model.*no module at path"),
    ("site-module-names-code", ic("bindings", 0, "site", {"module": "__import__('os').system"}),
     IncompatibleModelError, "no module at path"),
    ("site-layer-2-to-70", ic("bindings", 0, "site", "layer", 2**70), IncompatibleModelError, "out of range"),
    ("binding-index-string", ic("bindings", 0, "intervention", "0"), ConfigError, "expected an index 0..1"),
    ("binding-index-99", ic("bindings", 0, "intervention", 99), ConfigError, "expected an index 0..1"),
    ("binding-source-nan", ic("bindings", 0, "source", float("nan")), ConfigError, "expected an index >= 0"),
    ("positions-kind-names-code", ic("bindings", 0, "positions", {"kind": "os.system"}), ConfigError,
     "bad positions"),
    ("positions-is-a-list", ic("bindings", 0, "positions", [0, 1]), ConfigError, "must be an object or null"),
    ("binding-name-is-a-path", ic("bindings", 0, "name", "../../escape"), None, ""),
    ("fingerprint-hidden-size-string", ic("model", "hidden_size", "64"), IncompatibleModelError,
     "hidden_size: saved '64', model has 64"),
    ("weights-missing", write(WEIGHTS, None), ConfigError, "no interventions.safetensors"),
    ("weights-truncated", transform(WEIGHTS, lambda b: b[: len(b) // 2]), ConfigError,
     "is not a readable safetensors file"),
    *[(name, write(WEIGHTS, data), ConfigError, "is not a readable safetensors file")
      for name, data in WEIGHT_FILE_CASES],
    ("weights-wrong-shape", edit_tensors(WEIGHTS, lambda t: t.update({"0.learned_source.weight": torch.zeros(3, 64)})),
     ConfigError, "do not fit its config.*size mismatch"),
    ("weights-int32-for-float", edit_tensors(WEIGHTS, lambda t: t.update(
        {"0.learned_source.weight": torch.zeros(2, 64, dtype=torch.int32)})), ConfigError,
     "'learned_source.weight' is torch.int32, expected torch.float32"),
    ("weights-bool-for-float", edit_tensors(WEIGHTS, lambda t: t.update(
        {"1.autoencoder.encoder.0.bias": torch.ones(8, dtype=torch.bool)})), ConfigError, "is torch.bool, expected"),
    ("weights-key-is-a-path", edit_tensors(WEIGHTS, lambda t: t.update({"../../escape": torch.zeros(1)})),
     ConfigError, "unexpected tensor '../../escape'"),
    ("weights-key-non-ascii-digit", edit_tensors(WEIGHTS, lambda t: t.update({"\u0661.weight": torch.zeros(1)})),
     ConfigError, "unexpected tensor"),
    ("weights-key-dunder-class", edit_tensors(WEIGHTS, lambda t: t.update({"0.__class__": torch.zeros(1)})),
     ConfigError, "Unexpected key"),
    ("weights-tensor-missing", edit_tensors(WEIGHTS, lambda t: [t.pop("0.learned_source.bias"), None][1]), ConfigError,
     "Missing key"),
]


@pytest.mark.parametrize("change,error,match", [pytest.param(*c[1:], id=c[0]) for c in INTERVENTION_CASES])
def test_intervention_folder(llama, good_interventions, tmp_path, monkeypatch, change, error, match):
    folder = copy_of(good_interventions, tmp_path)
    change(folder)
    with untouched(tmp_path, monkeypatch):
        result = expect(lambda: IntervenableModel.load(llama, folder), error, match, names=str(folder))
    if error is None:
        assert [b.name for b in result.bindings][0] in ("edit", "../../escape")
        result.remove()
    assert hook_count(llama) == 0


# --------------------------------------------------------------------------------------- adapter folders

ACONFIG, AWEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ac = lambda *path_and_value: edit_json(ACONFIG, set_in(("config", *path_and_value[:-1]), path_and_value[-1]))  # noqa: E731

ADAPTER_CASES = [
    ("no-config-at-all", write(ACONFIG, None), ConfigError, "holds no adapter_config.json"),
    ("config-empty", write(ACONFIG, b""), ConfigError, "is not a valid adapter config"),
    ("config-random-bytes", write(ACONFIG, noise(2048, "ac")), ConfigError, "UnicodeDecodeError"),
    ("config-truncated", transform(ACONFIG, lambda b: b[: len(b) // 2]), ConfigError, "not a valid adapter config"),
    ("config-non-utf8-byte", transform(ACONFIG, non_utf8), ConfigError, "UnicodeDecodeError"),
    ("config-with-utf8-bom", transform(ACONFIG, lambda b: b"\xef\xbb\xbf" + b), None, ""),
    ("config-nested-100000-deep", write(ACONFIG, deep_json()), ConfigError, "RecursionError"),
    ("config-is-a-list", write(ACONFIG, "[]"), ConfigError, "expected an object with a 'config' object"),
    ("config-field-is-a-list", edit_json(ACONFIG, set_in(("config",), [1])), ConfigError, "a 'config' object"),
    ("model-field-is-a-string", edit_json(ACONFIG, set_in(("model",), "llama")), ConfigError, "a 'model' object"),
    ("method-names-os-system", ac("method", "os.system"), ConfigError, "unknown ReFT method 'os.system'"),
    ("method-is-a-list", ac("method", ["loreft"]), ConfigError, "unknown ReFT method"),
    ("unknown-field-class", ac("class", "os.system"), ConfigError, r"unknown ReftConfig fields \['class'\]"),
    ("format-version-future", ac("format_version", 2), ConfigError, "format version 2 is not supported"),
    ("rank-string", ac("rank", "4"), ConfigError, "rank must be a positive integer"),
    ("rank-nan", ac("rank", float("nan")), ConfigError, "rank must be a positive integer"),
    ("rank-10e12", ac("rank", 10**12), ConfigError, "rank 1000000000000 is larger than the width 64"),
    ("dropout-nan", ac("dropout", float("nan")), ConfigError, r"dropout must be a number in \[0, 1\)"),
    ("layers-infinite", ac("layers", [float("inf")]), ConfigError, "layers must be 'all' or a non-empty list"),
    ("layers-is-a-path", ac("layers", "../../x"), ConfigError, "layers must be 'all' or a list of integers"),
    ("layer-out-of-range", ac("layers", [2**40]), ConfigError, "out of range"),
    ("component-is-a-path", ac("component", "../../etc"), SiteError, "unknown component '../../etc'; expected one"),
    ("component-is-a-number", ac("component", 5), ConfigError, "component must be a component name"),
    ("tied-is-a-string", ac("tied", "no"), ConfigError, "tied must be true or false"),
    ("seed-is-a-string", ac("seed", "x"), ConfigError, "seed must be an integer"),
    ("act-fn-names-os-system", ac("act_fn", "os.system"), ConfigError, "unknown act_fn 'os.system'"),
    ("act-fn-is-a-list", ac("act_fn", ["relu"]), ConfigError, "act_fn must be an activation name"),
    ("extra-embed-dim-10e12", ac("extra", {"embed_dim": 10**12}), ConfigError,
     "embed_dim 1000000000000 does not match the width 64"),
    ("extra-field-dunder-class", ac("extra", {"__class__": "os.system"}), ConfigError,
     r"unknown fields \['__class__'\]"),
    ("site-method-names-os-system", ac("interventions", [{"layer": 1, "method": "os.system"}]), ConfigError,
     "unknown method 'os.system'"),
    ("site-embed-dim-10e12", ac("interventions", [{"layer": 1, "method": "loreft",
                                                   "config": {"embed_dim": 10**12}}]), ConfigError,
     "embed_dim 1000000000000 does not match"),
    ("modules-to-save-is-a-path", ac("modules_to_save", ["../../etc"]), ConfigError,
     "modules_to_save names '../../etc', which is not a module"),
    ("modules-to-save-names-code", ac("modules_to_save", ["__import__('os').system"]), ConfigError,
     "which is not a module"),
    ("saved-adapter-name-is-a-path", edit_json(ACONFIG, set_in(("adapter_name",), "../../escape")), None, ""),
    ("fingerprint-hidden-size-string", edit_json(ACONFIG, set_in(("model", "hidden_size"), "64")),
     IncompatibleModelError, "hidden_size='64', but this model has hidden_size=64"),
    ("weights-missing", write(AWEIGHTS, None), ConfigError, "cannot read the adapter weights"),
    ("weights-truncated", transform(AWEIGHTS, lambda b: b[: len(b) // 2]), ConfigError,
     "cannot read the adapter weights"),
    *[(name, write(AWEIGHTS, data), ConfigError, "cannot read the adapter weights")
      for name, data in WEIGHT_FILE_CASES],
    ("weights-wrong-shape", edit_tensors(AWEIGHTS, lambda t: t.update(
        {"interventions.0.learned_source.weight": torch.zeros(3, 64)})), IncompatibleModelError,
     "do not fit intervention 0.*size mismatch"),
    ("weights-int64-for-float", edit_tensors(AWEIGHTS, lambda t: t.update(
        {"interventions.0.learned_source.bias": torch.zeros(2, dtype=torch.int64)})), ConfigError,
     "'learned_source.bias' is torch.int64, expected torch.float32"),
    ("weights-key-is-a-path", edit_tensors(AWEIGHTS, lambda t: t.update(
        {"interventions.0.../../escape": torch.zeros(1)})), IncompatibleModelError, "Unexpected key"),
    ("weights-key-names-module", edit_tensors(AWEIGHTS, lambda t: t.update({"modules.__import__": torch.zeros(1)})),
     ConfigError, "holds weights its config does not describe"),
]


@pytest.mark.parametrize("change,error,match", [pytest.param(*c[1:], id=c[0]) for c in ADAPTER_CASES])
def test_adapter_folder(llama, good_adapter, tmp_path, monkeypatch, change, error, match):
    folder = copy_of(good_adapter, tmp_path)
    change(folder)
    with untouched(tmp_path, monkeypatch):
        result = expect(lambda: ReftModel.from_pretrained(llama, folder), error, match, names=str(folder))
    if error is None:
        assert result.adapter_names == ["default"]
        result.unload()
    assert hook_count(llama) == 0


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "..", "a.b", "nul\0byte", ""])
def test_adapter_names_cannot_be_paths(llama, good_adapter, tmp_path, monkeypatch, name):
    with untouched(tmp_path, monkeypatch):
        with pytest.raises(ConfigError, match="adapter names cannot"):
            ReftModel.from_pretrained(llama, good_adapter, adapter_name=name)
    assert hook_count(llama) == 0


# ---------------------------------------------------------------------------------------- pyreft folders

PCONFIG = "config.json"
BIN0 = "intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin"
rep0 = lambda index, value: edit_json(PCONFIG, set_in(("representations", 0, index), value))  # noqa: E731


class _RunsCode:
    """Pickles as a call to os.system (a classic malicious checkpoint)."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def edit_state(change):
    def apply(folder: Path):
        state = torch.load(folder / BIN0, weights_only=True)
        result = change(state)
        (folder / BIN0).write_bytes(torch_bytes(state if result is None else result))
    return apply


def zip_claiming_4gb(data: bytes) -> bytes:
    """The torch archive with its first record's declared (uncompressed) size set to 4 GB - 1."""
    out = bytearray(data)
    central = out.find(b"PK\x01\x02")
    out[central + 24: central + 28] = struct.pack("<I", 0xFFFFFFFF)
    return bytes(out)


PYREFT_CASES = [
    ("config-empty", write(PCONFIG, b""), ConfigError, "is not valid JSON"),
    ("config-random-bytes", write(PCONFIG, noise(2048, "pc")), ConfigError, "is not UTF-8"),
    ("config-truncated", transform(PCONFIG, lambda b: b[: len(b) // 2]), ConfigError, "is not valid JSON"),
    ("config-non-utf8-byte", transform(PCONFIG, non_utf8), ConfigError, "is not UTF-8"),
    ("config-with-utf8-bom", transform(PCONFIG, lambda b: b"\xef\xbb\xbf" + b), None, ""),
    ("config-nested-100000-deep", write(PCONFIG, deep_json()), ConfigError, "is not valid JSON"),
    ("config-is-a-list", write(PCONFIG, "[]"), ConfigError, r"expected a JSON object \(pyvene's"),
    ("representations-is-a-string", edit_json(PCONFIG, set_in(("representations",), "x")), ConfigError,
     "expected parallel lists"),
    ("types-is-a-string", edit_json(PCONFIG, set_in(("intervention_types",), "os.system")), ConfigError,
     "expected parallel lists"),
    ("type-names-os-system", edit_json(PCONFIG, set_in(("intervention_types", 0), "os.system")), ConfigError,
     "'os.system' is not supported; reftkit reads"),
    ("type-names-popen", edit_json(PCONFIG, set_in(("intervention_types", 0), "<class 'subprocess.Popen'>")),
     ConfigError, "is not supported"),
    ("layer-is-a-path", rep0(0, "../../escape"), ConfigError, "layer '../../escape'; expected a non-negative int"),
    ("layer-negative", rep0(0, -1), ConfigError, "expected a non-negative integer"),
    ("layer-float", rep0(0, 1.5), ConfigError, "expected a non-negative integer"),
    ("layer-bool", rep0(0, True), ConfigError, "expected a non-negative integer"),
    ("component-is-a-path", rep0(1, "../../escape"), ConfigError, "expected a component name"),
    ("component-absolute-path", rep0(1, "/etc/passwd"), ConfigError, "expected a component name"),
    ("component-backslash", rep0(1, "a\\b"), ConfigError, "expected a component name"),
    ("component-is-a-number", rep0(1, 7), ConfigError, "expected a component name"),
    ("units-string", rep0(3, "1"), ConfigError, "max_number_of_units '1'; expected a non-negative integer"),
    ("rank-string", rep0(4, "4"), ConfigError, "low_rank_dimension '4'; expected an integer or null"),
    ("unit-number", rep0(2, 5), ConfigError, "unit 5 .* is not supported"),
    ("too-many-fields", rep0(slice(None), [0] * 20), ConfigError, "has 20 fields"),
    ("bin-missing", write(BIN0, None), ConfigError, "are missing"),
    ("bin-empty", write(BIN0, b""), ConfigError, "is not a torch.save archive"),
    ("bin-random-bytes", write(BIN0, noise(4096, "bin")), ConfigError, "is not a torch.save archive"),
    ("bin-truncated", transform(BIN0, lambda b: b[: len(b) // 2]), ConfigError, "is not a torch.save archive"),
    ("bin-plain-pickle-runs-code", write(BIN0, b"cos\nsystem\n(S'touch PWNED'\ntR."), ConfigError,
     "is not a torch.save archive"),
    ("bin-torch-archive-runs-code", write(BIN0, torch_bytes({"weight": _RunsCode()})), ConfigError,
     "is not a plain state dict of tensors.*weights_only=True"),
    ("bin-record-claims-4gb", transform(BIN0, zip_claiming_4gb), ConfigError, "declare more bytes than the file"),
    ("bin-holds-a-list", write(BIN0, torch_bytes([torch.zeros(2)])), ConfigError, "does not hold a state dict"),
    ("bin-value-is-a-string", edit_state(lambda s: s.update({"weight": "os.system"})), ConfigError,
     "does not hold a state dict"),
    ("bin-int-weights", edit_state(lambda s: s.update({"weight": s["weight"].to(torch.int32)})), ConfigError,
     "'learned_source.weight' is torch.int32; pyreft's weights are floating point"),
    ("bin-weight-3d", edit_state(lambda s: s.update({"weight": torch.zeros(4, 64, 1)})), ConfigError,
     r"has shape \(4, 64, 1\); expected a matrix"),
    ("bin-embed-dim-vector", edit_state(lambda s: s.update({"embed_dim": torch.tensor([64, 64])})), ConfigError,
     "embed_dim must be a single number"),
    ("bin-unknown-key", edit_state(lambda s: s.update({"__class__": torch.zeros(1)})), ConfigError,
     r"unexpected weights \['__class__'\]"),
]


@pytest.mark.parametrize("change,error,match", [pytest.param(*c[1:], id=c[0]) for c in PYREFT_CASES])
def test_pyreft_folder(tmp_path, monkeypatch, change, error, match):
    folder = copy_of(FIXTURES / "saved_adapter", tmp_path)
    change(folder)
    with untouched(tmp_path, monkeypatch):
        result = expect(lambda: read_pyreft_folder(folder), error, match, names=str(folder))
    if error is None:
        assert [e.layer for e in result] == [1, 3]
    assert not (tmp_path / "cwd" / "PWNED").exists() and not Path("PWNED").exists()


@pytest.mark.parametrize("change,error,match", [
    pytest.param(lambda f: (rep0(0, 99)(f), (f / BIN0).rename(f / BIN0.replace("layer_1", "layer_99"))),
                 ConfigError, "layers \\[99\\] are out of range", id="layer-beyond-the-model"),
    pytest.param(edit_state(lambda s: s.update({"weight": torch.zeros(4, 32), "rotate_layer": torch.zeros(32, 4)})),
                 IncompatibleModelError, r"must have shape \(64, 4\), got \(32, 4\)", id="weights-narrower-than-the-model"),
])
def test_pyreft_folder_onto_a_model(llama, tmp_path, monkeypatch, change, error, match):
    folder = copy_of(FIXTURES / "saved_adapter", tmp_path)
    change(folder)
    with untouched(tmp_path, monkeypatch):
        expect(lambda: ReftModel.from_pretrained(llama, folder, positions="f1+l1"), error, match, names=str(folder))
    assert hook_count(llama) == 0


# ------------------------------------------------------------------------------------------------ recipes

GOOD_RECIPE = {"model": "tiny-llama", "task": "sft", "data": "rows.jsonl", "chat": False, "max_length": 64,
               "reft": {"method": "loreft", "layers": [1], "rank": 2}, "train": {"max_steps": 1, "lr": 0.01}}


def recipe_text(**changes) -> str:
    return yaml.safe_dump({**GOOD_RECIPE, **changes})


def laughs(levels: int = 6) -> str:
    """A YAML alias bomb: ten references per level, so `levels` lines stand for 10**levels values."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


RECIPE_CASES = [
    ("missing", None, ConfigError, "does not exist"),
    ("empty", b"", ConfigError, "must hold a mapping"),
    ("random-bytes", noise(2048, "yaml"), ConfigError, "is not UTF-8"),
    ("non-utf8-byte-in-comment", recipe_text().encode() + b"# caf\xe9\n", ConfigError, "is not UTF-8"),
    ("utf8-bom", b"\xef\xbb\xbf" + recipe_text().encode(), None, ""),
    ("top-level-list", "- model\n- data\n", ConfigError, "must hold a mapping"),
    ("python-object-apply", recipe_text().replace("tiny-llama", "!!python/object/apply:os.system ['touch PWNED']"),
     ConfigError, "is not valid YAML.*python/object/apply"),
    ("python-name", recipe_text().replace("tiny-llama", "!!python/name:os.system"), ConfigError,
     "is not valid YAML.*python/name"),
    ("python-object-new", "!!python/object/new:subprocess.Popen [['touch', 'PWNED']]\n", ConfigError,
     "is not valid YAML"),
    ("unknown-key-class", recipe_text(**{"class": "os.system"}), ConfigError, r"unknown keys \['class'\]"),
    ("reft-method-os-system", recipe_text(reft={"method": "os.system"}), ConfigError, "unknown ReFT method"),
    ("reft-is-a-list", recipe_text(reft=[1, 2]), ConfigError, "'reft' must be a mapping"),
    ("reft-rank-string", recipe_text(reft={"rank": "4"}), ConfigError, "rank must be a positive integer"),
    ("reft-rank-nan", recipe_text().replace("rank: 2", "rank: .nan"), ConfigError, "rank must be a positive"),
    ("reft-dropout-nan", recipe_text(reft={"dropout": float("nan")}), ConfigError, "dropout must be a number"),
    ("train-lr-word", recipe_text(train={"lr": "fast"}), ConfigError, "train option lr must be a number"),
    ("train-lr-nan", recipe_text(train={"lr": float("nan")}), ConfigError, "lr must be a finite number"),
    ("train-epochs-infinite", recipe_text(train={"epochs": float("inf")}), ConfigError, "epochs must be a finite"),
    ("train-batch-size-string", recipe_text(train={"batch_size": "8"}), ConfigError, "batch_size must be an int"),
    ("train-is-a-list", recipe_text(train=[1]), ConfigError, "'train' must be a mapping"),
    ("task-is-a-path", recipe_text(task="../../escape"), ConfigError, "unknown task '../../escape'"),
    ("model-is-a-list", recipe_text(model=["tiny-llama"]), ConfigError, "model must be a model name or path"),
    ("chat-is-a-string", recipe_text(chat="no"), ConfigError, "chat must be true or false"),
    ("max-length-string", recipe_text(max_length="64"), ConfigError, "max_length must be a positive integer"),
    ("max-length-5000-digits", recipe_text().replace("max_length: 64", "max_length: 1" + "0" * 5000), ConfigError,
     "is not valid YAML"),
    ("label-names-string", recipe_text(label_names="a,b"), ConfigError, "label_names must be a list of strings"),
    ("alias-bomb", laughs() + recipe_text(), ConfigError, "expands to more than 100,000 values"),
]


@pytest.mark.parametrize("content,error,match", [pytest.param(*c[1:], id=c[0]) for c in RECIPE_CASES])
def test_recipe(tmp_path, monkeypatch, content, error, match):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "recipe.yaml"
    (tmp_path / "in" / "rows.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with untouched(tmp_path, monkeypatch):
        result = expect(lambda: load_recipe(path), error, match, names=str(path))
    if error is None:
        assert result["model"] == "tiny-llama" and result["reft"]["rank"] == 2
    assert not (tmp_path / "cwd" / "PWNED").exists()


def test_alias_bomb_case_is_a_real_bomb():
    """The alias-bomb recipe above stands for 10**6 values in a few hundred bytes (and is refused for it)."""
    loaded = yaml.safe_load(laughs())
    assert len(laughs()) < 400
    assert len(loaded["l5"]) == 10 and loaded["l5"][0] is loaded["l5"][1]


# -------------------------------------------------------------------------------------------- GGUF files

def gguf(*, version=3, tensors=0, values=0, body=b"", order="<") -> bytes:
    return b"GGUF" + struct.pack(order + "IQQ", version, tensors, values) + body


def gstr(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gkv_string(key: str, value: str) -> bytes:
    return gstr(key) + struct.pack("<I", 8) + gstr(value)


def gtensor(name: str, dims: list[int], kind: int = 0, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", kind, offset)


def nested_arrays(depth: int) -> bytes:
    value = struct.pack("<IQ", 4, 0)  # an empty uint32 array
    for _ in range(depth):
        value = struct.pack("<IQ", 9, 1) + value
    return value


ARCH = gkv_string("general.architecture", "llama")
GGUF_CASES = [
    ("empty", b"", "fewer than a GGUF header's 24"),
    ("random-bytes", noise(4096, "gguf"), "is not a GGUF file: it starts with"),
    ("truncated-header", gguf()[:10], "fewer than a GGUF header's 24"),
    ("version-99", gguf(version=99), "version 99 is not supported"),
    ("version-1", gguf(version=1), "version 1 is not supported"),
    ("2-to-60-tensors", gguf(tensors=2**60), "declares 1152921504606846976 tensors"),
    ("2-to-60-key-values", gguf(values=2**60), "declares 1152921504606846976 key/value pairs"),
    ("2-to-60-tensors-big-endian", gguf(tensors=2**60, order=">"), "declares 1152921504606846976 tensors"),
    ("key-length-2-to-62", gguf(values=1, body=gstr(b"k", 2**62) + bytes(16)), "key 0 declares 4611686018427387904"),
    ("string-value-length-2-to-62", gguf(values=1, body=gstr("general.name") + struct.pack("<I", 8) +
                                         gstr(b"x", 2**62)), "declares 4611686018427387904 bytes"),
    ("array-of-2-to-60-ints", gguf(values=1, body=gstr("a") + struct.pack("<IIQ", 9, 4, 2**60)),
     "declares 1152921504606846976 items"),
    ("array-of-2-to-60-strings", gguf(values=1, body=gstr("tokenizer.ggml.tokens") +
                                      struct.pack("<IIQ", 9, 8, 2**60) + bytes(64)),
     "declares 1152921504606846976 items"),
    ("arrays-nested-9-deep", gguf(values=1, body=gstr("a") + struct.pack("<I", 9) + nested_arrays(9)),
     "nests arrays more than 8 deep"),
    ("unknown-value-type", gguf(values=1, body=gstr("a") + struct.pack("<I", 99) + bytes(8)),
     "unknown value type 99"),
    ("key-not-utf8", gguf(values=1, body=gstr(b"\xff\xfe") + struct.pack("<IB", 0, 1)), "key 0 is not UTF-8"),
    ("value-cut-short", gguf(values=2, body=ARCH + gstr("general.alignment") + struct.pack("<I", 4) + b"\x20"),
     "the file ends inside the value of 'general.alignment'"),
    ("alignment-3", gguf(values=1, body=gstr("general.alignment") + struct.pack("<II", 4, 3)),
     "general.alignment must be a power of two"),
    ("tensor-with-5-dims", gguf(tensors=1, values=1, body=ARCH + gtensor("w", [1] * 5)), "has 5 dimensions"),
    ("tensor-2-to-80-elements", gguf(tensors=1, values=1, body=ARCH + gtensor("w", [2**40, 2**40])),
     "tensor 'w' .* needs bytes"),
    ("tensor-offset-beyond-file", gguf(tensors=1, values=1, body=ARCH + gtensor("w", [4], offset=2**50)),
     "needs bytes 1125899906842624"),
    ("tensor-unknown-ggml-type", gguf(tensors=1, values=1, body=ARCH + gtensor("w", [4], kind=999)),
     "unknown ggml type 999"),
    ("tensor-name-twice", gguf(tensors=2, values=1, body=ARCH + gtensor("w", [1]) + gtensor("w", [1])),
     "tensor 'w' appears twice"),
    ("architecture-names-os-system", gguf(values=1, body=gkv_string("general.architecture", "os.system")),
     "cannot be converted"),
    ("header-only", gguf(), "cannot be converted"),
]


@pytest.mark.parametrize("content,match", [pytest.param(*c[1:], id=c[0]) for c in GGUF_CASES])
def test_gguf_file(tmp_path, monkeypatch, content, match):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "model.gguf"
    path.write_bytes(content)
    with untouched(tmp_path, monkeypatch, allow=("cache",)):
        expect(lambda: load_model(path), ConfigError, match, names=str(path))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no entry, no staging left


def test_the_builtin_gguf_passes_the_header_check():
    from reftkit.gguf_header import check_gguf_header

    spec = models.BUILTINS["smollm2-135m-instruct"]
    path = models._locate_package_file(spec.package, spec.filename)
    if path is None:
        pytest.skip(f"{spec.pip_spec} is not installed")
    check_gguf_header(path)


# --------------------------------------------------------------------------------- the converted-model cache

def manifest(change):
    def apply(entry: Path, victim: Path):
        path = entry / models.MANIFEST_NAME
        data = json.loads(path.read_text())
        result = change(data, victim)
        path.write_text(json.dumps(data if result is None else result))
    return apply


def raw_manifest(content: bytes):
    def apply(entry: Path, victim: Path):
        (entry / models.MANIFEST_NAME).write_bytes(content)
    return apply


def link_file(entry: Path, victim: Path):
    (entry / "config.json").unlink()
    (entry / "config.json").symlink_to(victim / "secret.txt")


def extra_file(entry: Path, victim: Path):
    (entry / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch PWNED'\ntR.")


CACHE_CASES = [
    ("manifest-empty", raw_manifest(b""), "manifest is unreadable"),
    ("manifest-random-bytes", raw_manifest(noise(512, "manifest")), "manifest is unreadable"),
    ("manifest-nested-100000-deep", raw_manifest(deep_json().encode()), "manifest is unreadable"),
    ("manifest-is-a-list", raw_manifest(b"[1]"), "manifest format version is not 1"),
    ("format-version-string", manifest(lambda m, v: m.update(format_version="1")), "format version is not 1"),
    ("source-size-string", manifest(lambda m, v: m.update(source_size=str(m["source_size"]))),
     "source_size does not match"),
    ("files-is-a-list", manifest(lambda m, v: m.update(files=["config.json"])), "lists no files"),
    ("file-outside-with-dot-dot", manifest(lambda m, v: m["files"].update({"../victim/secret.txt": "0"})),
     "outside the entry"),
    ("file-absolute-path", manifest(lambda m, v: m["files"].update({str(v / "secret.txt"): "0"})),
     "outside the entry"),
    ("file-name-with-nul", manifest(lambda m, v: m["files"].update({"a\0b": "0"})), "cannot be checked"),
    ("checksum-is-a-number", manifest(lambda m, v: m["files"].update({"config.json": 5})), "wrong sha256"),
    ("file-is-a-symlink-outside", link_file, "outside the entry"),
    ("unlisted-pickle-file", extra_file, "holds files its manifest does not list"),
]


@pytest.mark.parametrize("change,problem", [pytest.param(*c[1:], id=c[0]) for c in CACHE_CASES])
def test_cache_entry(tmp_path, monkeypatch, caplog, change, problem):
    """A damaged entry is reported, deleted and rebuilt; files it names outside itself are never touched."""
    victim = tmp_path / "cache" / "models" / "victim"
    victim.mkdir(parents=True)
    (victim / "secret.txt").write_text("keep me")
    source = tmp_path / "source.gguf"
    source.write_bytes(b"source")
    monkeypatch.setenv("REFTKIT_CACHE", str(tmp_path / "cache"))
    builds = []

    def build(src: Path, out: Path) -> None:
        builds.append(src)
        (out / "config.json").write_text('{"model_type": "llama"}')

    entry = models._ensure_entry("hostile", source, build)
    assert verify_cache_entry(entry, source) is None
    change(entry, victim)
    assert problem in verify_cache_entry(entry, source)
    with caplog.at_level("WARNING", logger="reftkit.models"):
        assert models._ensure_entry("hostile", source, build) == entry
    assert "is corrupt" in caplog.text and str(entry) in caplog.text and len(builds) == 2
    assert verify_cache_entry(entry, source) is None
    assert (victim / "secret.txt").read_text() == "keep me"
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------------------------------- CLI

def one_error_line(capsys, argv, names: str, match: str) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and out == "", (code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert not re.match(r"error: [A-Za-z_.]*(Error|Exception|Warning): ", line), f"an untyped error: {line}"
    assert names in line and re.search(match, line), line
    return line


@pytest.mark.parametrize("content,match", [
    pytest.param(noise(512, "cli-yaml"), "is not UTF-8", id="random-bytes"),
    pytest.param(recipe_text().replace("tiny-llama", "!!python/object/apply:os.system ['touch PWNED']"),
                 "is not valid YAML", id="python-object-apply"),
    pytest.param(recipe_text(reft={"method": "os.system"}), "unknown ReFT method", id="method-os-system"),
    pytest.param(recipe_text(train={"lr": float("nan")}), "finite number", id="lr-nan"),
])
def test_cli_train_with_a_bad_recipe(tmp_path, monkeypatch, capsys, content, match):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "bad.yaml"
    (tmp_path / "in" / "rows.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with untouched(tmp_path, monkeypatch):
        one_error_line(capsys, ["train", path], str(path), match)
    assert not (tmp_path / "cwd" / "PWNED").exists()


@pytest.mark.parametrize("change,match", [
    pytest.param(write(ACONFIG, noise(512, "cli-adapter")), "not (a )?valid (adapter config|JSON)",
                 id="config-random-bytes"),
    pytest.param(write(AWEIGHTS, WEIGHT_FILE_CASES[2][1]), "adapter_model.safetensors.*(header|safetensors)",
                 id="weights-header-claims-8-EB"),
    pytest.param(ac("method", "os.system"), "unknown ReFT method", id="method-os-system"),
    pytest.param(ac("extra", {"embed_dim": 10**12}), "does not match the width", id="embed-dim-10e12"),
])
def test_cli_generate_with_a_bad_adapter(good_adapter, tmp_path, monkeypatch, capsys, change, match):
    folder = copy_of(good_adapter, tmp_path)
    change(folder)
    with untouched(tmp_path, monkeypatch):
        one_error_line(capsys, ["generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "1",
                                "--adapter", folder], str(folder), match)


@pytest.mark.parametrize("content,match", [
    pytest.param(gguf(tensors=2**60), "declares 1152921504606846976 tensors", id="2-to-60-tensors"),
    pytest.param(noise(1024, "cli-gguf"), "is not a GGUF file", id="random-bytes"),
])
def test_cli_generate_with_a_bad_gguf(tmp_path, monkeypatch, capsys, content, match):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "bad.gguf"
    path.write_bytes(content)
    with untouched(tmp_path, monkeypatch, allow=("cache",)):
        one_error_line(capsys, ["generate", "--model", path, "--prompt", "hi"], str(path), match)


# ------------------------------------------------------------------------------ no code from a file ever runs

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
YAML_LOADERS = {"yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
                "yaml.full_load_all"}


def dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def lazy_exports(tree: ast.Module) -> set[ast.AST]:
    """The `import_module` calls of a lazy package API: inside `__getattr__`, in a module whose `_EXPORTS` is a
    literal table of strings (public name -> module), so what is imported never comes from a file."""
    table = [n for n in tree.body if isinstance(n, ast.Assign) and [dotted(t) for t in n.targets] == ["_EXPORTS"]
             and isinstance(n.value, ast.Dict) and all(isinstance(v, ast.Constant) and isinstance(v.value, str)
                                                       for v in n.value.keys + n.value.values)]
    getattrs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
    if not table or not getattrs:
        return set()
    return {c for c in ast.walk(getattrs[0]) if isinstance(c, ast.Call) and dotted(c.func).endswith("import_module")}


def risky(tree: ast.Module) -> list[str]:
    """Places where a file's content could become code: pickle-like modules, eval/exec/compile/__import__,
    import_module (but a lazy API's fixed table), object-building YAML loaders, torch.load without
    weights_only=True, allow_pickle / trust_remote_code set to True."""
    found, allowed = [], lazy_exports(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: imports {n}" for n in names if n.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name, keywords = dotted(node.func), {k.arg: k.value for k in node.keywords}
        true = lambda key: isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True  # noqa: E731
        if name in ("eval", "exec", "compile", "__import__") or name.endswith("import_module") and node not in allowed:
            found.append(f"line {node.lineno}: {name}()")
        if name in YAML_LOADERS or "Loader" in keywords:
            found.append(f"line {node.lineno}: {name}() builds objects")
        if name == "torch.load" and not true("weights_only"):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if true("allow_pickle") or true("trust_remote_code"):
            found.append(f"line {node.lineno}: {name}() with allow_pickle or trust_remote_code")
    return found


def test_no_loader_can_run_code_from_a_file():
    sources = sorted(SRC.rglob("*.py"))
    assert len(sources) > 20
    found = [f"{path.relative_to(SRC)} {where}" for path in sources for where in risky(ast.parse(path.read_text()))]
    assert found == []
    # the scan itself finds what it looks for
    bad = "import pickle\ntorch.load(f)\ntorch.load(f, weights_only=False)\nyaml.load(t, Loader=yaml.Loader)\n" \
          "eval(s)\nimportlib.import_module(s)\nnp.load(f, allow_pickle=True)\n"
    assert len(risky(ast.parse(bad))) == 7
    assert risky(ast.parse("model.eval()\nre.compile(p)\ntorch.load(f, weights_only=True)\nyaml.safe_load(t)\n")) == []
    lazy = "_EXPORTS = {'a': 'm'}\ndef __getattr__(n):\n    return import_module(_EXPORTS[n])\n"
    assert risky(ast.parse(lazy)) == [] and len(risky(ast.parse(lazy.replace("_EXPORTS = {'a': 'm'}", "")))) == 1
