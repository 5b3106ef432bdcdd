"""GPTQ-format checkpoints (AutoGPTQ / GPTQModel: `qweight` / `qzeros` / `scales` / `g_idx`, quant_method gptq)
read exactly where their math is nextq's int4_sym_g{G}: symmetric 4-bit groups in order (`desc_act: false`), every
zero point 8. The codes are re-laid (GPTQ packs along K within columns, nextq along K within rows), not re-computed.

    tensors = pair_gptq(config_json, ckpt.tensors)  # `<m>.qweight` + `qzeros` + `scales` [+ `g_idx`] -> one entry

Layout (AutoGPTQ `QuantLinear.pack`, GPTQModel's `gptq` / `gptq_v2` checkpoint formats): `qweight` int32
[K / 8, N], row i holding k = 8i..8i+7 of each column at bits 4 (k mod 8); `qzeros` int32 [K / G, N / 8], packed
the same way along N; `scales` float16 [K / G, N]; `g_idx` int32 [K], the group of each k. w[n, k] = scales[g, n] *
(q[k, n] - z[g, n]), where the `gptq` (v1) format stores z - 1 (AutoGPTQ's historical offset) and `gptq_v2` z.
With sym = true every z is 8, which is nextq's int4 dequantization (q - 8) * d with d = scales. Anything else —
asymmetric zeros, activation order (`desc_act`, a g_idx out of order), other bit widths or group sizes, GPTQModel's
per-module `dynamic` overrides — is refused with the field or tensor named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nextq.errors import CheckpointError, UnsupportedModelError
from nextq.quant import QuantizedTensor, pack_int4
from nextq.quant.schemes import SCHEMES
from nextq.storage import StoredTensor

from .quant_source import QuantizedSource, QuantizedStored, exact_scales, register_layout

METHOD = "gptq"
BITS = 4
PER_WORD = 32 // BITS
ZERO = 1 << (BITS - 1)  # the symmetric zero point
STORED_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> z - stored z
PARTS = ("qweight", "qzeros", "scales")
SCALE_DTYPES = ("F16", "BF16", "F32")


def _refuse(field: str, got: Any, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"config: quantization_config.{field}={got!r} is not implemented by nextq; "
                                 f"supported: {supported}")


def read_gptq_config(qc: Mapping[str, Any]) -> tuple[str, int, int]:
    """(nextq scheme, group size, stored zero offset) of a GPTQ quantization_config; unsupported fields refused."""
    groups = [int(s.removeprefix("int4_sym_g")) for s in SCHEMES if s.startswith("int4_sym_g")]
    checks = [("bits", qc.get("bits"), lambda v: v == BITS, f"[{BITS}]"),
              ("sym", qc.get("sym", True), lambda v: v is True, "true (zero point 8)"),
              ("desc_act", qc.get("desc_act", False), lambda v: v is False, "false (groups in order)"),
              ("group_size", qc.get("group_size"), lambda v: v in groups, str(groups)),
              ("checkpoint_format", qc.get("checkpoint_format", "gptq"),
               lambda v: isinstance(v, str) and v in STORED_ZERO_OFFSET,
               str(list(STORED_ZERO_OFFSET))),
              ("dynamic", qc.get("dynamic"), lambda v: not v, "empty (no per-module overrides)")]
    for field, got, ok, supported in checks:
        if not ok(got):
            raise _refuse(field, got, supported)
    g = qc["group_size"]
    return f"int4_sym_g{g}", g, STORED_ZERO_OFFSET[qc.get("checkpoint_format", "gptq")]


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] packing 8 nibbles per word along R (element 8i + j at bits 4j of row i) -> uint8 [8R, C]."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32).view(1, PER_WORD, 1)
    nibbles = (words.unsqueeze(1) >> shifts) & 0xF  # [R, 8, C]
    return nibbles.reshape(-1, words.shape[1]).to(torch.uint8)


class GptqSource(QuantizedSource):
    """A canonical int4_sym tensor read on demand from a GPTQ module (see the module docstring)."""

    dtype = torch.uint8

    @property
    def scheme(self) -> str:
        return self.stored.scheme

    def load(self) -> QuantizedTensor:
        st = self.stored
        n, k = st.shape
        g = st.group_size
        zeros = unpack_columns(st.zeros.read().T).T.to(torch.int16) + st.zero_offset  # [K / G, N]
        if not bool((zeros == ZERO).all()):
            bad = zeros[zeros != ZERO][0]
            raise UnsupportedModelError(f"{st.module}.qzeros: zero point {int(bad)}, supported: {ZERO} only "
                                        "(symmetric int4; asymmetric GPTQ is not implemented by nextq)")
        if st.g_idx is not None and not torch.equal(st.g_idx.read().long(), torch.arange(k) // g):
            raise UnsupportedModelError(f"{st.module}.g_idx: groups out of order (activation order); supported: "
                                        "k // group_size")
        codes = pack_int4(unpack_columns(st.weight.read()).T.contiguous())  # [N, K] -> low_even [N, K/2]
        scales = exact_scales(st.scale.read().T, torch.float16, f"{st.path}:{st.module}.scales")  # [N, K / G]
        rm = self.row_map
        if rm is not None:  # a split of a fused tensor: the same rows of codes and scales
            codes, scales = codes[rm], scales[rm]
        return self.checked(QuantizedTensor(scheme=st.scheme, shape=(codes.shape[0], k), data=codes.contiguous(),
                                            scales=scales.contiguous(), block_size=g, nibble_order="low_even"))


@dataclass(frozen=True)
class GptqStored(QuantizedStored):
    """A GPTQ module's stored parts (a QuantizedStored of the logical shape [N, K])."""

    weight: StoredTensor  # qweight int32 [K / 8, N]
    zeros: StoredTensor  # qzeros int32 [K / G, N / 8]
    scale: StoredTensor  # scales [K / G, N]
    g_idx: StoredTensor | None  # int32 [K] or absent
    module: str
    scheme: str
    group_size: int
    zero_offset: int

    dtype = "U8"

    @property
    def key(self) -> str:
        return f"{self.module}.weight"

    @property
    def shape(self) -> tuple[int, int]:
        words, n = self.weight.shape
        return n, words * PER_WORD

    source_class = GptqSource


