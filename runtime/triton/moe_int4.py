"""Sparse MoE with int4_sym_g{32,64,128} experts (nextq / GGUF Q4_0 packing) dequantized inside the kernels.

Layout (quant/int4.py, stacked over experts): codes uint8 [E, N, K/2], byte j = k 2j (low nibble) | k 2j+1
(high nibble); fp16 scales d [E, N, K/g]; w = (q - 8) * d. The kernels live in moe_grouped.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe_grouped import ExpertMatrix, experts_forward


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


def moe_int4(x, router, gate_q, gate_s, up_q, up_s, down_q, down_s, shared_gate, shared_up, shared_down,
             shared_gate_w, top_k: int, normalize: bool) -> torch.Tensor:
    """CUDA kernel of nextq::moe_int4 (see runtime/cuda_ops.py for the signature and the CPU reference)."""
    from nextq.runtime.ops import route, swiglu

    w, ids = route(F.linear(x, router), top_k, normalize)
    y = experts_forward(x.contiguous(), w, ids, int4_experts(gate_q, gate_s), int4_experts(up_q, up_s),
                        int4_experts(down_q, down_s))
    return y + torch.sigmoid(F.linear(x, shared_gate_w)) * swiglu(x, shared_gate, shared_up, shared_down)
