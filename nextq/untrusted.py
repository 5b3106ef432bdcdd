"""Untrusted input: the one validation layer every reader passes a file through before it trusts a byte of it.

IR directories, GGUF files, checkpoints, reports and recipes come from the Hub or a colleague. Everything here
checks a file's structure against its size and an allow-list before anything is allocated, looked up or
opened, and fails with an `InputError` (or `UnsafePathError`) that names the file and the field:

- names of shards and assets (`resolve_inside`): plain relative paths that stay inside their directory, symlinks
  included; a Hugging Face cache snapshot may point into its repo's blob store, nowhere else.
- JSON documents (`read_json`): bounded size, UTF-8, no duplicate keys, bounded nesting.
- dataclass values (`check_values`): every field's type from its annotation, integers in int64, sizes >= 1.
- safetensors headers (`safetensors_header`): the header length and JSON before use, dtype names from an
  allow-list, every shape consistent with its byte range, the byte ranges tiling the data exactly as the
  safetensors library requires (so a tensor claiming 2^40 elements is refused from the header alone).
- GGUF headers (`gguf_header`): every length, count, type and offset bounded by the file size before it is used,
  strings decoded as UTF-8, known keys of their expected kind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import struct
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import InputError, UnsafePathError
from .storage import StoredTensor

INT64 = 1 << 63
MAX_JSON_BYTES = 1 << 30  # graph.json of an 80B model with every expert quantized: ~25 MB
MAX_JSON_DEPTH = 64
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
MAX_NAME, MAX_PATH = 255, 4096  # bytes in one path component / a whole path (Linux NAME_MAX, PATH_MAX)


def need(ok: bool, where: str, msg: str) -> None:
    """Refuse the input: `where` names the file and the field, `msg` the expected vs actual value."""
    if not ok:
        raise InputError(f"{where}: {msg}")


# ---- paths --------------------------------------------------------------------------------------------------


def containment_root(directory: Path) -> Path:
    """The folder names from `directory` must resolve into: the directory itself, or for a Hugging Face cache
    snapshot (`models--o--n/snapshots/<rev>/`, files symlinked to `../../blobs/`) its repo folder."""
    real = Path(os.path.realpath(directory))
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def resolve_inside(directory: str | Path, name: object, what: str) -> Path:
    """`directory / name` for a `name` read from a file: a plain relative path (no absolute path, no `..`, no NUL or
    backslash) that still lies inside `directory` once symlinks are resolved. Else `UnsafePathError`."""
    directory = Path(directory)
    if not isinstance(name, str) or not name:
        raise InputError(f"{directory}: {what}: expected a file name, got {name!r}")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or "\0" in name or "\\" in name:
        raise UnsafePathError(f"{directory}: {what} {name!r:.200} is not a plain relative path inside the directory")
    try:
        too_long = len(name.encode()) > MAX_PATH or max((len(p.encode()) for p in parts), default=0) > MAX_NAME
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no file can have this name
        raise InputError(f"{directory}: {what} {name!r:.200} is not a valid file name") from None
    if too_long:
        raise InputError(f"{directory}: {what} {name[:60]!r}...: longer than a file name can be")
    root = containment_root(directory)
    real = Path(os.path.realpath(directory / name))
    if real != root and root not in real.parents:
        raise UnsafePathError(f"{directory}: {what} {name!r} resolves to {real}, outside {root}")
    return directory / name


def regular_file_inside(directory: str | Path, path: Path, what: str) -> Path:
    """`path` (under `directory`) if it is a regular file that resolves inside `directory`; else UnsafePathError."""
    directory = Path(directory)
    try:
        rel = path.relative_to(directory).as_posix()
    except ValueError:
        raise UnsafePathError(f"{directory}: {what} {path} is not inside the directory") from None
    p = resolve_inside(directory, rel, what)
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        raise InputError(f"{p}: {what}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise UnsafePathError(f"{p}: {what} is not a regular file")
    return p


# ---- JSON ---------------------------------------------------------------------------------------------------


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return d


def _depth(doc: Any) -> int:
    """Nesting depth of a parsed JSON document (iterative: deep documents do not recurse)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        x, d = stack.pop()
        deepest = max(deepest, d)
        if d <= MAX_JSON_DEPTH:
            stack.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()))
    return deepest


