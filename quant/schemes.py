"""Scheme registry: name -> (quantize, dequantize, nominal bits per weight), plus the two entry points.

    quantize(w [N, K], "int4_sym_g32") -> QuantizedTensor
    dequantize(qt)                     -> float32 [N, K]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .fp8 import dequantize_fp8_block128, dequantize_fp8_channel, quantize_fp8_block128, quantize_fp8_channel
from .int4 import GROUP_SIZES, dequantize_int4_asym, dequantize_int4_sym, quantize_int4_asym, quantize_int4_sym
from .int8 import dequantize_int8_channel, dequantize_q8_0, quantize_int8_channel, quantize_q8_0
from .tensor import QuantizedTensor, as_float32_matrix, join_rows

FLOAT_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


@dataclass(frozen=True)
class Scheme:
    """One registry entry. `bits_per_weight` is nominal: per-row schemes add 32/K bits for their float32 scale."""

    name: str
    quantize: Callable[[torch.Tensor], QuantizedTensor]
    dequantize: Callable[[QuantizedTensor], torch.Tensor]
    bits_per_weight: float


def quantize_float(w: torch.Tensor, scheme: str) -> QuantizedTensor:
    """Pass-through: the weight cast to bf16/f16/f32 `[N, K]`, no scales. Refuses values the dtype cannot hold."""
    w = as_float32_matrix(w)
    data = w.to(FLOAT_DTYPES[scheme])
    if not bool(torch.isfinite(data).all()):
        raise ValueError(f"{scheme}: weight max |w| = {float(w.abs().max())} overflows {FLOAT_DTYPES[scheme]}")
    return QuantizedTensor(scheme=scheme, shape=tuple(w.shape), data=data, scales=None)


def dequantize_float(qt: QuantizedTensor) -> torch.Tensor:
    """Float32 `[N, K]`."""
    return qt.data.to(torch.float32)


def _build() -> dict[str, Scheme]:
    entries = []
    for g in GROUP_SIZES:
        sym, asym = partial(quantize_int4_sym, group_size=g), partial(quantize_int4_asym, group_size=g)
        entries.append(Scheme(f"int4_sym_g{g}", sym, dequantize_int4_sym, 4 + 16 / g))  # + fp16 d per group
        entries.append(Scheme(f"int4_asym_g{g}", asym, dequantize_int4_asym, 4 + 32 / g))  # + fp16 d and m
    entries += [
        Scheme("int8_channel", quantize_int8_channel, dequantize_int8_channel, 8.0),
        Scheme("int8_g32", quantize_q8_0, dequantize_q8_0, 8 + 16 / 32),
        Scheme("fp8_channel", quantize_fp8_channel, dequantize_fp8_channel, 8.0),
        Scheme("fp8_block128", quantize_fp8_block128, dequantize_fp8_block128, 8 + 32 / (128 * 128)),
    ]
    for s, dtype in FLOAT_DTYPES.items():
        entries.append(Scheme(s, partial(quantize_float, scheme=s), dequantize_float, 8.0 * dtype.itemsize))
    return {e.name: e for e in entries}


SCHEMES: dict[str, Scheme] = _build()


def get_scheme(name: str) -> Scheme:
    """Registry lookup; unknown names raise ValueError listing the supported ones."""
    if name not in SCHEMES:
        raise ValueError(f"scheme: unknown {name!r}; supported: {', '.join(SCHEMES)}")
    return SCHEMES[name]


CHUNK_ELEMENTS = 1 << 20  # quantize larger weights in row blocks: float32 temporaries of ~4 MB stay in cache
CHUNK_ROWS_MULTIPLE = 128  # every scheme's scale layout is row-major in blocks of at most 128 rows


def row_block(shape: tuple[int, ...]) -> int | None:
    """Rows per block for a weight of `shape` quantized in pieces (a multiple of 128, about CHUNK_ELEMENTS
    elements), or None when it goes in one piece (small, or not 2-D)."""
    if len(shape) != 2 or shape[0] * shape[1] <= CHUNK_ELEMENTS:
        return None
    return max(CHUNK_ROWS_MULTIPLE, CHUNK_ELEMENTS // shape[1] // CHUNK_ROWS_MULTIPLE * CHUNK_ROWS_MULTIPLE)


def quantize(w: torch.Tensor, scheme: str) -> QuantizedTensor:
    """Quantize a weight `[N, K]` (any float dtype; computed in float32) with a registered scheme.

    Large weights (an 80B model's 151936 x 2048 embedding) go through in blocks of `row_block` rows, joined in
    place: every scheme works on rows or 128-row blocks, so the result is identical to one pass
    (tests/test_quant_schemes.py checks it) while the float32 temporaries stay small (and 1.5-2x faster than
    64 MB ones, measured).
    """
    s = get_scheme(scheme)
    rows = row_block(tuple(w.shape))
    if rows is None:
        return s.quantize(w)
    return join_rows((s.quantize(w[i:i + rows]) for i in range(0, w.shape[0], rows)), w.shape[0])


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Float32 `[N, K]` for any registered scheme."""
    return get_scheme(qt.scheme).dequantize(qt)
