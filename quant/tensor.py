"""`QuantizedTensor`: a quantized 2-D weight plus everything needed to dequantize or store it.

Storage convention (safetensors): one tensor per field, named after the weight,
    f"{name}.qdata"   packed codes          (always)
    f"{name}.scales"  per-block scales      (absent for float pass-through schemes)
    f"{name}.zeros"   per-block minimum m   (asymmetric schemes only)
plus `meta()`, a small JSON-able dict the writer keeps in the file header.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

NIBBLE_ORDERS = ("low_even",)
QUANT_FIELDS = ("data", "scales", "zero_points")  # the tensors of a QuantizedTensor


def as_float32_matrix(w: torch.Tensor) -> torch.Tensor:
    """Validate a weight `[N, K]` (any float dtype, finite) and return it as contiguous float32 `[N, K]`."""
    if w.dim() != 2:
        raise ValueError(f"weight: expected 2-D [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"weight: expected a float dtype, got {w.dtype}")
    w = w.to(torch.float32).contiguous()
    lo, hi = torch.aminmax(w) if w.numel() else (torch.zeros(()), torch.zeros(()))  # NaN propagates to both
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"weight: expected finite values, got {int((~torch.isfinite(w)).sum())} NaN/inf")
    return w


def _fields(x: torch.Tensor | QuantizedTensor) -> dict[str, torch.Tensor]:
    """A dense tensor as one field; a quantized one's tensors by name (those it has)."""
    if isinstance(x, torch.Tensor):
        return {"data": x}
    return {f: getattr(x, f) for f in QUANT_FIELDS if getattr(x, f) is not None}


