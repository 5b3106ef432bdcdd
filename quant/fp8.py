"""float8 e4m3fn weights (torch.float8_e4m3fn: 1 sign, 4 exponent, 3 mantissa bits, max 448, no inf).

    fp8_channel   one float32 scale per output row, scale = amax / 448.
    fp8_block128  Qwen's / DeepSeek's released FP8 layout: 128x128 tiles, float32 `weight_scale_inv`
                  `[ceil(N/128), ceil(K/128)]`, dequant = q * scale of the tile (edge tiles may be ragged).
Both: scale 1 where the row/tile is all zero; codes are clamped to +-448 before the cast so the
result saturates instead of depending on the cast's overflow behaviour (e4m3fn has no inf; 0x7F is NaN).
Matches ONNX DequantizeLinear(float8e4m3fn) and Qwen3-Next-*-FP8 checkpoints.
"""

from __future__ import annotations

import torch

from .tensor import QuantizedTensor, as_float32_matrix

E4M3_MAX = 448.0
FP8_BLOCK = 128


def cast_e4m3_saturating(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn, round to nearest even, |x| > 448 saturates to +-448."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax == 0, torch.ones_like(amax), amax / E4M3_MAX)


def quantize_fp8_channel(w: torch.Tensor) -> QuantizedTensor:
    """w `[N, K]` -> e4m3fn `[N, K]`, float32 scale `[N, 1]`."""
    w = as_float32_matrix(w)
    scale = _scale(w.abs().amax(dim=1, keepdim=True))  # [N, 1]
    q = cast_e4m3_saturating(w / scale)  # [N, K]
    return QuantizedTensor(scheme="fp8_channel", shape=tuple(w.shape), data=q, scales=scale)


def dequantize_fp8_channel(qt: QuantizedTensor) -> torch.Tensor:
    """q * scale, float32 `[N, K]`."""
    return qt.data.to(torch.float32) * qt.scales


def _tile_scale(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """`[ceil(N/128), ceil(K/128)]` -> per element `[N, K]`."""
    return scale.repeat_interleave(FP8_BLOCK, dim=0)[:n].repeat_interleave(FP8_BLOCK, dim=1)[:, :k]


def quantize_fp8_block128(w: torch.Tensor) -> QuantizedTensor:
    """w `[N, K]` -> e4m3fn `[N, K]`, float32 weight_scale_inv `[ceil(N/128), ceil(K/128)]`."""
    w = as_float32_matrix(w)
    n, k = w.shape
    nb, kb = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    padded = torch.nn.functional.pad(w.abs(), (0, kb * FP8_BLOCK - k, 0, nb * FP8_BLOCK - n))  # zeros never raise amax
    amax = padded.reshape(nb, FP8_BLOCK, kb, FP8_BLOCK).amax(dim=(1, 3))  # [nb, kb]
    scale = _scale(amax)
    q = cast_e4m3_saturating(w / _tile_scale(scale, n, k))
    return QuantizedTensor(scheme="fp8_block128", shape=(n, k), data=q, scales=scale, block_size=(FP8_BLOCK, FP8_BLOCK))


def dequantize_fp8_block128(qt: QuantizedTensor) -> torch.Tensor:
    """q * weight_scale_inv of its tile, float32 `[N, K]`."""
    n, k = qt.shape
    return qt.data.to(torch.float32) * _tile_scale(qt.scales, n, k)