def parse_json(raw: bytes, where: str) -> Any:
    """A JSON document from `raw` bytes: UTF-8, no duplicate keys, nesting at most MAX_JSON_DEPTH."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise InputError(f"{where}: not valid JSON ({e})") from None
    need(_depth(doc) <= MAX_JSON_DEPTH, where, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return doc


def read_text(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> str:
    """A UTF-8 text file of at most `max_bytes`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        need(size <= max_bytes, str(path), f"{size} bytes, at most {max_bytes} expected")
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_json(path: str | Path, expect: type | None = dict, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file (bounded size) parsed as `parse_json` does; `expect` is the type of its top-level value."""
    doc = parse_json(read_text(path, max_bytes).encode(), str(path))
    if expect is not None:
        need(isinstance(doc, expect), str(path), f"expected a JSON {_kind(expect)}, got {_kind(type(doc))}")
    return doc


def _kind(t: type) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(t, t.__name__)


def need_fields(d: Mapping[str, Any], where: str, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    """`d` has every required key and no key outside required + optional."""
    missing = [k for k in required if k not in d]
    unknown = sorted(set(d) - set(required) - set(optional))
    need(not missing, where, f"missing field(s) {missing}")
    need(not unknown, where, f"unknown field(s) {unknown}; expected: {', '.join([*required, *optional])}")


def need_int(v: Any, where: str, lo: int = 0, hi: int = INT64 - 1) -> int:
    """An integer (not a bool) in [lo, hi]."""
    need(isinstance(v, int) and not isinstance(v, bool), where, f"expected an integer, got {v!r:.60}")
    need(lo <= v <= hi, where, f"expected an integer in [{lo}, {hi}], got {v}")
    return v


def need_shape(v: Any, where: str, max_dims: int = 8) -> tuple[int, ...]:
    """A list of non-negative integers (a tensor shape)."""
    need(isinstance(v, list) and len(v) <= max_dims, where, f"expected a shape (list of at most {max_dims} "
                                                            f"integers), got {v!r:.60}")
    return tuple(need_int(x, f"{where}[{i}]") for i, x in enumerate(v))


# ---- dataclass values ---------------------------------------------------------------------------------------


def _matches(v: Any, hint: Any) -> bool | None:
    """Whether `v` has type `hint` (None: a hint this checker does not understand, so not checked)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(v, h) for h in typing.get_args(hint)]
        return True if any(results) else (None if None in results else False)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(v, tuple) or len(args) != 2 or args[1] is not Ellipsis:
            return isinstance(v, tuple) and None
        inner = [_matches(x, args[0]) for x in v]
        return False if False in inner else (None if None in inner else True)
    if hint is type(None):
        return v is None
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool) and -INT64 <= v < INT64
    if hint is float:
        return isinstance(v, float) or isinstance(v, int) and not isinstance(v, bool) and -INT64 <= v < INT64
    if isinstance(hint, type) and origin is None:
        return isinstance(v, hint)
    return None


