"""float8 e4m3fn weights (torch.float8_e4m3fn: 1 sign, 4 exponent, 3 mantissa bits, max 448, no inf).

    fp8_channel   one float32 scale per output row, scale = amax / 448.
    fp8_block128  Qwen's / DeepSeek's released FP8 layout: 128x128 tiles, float32 `weight_scale_inv`
                  `[ceil(N/128), ceil(K/128)]`, dequant = q * scale of the tile (edge tiles may be ragged).
    fp8_g128      one float32 scale per row and 128 columns `[N, ceil(K/128)]` (1x128 tiles). An FP8 checkpoint's
                  128x128 tiles lie on its fused tensors; a canonical tensor split from one (q from in_proj_qkvz,
                  q / gate from q_proj) whose rows do not fall on tile edges keeps its source tiles exactly this
                  way, each row carrying the scales of the source row it came from (convert/fp8_source.py).
All: scale 1 where the row/tile is all zero; codes are clamped to +-448 before the cast so the
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


def tile_scale(scale: torch.Tensor, n: int, k: int, block: tuple[int, int]) -> torch.Tensor:
    """Tile scales `[ceil(N/bn), ceil(K/bk)]` -> per element `[N, K]` (ragged edge tiles cropped)."""
    bn, bk = block
    return scale.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]


def quantize_fp8_tiles(w: torch.Tensor, block: tuple[int, int], scheme: str) -> QuantizedTensor:
    """w `[N, K]` -> e4m3fn `[N, K]`, float32 scales `[ceil(N/bn), ceil(K/bk)]` = tile amax / 448."""
    w = as_float32_matrix(w)
    n, k = w.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(w.abs(), (0, kb * bk - k, 0, nb * bn - n))  # zeros never raise amax
    amax = padded.reshape(nb, bn, kb, bk).amax(dim=(1, 3))  # [nb, kb]
    scale = _scale(amax)
    q = cast_e4m3_saturating(w / tile_scale(scale, n, k, block))
    return QuantizedTensor(scheme=scheme, shape=(n, k), data=q, scales=scale, block_size=block)


def quantize_fp8_block128(w: torch.Tensor) -> QuantizedTensor:
    """w `[N, K]` -> e4m3fn `[N, K]`, float32 weight_scale_inv `[ceil(N/128), ceil(K/128)]`."""
    return quantize_fp8_tiles(w, (FP8_BLOCK, FP8_BLOCK), "fp8_block128")


def quantize_fp8_g128(w: torch.Tensor) -> QuantizedTensor:
    """w `[N, K]` -> e4m3fn `[N, K]`, float32 scales `[N, ceil(K/128)]`."""
    return quantize_fp8_tiles(w, (1, FP8_BLOCK), "fp8_g128")


def dequantize_fp8_tiles(qt: QuantizedTensor) -> torch.Tensor:
    """q * the scale of its tile (qt.block_size), float32 `[N, K]`, multiplied in float32 as transformers and
    llama.cpp's converter do."""
    n, k = qt.shape
    return qt.data.to(torch.float32) * tile_scale(qt.scales.to(torch.float32), n, k, qt.block_size)


# Schemes an FP8 checkpoint's tensors are read as (convert/fp8_source.py): a quantized input that quantize accepts.
SOURCE_SCHEMES = ("fp8_block128", "fp8_g128")


def keeps_source(held: str, wanted: str) -> bool:
    """Whether a tensor stored as `held` satisfies a recipe asking for `wanted` as it is: the same scheme, or
    fp8_g128 for fp8_block128 (the same source tiles, carried per row: re-tiling would re-quantize)."""
    return held == wanted or (held, wanted) == ("fp8_g128", "fp8_block128")