def join_rows(parts: Iterator[torch.Tensor | QuantizedTensor], n: int) -> torch.Tensor | QuantizedTensor:
    """Row blocks of one weight, in order, all as high as the first but the last -> the weight of `n` rows.

    Dense blocks `[r, ...]` join into `[n, ...]`, quantized ones field by field, each filled in place (no list of
    parts beside the result): a field with one row per row has n rows, one per 128-row block ceil(n / 128), both
    ceil(n * field rows / r) when r is a multiple of 128.
    """
    first = next(parts)
    out = {f: x.new_empty((-(-n * x.shape[0] // first.shape[0]), *x.shape[1:])) for f, x in _fields(first).items()}
    at = dict.fromkeys(out, 0)
    for part in itertools.chain([first], parts):
        for f, x in _fields(part).items():
            out[f][at[f]:at[f] + x.shape[0]] = x
            at[f] += x.shape[0]
    assert at == {f: x.shape[0] for f, x in out.items()}, (at, n)
    if isinstance(first, torch.Tensor):
        return out["data"]
    return dataclasses.replace(first, shape=(n, first.shape[1]), **out)


def slice_rows(qt: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """Rows [start, stop) of a quantized weight, the inverse of `join_rows` (start a multiple of 128): a field with
    one row per row is sliced by rows, one with a row per 128-row block (fp8_block128 scales) by blocks."""
    n = qt.shape[0]
    assert start % 128 == 0, start
    out = {f: x[start:stop] if x.shape[0] == n else x[start // 128:-(-stop // 128)] for f, x in _fields(qt).items()}
    return dataclasses.replace(qt, shape=(stop - start, qt.shape[1]), **out)


def check_group(k: int, group_size: int, scheme: str) -> None:
    """Refuse K that is not a multiple of the group: a ragged last group would not map onto GGUF/ORT blocks."""
    if k % group_size != 0:
        raise ValueError(
            f"{scheme}: weight width K={k} is not a multiple of group_size={group_size}; "
            "pick a scheme with a group size that divides K"
        )


def fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """float16 `[N, nb]` -> its little-endian bytes `[N, nb, 2]` (ggml_half as stored in GGUF blocks)."""
    return t.contiguous().view(torch.uint8).reshape(*t.shape, 2)


def require_scheme(qt: QuantizedTensor, scheme: str, target: str) -> None:
    """Repack helpers accept exactly one scheme: converting another would silently change the numbers."""
    if qt.scheme != scheme:
        raise ValueError(f"{target}: scheme expected {scheme!r}, got {qt.scheme!r}")


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized weight of logical shape `[N, K]` = [out_features, in_features].

    Fields:
        scheme:       registry key, e.g. "int4_sym_g32" (see `schemes.SCHEMES`).
        shape:        logical (N, K) of the float weight.
        data:         the codes. int4: uint8 `[N, K/2]` packed two per byte; int8: int8 `[N, K]`;
                      fp8: float8_e4m3fn `[N, K]`; float pass-through: the weight itself `[N, K]`;
                      K-quants (q4_k, q5_k, q6_k): the GGUF blocks, uint8 `[N, K/256 * block bytes]`.
        scales:       int4 / int8_g32: float16 `[N, K/g]`; per-channel: float32 `[N, 1]`;
                      fp8_block128: float32 `[ceil(N/128), ceil(K/128)]` (Qwen's `weight_scale_inv`);
                      None for float pass-through and K-quants (their scales are inside the blocks).
        zero_points:  asymmetric int4 only: the per-group minimum `m`, float16 `[N, K/g]`
                      (dequant = q * d + m, as ggml block_q4_1). None otherwise.
        block_size:   int g = groups of g consecutive k within a row; (bn, bk) = 2-D tiles;
                      None = one scale per row (per-channel) or no scale (float pass-through).
        nibble_order: int4 only: "low_even" = byte j of a row holds k=2j in bits 0-3 and k=2j+1 in
                      bits 4-7 (ONNX Runtime MatMulNBits / QMoE order). None for other schemes.
    """

    scheme: str
    shape: tuple[int, ...]
    data: torch.Tensor
    scales: torch.Tensor | None
    zero_points: torch.Tensor | None = None
    block_size: int | tuple[int, int] | None = None
    nibble_order: str | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"{self.scheme}: shape must be (N, K), got {self.shape}")
        if self.nibble_order not in (None, *NIBBLE_ORDERS):
            raise ValueError(
                f"{self.scheme}: nibble_order must be one of {NIBBLE_ORDERS} or None, got {self.nibble_order!r}"
            )
        from .schemes import SCHEMES  # local import: schemes imports this module

        n, k = self.shape
        scheme = SCHEMES.get(self.scheme)
        if scheme is not None and scheme.data_shape is not None:  # block-encoded (K-quants: GGUF blocks per row)
            expected = scheme.data_shape(n, k)
        else:
            expected = (n, k // 2) if self.nibble_order else (n, k)
        if tuple(self.data.shape) != expected:
            raise ValueError(f"{self.scheme}: data shape expected {expected}, got {tuple(self.data.shape)}")

    def dequantize(self) -> torch.Tensor:
        """Float32 `[N, K]`, computed exactly as the scheme's reference (ggml / ORT / torch) does."""
        from .schemes import dequantize  # local import: schemes imports this module

        return dequantize(self)

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes + scales + zero points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.zero_points) if t is not None)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per logical weight, scales and zero points included (Q4_0: 4.5, Q4_1: 5.0, Q8_0: 8.5)."""
        n, k = self.shape
        return self.nbytes * 8 / (n * k)

    def meta(self) -> dict:
        """JSON-able description; with `to_tensors` it is enough to rebuild this object."""
        block = list(self.block_size) if isinstance(self.block_size, tuple) else self.block_size
        return {
            "scheme": self.scheme,
            "shape": list(self.shape),
            "block_size": block,
            "nibble_order": self.nibble_order,
        }

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors to store under `name` (contiguous, ready for safetensors)."""
        fields = {"qdata": self.data, "scales": self.scales, "zeros": self.zero_points}
        return {f"{name}.{suffix}": t.contiguous() for suffix, t in fields.items() if t is not None}

    @classmethod
    def from_tensors(cls, name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> QuantizedTensor:
        """Inverse of `to_tensors` + `meta`; bit-exact."""
        if f"{name}.qdata" not in tensors:
            raise ValueError(f"{name}: missing tensor {name}.qdata")
        block = meta["block_size"]
        return cls(
            scheme=meta["scheme"],
            shape=tuple(int(s) for s in meta["shape"]),
            data=tensors[f"{name}.qdata"],
            scales=tensors.get(f"{name}.scales"),
            zero_points=tensors.get(f"{name}.zeros"),
            block_size=tuple(block) if isinstance(block, list) else block,
            nibble_order=meta["nibble_order"],
        )