def check_values(obj: Any, where: str, positive: Sequence[str] = (), signed: Sequence[str] = ()) -> None:
    """Every field of dataclass instance `obj` has its annotated type (ints in int64); integers (also inside tuples)
    are >= 1 in the fields named in `positive`, any value in those named in `signed`, >= 0 everywhere else."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_field(f.name, getattr(obj, f.name), hints[f.name], where, positive, signed)


def check_json_fields(cls: type, d: Mapping[str, Any], where: str, positive: Sequence[str] = (),
                      signed: Sequence[str] = (), skip: Sequence[str] = ()) -> None:
    """`check_values` for a JSON object whose keys are (some of) dataclass `cls`'s field names (a Hugging Face
    config.json and ModelConfig): the non-null values of known keys, arrays standing for tuples; `skip` unchecked."""
    hints = _hints(cls)
    for k, v in d.items():
        if k in hints and k not in skip and v is not None:
            _check_field(k, tuple(v) if isinstance(v, list) else v, hints[k], where, positive, signed)


def _check_field(name: str, v: Any, hint: Any, where: str, positive: Sequence[str], signed: Sequence[str]) -> None:
    if _matches(v, hint) is False:
        raise InputError(f"{where}: field {name}: expected {_hint_name(hint)}, got {v!r:.60}")
    if name in signed:
        return
    ints = [x for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, int) and not isinstance(x, bool)]
    lo = 1 if name in positive else 0
    bad = [x for x in ints if x < lo]
    need(not bad, where, f"field {name}: expected integers >= {lo}, got {bad[0] if bad else ''}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce_json_fields(cls: type, d: Any, where: str) -> dict[str, Any]:
    """Keyword arguments for dataclass `cls` from a JSON object: required fields present, no unknown ones, JSON
    arrays turned into tuples where the annotation says tuple (types themselves are checked by `check_values`)."""
    need(isinstance(d, dict), where, f"expected a JSON object, got {_kind(type(d))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    need_fields(d, where, required, [n for n in fields if n not in required])
    hints = _hints(cls)
    out = dict(d)
    for k, v in d.items():
        union = typing.get_origin(hints[k]) in (typing.Union, types.UnionType)
        wants_tuple = any(h is tuple or typing.get_origin(h) is tuple
                          for h in (typing.get_args(hints[k]) if union else (hints[k],)))
        if isinstance(v, list) and wants_tuple:
            out[k] = tuple(v)
    return out


# ---- safetensors --------------------------------------------------------------------------------------------


def safetensors_header(path: str | Path, itemsizes: Mapping[str, int]) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, checked against its size before anything else reads it.

    `itemsizes`: the allowed dtype names and their bytes per element. Checks the header length (8 + header <= file,
    header <= 100 MB), the header's JSON (an object of {dtype, shape, data_offsets} objects plus an optional
    `__metadata__` of strings), each shape's byte count against its range, and that the ranges tile the data from
    0 to the end of the file without gap or overlap (the safetensors library's own rule).
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            need(len(raw) == 8, path, f"not a safetensors file (only {size} bytes)")
            (hlen,) = struct.unpack("<Q", raw)
            need(hlen <= min(size - 8, MAX_SAFETENSORS_HEADER), path,
                 f"header length {hlen} exceeds the file size {size} or the 100 MB limit (truncated or corrupt)")
            header = parse_json(f.read(hlen), f"{path}: header")
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    need(isinstance(header, dict), path, f"header: expected a JSON object, got {_kind(type(header))}")
    base, data = 8 + hlen, size - 8 - hlen
    out: dict[str, StoredTensor] = {}
    for key, info in header.items():
        where = f"{path}: tensor {key!r}"
        if key == "__metadata__":
            need(isinstance(info, dict) and all(isinstance(v, str) for v in info.values()), where,
                 "expected an object of strings")
            continue
        need(isinstance(info, dict), where, f"expected a JSON object, got {_kind(type(info))}")
        need_fields(info, where, ("dtype", "shape", "data_offsets"))
        need(info["dtype"] in itemsizes, where, f"dtype {info['dtype']!r:.40}, supported: {sorted(itemsizes)}")
        shape = need_shape(info["shape"], f"{where} shape")
        offs = info["data_offsets"]
        need(isinstance(offs, list) and len(offs) == 2, where, f"data_offsets: expected [begin, end], got {offs!r:.60}")
        begin, end = (need_int(x, f"{where} data_offsets") for x in offs)
        need(begin <= end <= data, where, f"truncated or corrupt: data_offsets [{begin}, {end}] end past byte "
                                          f"{data} of the data ({size} bytes in the file)")
        nbytes = math.prod(shape) * itemsizes[info["dtype"]]
        need(end - begin == nbytes, where, f"shape {list(shape)} of {info['dtype']} is {nbytes} bytes, its "
                                           f"data_offsets [{begin}, {end}] hold {end - begin}")
        out[key] = StoredTensor(path, key, info["dtype"], shape, base + begin, base + end)
    at = base
    for key, e in sorted(out.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        need(e.begin == at, f"{path}: tensor {key!r}", f"data starts at byte {e.begin}, expected {at} (tensor "
                                                       f"ranges must tile the data without gaps or overlaps)")
        at = e.end
    need(at == size, path, f"tensor data ends at byte {at}, the file has {size} bytes (truncated or padded)")
    return out


# ---- GGUF ---------------------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_MAX_DIMS = 4
GGUF_DEFAULT_ALIGNMENT = 32
# value type id -> (name, struct format); 8 = string, 9 = array
GGUF_SCALARS: dict[int, tuple[str, str]] = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"), 4: ("UINT32", "<I"),
    5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_INTS = {0, 1, 2, 3, 4, 5, 10, 11}
GGUF_FLOATS = {6, 12}
# what a reader may expect of a key: the type ids its value may have (arrays: the element type ids)
GGUF_KINDS: dict[str, tuple[bool, set[int]]] = {  # kind -> (is an array, allowed (element) type ids)
    "int": (False, GGUF_INTS), "float": (False, GGUF_INTS | GGUF_FLOATS), "bool": (False, {7}),
    "str": (False, {GGUF_STRING}), "ints": (True, GGUF_INTS), "bools": (True, {7}), "strs": (True, {GGUF_STRING}),
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a checked GGUF header: ggml dims (innermost first), type id, absolute byte range."""

    name: str
    dims: tuple[int, ...]
    type: int
    begin: int
    end: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, tuple[int, Any]]  # key -> (type id, value); arrays: (9, (element type id, list))
    tensors: dict[str, GGUFTensorInfo]


