"""Scheme registry: name -> (quantize, dequantize, nominal bits per weight), plus the two entry points.

    quantize(w [N, K], "int4_sym_g32") -> QuantizedTensor
    dequantize(qt)                     -> float32 [N, K]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .fp8 import dequantize_fp8_block128, dequantize_fp8_channel, quantize_fp8_block128, quantize_fp8_channel
from .int4 import GROUP_SIZES, dequantize_int4_asym, dequantize_int4_sym, quantize_int4_asym, quantize_int4_sym
from .int8 import dequantize_int8_channel, dequantize_q8_0, quantize_int8_channel, quantize_q8_0
from .tensor import QuantizedTensor, as_float32_matrix

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


CHUNK_ELEMENTS = 1 << 24  # quantize larger weights in row blocks: float32 temporaries stay ~64 MB each
CHUNK_ROWS_MULTIPLE = 128  # every scheme's scale layout is row-major in blocks of at most 128 rows


def quantize(w: torch.Tensor, scheme: str) -> QuantizedTensor:
    """Quantize a weight `[N, K]` (any float dtype; computed in float32) with a registered scheme.

    Large weights (an 80B model's 151936 x 2048 embedding) go through in row blocks of a multiple of 128 rows and
    are concatenated: every scheme works on rows or 128-row blocks, so the result is identical to one pass
    (tests/test_quant_schemes.py checks it) while the float32 temporaries stay bounded.
    """
    s = get_scheme(scheme)
    if w.dim() != 2 or w.numel() <= CHUNK_ELEMENTS:
        return s.quantize(w)
    rows = max(CHUNK_ROWS_MULTIPLE, CHUNK_ELEMENTS // w.shape[1] // CHUNK_ROWS_MULTIPLE * CHUNK_ROWS_MULTIPLE)
    first = s.quantize(w[:rows])
    n = w.shape[0]

    def alloc(x: torch.Tensor | None) -> torch.Tensor | None:
        # per-row fields have n rows, per-128-row-block fields ceil(n / 128): both are ceil(n * rows_x / rows)
        return None if x is None else x.new_empty((-(-n * x.shape[0] // rows), *x.shape[1:]))

    fields = ("data", "scales", "zero_points")
    out = {f: alloc(getattr(first, f)) for f in fields}
    for i in range(0, n, rows):  # fill in place: no list of parts beside the result
        part = first if i == 0 else s.quantize(w[i:i + rows])
        for f in fields:
            x = getattr(part, f)
            if x is not None:
                at = i * getattr(first, f).shape[0] // rows  # rows of this field before input row i
                out[f][at:at + x.shape[0]] = x
    return dataclasses.replace(first, shape=tuple(w.shape), **out)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Float32 `[N, K]` for any registered scheme."""
    return get_scheme(qt.scheme).dequantize(qt)
