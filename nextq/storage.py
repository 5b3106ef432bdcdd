"""Streaming safetensors I/O with bounded memory.

Reading uses plain positioned reads, not mmap: a converter that touches every byte of a 160 GB checkpoint
through mmap would see its resident set grow with the page cache it maps. Writing buffers up to a shard budget
and writes the standard safetensors layout (8-byte little-endian header length, JSON header, raw data).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

# safetensors dtype names <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZES = {k: v.itemsize for k, v in DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes live in a safetensors file."""

    path: str
    key: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    def read(self) -> torch.Tensor:
        """Read the tensor with one positioned read (no mmap)."""
        n = self.end - self.begin
        buf = torch.empty(n, dtype=torch.uint8)  # not zero-filled first (bytearray is): reads twice as fast
        with open(self.path, "rb") as f:
            f.seek(self.begin)
            if n and f.readinto(memoryview(buf.numpy())) != n:
                raise CheckpointError(f"{self.path}: tensor {self.key!r} is truncated (expected {n} bytes)")
        return buf.view(DTYPES[self.dtype]).reshape(self.shape)

    def rows(self, start: int, stop: int) -> StoredTensor:
        """Rows [start, stop) along the first dimension, as a byte range (reading it reads only those rows)."""
        per = (self.end - self.begin) // self.shape[0]
        return StoredTensor(self.path, f"{self.key}[{start}:{stop}]", self.dtype, (stop - start, *self.shape[1:]),
                            self.begin + start * per, self.begin + stop * per)


def read_header(path: str | Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, its header checked first (`untrusted.safetensors_header`: sizes, dtype
    names, shapes against byte ranges, ranges inside the file: a truncated shard is refused here)."""
    from .untrusted import safetensors_header

    return safetensors_header(path, ITEMSIZES)


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write `tensors` in the safetensors layout, one tensor's bytes at a time."""
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align data to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            t = t.contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no copy


class ShardWriter:
    """Collects tensors into safetensors shards of at most `shard_bytes` (a larger tensor gets its own shard).

    Peak memory is one shard's budget plus the tensor being added.
    """

    def __init__(self, directory: Path, shard_bytes: int = 256 << 20):
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.pending_bytes = 0
        self.index: dict[str, str] = {}  # tensor name -> shard file name
        self.shards: list[str] = []

    def add(self, name: str, parts: dict[str, torch.Tensor]) -> None:
        """Queue the stored parts of tensor `name` (one entry for dense, several for quantized); never split."""
        n = sum(t.numel() * t.element_size() for t in parts.values())
        if self.pending and self.pending_bytes + n > self.shard_bytes:
            self.flush()
        self.pending[name] = {k: t.contiguous() for k, t in parts.items()}
        self.pending_bytes += n

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f"shard-{len(self.shards) + 1:05d}.safetensors"
        flat = {k: t for parts in self.pending.values() for k, t in parts.items()}
        write_safetensors(self.directory / fname, flat, {"format": "pt"})
        for name in self.pending:
            self.index[name] = fname
        self.shards.append(fname)
        self.pending, self.pending_bytes = {}, 0