class _Cursor:
    """Bounded little-endian reads from a file: every read checks the bytes left in the file first."""

    def __init__(self, f: Any, size: int, path: str):
        self.f, self.size, self.pos, self.path = f, size, 0, path

    def take(self, n: int, what: str) -> bytes:
        need(n <= self.size - self.pos, self.path,
             f"{what}: needs {n} bytes at offset {self.pos}, the file has {self.size}")
        out = self.f.read(n)
        need(len(out) == n, self.path, f"{what}: file shrank while being read")
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"{what} length")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{self.path}: {what}: not UTF-8 (byte {e.start})") from None

    def value(self, type_id: int, what: str) -> Any:
        if type_id == GGUF_STRING:
            return self.string(what)
        need(type_id in GGUF_SCALARS, self.path, f"{what}: unknown value type {type_id}")
        return self.scalar(GGUF_SCALARS[type_id][1], what)

    def count(self, what: str, min_bytes: int) -> int:
        """A u64 count of items of at least `min_bytes` each, bounded by the bytes left."""
        n = self.scalar("<Q", what)
        left = self.size - self.pos
        need(n * min_bytes <= left, self.path, f"{what} = {n} needs at least {n * min_bytes} bytes, {left} left")
        return n


def _need_kind(path: str, key: str, t: int, value: Any, kind: str) -> None:
    """The value of `key` (type id `t`) has `kind`, a GGUF_KINDS name."""
    is_array, allowed = GGUF_KINDS[kind]
    got = value[0] if t == GGUF_ARRAY else t
    need((t == GGUF_ARRAY) == is_array and got in allowed, path,
         f"{key}: expected {kind}, got type {t}{f' of {got}' if t == GGUF_ARRAY else ''}")


