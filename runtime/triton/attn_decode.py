"""Gated attention over the KV cache for a few new tokens (decode, speculative verify) in one launch.

One program per (sequence, token, query head) streams its KV head's cache rows 0 .. positions[t] (GQA: query head
h reads KV head h // (Hq / Hkv)) with an online softmax in fp32 and writes o * sigmoid(gate) straight into the
[B, T, Hq * D] layout the output projection reads. Math of runtime/model.py's attention (scores scaled by D^-0.5,
key j visible to the token at position p iff j <= p), with fp32 scores and probabilities where the eager path
rounds both to the compute dtype. It replaces about a dozen small launches (two batched products, the mask, the
softmax, casts, the transpose and the gate); each program reads its KV rows once, so it is meant for short spans
(ATTN_FUSED_MAX_SPAN in runtime/gpu.py), where launches, not bytes, cost the time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_S = 32  # cache rows per step


@triton.jit
def _attn_decode_kernel(q, sq_b, sq_h, sq_t, kc, vc, sc_b, sc_h, sc_s, positions, gate, sg_b, sg_t, o, so_b, so_t,
                        span, T, GROUP, D, scale, BS: tl.constexpr, BD: tl.constexpr):
    i_bt, h = tl.program_id(0), tl.program_id(1)
    b, t = (i_bt // T).to(tl.int64), i_bt % T
    hk = h // GROUP
    last = tl.minimum(tl.load(positions + t).to(tl.int32), span - 1)  # the last visible cache row
    rd = tl.arange(0, BD)
    md = rd < D
    qv = tl.load(q + b * sq_b + h * sq_h + t * sq_t + rd, mask=md, other=0.0).to(tl.float32) * scale
    kb, vb = kc + b * sc_b + hk * sc_h, vc + b * sc_b + hk * sc_h
    m_i = tl.full([1], float("-inf"), tl.float32)  # running max and sum of the online softmax
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros((BD,), tl.float32)
    for s0 in range(0, last + 1, BS):
        rs = s0 + tl.arange(0, BS)
        ms = rs <= last
        m2 = ms[:, None] & md[None, :]
        kt = tl.load(kb + rs[:, None] * sc_s + rd[None, :], mask=m2, other=0.0).to(tl.float32)
        s = tl.where(ms, tl.sum(kt * qv[None, :], 1), float("-inf"))  # [BS]
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        vt = tl.load(vb + rs[:, None] * sc_s + rd[None, :], mask=m2, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vt, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    g = tl.load(gate + b * sg_b + t * sg_t + h * D + rd, mask=md, other=0.0).to(tl.float32)
    out = acc / l_i * tl.sigmoid(g)
    tl.store(o + b * so_b + t * so_t + h * D + rd, out.to(o.dtype.element_ty), mask=md)


def attn_decode_into(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     span: int, gate: torch.Tensor, out: torch.Tensor) -> None:
    """q [B, Hq, T, D] (qk_rope's layout), caches [B, Hkv, S, D] (one layout, unit last stride), positions int [T]
    on the device (token t sees cache rows 0 .. positions[t], at most span - 1), gate [B, T, Hq * D] (a view of the
    projection: unit last stride) -> out [B, T, Hq * D] = attention * sigmoid(gate), in out's dtype."""
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    if q.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("attn_decode: q and the caches need unit last strides and the caches one layout")
    if gate.stride(-1) != 1 or out.stride(-1) != 1 or gate.shape != out.shape or out.shape != (b, t, hq * d):
        raise ValueError(f"attn_decode: gate and out must be [{b}, {t}, {hq * d}] with unit last strides, got "
                         f"{tuple(gate.shape)} and {tuple(out.shape)}")
    if hq % hkv:
        raise ValueError(f"attn_decode: {hq} query heads do not group over {hkv} KV heads")
    _attn_decode_kernel[(b * t, hq)](
        q, q.stride(0), q.stride(1), q.stride(2), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), positions, gate, gate.stride(0), gate.stride(1), out, out.stride(0), out.stride(1),
        span, t, hq // hkv, d, d ** -0.5, BS=BLOCK_S, BD=triton.next_power_of_2(d), num_warps=4)
