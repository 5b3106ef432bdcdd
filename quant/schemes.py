"""Scheme registry: each scheme is one structured object (bits, symmetry, block layout, what every target does
with it, its quantize / dequantize functions), plus the two entry points.

    quantize(w [N, K], "int4_sym_g32") -> QuantizedTensor
    dequantize(qt)                     -> float32 [N, K]

Every other module asks the registry instead of parsing names: recipes (`k_multiple`, `fallback`), the calibrated
quantizers (`calibratable`, `family`), the GGUF exporter (`gguf`, `gguf_nearest`), the ONNX exporter (`onnx`),
the GPU backend (`gpu`) and `nextq recipes --targets` (all of them, with the reasons a cell is empty).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .fp8 import (dequantize_fp8_channel, dequantize_fp8_tiles, quantize_fp8_block128, quantize_fp8_channel,
                  quantize_fp8_g128)
from .int4 import GROUP_SIZES, dequantize_int4_asym, dequantize_int4_sym, quantize_int4_asym, quantize_int4_sym
from .int8 import dequantize_int8_channel, dequantize_q8_0, quantize_int8_channel, quantize_q8_0
from .gguf_blocks import GGUF_BLOCK_TYPES
from .kquants import KQUANTS, QK_K
from .tensor import QuantizedTensor, as_float32_matrix, join_rows

FLOAT_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
LAYOUTS = ("none", "row", "group", "tile", "superblock")  # no scale / one per row / per g along K / 2-D tiles /
# two-level: super-blocks of 256 along K holding sub-block scales quantized against one fp16 scale


@dataclass(frozen=True)
class Scheme:
    """One registry entry.

    bits:           bits per code (16/32 for float pass-through)
    symmetric:      no zero point / min (value = q * scale) vs value = q * scale + offset
    layout, block:  see LAYOUTS; block = elements per scale along K (group / super-block), a (rows, cols) tile,
                    or None (per row, or no scale)
    bits_per_weight nominal, scales included (per-row schemes add 32/K bits for their float32 scale, not counted)
    k_multiple:     a weight's K must be a multiple of this (1 = any K)
    family:         "int4", "int8", "fp8", "float", "kquant": which data-aware grid applies (quant/gptq.py)
    calibratable:   GPTQ / weighted search (quant/gptq.py) can produce this scheme's exact format
    gguf:           GGUF type with the same math, blocks copied without re-quantizing (None: none)
    gguf_nearest:   GGUF type it is re-quantized to otherwise (a printed, measured warning); None: refused
    onnx:           the op convert/onnx_export.py emits a linear of it with, or None (embeddings and experts: the
                    exporter's EMBED_FORMATS / EXPERT_FORMATS)
    gpu:            runtime/gpu.py expert packer ("dequant": none, dequantized at load, GPU_NOTES), or None
    fallback:       llama.cpp's replacement when K is not a multiple of k_multiple (llama-quant.cpp), or None
    no_target:      target -> why that cell is impossible (for `nextq recipes --targets`)
    """

    name: str
    quantize: Callable[[torch.Tensor], QuantizedTensor]
    dequantize: Callable[[QuantizedTensor], torch.Tensor]
    bits_per_weight: float
    bits: int
    symmetric: bool
    layout: str
    block: int | tuple[int, int] | None
    family: str
    k_multiple: int = 1
    calibratable: bool = False
    gguf: str | None = None
    gguf_nearest: str | None = None
    onnx: str | None = None
    gpu: str | None = None
    fallback: str | None = None
    data_shape: Callable[[int, int], tuple[int, int]] | None = None  # stored codes' shape when not [N, K(/2)]
    no_target: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        assert self.layout in LAYOUTS, self.layout

    def target(self, target: str) -> str | None:
        """What target `target` ("gguf", "onnx", "gpu") does with this scheme, None when it cannot."""
        return {"gguf": self.gguf or (self.gguf_nearest and f"{self.gguf_nearest} (re-quantized)"),
                "onnx": self.onnx, "gpu": self.gpu}[target]

    def why_not(self, target: str) -> str:
        return dict(self.no_target).get(target, "not supported")


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


NO_FP8_GGUF = (("gguf", "GGUF has no fp8 type (export with --fallback q8_0 or bf16)"),)
GPU_DEQUANT = "dequant"  # runtime/gpu.py: no packed kernel, experts dequantized to the compute dtype at load
GPU_NOTES = {GPU_DEQUANT: "no packed GPU kernel (the MoE kernels take int4_sym, fp8 and float experts): these experts "
                          "are dequantized exactly and cast to the compute dtype at load, 16 bits/weight on the device "
                          "in bf16 (Qwen3-Next-80B's 79 G expert weights, MTP layer included: 147 GiB, more "
                          "than one H200's 141 GB)"}
BLOCKS_ONNX = "MatMulNBits"  # integer block schemes (quant/affine.py): MatMulNBits, GatherBlockQuantized, MoE


def _build() -> dict[str, Scheme]:
    entries = []
    for g in GROUP_SIZES:
        sym, asym = partial(quantize_int4_sym, group_size=g), partial(quantize_int4_asym, group_size=g)
        q4 = dict(bits=4, layout="group", block=g, family="int4", k_multiple=g, calibratable=True)
        entries.append(Scheme(f"int4_sym_g{g}", sym, dequantize_int4_sym, 4 + 16 / g, symmetric=True,  # + fp16 d
                              gguf="q4_0" if g == 32 else None, gguf_nearest="q4_0", onnx=BLOCKS_ONNX,
                              gpu="int4_sym", **q4))
        entries.append(Scheme(f"int4_asym_g{g}", asym, dequantize_int4_asym, 4 + 32 / g, symmetric=False,  # d and m
                              gguf="q4_1" if g == 32 else None, gguf_nearest="q4_1",
                              onnx=BLOCKS_ONNX, gpu=GPU_DEQUANT, **q4))
    entries += [
        Scheme("int8_channel", quantize_int8_channel, dequantize_int8_channel, 8.0, 8, True, "row", None, "int8",
               gguf_nearest="q8_0", onnx=BLOCKS_ONNX, gpu=GPU_DEQUANT),
        Scheme("int8_g32", quantize_q8_0, dequantize_q8_0, 8 + 16 / 32, 8, True, "group", 32, "int8", k_multiple=32,
               calibratable=True, gguf="q8_0", onnx=BLOCKS_ONNX, gpu=GPU_DEQUANT),
        Scheme("fp8_channel", quantize_fp8_channel, dequantize_fp8_channel, 8.0, 8, True, "row", None, "fp8",
               onnx="DequantizeLinear", gpu="fp8", no_target=NO_FP8_GGUF),
        Scheme("fp8_block128", quantize_fp8_block128, dequantize_fp8_tiles, 8 + 32 / (128 * 128), 8, True,
               "tile", (128, 128), "fp8", onnx="DequantizeLinear", gpu="fp8", no_target=NO_FP8_GGUF),
        Scheme("fp8_g128", quantize_fp8_g128, dequantize_fp8_tiles, 8 + 32 / 128, 8, True, "tile", (1, 128), "fp8",
               onnx="DequantizeLinear", gpu="fp8", no_target=NO_FP8_GGUF),
    ]
    fallbacks = {"q3_k": "int4_sym_g32", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "int8_g32"}  # llama-quant.cpp, K % 256
    for kq in KQUANTS.values():
        entries.append(Scheme(kq.name, kq.quantize, kq.dequantize, kq.bits_per_weight, int(kq.qmax).bit_length(),
                              not kq.asymmetric, "superblock", QK_K, "kquant", k_multiple=QK_K, calibratable=True,
                              gguf=kq.name, fallback=fallbacks[kq.name], onnx=BLOCKS_ONNX,
                              data_shape=kq.data_shape, gpu=GPU_DEQUANT))
    for bt in GGUF_BLOCK_TYPES.values():
        entries.append(Scheme(bt.name, bt.quantize, bt.dequantize, bt.bits_per_weight, 5, bt.name == "q5_0", "group",
                              32, "gguf", k_multiple=32, calibratable=True, gguf=bt.name, fallback="f16",
                              data_shape=bt.data_shape, onnx=BLOCKS_ONNX, gpu=GPU_DEQUANT))
    for s, dtype in FLOAT_DTYPES.items():
        entries.append(Scheme(s, partial(quantize_float, scheme=s), dequantize_float, 8.0 * dtype.itemsize,
                              8 * dtype.itemsize, True, "none", None, "float", gguf=s, onnx="float", gpu="float"))
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