def gguf_need_kinds(h: GGUFHeader, kinds: Mapping[str, str], path: str) -> None:
    """The keys of `kinds` present in a parsed header have their kinds (for keys only known after parsing, such as
    `{general.architecture}.context_length`)."""
    for key, kind in kinds.items():
        if key in h.fields:
            _need_kind(path, key, *h.fields[key], kind)


def gguf_header(path: str | Path, type_sizes: Mapping[int, tuple[int, int]],
                kinds: Mapping[str, str] = {}) -> GGUFHeader:  # noqa: B006 (read-only default)
    """Parse and check a GGUF file's header, every length and count bounded by the file size before use.

    type_sizes: the ggml tensor types accepted, id -> (block size in elements, bytes per block).
    kinds: key -> expected kind (a GGUF_KINDS name) for the keys the caller reads; other keys are only parsed.
    Checks: magic, version, little-endian, UTF-8 keys and strings, no duplicate key or tensor, arrays of scalars or
    strings, 1 to 4 dims per tensor, each >= 1, the innermost dim a multiple of the type's block, general.alignment a u32
    power of two, every tensor's offset aligned and its bytes inside the file.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _parse_gguf(_Cursor(f, size, path), type_sizes, kinds, size)
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None


def _parse_gguf(c: _Cursor, type_sizes: Mapping[int, tuple[int, int]], kinds: Mapping[str, str],
                size: int) -> GGUFHeader:
    path = c.path
    need(bytes(c.take(4, "magic")) == GGUF_MAGIC, path, "not a GGUF file (magic)")
    version = c.scalar("<I", "version")
    need(version in GGUF_VERSIONS, path, f"version {version}, supported: {list(GGUF_VERSIONS)} (little-endian)")
    n_tensors = c.scalar("<Q", "tensor_count")
    n_kv = c.count("kv_count", 8 + 4 + 1)
    need(n_tensors * (8 + 4 + 4 + 8) <= size, path, f"tensor_count = {n_tensors} does not fit in {size} bytes")
    fields: dict[str, tuple[int, Any]] = {}
    for i in range(n_kv):
        key = c.string(f"key {i}")
        need(key not in fields, path, f"key {key!r} appears twice")
        t = c.scalar("<I", f"{key}: type")
        if t == GGUF_ARRAY:
            et = c.scalar("<I", f"{key}: element type")
            need(et in GGUF_SCALARS or et == GGUF_STRING, path, f"{key}: array element type {et}, expected a "
                                                                 f"scalar or string type")
            n = c.count(f"{key}: array length", 8 if et == GGUF_STRING else struct.calcsize(GGUF_SCALARS[et][1]))
            value: Any = (et, [c.value(et, f"{key}[{j}]") for j in range(n)])
        else:
            value = c.value(t, key)
        fields[key] = (t, value)
        if key in kinds:
            _need_kind(path, key, t, value, kinds[key])
    align_t, alignment = fields.get("general.alignment", (4, GGUF_DEFAULT_ALIGNMENT))
    need(align_t == 4 and alignment > 0 and alignment & (alignment - 1) == 0, path,
         f"general.alignment: expected a u32 power of two, got {alignment!r} (type {align_t})")
    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor {i} name")
        where = f"tensor {name!r}"
        n_dims = c.scalar("<I", f"{where} n_dims")
        need(1 <= n_dims <= GGUF_MAX_DIMS, path, f"{where}: n_dims {n_dims}, expected 1..{GGUF_MAX_DIMS}")
        dims = tuple(c.scalar("<Q", f"{where} dims") for _ in range(n_dims))
        # a zero dim would make the byte count 0 whatever the others claim (2^63 beside a 0 passed the size check)
        need(all(d >= 1 for d in dims), path, f"{where}: dims {list(dims)}, expected every dim >= 1")
        t = c.scalar("<I", f"{where} type")
        need(t in type_sizes, path, f"{where}: ggml type {t} is not supported; supported ids: {sorted(type_sizes)}")
        offset = c.scalar("<Q", f"{where} offset")
        block, block_bytes = type_sizes[t]
        need(dims[0] % block == 0, path, f"{where}: innermost dim {dims[0]} is not a multiple of the type's "
                                         f"block of {block}")
        need(offset % alignment == 0, path, f"{where}: offset {offset} is not a multiple of {alignment}")
        infos.append((name, dims, t, offset, math.prod(dims) // block * block_bytes))
    data = c.pos + -c.pos % alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, t, offset, nbytes in infos:
        need(name not in tensors, path, f"tensor {name!r} appears twice")
        need(data + offset + nbytes <= size, path, f"tensor {name!r}: dims {list(dims)} need {nbytes} bytes at "
                                                   f"{data + offset}, the file has {size} (truncated or corrupt)")
        tensors[name] = GGUFTensorInfo(name, dims, t, data + offset, data + offset + nbytes)
    return GGUFHeader(version, fields, tensors)


# ---- ONNX ---------------------------------------------------------------------------------------------------

MAX_ONNX_PROTO = (1 << 31) - 1  # protobuf's limit for one message; weights beyond it are external data


def _onnx_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX ModelProto: graph initializers (dense and sparse), tensors in node attributes
    (Constant values), through subgraphs (If / Loop / Scan bodies) and local functions. Iterative, so a deeply nested
    model does not recurse."""
    graphs, nodes = [model.graph], [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for sp in g.sparse_initializer:
                yield from (sp.values, sp.indices)
            nodes.extend(g.node)
            continue
        for a in nodes.pop().attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sp in [a.sparse_tensor] * a.HasField("sparse_tensor") + list(a.sparse_tensors):
                yield from (sp.values, sp.indices)
            graphs.extend([a.g] * a.HasField("g") + list(a.graphs))


def onnx_external_data(model_path: str | Path) -> dict[str, Path]:
    """The external-data files an ONNX model's tensors name (ONNX Runtime opens every `location` it finds, relative
    to the model's folder), checked before a session is created: each location a plain relative name resolving to
    a regular file inside the folder, each `offset` / `length` an integer whose byte range lies inside that file.
    Returns location -> path."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(model_path)
    size = path.stat().st_size
    need(size <= MAX_ONNX_PROTO, str(path), f"{size} bytes: an ONNX protobuf is at most {MAX_ONNX_PROTO}")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RecursionError, ValueError) as e:
        raise InputError(f"{path}: not a valid ONNX model ({str(e)[:200]})") from None
    files: dict[str, Path] = {}
    for t in _onnx_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = f"{path}: tensor {t.name[:200]!r} external_data"
        # protobuf hands a string field that is not UTF-8 back as bytes
        need(all(isinstance(x, str) for e in t.external_data for x in (e.key, e.value)), where,
             "an entry is not UTF-8 text")
        info = {e.key: e.value for e in t.external_data}
        need("location" in info, where, "no location")
        loc = info["location"]
        if loc not in files:
            files[loc] = regular_file_inside(path.parent, path.parent / loc, "external data")
        ints = {}
        for k in ("offset", "length"):
            v = info.get(k, "0")
            need(v.isdecimal() and len(v) <= 19, where, f"{k}: expected a decimal integer, got {v[:40]!r}")
            ints[k] = int(v)
        end, file_size = ints["offset"] + ints["length"], files[loc].stat().st_size
        need(end <= file_size, where, f"bytes [{ints['offset']}, {end}) of {loc!r}, which has {file_size}")
    return files


def onnx_dir(directory: str | Path, models: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Path]:
    """An ONNX export folder before ONNX Runtime opens it: each of `models` (required) and `optional` (when present)
    a regular file inside the folder, symlinks resolved, with its external data checked (`onnx_external_data`).
    Returns name -> path of the models found."""
    directory = Path(directory)
    found = {}
    for name in [*models, *optional]:
        if name in optional and not os.path.lexists(directory / name):
            continue
        found[name] = regular_file_inside(directory, directory / name, "model file")
        onnx_external_data(found[name])
    return found
