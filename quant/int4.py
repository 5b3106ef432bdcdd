"""Group-wise int4 along K: symmetric = ggml Q4_0 math, asymmetric = ggml Q4_1 math.

Codes are uint4 0..15 packed two per byte in ONNX Runtime MatMulNBits / QMoE order
("low_even": low nibble = even k). `to_gguf_q4_*_blocks` re-lay the same codes and scales as
ggml blocks, so a GGUF exporter copies them without re-quantizing.

References (ggml/src/ggml-quants.c):
    quantize_row_q4_0_ref  d = max / -8 (max = element of largest |x|, sign kept), id = 1/d,
                           q = MIN(15, (int8_t)(x*id + 8.5f)), dequant (q - 8) * d, d stored fp16
    quantize_row_q4_1_ref  d = (max - min) / 15, id = 1/d, q = MIN(15, (int8_t)((x - min)*id + 0.5f)),
                           dequant q * d + m, d and m = min stored fp16
Quantization uses the float32 d (as ggml does); dequantization the fp16-rounded d (and m).

Checked bit-for-bit (blocks and dequantized floats) against gguf-py's quants.py and against the C
reference compiled for baseline x86-64. Two known differences:
  - gguf-py takes the sign of a zero d (q4_0) or zero m (q4_1) from the block's values; ggml's C, and this
    module, give an all-zero q4_0 block d = -0.0 and take the first-occurring zero as q4_1's min.
    Only the sign bit of a zero scale differs; dequantized values compare equal.
  - GCC with FMA (-march=native, gnu11's default -ffp-contract=fast) fuses `x*id + 8.5f` into one rounding,
    which flips a code where x/d is exactly k + 0.5 (seen on bf16-grid weights). Both are valid Q4_0;
    this module follows the unfused reference, as gguf-py does.
"""

from __future__ import annotations

import numpy as np
import torch

from .tensor import QuantizedTensor, as_float32_matrix, check_group, fp16_bytes, require_scheme

GROUP_SIZES = (32, 64, 128)
GGUF_BLOCK = 32  # QK4_0 == QK4_1 == 32


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes `[N, K]` in 0..15 -> uint8 `[N, K/2]`, byte j = q[:, 2j] | q[:, 2j+1] << 4 (low_even)."""
    if q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4: expected uint8 [N, K] with even K, got {q.dtype} {tuple(q.shape)}")
    if bool((q > 15).any()):
        raise ValueError(f"pack_int4: codes must be 0..15, got max {int(q.max())}")
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, K/2]` (low_even) -> uint8 codes `[N, K]`."""
    n, half = packed.shape
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(n, 2 * half)  # [N, K/2, 2] -> [N, K]


def _groups(w: torch.Tensor, group_size: int, scheme: str) -> torch.Tensor:
    """float32 `[N, K]` -> `[N, K/g, g]`, refusing ragged K and unsupported g."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{scheme}: group_size must be one of {GROUP_SIZES}, got {group_size}")
    n, k = w.shape
    check_group(k, group_size, scheme)
    return w.reshape(n, k // group_size, group_size)


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The element of largest |x| per block, sign kept, `[N, G, g]` -> `[N, G, 1]` (ggml's `max` in Q4_0).

    ggml keeps the first element of strictly largest |x| and starts from max = 0.0f: an all-zero block gives +0.0.
    amax and amin decide every block but those holding both +a and -a, where the first of them wins (argmax).
    """
    hi, lo = blocks.amax(dim=-1, keepdim=True), blocks.amin(dim=-1, keepdim=True)  # [N, G, 1]
    vmax = torch.where(-lo > hi, lo, hi)
    tie = ((hi == -lo) & (hi != 0)).squeeze(-1)  # [N, G]; rare outside bf16 grids
    if bool(tie.any()):
        ties = blocks[tie]  # [T, g]
        vmax[tie] = ties.gather(-1, ties.abs().argmax(dim=-1, keepdim=True))  # first of ties, as `amax < |v|`
    return torch.where(vmax == 0, torch.zeros_like(vmax), vmax)


