"""compressed-tensors checkpoints (llm-compressor's W4A16 / W8A16 `pack-quantized` releases, what vLLM and SGLang
load) read exactly, for every family: each module's packed codes and scales become a QuantizedTensor holding the
same codes and the same scales, nothing re-quantized.

    tensors = pair_packed(config_json, ckpt.tensors)  # `<m>.weight_packed` + `weight_scale` + `weight_shape` -> one
    src = tensors["<m>.weight"].source(shape, transform)  # a lazy canonical tensor (the reader's row split applied)

Layout (compressed-tensors `PackedQuantizationCompressor`, `pack_to_int32`; notes/kquants-and-serving-formats.md):
`quantization_config` {quant_method: compressed-tensors, format, quantization_status: compressed, config_groups:
{name: {targets, weights: {num_bits, type, symmetric, strategy, group_size, actorder, ...}, input_activations,
output_activations, format}}, ignore}. Per module: `weight_packed` int32 [N, K * bits / 32], value v of element i
at bit (i * bits) mod 32 of word i * bits // 32 as v + 2^(bits-1); `weight_scale` [N, K / G] (group) or [N, 1]
(channel) in the model's dtype; `weight_shape` [2] = (N, K). w = v * scale.

Read as little-endian bytes, the int32 words are nextq's codes already (a view, no arithmetic on the values):
    int4, group G   -> int4_sym_g{G}: byte j holds element 2j in bits 0-3 and 2j + 1 in bits 4-7, code v + 8,
                       nextq's "low_even" order with dequant (q - 8) * d
    int8, group 32  -> int8_g32:      byte j holds v + 128; nextq's int8 code is v (= byte xor 0x80)
    int8, channel   -> int8_channel:  same codes, float32 scales [N, 1]
nextq stores group scales as float16: a bf16 / float32 scale is taken when float16 holds it exactly (bf16 scales
in float16's normal range always are) and refused, naming the tensor, when it does not; per-channel scales are
float32 (exact from any of them). Which module takes which config group follows compressed-tensors' matching
(`match_targets`): exact names first, then `re:` regexes (`re.match`), then the class name `Linear`; `ignore`
likewise. Refused with the field named: activation quantization, asymmetric weights (zero points), activation
ordering that stores `g_idx`, other strategies, bit widths and formats, transforms, sparsity, KV-cache schemes.
A `float-quantized` group of 8-bit [128, 128] blocks (`weight` e4m3 + `weight_scale` tiles: Qwen's FP8 layout under
another scale name, what nextq's export writes beside integer groups) is read as convert/fp8_source.py reads Qwen's.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nextq.errors import CheckpointError, InputError, UnsupportedModelError
from nextq.quant import QuantizedTensor
from nextq.quant.schemes import SCHEMES
from nextq.storage import StoredTensor
from nextq.untrusted import need

from .fp8_source import fp8_pair
from .quant_source import QuantizedSource, QuantizedStored, exact_scales, register_layout

METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
FP8_FORMAT = "float-quantized"
# the one float layout read (nextq's fp8_block128 = Qwen's FP8 tiles): its weights' fields and their values
FP8_WEIGHTS = {"num_bits": 8, "symmetric": True, "strategy": "block", "block_structure": [128, 128], "dynamic": False}
PARTS = ("weight_packed", "weight_scale", "weight_shape")  # a module's stored tensors, in that order
REFUSED_PARTS = {"weight_zero_point": "asymmetric weights (zero points)",
                 "weight_g_idx": "activation ordering with g_idx (actorder 'group')",
                 "input_scale": "static activation quantization", "weight_global_scale": "two-level (fp4) scales"}
SCALE_DTYPES = ("BF16", "F16", "F32")
CALIBRATION_ONLY_ACTORDER = (None, "weight", "static")  # changes GPTQ's order, not the stored format
# quantization_config fields that must be empty (nextq implements none of them), with what they would mean
EMPTY_FIELDS = {"kv_cache_scheme": "KV-cache quantization", "sparsity_config": "sparsity",
                "transform_config": "weight transforms (rotations)", "moe_sparsity_config": "expert pruning"}
CLASS_TARGETS = {"Linear"}  # the class names a packed module can match (every packed weight here is a Linear's)


@dataclass(frozen=True)
class IntLayout:
    """One pack-quantized integer layout nextq holds exactly: its scheme and how the packed words become codes."""

    bits: int
    strategy: str
    scheme: Callable[[int | None], str | None]  # group size -> nextq scheme (None: no such nextq scheme)
    codes: Callable[[torch.Tensor], torch.Tensor]  # int32 [N, W] -> nextq's codes
    scale_dtype: torch.dtype  # nextq's scale dtype for it


def _int4_scheme(group: int | None) -> str | None:
    name = f"int4_sym_g{group}"
    return name if name in SCHEMES else None


LAYOUTS: dict[tuple[int, str], IntLayout] = {
    (4, "group"): IntLayout(4, "group", _int4_scheme, lambda w: w.view(torch.uint8), torch.float16),
    (8, "group"): IntLayout(8, "group", lambda g: "int8_g32" if g == 32 else None,
                            lambda w: (w.view(torch.uint8) ^ 0x80).view(torch.int8), torch.float16),
    (8, "channel"): IntLayout(8, "channel", lambda g: "int8_channel",
                              lambda w: (w.view(torch.uint8) ^ 0x80).view(torch.int8), torch.float32),
}


@dataclass(frozen=True)
class GroupScheme:
    """A config group as nextq reads it: its targets and the nextq scheme of its weights."""

    name: str
    targets: tuple[str, ...]
    layout: IntLayout | None  # None: fp8 tiles (float-quantized), read as convert/fp8_source.py's pairs
    scheme: str
    group_size: int | None


def _refuse(where: str, field: str, got: Any, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"config: quantization_config.{where}{field}={got!r} is not implemented by nextq; "
                                 f"supported: {supported}")


def read_group(name: str, group: Any, default_format: str | None) -> GroupScheme:
    """One `config_groups` entry checked field by field (one error naming the first unsupported field)."""
    where = f"config_groups.{name}."
    need(isinstance(group, dict), f"config.json: quantization_config.{where[:-1]}", "expected an object")
    targets = group.get("targets")
    need(isinstance(targets, list) and all(isinstance(t, str) for t in targets),
         f"config.json: quantization_config.{where}targets", f"expected a list of strings, got {targets!r:.60}")
    for field in ("input_activations", "output_activations"):
        if group.get(field) is not None:
            raise _refuse(where, field, group[field], "null (weight-only quantization)")
    w = group.get("weights")
    need(isinstance(w, dict), f"config.json: quantization_config.{where}weights", f"expected an object, got {w!r:.60}")
    fmt = group.get("format") or default_format
    want = FP8_FORMAT if w.get("type") == "float" else FORMAT
    if fmt != want:
        raise _refuse(where, "format", fmt, repr(want))
    where += "weights."
    if w.get("type") == "float":
        for field, supported in FP8_WEIGHTS.items():
            if w.get(field) != supported:
                raise _refuse(where, field, w.get(field), repr(supported))
        return GroupScheme(name, tuple(targets), None, "fp8_block128", None)
    checks = [("type", w.get("type"), lambda v: v == "int", "'int'"),
              ("symmetric", w.get("symmetric", True), lambda v: v is True, "true (no zero points)"),
              ("dynamic", w.get("dynamic", False), lambda v: v is False, "false"),
              ("actorder", w.get("actorder"), lambda v: v in CALIBRATION_ONLY_ACTORDER,
               f"{list(CALIBRATION_ONLY_ACTORDER)} (no g_idx)"),
              ("block_structure", w.get("block_structure"), lambda v: v is None, "null")]
    for field, got, ok, supported in checks:
        if not ok(got):
            raise _refuse(where, field, got, supported)
    key = (w.get("num_bits"), w.get("strategy"))
    if not (isinstance(key[0], int) and isinstance(key[1], str)) or key not in LAYOUTS:
        raise _refuse(where, "num_bits/strategy", list(key), str([list(k) for k in LAYOUTS]))
    layout = LAYOUTS[key]
    g = w.get("group_size") if layout.strategy == "group" else None
    scheme = layout.scheme(g)
    if scheme is None or (g is not None and not isinstance(g, int)):
        groups = [s for s in SCHEMES if s.startswith("int4_sym_g")] if layout.bits == 4 else ["int8_g32"]
        raise _refuse(where, "group_size", g, f"the group sizes of {groups}")
    return GroupScheme(name, tuple(targets), layout, scheme, g)


def _match_name(name: str, target: str) -> bool:
    """compressed-tensors' `match_name`: `re:` = re.match from the start, else the exact module name."""
    if not target.startswith("re:"):
        return target == name
    try:
        return re.match(target[3:], name) is not None
    except re.error as e:
        raise InputError(f"config.json: quantization_config target {target!r}: not a regular expression ({e})") from None


