"""Sparse MoE with int4_sym_g{32,64,128} experts (nextq / GGUF Q4_0 packing) dequantized inside the kernels.

Layout (quant/int4.py, stacked over experts): codes uint8 [E, N, K/2], byte j = k 2j (low nibble) | k 2j+1
(high nibble); fp16 scales d [E, N, K/g]; w = (q - 8) * d. The kernels live in moe_grouped.py
(`moe_forward` serves the nextq::moe_int4 op).
"""

from __future__ import annotations

import torch

from .moe_grouped import ExpertMatrix


def int4_experts(data: torch.Tensor, scales: torch.Tensor) -> ExpertMatrix:
    """Stacked int4_sym codes uint8 [E, N, K/2] + fp16 scales [E, N, K/g] -> ExpertMatrix (g inferred)."""
    if data.dtype != torch.uint8 or data.dim() != 3 or scales.dim() != 3:
        raise ValueError(f"int4 experts: expected uint8 [E, N, K/2] codes and [E, N, K/g] scales, got "
                         f"{data.dtype} {tuple(data.shape)} and {tuple(scales.shape)}")
    e, n, half = data.shape
    k = 2 * half
    if k % scales.shape[2]:
        raise ValueError(f"int4 experts: K={k} is not a multiple of the {scales.shape[2]} scale groups")
    return ExpertMatrix("int4", data.contiguous(), scales.contiguous(), (1, k // scales.shape[2]), (e, n, k))

