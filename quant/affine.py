"""Every integer scheme as one form: codes on blocks along K with a scale, an integer zero and an optional offset.

    value[n, k] = (codes[n, k] - zero) * scale[n, k // block]  (+ offset[n, k // block])

This is what a target without the scheme's own layout needs: ONNX Runtime's MatMulNBits / GatherBlockQuantized /
DequantizeLinear take `(q - zero_point) * scale` on blocks of a power of two >= 16, so a scheme maps onto them
exactly when its blocks have such a length; an offset that is not an integer multiple of the scale (Q4_1's min,
Q4_K's -dmin*m) is carried beside the codes and added as its own term. The views are computed from each format's
own decoder (unpack_int4, the K-quant and Q5 block decoders), not re-derived:

    scheme          bits  block  zero  scale          offset
    int4_sym_g*     4     g      8     fp16 d         -
    int4_asym_g*    4     g      0     fp16 d         fp16 m
    int8_g32        8     32     128   fp16 d         -        (codes int8 + 128)
    int8_channel    8     K      128   float32 scale  -
    q5_0 / q5_1     5     32     16/0  fp16 d         - / fp16 m
    q4_k / q5_k     4/5   32     0     d * sc         -dmin * m   (float32 products of fp16 and 6-bit codes: exact)
    q6_k            6     16     32    d * sc         -
    q3_k            3     16     4     d * sc         -

Each scale (and offset) is the float32 value the scheme's own dequantize multiplies by, so dequantizing the view
gives the same float32 weight bit for bit (tests/test_onnx.py checks it for every scheme).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .gguf_blocks import GGUF_BLOCK_TYPES
from .int4 import GROUP_SIZES, unpack_int4
from .kquants import KQUANTS
from .tensor import QuantizedTensor


@dataclass(frozen=True)
class AffineBlocks:
    """codes uint8 `[N, K]` (0 .. 2^bits - 1), scale float32 `[N, K / block]`, offset float32 `[N, K / block]` or None;
    value = (codes - zero) * scale + offset, blockwise along K."""

    codes: torch.Tensor
    bits: int
    block: int
    zero: int
    scale: torch.Tensor
    offset: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """Float32 `[N, K]`: (q - zero) * scale, then + offset (the order every scheme's own dequantize uses)."""
        n, k = self.codes.shape
        q = self.codes.reshape(n, -1, self.block).to(torch.float32)
        w = (q - float(self.zero)) * self.scale[..., None] if self.zero else q * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(n, k)

    def reblock(self, block: int) -> AffineBlocks:
        """The same values on blocks of `block` (a divisor of this block): scale and offset repeated."""
        assert self.block % block == 0, (self.block, block)
        r = self.block // block
        rep = (lambda t: t.repeat_interleave(r, dim=1)) if r > 1 else (lambda t: t)
        return AffineBlocks(self.codes, self.bits, block, self.zero, rep(self.scale),
                            None if self.offset is None else rep(self.offset))


def _int4(qt: QuantizedTensor) -> AffineBlocks:
    offset = None if qt.zero_points is None else qt.zero_points.float()
    return AffineBlocks(unpack_int4(qt.data), 4, qt.block_size, 0 if offset is not None else 8, qt.scales.float(),
                        offset)


def _int8(qt: QuantizedTensor) -> AffineBlocks:
    codes = (qt.data.to(torch.int16) + 128).to(torch.uint8)
    block = qt.block_size or qt.shape[1]  # int8_channel: one block per row
    return AffineBlocks(codes, 8, block, 128, qt.scales.float().reshape(qt.shape[0], -1))


def _q5(qt: QuantizedTensor) -> AffineBlocks:
    codes, d, m = GGUF_BLOCK_TYPES[qt.scheme].decode(qt)
    return AffineBlocks(codes, 5, 32, 16 if m is None else 0, d, m)


def _kquant(qt: QuantizedTensor) -> AffineBlocks:
    kq = KQUANTS[qt.scheme]
    q, p = kq.decode(qt)
    step, offset = kq.grid(p)  # [N, K / sub, 1]: the float32 factors kq.dequantize uses
    n = qt.shape[0]
    bits = int(kq.qmax).bit_length()
    if kq.asymmetric:
        return AffineBlocks(q.to(torch.uint8), bits, kq.sub, 0, step.reshape(n, -1), offset.reshape(n, -1))
    return AffineBlocks(q.to(torch.uint8), bits, kq.sub, kq.zero, step.reshape(n, -1))


AFFINE_VIEWS: dict[str, Callable[[QuantizedTensor], AffineBlocks]] = {
    **{f"int4_{s}_g{g}": _int4 for s in ("sym", "asym") for g in GROUP_SIZES},
    "int8_g32": _int8, "int8_channel": _int8,
    **{name: _q5 for name in GGUF_BLOCK_TYPES},
    **{name: _kquant for name in KQUANTS},
}


def affine_blocks(qt: QuantizedTensor) -> AffineBlocks:
    """The affine block view of an integer-coded weight (ValueError for fp8 / float schemes, which have none)."""
    if qt.scheme not in AFFINE_VIEWS:
        raise ValueError(f"{qt.scheme}: no integer block form; schemes with one: {', '.join(AFFINE_VIEWS)}")
    return AFFINE_VIEWS[qt.scheme](qt)