def _matches(name: str, target: str) -> bool:
    return _match_name(name, target) or target in CLASS_TARGETS


def scheme_of_module(module: str, groups: list[GroupScheme], ignore: list[str]) -> GroupScheme | None:
    """The config group quantizing `module` as compressed-tensors picks it: exact names, then regexes (each in
    sorted order), then class names; None when it is ignored or no group targets it."""
    if any(_matches(module, t) for t in ignore):
        return None
    owner = {t: g for g in groups for t in g.targets}  # later groups override a repeated target, as there
    by_name = [t for t in sorted(owner, key=lambda t: ("re:" in t, t)) if _match_name(module, t)]
    by_class = [t for t in owner if t in CLASS_TARGETS and t not in by_name]
    matched = by_name + by_class
    return owner[matched[0]] if matched else None


class PackedSource(QuantizedSource):
    """A canonical integer tensor read on demand: the stored codes and per-row scales through the reader's row map
    (see the module docstring). Loads as a QuantizedTensor."""

    dtype = torch.int8  # one byte per element or less (size estimates)

    @property
    def scheme(self) -> str:
        return self.stored.group.scheme

    def load(self) -> QuantizedTensor:
        st, layout = self.stored, self.stored.group.layout
        n, k = st.shape
        stored_shape = st.weight_shape.read().tolist()
        if stored_shape != [n, k]:
            raise CheckpointError(f"{st.module}.weight_shape: {stored_shape}, expected [{n}, {k}] (from "
                                  f"weight_packed {list(st.weight.shape)} at {layout.bits} bits)")
        codes = layout.codes(st.weight.read())  # [N, K/2] uint8 (int4) or [N, K] int8
        scales = exact_scales(st.scale.read(), layout.scale_dtype, f"{st.path}:{st.module}.weight_scale")
        rm = self.row_map
        if rm is not None:  # a split of a fused tensor: the same rows of codes and scales
            codes, scales = codes[rm], scales[rm]
        int4 = layout.bits == 4
        return self.checked(QuantizedTensor(scheme=self.scheme, shape=(codes.shape[0], k), data=codes.contiguous(),
                                            scales=scales.contiguous(), block_size=st.group.group_size,
                                            nibble_order="low_even" if int4 else None))


