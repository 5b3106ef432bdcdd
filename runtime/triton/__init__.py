"""Triton kernels of nextq's GPU runtime, one file per kernel (see runtime/cuda_ops.py for the op registrations).

Each module exposes a plain Python launcher with the same arguments and shapes as the CPU reference in
runtime/ops.py, plus lower-level entry points with explicit output buffers for the CUDA-graph executor
(runtime/gpu.py). Importing this package needs `triton`; it is imported lazily by runtime/cuda_ops.py.
"""

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for a model computed in `dtype`: 3xTF32 (about fp32) for fp32, tf32 otherwise (error ~1e-3
    relative, far inside the bf16 budget)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"
