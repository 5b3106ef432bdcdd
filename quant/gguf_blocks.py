"""ggml's 5-bit block types Q5_0 / Q5_1 (blocks of 32 along K), quantized and dequantized by gguf-py.

They exist in nextq for one reason: llama.cpp replaces Q4_K by Q5_0 and Q5_K by Q5_1 on rows whose length is not a
multiple of 256 (llama-quant.cpp), and a K-quant recipe on such a model must produce the same file. gguf-py's
`quants.quantize` implements ggml's reference quantizer for these types (quantize_row_q5_{0,1}_ref), so the
QuantizedTensor holds the GGUF blocks (uint8 `[N, K/32 * block bytes]`) as the K-quants do.

    Q5_0  22 bytes / 32: fp16 d, qh[4] (fifth bits), qs[16]; value = d * (q - 16), q 0..31
    Q5_1  24 bytes / 32: fp16 d, fp16 m, qh[4], qs[16];      value = d * q + m
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tensor import QuantizedTensor, as_float32_matrix, check_group, fp16_bytes

BLOCK = 32


@dataclass(frozen=True)
class GGUFBlockType:
    name: str  # "q5_0"
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / BLOCK

    def _type(self):
        import gguf

        return gguf.GGMLQuantizationType[self.name.upper()]

    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        """w `[N, K]` -> GGUF blocks `[N, K/32 * block_bytes]` (gguf-py = ggml's reference quantizer)."""
        from gguf.quants import quantize

        w = as_float32_matrix(w)
        n, k = w.shape
        check_group(k, BLOCK, self.name)
        data = torch.from_numpy(quantize(w.numpy(), self._type()).reshape(n, -1))
        return QuantizedTensor(scheme=self.name, shape=(n, k), data=data, scales=None, block_size=BLOCK)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        """Float32 `[N, K]` (gguf.quants.dequantize)."""
        from gguf.quants import dequantize

        if qt.data.device.type == "meta":  # a layout probe (nextq.untrusted): shapes only, gguf-py needs bytes
            return torch.empty(qt.shape, dtype=torch.float32, device="meta")
        return torch.from_numpy(dequantize(qt.data.numpy(), self._type()).astype("float32")).reshape(qt.shape)

    def encode(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> QuantizedTensor:
        """Codes `[N, K]` (0..31) and fp16-exact d (and m for Q5_1) `[N, K/32]` -> the GGUF blocks (the layout
        gguf-py's quantize_blocks writes: fp16 d, [fp16 m,] qh = fifth bits little-endian, qs = byte j holding
        elements j (low) and j + 16 (high))."""
        n, k = q.shape
        qb = q.to(torch.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
        qs = (qb[:, :, 0] & 0x0F) | ((qb[:, :, 1] & 0x0F) << 4)  # [n, nb, 16]
        hi = (q.to(torch.uint8).reshape(n, k // BLOCK, 4, 8) >> 4).to(torch.int32)  # [n, nb, 4 bytes, 8 bits]
        qh = (hi << torch.arange(8, dtype=torch.int32, device=q.device)).sum(-1).to(torch.uint8)  # [n, nb, 4]
        parts = [fp16_bytes(d.to(torch.float16))]
        if m is not None:
            parts.append(fp16_bytes(m.to(torch.float16)))
        data = torch.cat([*parts, qh, qs], dim=-1).reshape(n, -1)
        return QuantizedTensor(scheme=self.name, shape=(n, k), data=data, scales=None, block_size=BLOCK)

    def decode(self, qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The GGUF blocks -> (codes uint8 `[N, K]` 0..31, d float32 `[N, K/32]`, m float32 `[N, K/32]` for Q5_1
        else None): the inverse of `encode`, so value = d * (q - 16) (Q5_0) or d * q + m (Q5_1)."""
        n, k = qt.shape
        nb = k // BLOCK
        b = qt.data.reshape(n, nb, self.block_bytes)
        d = b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
        at, m = 2, None
        if self.block_bytes == 24:
            m, at = b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1), 4
        qh, qs = b[..., at:at + 4], b[..., at + 4:at + 20]  # [n, nb, 4], [n, nb, 16]
        lo = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # element j (low nibble of byte j) and j + 16 (high)
        hi = (qh[..., :, None] >> torch.arange(8, dtype=torch.uint8, device=b.device)) & 1  # [n, nb, 4 bytes, 8 bits]: element 8i+b
        return (lo | (hi.reshape(n, nb, BLOCK) << 4)).reshape(n, k), d, m

    def data_shape(self, n: int, k: int) -> tuple[int, int]:
        return n, k // BLOCK * self.block_bytes


GGUF_BLOCK_TYPES: dict[str, GGUFBlockType] = {t.name: t for t in (GGUFBlockType("q5_0", 22), GGUFBlockType("q5_1", 24))}
