"""Rotary position embedding parameters: the one place that turns a ModelConfig into inverse frequencies and the
attention factor. The torch runtime, the GPU runtime and the ONNX exporter all call `rope_parameters`.

    inv_freq, attention_factor = rope_parameters(config)     # fp32 [rot / 2], float
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor, dtype)   # [T, rot] each

Math of transformers 5 (`modeling_rope_utils`): plain RoPE `inv_freq_i = 1 / theta^(2i / rot)`; YaRN
(`_compute_yarn_parameters`) blends, per frequency, the plain inverse frequency (high frequencies, extrapolated)
with the one divided by `factor` (low frequencies, interpolated) along a linear ramp between the correction dims
of beta_fast and beta_slow over the original context, and scales cos and sin by the attention factor
(`Qwen3NextRotaryEmbedding.forward`: cos * attention_scaling, then cast to the model dtype). Only the first `rot`
dims rotate; the pass-through dims are not scaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nextq.graph import ModelConfig, RopeScaling

YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # transformers' defaults (`or 32`, `or 1`: 0 means default too)


def plain_inv_freq(rot: int, theta: float) -> torch.Tensor:
    """fp32 [rot / 2]: 1 / theta^(2i / rot)."""
    return 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(s: RopeScaling) -> float:
    """The cos/sin multiplier: explicit attention_factor, else mscale / mscale_all_dim when both are set, else
    yarn_mscale(factor)."""
    if s.attention_factor is not None:
        return float(s.attention_factor)
    if s.mscale and s.mscale_all_dim:
        return float(yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim))
    return yarn_mscale(s.factor)


def yarn_correction_range(s: RopeScaling, rot: int, theta: float) -> tuple[float, float]:
    """(low, high) frequency indices of the ramp: dims of beta_fast / beta_slow rotations over the original
    context, floor / ceil unless `truncate` is false, clamped to [0, rot - 1]."""
    def dim_of(rotations: float) -> float:
        return rot * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast or YARN_BETA_FAST), dim_of(s.beta_slow or YARN_BETA_SLOW)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rot - 1)


def yarn_inv_freq(c: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies fp32 [rot / 2] and attention factor, with transformers' expression order."""
    s, rot, theta = c.rope_scaling, c.rotary_dim, c.rope_theta
    low, high = yarn_correction_range(s, rot, theta)
    if low == high:
        high += 0.001  # transformers: prevent a zero-width ramp
    ramp = torch.clamp((torch.arange(rot // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # [rot / 2]
    pos_freqs = theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    extrapolation = 1 - ramp  # 1: plain RoPE (high frequencies), 0: interpolated by factor
    inv_freq = 1.0 / (s.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, yarn_attention_factor(s)


def _plain(c: ModelConfig) -> tuple[torch.Tensor, float]:
    return plain_inv_freq(c.rotary_dim, c.rope_theta), 1.0


ROPE_TYPES: dict[str, Callable[[ModelConfig], tuple[torch.Tensor, float]]] = {"default": _plain, "yarn": yarn_inv_freq}


def rope_parameters(c: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 [rot / 2] on the CPU, attention factor) of a config's rotary embedding."""
    return ROPE_TYPES[c.rope_scaling.rope_type if c.rope_scaling is not None else "default"](c)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rot] for positions [T]: angles in fp32, scaled by the attention factor, then cast to `dtype`
    (transformers' order of rounding)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)  # [T, rot/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def describe_rope(c: ModelConfig) -> str:
    """One line for `nextq inspect`: the rotary setting and, with YaRN, its effective parameters."""
    plain = f"theta {c.rope_theta:g}, {c.rotary_dim} of {c.head_dim} dims rotated"
    s = c.rope_scaling
    if s is None:
        return f"rope: plain, {plain}"
    return (f"rope: {s.rope_type} factor {s.factor:g} over original {s.original_max_position_embeddings} "
            f"(context {int(s.factor * s.original_max_position_embeddings)}), attention factor "
            f"{yarn_attention_factor(s):.7g}, beta_fast {s.beta_fast or YARN_BETA_FAST:g} / beta_slow "
            f"{s.beta_slow or YARN_BETA_SLOW:g}{'' if s.truncate else ', untruncated'}, {plain}")