@dataclass(frozen=True)
class PackedStored(QuantizedStored):
    """A pack-quantized module's stored parts (a QuantizedStored: the family tables map it like any stored tensor
    of the logical shape [N, K]); `source` builds its canonical tensors."""

    weight: StoredTensor  # weight_packed, int32 [N, K * bits / 32]
    scale: StoredTensor  # weight_scale [N, K / G] or [N, 1]
    weight_shape: StoredTensor  # [2] = (N, K), checked when read
    group: GroupScheme
    module: str

    dtype = property(lambda self: "U8" if self.group.layout.bits == 4 else "I8")

    @property
    def key(self) -> str:
        return f"{self.module}.weight"

    @property
    def shape(self) -> tuple[int, int]:
        n, words = self.weight.shape
        return n, words * 32 // self.group.layout.bits

    source_class = PackedSource


def read_ct_config(qc: Mapping[str, Any]) -> tuple[list[GroupScheme], list[str]]:
    """(config groups, ignore list) of a compressed-tensors quantization_config; unsupported fields refused."""
    status = qc.get("quantization_status")
    if status != "compressed":
        raise _refuse("", "quantization_status", status, "'compressed'")
    for field, what in EMPTY_FIELDS.items():
        if qc.get(field):
            raise _refuse("", field, qc[field], f"empty ({what} is not implemented)")
    groups = qc.get("config_groups")
    need(isinstance(groups, dict) and groups, "config.json: quantization_config.config_groups",
         f"expected a non-empty object, got {groups!r:.60}")
    ignore = qc.get("ignore") or []
    need(isinstance(ignore, list) and all(isinstance(t, str) for t in ignore),
         "config.json: quantization_config.ignore", f"expected a list of strings, got {ignore!r:.60}")
    fmt = qc.get("format")
    return [read_group(name, g, fmt if fmt != "mixed-precision" else None) for name, g in groups.items()], ignore


