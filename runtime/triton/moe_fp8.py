"""Sparse MoE with fp8 (float8_e4m3fn) experts dequantized inside the kernels; also any float expert dtype.

Layout (quant/fp8.py, stacked over experts): codes [E, N, K]; fp32 scales either per channel [E, N, 1]
(fp8_channel) or per 128x128 tile [E, ceil(N/128), ceil(K/128)] (fp8_block128, Qwen's `weight_scale_inv`);
w = q * s. The kernels live in moe_grouped.py.
"""

from __future__ import annotations

import torch

from .moe_grouped import ExpertMatrix

FP8_BLOCK = 128


def scale_block(n: int, k: int, scale_shape: tuple[int, int]) -> tuple[int, int]:
    """(bn, bk) of a scale grid [sN, sK] over [N, K]: per channel [N, 1] -> (1, K); tiles -> (128, 128)."""
    sn, sk = scale_shape
    bn = 1 if sn == n else FP8_BLOCK
    bk = k if sk == 1 else FP8_BLOCK
    if (sn, sk) != (-(-n // bn), -(-k // bk)):
        raise ValueError(f"fp8 experts: scales {list(scale_shape)} fit neither per-channel [{n}, 1] nor "
                         f"128x128 tiles [{-(-n // 128)}, {-(-k // 128)}] of [{n}, {k}]")
    return bn, bk


def float_experts(data: torch.Tensor, scales: torch.Tensor | None = None) -> ExpertMatrix:
    """Stacked float codes [E, N, K] (fp8 / bf16 / ...) + fp32 scales [E, sN, sK] (None: unscaled)."""
    if data.dim() != 3 or not data.is_floating_point():
        raise ValueError(f"fp8 experts: expected float codes [E, N, K], got {data.dtype} {tuple(data.shape)}")
    e, n, k = data.shape
    if scales is None:
        return ExpertMatrix("float", data.contiguous(), torch.ones(e, 1, 1, device=data.device), (n, k), (e, n, k))
    if scales.dim() != 3:
        raise ValueError(f"fp8 experts: scales expected [E, sN, sK], got {tuple(scales.shape)}")
    block = scale_block(n, k, tuple(scales.shape[1:]))
    return ExpertMatrix("float", data.contiguous(), scales.float().contiguous(), block, (e, n, k))

