"""int8 weights: per output channel (`int8_channel`) and ggml Q8_0 groups of 32 (`int8_g32`).

References:
    ggml/src/ggml-quants.c quantize_row_q8_0_ref: d = amax / 127, id = d ? 1/d : 0,
        q = roundf(x * id) (x times the reciprocal, not x / d; roundf = half away from zero), d stored fp16;
        dequantize_row_q8_0: q * d.
    int8_channel matches ONNX Runtime MatMulNBits bits=8 / QMoE int8 per-row scales (symmetric, no zero point).
"""

from __future__ import annotations

import numpy as np
import torch

from .tensor import QuantizedTensor, as_float32_matrix, check_group, fp16_bytes, require_scheme

Q8_0_BLOCK = 32  # QK8_0


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf (ties away from zero) of float32 `x` with |x| < 2^14, as int16: trunc(2x) - trunc(x), exact (2x is,
    and each cast truncates; floor(|x| + 0.5) is not: 0.49999997 + 0.5 rounds up to 1.0). Same values as gguf-py's
    np_roundf."""
    return (x * 2).to(torch.int16) - x.to(torch.int16)


def quantize_int8_channel(w: torch.Tensor) -> QuantizedTensor:
    """Symmetric per-row int8. w `[N, K]` -> int8 `[N, K]`, float32 scale `[N, 1]` = amax/127 (1 for all-zero rows).

    Rounds with torch.round (half to even, unlike Q8_0's roundf); codes stay in -127..127.
    """
    w = as_float32_matrix(w)
    amax = w.abs().amax(dim=1, keepdim=True)  # [N, 1]
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return QuantizedTensor(scheme="int8_channel", shape=tuple(w.shape), data=q, scales=scale)


def dequantize_int8_channel(qt: QuantizedTensor) -> torch.Tensor:
    """q * scale, float32 `[N, K]`."""
    return qt.data.to(torch.float32) * qt.scales


def quantize_q8_0(w: torch.Tensor) -> QuantizedTensor:
    """ggml Q8_0 math per group of 32 along K. w `[N, K]` -> int8 `[N, K]`, fp16 d `[N, K/32]`."""
    w = as_float32_matrix(w)
    n, k = w.shape
    check_group(k, Q8_0_BLOCK, "int8_g32")
    blocks = w.reshape(n, k // Q8_0_BLOCK, Q8_0_BLOCK)  # [N, nb, 32]
    amax = torch.maximum(blocks.amax(dim=-1, keepdim=True), -blocks.amin(dim=-1, keepdim=True)).abs_()  # +0.0, not -0.0
    d = amax / 127.0  # [N, nb, 1]
    inv_d = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = round_half_away(blocks * inv_d).to(torch.int8)  # |x * id| <= 127 up to 1 ulp, rounds to 127 at most
    return QuantizedTensor(
        scheme="int8_g32",
        shape=(n, k),
        data=q.reshape(n, k),
        scales=d.squeeze(-1).to(torch.float16),
        block_size=Q8_0_BLOCK,
    )


def dequantize_q8_0(qt: QuantizedTensor) -> torch.Tensor:
    """q * fp16 d, float32 `[N, K]` (ggml dequantize_row_q8_0)."""
    n, k = qt.shape
    q = qt.data.reshape(n, -1, Q8_0_BLOCK).to(torch.float32)  # [N, nb, 32]
    return (q * qt.scales.to(torch.float32).unsqueeze(-1)).reshape(n, k)


def to_gguf_q8_0_blocks(qt: QuantizedTensor) -> np.ndarray:
    """int8_g32 -> ggml block_q8_0 rows, uint8 `[N, K/32*34]` (fp16 d, 32 int8)."""
    require_scheme(qt, "int8_g32", "to_gguf_q8_0_blocks")
    n, k = qt.shape
    qs = qt.data.contiguous().view(torch.uint8).reshape(n, k // Q8_0_BLOCK, Q8_0_BLOCK)  # [N, nb, 32]
    return torch.cat((fp16_bytes(qt.scales), qs), dim=-1).reshape(n, -1).numpy()  # [N, nb*34]
