"""Checking a GGUF file's header before anything else reads it.

A GGUF file starts with counts and lengths that its readers trust: the tensor count, the key/value count, every
string length and array length. A 40-byte file that claims 2**60 array items keeps a reader looping for ever, and
one that claims a giant string makes it slice or allocate far past the end. `check_gguf_header` walks the header
with every count and length checked against the bytes that are really left, so the walk is bounded by the file
size and allocates nothing (the file is memory-mapped and read with `struct.unpack_from`).

Design decisions
- Structure only: magic, version (2 or 3, as the `gguf` reader supports), byte order (detected as `gguf` does),
  key/value types, UTF-8 keys and tensor names, at most `MAX_DIMS` dimensions, no duplicate tensor names, and,
  when the `gguf` package is installed, every tensor's data inside the file. What the keys mean (architecture,
  tokenizer) is left to the converter.
- Errors are `ConfigError`s that name the file, the byte offset and what was expected there.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from .errors import ConfigError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8
DEFAULT_ALIGNMENT = 32
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Walker:
    def __init__(self, path: Path, data, order: str):
        self.path, self.data, self.order, self.pos = path, data, order, 0

    def fail(self, what: str) -> ConfigError:
        return ConfigError(f"{self.path} is not a valid GGUF file: {what} (at byte {self.pos} of {len(self.data)}); "
                           "expected a GGUF v2/v3 file as llama.cpp writes it")

    def left(self) -> int:
        return len(self.data) - self.pos

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        if size > self.left():
            raise self.fail(f"the file ends inside {what}")
        value = struct.unpack_from(self.order + fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def skip_string(self, what: str) -> int:
        length = self.unpack("Q", f"the length of {what}")
        if length > self.left():
            raise self.fail(f"{what} declares {length} bytes but only {self.left()} are left")
        start = self.pos
        self.pos += length
        return start

    def text(self, what: str) -> str:
        start = self.skip_string(what)
        try:
            return bytes(self.data[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def count(self, what: str, each: int) -> int:
        """A declared count whose items take at least `each` bytes apiece: refused when the rest of the file
        cannot hold that many."""
        n = self.unpack("Q", f"the count of {what}")
        if n > self.left() // each:
            raise self.fail(f"the header declares {n} {what}, more than the {self.left()} bytes left can hold")
        return n

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in _FIXED:
            return self.unpack(_FIXED[kind], what)
        if kind == _STRING:
            self.skip_string(what)
            return None
        if kind != _ARRAY:
            raise self.fail(f"{what} has unknown value type {kind}")
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        item = self.unpack("I", f"the item type of {what}")
        if item in _FIXED:
            size = struct.calcsize(_FIXED[item])
            n = self.count(f"items of {what}", size)
            self.pos += n * size
        elif item in (_STRING, _ARRAY):
            for _ in range(self.count(f"items of {what}", 8 if item == _STRING else 12)):
                self.value(item, f"an item of {what}", depth + 1)
        else:
            raise self.fail(f"{what} has unknown item type {item}")
        return None


def check_gguf_header(path: "str | Path") -> None:
    """Raise `ConfigError` unless `path` is a structurally sound GGUF file (see the module docstring)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 24:
            raise ConfigError(f"{path} is not a valid GGUF file: it has {size} bytes, fewer than a GGUF header's 24")
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check(path, data)
    except OSError as e:
        raise ConfigError(f"cannot read the GGUF file {path}: {e}") from e


def _check(path: Path, data) -> None:
    if bytes(data[:4]) != MAGIC:
        raise ConfigError(f"{path} is not a GGUF file: it starts with {bytes(data[:4])!r}, not {MAGIC!r}")
    order = ">" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF == 0 else "<"
    walker = _Walker(path, data, order)
    walker.pos = 4
    version = walker.unpack("I", "the version")
    if version not in VERSIONS:
        raise walker.fail(f"version {version} is not supported (readable: {', '.join(map(str, VERSIONS))})")
    # smallest entries: a tensor info is an empty name, no dimension, a type and an offset; a key/value is an
    # empty key, a type and a one-byte value
    n_tensors = walker.count("tensors", 8 + 4 + 4 + 8)
    n_values = walker.count("key/value pairs", 8 + 4 + 1)
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_values):
        key = walker.text(f"key {i}")
        kind = walker.unpack("I", f"the value type of {key!r}")
        value = walker.value(kind, f"the value of {key!r}")
        if key == "general.alignment":
            if kind != 4 or not value or value & (value - 1):
                raise walker.fail(f"general.alignment must be a power of two (uint32), got {value!r}")
            alignment = value
    tensors, names = [], set()
    for i in range(n_tensors):
        name = walker.text(f"the name of tensor {i}")
        if name in names:
            raise walker.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = walker.unpack("I", f"the dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise walker.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have at most {MAX_DIMS}")
        dims = [walker.unpack("Q", f"the dimensions of {name!r}") for _ in range(n_dims)]
        kind = walker.unpack("I", f"the type of {name!r}")
        offset = walker.unpack("Q", f"the data offset of {name!r}")
        tensors.append((name, dims, kind, offset))
    _check_extents(walker, tensors, alignment)


def _check_extents(walker: _Walker, tensors: list, alignment: int) -> None:
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:  # the converter needs gguf and says so; the header itself is sound
        return
    start = -(-walker.pos // alignment) * alignment
    room = len(walker.data) - start
    for name, dims, kind, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise walker.fail(f"tensor {name!r} has unknown ggml type {kind}") from None
        elements = 1
        for d in dims:
            elements *= d
        nbytes = -(-elements // block) * type_size
        if offset % alignment or offset + nbytes > room:
            raise walker.fail(f"tensor {name!r} ({' x '.join(map(str, dims)) or 'scalar'}) needs bytes "
                              f"{offset}..{offset + nbytes} of the data section, which holds {max(room, 0)} bytes "
                              f"(alignment {alignment})")