def pair_gptq(config: Mapping[str, Any], tensors: Mapping[str, StoredTensor]) -> dict[str, Any]:
    """The stored tensors with each GPTQ module's parts merged into one GptqStored under `<module>.weight`.

    Errors (one line, naming the tensor): a part without its qweight, a missing or misshapen part."""
    scheme, g, offset = read_gptq_config(config["quantization_config"])
    out = dict(tensors)
    for key in tensors:
        module, _, part = key.rpartition(".")
        if part in (*PARTS[1:], "g_idx") and f"{module}.qweight" not in tensors:
            raise CheckpointError(f"{key}: {part} without its {module}.qweight")
        if part != "qweight":
            continue
        qweight, zeros, scale = (tensors.get(f"{module}.{p}") for p in PARTS)
        g_idx = tensors.get(f"{module}.g_idx")
        for p, st in zip(PARTS[1:], (zeros, scale)):
            if st is None:
                raise CheckpointError(f"{key}: without its {module}.{p}")
        if qweight.dtype != "I32" or len(qweight.shape) != 2:
            raise CheckpointError(f"{key}: {qweight.dtype} {list(qweight.shape)}, expected I32 [K/8, N]")
        k, n = qweight.shape[0] * PER_WORD, qweight.shape[1]
        want = {"qzeros": (("I32",), [k // g, n // PER_WORD], zeros), "scales": (SCALE_DTYPES, [k // g, n], scale),
                **({"g_idx": (("I32",), [k], g_idx)} if g_idx is not None else {})}
        for p, (dtype, shape, st) in want.items():
            if st.dtype not in dtype or list(st.shape) != shape or k % g or n % PER_WORD:
                raise CheckpointError(f"{module}.{p}: {st.dtype} {list(st.shape)}, expected {dtype} {shape} "
                                      f"({scheme} of [{n}, {k}])")
        out[f"{module}.weight"] = GptqStored(qweight, zeros, scale, g_idx, module, scheme, g, offset)
        for p in (*PARTS, "g_idx"):
            out.pop(f"{module}.{p}", None)
    return out


register_layout(METHOD)(pair_gptq)