def _pack_low_even(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes `[N, K]` known to be 0..15 -> low_even bytes `[N, K/2]` (pack_int4 without its checks)."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize_int4_sym(w: torch.Tensor, group_size: int) -> QuantizedTensor:
    """Q4_0 math per group of `group_size` along K. w `[N, K]` -> codes `[N, K/2]`, fp16 d `[N, K/g]`."""
    scheme = f"int4_sym_g{group_size}"
    blocks = _groups(as_float32_matrix(w), group_size, scheme)  # [N, G, g]
    d = _signed_absmax(blocks) / -8.0  # [N, G, 1] float32
    inv_d = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    y = blocks * inv_d  # [N, G, g]; then + 8.5 as a separate rounding step (no FMA), in place
    y += 8.5
    # (int8_t) truncates, then MIN(15, .): clamping first is the same for integer bounds, and makes the cast exact
    q = y.clamp_(0, 15).to(torch.uint8)
    n, k = blocks.shape[0], blocks.shape[1] * group_size
    return QuantizedTensor(
        scheme=scheme,
        shape=(n, k),
        data=_pack_low_even(q.reshape(n, k)),
        scales=d.squeeze(-1).to(torch.float16),
        block_size=group_size,
        nibble_order="low_even",
    )


def dequantize_int4_sym(qt: QuantizedTensor) -> torch.Tensor:
    """(q - 8) * fp16 d, float32 `[N, K]` (ggml dequantize_row_q4_0)."""
    n, k = qt.shape
    q = unpack_int4(qt.data).reshape(n, -1, qt.block_size).to(torch.float32)  # [N, G, g]
    return ((q - 8.0) * qt.scales.to(torch.float32).unsqueeze(-1)).reshape(n, k)


def quantize_int4_asym(w: torch.Tensor, group_size: int) -> QuantizedTensor:
    """Q4_1 math per group along K. w `[N, K]` -> codes `[N, K/2]`, fp16 d and m `[N, K/g]`."""
    scheme = f"int4_asym_g{group_size}"
    blocks = _groups(as_float32_matrix(w), group_size, scheme)  # [N, G, g]
    # first occurrence, as ggml's strict `v < min` / `v > max`: decides the sign of a zero min (and d) exactly
    vmin = blocks.gather(-1, blocks.argmin(dim=-1, keepdim=True))  # [N, G, 1]
    vmax = blocks.gather(-1, blocks.argmax(dim=-1, keepdim=True))
    d = (vmax - vmin) / 15.0
    inv_d = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc((blocks - vmin) * inv_d + 0.5).clamp(0, 15).to(torch.uint8)
    n, k = blocks.shape[0], blocks.shape[1] * group_size
    return QuantizedTensor(
        scheme=scheme,
        shape=(n, k),
        data=pack_int4(q.reshape(n, k)),
        scales=d.squeeze(-1).to(torch.float16),
        zero_points=vmin.squeeze(-1).to(torch.float16),
        block_size=group_size,
        nibble_order="low_even",
    )


def dequantize_int4_asym(qt: QuantizedTensor) -> torch.Tensor:
    """q * fp16 d + fp16 m, float32 `[N, K]` (ggml dequantize_row_q4_1; mul then add, no FMA)."""
    n, k = qt.shape
    q = unpack_int4(qt.data).reshape(n, -1, qt.block_size).to(torch.float32)  # [N, G, g]
    d = qt.scales.to(torch.float32).unsqueeze(-1)
    m = qt.zero_points.to(torch.float32).unsqueeze(-1)
    return (q * d + m).reshape(n, k)


LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
HIGH_NIBBLES = 0xF0F0F0F0F0F0F0F0 - (1 << 64)  # as int64


def _gguf_nibbles(qt: QuantizedTensor) -> torch.Tensor:
    """low_even codes -> ggml's in-block layout: byte j holds element j (low) and j+16 (high). `[N, K/32, 16]`.

    Byte i of a low_even block holds elements 2i | 2i+1 << 4; so with its bytes 0..7 (elements 0..15) and 8..15
    (16..31) read as little-endian int64 a and b, ggml's even bytes are a's low nibbles | b's low nibbles << 4
    and its odd bytes a's high nibbles >> 4 | b's high nibbles: eight bytes per operation, then interleaved.
    """
    n, k = qt.shape
    ab = qt.data.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK // 2).view(torch.int64)  # [N, nb, 2]
    a, b = ab[..., :1], ab[..., 1:]  # [N, nb, 1]
    even = (a & LOW_NIBBLES) | ((b << 4) & HIGH_NIBBLES)  # ggml bytes 0, 2, .., 14
    odd = ((a >> 4) & LOW_NIBBLES) | (b & HIGH_NIBBLES)  # ggml bytes 1, 3, .., 15
    return torch.stack((even.view(torch.uint8), odd.view(torch.uint8)), dim=-1).reshape(n, -1, GGUF_BLOCK // 2)


def to_gguf_q4_0_blocks(qt: QuantizedTensor) -> np.ndarray:
    """int4_sym_g32 -> ggml block_q4_0 rows, uint8 `[N, K/32*18]` (fp16 d, 16 bytes of nibbles)."""
    require_scheme(qt, "int4_sym_g32", "to_gguf_q4_0_blocks")
    n = qt.shape[0]
    blocks = torch.cat((fp16_bytes(qt.scales), _gguf_nibbles(qt)), dim=-1)  # [N, nb, 18]
    return blocks.reshape(n, -1).numpy()


def to_gguf_q4_1_blocks(qt: QuantizedTensor) -> np.ndarray:
    """int4_asym_g32 -> ggml block_q4_1 rows, uint8 `[N, K/32*20]` (fp16 d, fp16 m, 16 bytes of nibbles)."""
    require_scheme(qt, "int4_asym_g32", "to_gguf_q4_1_blocks")
    n = qt.shape[0]
    blocks = torch.cat((fp16_bytes(qt.scales), fp16_bytes(qt.zero_points), _gguf_nibbles(qt)), dim=-1)  # [N, nb, 20]
    return blocks.reshape(n, -1).numpy()
