"""Quantized checkpoints read without re-quantizing: the parts every layout shares (Qwen's FP8 in
convert/fp8_source.py, compressed-tensors in convert/ct_source.py, GPTQ in convert/gptq_source.py).

    tensors = pair_quantized(config_json, ckpt.tensors)  # a module's stored tensors -> one QuantizedStored entry
    src = tensors["<m>.weight"].source(shape, transform)  # a lazy canonical tensor, loads as a QuantizedTensor

A layout is registered under its `quantization_config.quant_method`. Its pairing merges each quantized module's
stored tensors (codes, scales, shapes) into one entry under `<m>.weight` that has a StoredTensor's `path`, `key`,
`dtype` and `shape` (the logical weight's), so the family tables map it like any stored tensor.

A family's split of a fused tensor (q / k / v / z out of in_proj_qkvz, q / gate out of q_proj) only selects
rows; `probe_row_map` runs it once on a probe of flat element indices to learn which stored row each canonical row
comes from (and to prove it moves no column), so the codes and the per-row scales of a quantized tensor are
selected with the same row map.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any, ClassVar

import torch

from nextq.errors import CheckpointError, UnsupportedModelError
from nextq.quant import QuantizedTensor
from nextq.untrusted import need

Pairing = Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
LAYOUTS: dict[str | None, Pairing] = {}  # quantization_config.quant_method (None: no quantization_config)


def register_layout(method: str | None) -> Callable[[Pairing], Pairing]:
    def deco(fn: Pairing) -> Pairing:
        LAYOUTS[method] = fn
        return fn

    return deco


def pair_quantized(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The stored tensors with every quantized module's parts merged by the layout config.json declares
    (`quantization_config.quant_method`); an unknown method is one error listing the supported ones."""
    from . import ct_source, fp8_source, gptq_source  # noqa: F401  (register their layouts)

    qc = config.get("quantization_config")
    need(qc is None or isinstance(qc, dict), "config.json: quantization_config", f"expected an object, got {qc!r:.60}")
    method = qc.get("quant_method") if qc else None
    need(method is None or isinstance(method, str), "config.json: quantization_config.quant_method",
         f"expected a string, got {method!r:.60}")
    if method not in LAYOUTS:
        known = sorted(m for m in LAYOUTS if m is not None)
        raise UnsupportedModelError(f"config: quantization_config.quant_method={method!r} is not implemented by "
                                    f"nextq; supported: {known}")
    return LAYOUTS[method](config, tensors)


def probe_row_map(transform: Callable[[torch.Tensor], torch.Tensor] | None, shape: tuple[int, int],
                  origin: str) -> torch.Tensor | None:
    """Source row of each canonical row, int64 [N'] (None: no transform, the rows are the stored ones).

    Found by running the transform on a probe [N, K] holding each element's flat source index, which also proves
    that it only selects whole rows: a transform that moved columns would mix the scale blocks along K.
    """
    if transform is None:
        return None
    n, k = shape
    index = torch.int32 if n * k < 2**31 else torch.int64  # a probe of 4 bytes per element when it fits
    probe = transform(torch.arange(n * k, dtype=index).reshape(n, k))
    if probe.dim() != 2 or probe.shape[1] != k or not bool((probe % k == torch.arange(k)).all()):
        raise CheckpointError(f"{origin}: the reader's split of this quantized weight is not a row selection")
    return probe[:, 0].long() // k


def exact_scales(s: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """`s` as `dtype` (nextq's scale dtype), refused (the tensor and a value named) when that is not exact."""
    out = s.to(dtype)
    bad = out.to(s.dtype) != s  # a NaN is refused too
    if bool(bad.any()):
        v = float(s[bad][0])
        raise CheckpointError(f"{where}: scale value {v!r} ({s.dtype}) is not exactly representable in "
                              f"{dtype} ({int(bad.sum())} of {s.numel()} scales), which nextq stores this scheme's "
                              "scales in; refusing to round it")
    return out


class QuantizedStored:
    """Base of a quantized module's merged stored parts (a layout's dataclass). Subclasses give `weight` (the
    stored tensor that names it), `shape` (the logical [N, K]) and `source_class` (their QuantizedSource)."""

    weight: Any
    source_class: ClassVar[type[QuantizedSource]]
    path = property(lambda self: self.weight.path)

    @property
    def key(self) -> str:
        return self.weight.key

    def rows(self, start: int, stop: int):
        raise CheckpointError(f"{self.key}: quantized weights stacked over experts are not supported (store the "
                              "experts one by one, mlp.experts.{e}.*_proj)")

    def source(self, shape: tuple[int, ...], transform: Callable | None) -> QuantizedSource:
        """The canonical tensor of shape `shape` made by the reader's `transform` (None: the stored rows)."""
        return self.source_class(self, tuple(shape), transform)


class QuantizedSource:
    """A canonical quantized tensor read on demand (a layout's subclass implements `load`): the stored parts
    through the reader's row map. `stored.shape` is the logical [N, K] the transform is written for."""

    def __init__(self, stored: QuantizedStored, shape: tuple[int, ...], transform: Callable | None):
        self.stored, self.shape, self.transform = stored, tuple(shape), transform
        self.origin = f"{stored.path}:{stored.key}"

    @cached_property
    def row_map(self) -> torch.Tensor | None:
        return probe_row_map(self.transform, tuple(self.stored.shape), self.origin)

    def load(self) -> QuantizedTensor:
        raise NotImplementedError

    def checked(self, qt: QuantizedTensor) -> QuantizedTensor:
        if tuple(qt.shape) != self.shape:
            raise CheckpointError(f"{self.origin}: produced shape {tuple(qt.shape)}, expected {self.shape}")
        return qt

    def dequantized(self) -> DequantizedSource:
        return DequantizedSource(self)


class DequantizedSource:
    """A quantized source read as its float32 dequantization (exact for fp8 tiles and int4 / int8 codes times
    float16 scales): `nextq convert --dtype` of a quantized checkpoint."""

    dtype = torch.float32

    def __init__(self, src: QuantizedSource):
        self.src, self.shape, self.origin = src, src.shape, src.origin

    def load(self) -> torch.Tensor:
        return self.src.load().dequantize()


def dequantized_view(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A graph's tensors with every quantized source read as its exact float32 dequantization."""
    return {n: t.dequantized() if isinstance(t, QuantizedSource) else t for n, t in tensors.items()}