def pair_packed(config: Mapping[str, Any], tensors: Mapping[str, StoredTensor]) -> dict[str, Any]:
    """The stored tensors with each pack-quantized module's parts merged into one PackedStored under
    `<module>.weight`.

    Errors (one line, naming the tensor): a packed module that is ignored or that no config group targets, a
    missing or misshapen part, a part nextq does not implement (zero points, g_idx, activation scales), a dense
    weight that a config group targets by name.
    """
    if sys.byteorder != "little":
        raise UnsupportedModelError("compressed-tensors codes are read as little-endian bytes; this host is big-endian")
    groups, ignore = read_ct_config(config["quantization_config"])
    out = dict(tensors)
    for key in tensors:
        module, _, part = key.rpartition(".")
        if part in REFUSED_PARTS:
            raise UnsupportedModelError(f"{key}: {REFUSED_PARTS[part]} is not implemented by nextq")
        fp8 = getattr(tensors.get(f"{module}.weight"), "dtype", None) == "F8_E4M3"
        if part in PARTS[1:] and f"{module}.weight_packed" not in tensors and not (fp8 and part == "weight_scale"):
            raise CheckpointError(f"{key}: {part} without its {module}.weight_packed")
        if part not in ("weight", "weight_packed"):
            continue
        group = scheme_of_module(module, groups, ignore)
        if part == "weight" and fp8:
            if group is None or group.layout is not None:
                raise CheckpointError(f"{key}: F8_E4M3, but no float-quantized config group targets {module}")
            out[key] = fp8_pair(key, tensors[key], tensors.get(f"{module}.weight_scale"), f"{module}.weight_scale")
            out.pop(f"{module}.weight_scale", None)
            continue
        if part == "weight":
            if group is not None and len(tensors[key].shape) == 2 and any(_match_name(module, t) for t in group.targets):
                raise CheckpointError(f"{key}: stored dense, but config group {group.name} targets {module} by name")
            continue
        if group is not None and group.layout is None:
            raise CheckpointError(f"{key}: packed, but config group {group.name} of {module} is float-quantized")
        if group is None:
            why = "ignores" if any(_matches(module, t) for t in ignore) else "has no config group targeting"
            raise CheckpointError(f"{key}: packed, but quantization_config {why} {module}")
        packed, scale, shape = (tensors.get(f"{module}.{p}") for p in PARTS)
        out[f"{module}.weight"] = _checked_pair(module, packed, scale, shape, group)
        for p in PARTS:
            out.pop(f"{module}.{p}", None)
    return out


def _checked_pair(module: str, packed: StoredTensor, scale: StoredTensor | None, shape: StoredTensor | None,
                  group: GroupScheme) -> PackedStored:
    """A PackedStored after the headers' dtypes and shapes are checked against the group's layout."""
    for part, st in zip(PARTS[1:], (scale, shape)):
        if st is None:
            raise CheckpointError(f"{module}.weight_packed: without its {module}.{part}")
    bits = group.layout.bits
    if packed.dtype != "I32" or len(packed.shape) != 2:
        raise CheckpointError(f"{module}.weight_packed: {packed.dtype} {list(packed.shape)}, expected I32 [N, K*{bits}/32] "
                              "(experts stored one by one)")
    n, k = packed.shape[0], packed.shape[1] * 32 // bits
    want = [n, 1] if group.group_size is None else [n, k // group.group_size]
    if scale.dtype not in SCALE_DTYPES or list(scale.shape) != want:
        raise CheckpointError(f"{module}.weight_scale: {scale.dtype} {list(scale.shape)}, expected one of "
                              f"{list(SCALE_DTYPES)} {want} ({group.scheme} of [{n}, {k}])")
    if shape.dtype not in ("I64", "I32") or list(shape.shape) != [2]:
        raise CheckpointError(f"{module}.weight_shape: {shape.dtype} {list(shape.shape)}, expected I64 [2]")
    return PackedStored(packed, scale, shape, group, module)


register_layout(METHOD)(pair_packed)
