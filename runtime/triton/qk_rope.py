"""Gated attention's per-head prologue in one launch: q/k RMSNorm, split-half RoPE, and the KV-cache write.

One program per (token, head row) of the fused projection [B, T, q | gate | k | v]:
    q heads   q_hat = rms_norm(q) (offset + w_q), rotated -> q_out [B, Hq, T, D]
    k heads   same with w_k                                 -> k_cache[b, h, positions[t]]
    v heads   copied                                        -> v_cache[b, h, positions[t]]
Math of runtime/model.py (`rms_norm`, then `rope` on the first `rot` dims: x_i cos - x_{i+rot/2} sin for
i < rot/2, x_i cos + x_{i-rot/2} sin below rot, angle positions[t] * inv_freq[i mod rot/2], cos and sin times
the attention factor; inv_freq and the factor from runtime/rope.py, plain or YaRN); statistics and the rotation in
fp32, one rounding to the cache dtype (the eager path rounds after the norm and after each product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_row(xp, wp, offset, eps, pos, inv_freq, attn, D, ROT: tl.constexpr, BD: tl.constexpr):
    rd = tl.arange(0, BD)
    md = rd < D
    x = tl.load(xp + rd, mask=md, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / D + eps)
    y = x * rstd * (offset + tl.load(wp + rd, mask=md, other=0.0).to(tl.float32))
    half: tl.constexpr = ROT // 2
    mr = rd < ROT
    pd = tl.where(rd < half, rd + half, rd - half)  # the rotation partner of each rotary dim
    yp = tl.load(xp + pd, mask=mr, other=0.0).to(tl.float32) * rstd * (
        offset + tl.load(wp + pd, mask=mr, other=0.0).to(tl.float32))
    ang = pos.to(tl.float32) * tl.load(inv_freq + rd % half, mask=mr, other=0.0)
    cos, sin = tl.cos(ang) * attn, tl.sin(ang) * attn
    rot = tl.where(rd < half, y * cos - yp * sin, y * cos + yp * sin)
    return tl.where(mr, rot, y)


@triton.jit
def _qk_rope_kernel(proj, sp_b, sp_t, positions, inv_freq, attn, wq, wk, q_out, sq_b, sq_h, sq_t,
                    kc, vc, sc_b, sc_h, sc_t, T, HQ, HKV, D, K_OFF, V_OFF, q_offset, k_offset, eps,
                    ROT: tl.constexpr, BD: tl.constexpr):
    i_bt, h = tl.program_id(0), tl.program_id(1)
    b, t = (i_bt // T).to(tl.int64), i_bt % T
    pos = tl.load(positions + t).to(tl.int64)
    row = proj + b * sp_b + t * sp_t
    rd = tl.arange(0, BD)
    md = rd < D
    if h < HQ:
        y = _norm_rope_row(row + h * D, wq, q_offset, eps, pos, inv_freq, attn, D, ROT, BD)
        tl.store(q_out + b * sq_b + h * sq_h + t * sq_t + rd, y.to(q_out.dtype.element_ty), mask=md)
    elif h < HQ + HKV:
        hk = h - HQ
        y = _norm_rope_row(row + K_OFF + hk * D, wk, k_offset, eps, pos, inv_freq, attn, D, ROT, BD)
        tl.store(kc + b * sc_b + hk * sc_h + pos * sc_t + rd, y.to(kc.dtype.element_ty), mask=md)
    else:
        hv = h - HQ - HKV
        tl.store(vc + b * sc_b + hv * sc_h + pos * sc_t + rd, tl.load(row + V_OFF + hv * D + rd, mask=md), mask=md)


def qk_norm_rope_into(proj: torch.Tensor, heads: tuple[int, int, int], offsets: tuple[int, int],
                      positions: torch.Tensor, rope: tuple[torch.Tensor, float], q_norm: torch.Tensor,
                      k_norm: torch.Tensor, norm_offsets: tuple[float, float], eps: float, q_out: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """proj [B, T, W] (last dim contiguous) holds q at column 0 and k, v at `offsets` (Hq, Hkv, D = `heads`);
    positions int [T] (device); rope = (inv_freq fp32 [rot / 2] on the device, attention factor), as
    runtime/rope.py `rope_parameters` gives them; q_norm, k_norm [D]; writes q_out [B, Hq, T, D] and the caches
    [B, Hkv, S, D] at `positions` (all three with unit last stride, caches with one layout)."""
    b, t, _ = proj.shape
    hq, hkv, d = heads
    if proj.stride(-1) != 1 or q_out.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("qk_norm_rope: proj and q_out need unit last strides and the caches one layout")
    inv_freq, attention_factor = rope
    rot = 2 * inv_freq.numel()
    _qk_rope_kernel[(b * t, hq + 2 * hkv)](
        proj, proj.stride(0), proj.stride(1), positions, inv_freq, float(attention_factor), q_norm, k_norm, q_out,
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        t, hq, hkv, d, offsets[0], offsets[1], float(norm_offsets[0]), float(norm_offsets[1]), float(eps),
        ROT=rot, BD=triton.next_power_of_2(d), num_warps=1 if d <= 128 else 2)
