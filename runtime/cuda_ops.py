"""CUDA kernels (Triton) of nextq's custom ops, and the quantized-MoE ops with their CPU references.

    nextq::gated_delta_rule  T == 1: fused recurrent step (triton/gdr_recurrent.py); else chunked (triton/gdr_chunk.py)
    nextq::causal_conv1d     triton/conv_update.py
    nextq::moe               triton/moe_grouped.py `moe_forward` (GpuModel's MoE layer) on unscaled float experts
    nextq::moe_int4          the same on int4_sym experts, dequantized in-kernel (triton/moe_int4.py) -- defined here
    nextq::moe_fp8           the same on fp8 / float experts with scales (triton/moe_fp8.py)         -- defined here

Importing this module defines the two new ops (CPU reference = dequantize + runtime/ops.py `moe`) and, when CUDA
and Triton are present, registers the Triton kernels for the "cuda" device (`CUDA_KERNELS` says whether it did).
Same signatures and results as the references; tests/test_gpu.py compares them.
"""

from __future__ import annotations

import torch

from nextq.quant.int4 import unpack_int4

from . import ops


def dequantize_int4_experts(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """uint8 [E, N, K/2] (low nibble = even k) + fp16 d [E, N, K/g] -> float32 [E, N, K] = (q - 8) d."""
    e, n, half = data.shape
    q = unpack_int4(data.reshape(e * n, half)).reshape(e, n, scales.shape[2], -1).float()
    return ((q - 8.0) * scales.float().unsqueeze(-1)).reshape(e, n, 2 * half)


def dequantize_fp8_experts(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float codes [E, N, K] + fp32 scales [E, N, 1] (per channel) or [E, ceil(N/128), ceil(K/128)] -> float32."""
    _, n, k = data.shape
    sn, sk = scales.shape[1:]
    bn, bk = (1, k) if (sn == n and sk == 1) else (128, 128)
    full = scales.float().repeat_interleave(bn, 1)[:, :n].repeat_interleave(bk, 2)[:, :, :k]
    return data.float() * full


@torch.library.custom_op("nextq::moe_int4", mutates_args=())
def moe_int4(
    x: torch.Tensor, router: torch.Tensor, gate_q: torch.Tensor, gate_s: torch.Tensor, up_q: torch.Tensor,
    up_s: torch.Tensor, down_q: torch.Tensor, down_s: torch.Tensor, shared_gate: torch.Tensor,
    shared_up: torch.Tensor, shared_down: torch.Tensor, shared_gate_w: torch.Tensor, top_k: int, normalize: bool,
) -> torch.Tensor:
    """Sparse MoE with int4_sym experts. x [N, H]; router [E, H]; gate_q, up_q uint8 [E, I, H/2] with fp16 scales
    [E, I, H/g]; down_q uint8 [E, H, I/2] with [E, H, I/g]; shared_* as nextq::moe. Returns [N, H] in x's dtype.
    CPU reference: dequantize (quant/int4.py math) and run runtime/ops.py `moe`."""
    deq = [dequantize_int4_experts(q, s).to(x.dtype) for q, s in ((gate_q, gate_s), (up_q, up_s), (down_q, down_s))]
    return ops.moe(x, router, *deq, shared_gate, shared_up, shared_down, shared_gate_w, top_k, normalize)


@moe_int4.register_fake
def _(x, router, gate_q, gate_s, up_q, up_s, down_q, down_s, shared_gate, shared_up, shared_down, shared_gate_w,
      top_k, normalize):
    return torch.empty_like(x)


@torch.library.custom_op("nextq::moe_fp8", mutates_args=())
def moe_fp8(
    x: torch.Tensor, router: torch.Tensor, gate_q: torch.Tensor, gate_s: torch.Tensor, up_q: torch.Tensor,
    up_s: torch.Tensor, down_q: torch.Tensor, down_s: torch.Tensor, shared_gate: torch.Tensor,
    shared_up: torch.Tensor, shared_down: torch.Tensor, shared_gate_w: torch.Tensor, top_k: int, normalize: bool,
) -> torch.Tensor:
    """Sparse MoE with fp8 experts. gate_q, up_q float8_e4m3fn [E, I, H], down_q [E, H, I]; fp32 scales per channel
    [E, N, 1] or per 128x128 tile [E, ceil(N/128), ceil(K/128)] (quant/fp8.py). Otherwise as nextq::moe_int4."""
    deq = [dequantize_fp8_experts(q, s).to(x.dtype) for q, s in ((gate_q, gate_s), (up_q, up_s), (down_q, down_s))]
    return ops.moe(x, router, *deq, shared_gate, shared_up, shared_down, shared_gate_w, top_k, normalize)


@moe_fp8.register_fake
def _(x, router, gate_q, gate_s, up_q, up_s, down_q, down_s, shared_gate, shared_up, shared_down, shared_gate_w,
      top_k, normalize):
    return torch.empty_like(x)


def _gated_delta_rule_cuda(q, k, v, g, beta, state):
    from .triton import gdr_chunk, gdr_recurrent

    fn = gdr_recurrent.gated_delta_rule_recurrent if q.shape[1] == 1 else gdr_chunk.gated_delta_rule_chunked
    return fn(q, k, v, g, beta, state)


def _causal_conv1d_cuda(x, weight, state):
    from .triton import conv_update

    return conv_update.causal_conv1d(x, weight, state)


def _moe_cuda(x, router, gate, up, down, *shared_and_routing):
    from .triton.moe_fp8 import float_experts
    from .triton.moe_grouped import moe_forward

    return moe_forward(x, router, float_experts(gate), float_experts(up), float_experts(down), *shared_and_routing)


def _moe_int4_cuda(x, router, gate_q, gate_s, up_q, up_s, down_q, down_s, *shared_and_routing):
    from .triton.moe_grouped import moe_forward
    from .triton.moe_int4 import int4_experts

    return moe_forward(x, router, int4_experts(gate_q, gate_s), int4_experts(up_q, up_s),
                       int4_experts(down_q, down_s), *shared_and_routing)


def _moe_fp8_cuda(x, router, gate_q, gate_s, up_q, up_s, down_q, down_s, *shared_and_routing):
    from .triton.moe_fp8 import float_experts
    from .triton.moe_grouped import moe_forward

    return moe_forward(x, router, float_experts(gate_q, gate_s), float_experts(up_q, up_s),
                       float_experts(down_q, down_s), *shared_and_routing)


KERNELS = {
    "nextq::gated_delta_rule": _gated_delta_rule_cuda,
    "nextq::causal_conv1d": _causal_conv1d_cuda,
    "nextq::moe": _moe_cuda,
    "nextq::moe_int4": _moe_int4_cuda,
    "nextq::moe_fp8": _moe_fp8_cuda,
}


def register_cuda_kernels() -> bool:
    """Register every entry of KERNELS for the "cuda" device; False (nothing registered) without CUDA or Triton."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError:
        return False
    for name, fn in KERNELS.items():
        torch.library.register_kernel(name, "cuda", fn)
    return True


CUDA_KERNELS = register_cuda_kernels()
