"""Chunked gated delta rule (prefill), two kernels (the algorithm of runtime/ops.py `gated_delta_rule_chunked`):

1. `_chunk_prep_kernel`, parallel over (chunk, batch x value head): l2-normalise q, k; in-chunk cumulative log
   decay G; L = strict_lower(diag(beta) K K^T * Gamma) with Gamma[i, j] = exp(G_i - G_j); (I + L)^-1 as the
   product (I - L)(I + L^2)(I + L^4)... (exact: L is nilpotent); w = (I + L)^-1 diag(beta exp G) K, u = (I + L)^-1 diag(beta) V; the causal
   in-chunk scores A = (Q K^T) * Gamma (diagonal included); q exp(G) and k exp(G_last - G).
2. `_chunk_state_kernel`, parallel over (batch x value head, block of Dv), sequential over chunks: the state
   S [Dk, BV] stays in registers; per chunk u' = u - w S, o = q exp(G) S + A u', S = exp(G_last) S + (k exp(G_last - G))^T u'.
Intermediates are fp32 (w, u, q exp(G), k exp(..) [B, Hv, Tp, D]; A [B, Hv, Tp, C]). Matrix products use
`dot_precision` of v's dtype: tf32 for bf16 models, 3xTF32 (about fp32) for fp32 ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dot_precision

CHUNK = 64
PREP_WARPS = 8  # kernel 1 holds q, k, v, w, u tiles of 64 x 128 fp32: 8 warps keep them in registers
STATE_BV = 32  # kernel 2: Dv columns per program


@triton.jit(do_not_specialize=["T"])
def _chunk_prep_kernel(
    q, k, v, g, beta, w_out, u_out, qg_out, kd_out, a_out, gl_out, T,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sg_b, sg_t, sb_b, sb_t,
    scale, HV, GROUP, DK, DV, NC,
    BK: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr, LOG2C: tl.constexpr, PREC: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // HV, i_bh % HV
    hk = h // GROUP
    rt = i_c * C + tl.arange(0, C)
    mt = rt < T
    rk, rv = tl.arange(0, BK), tl.arange(0, BDV)
    mk, mv = rk < DK, rv < DV
    qb = tl.load(q + b * sq_b + rt[:, None] * sq_t + hk * sq_h + rk[None, :], mask=mt[:, None] & mk[None, :],
                 other=0.0).to(tl.float32)
    kb = tl.load(k + b * sk_b + rt[:, None] * sk_t + hk * sk_h + rk[None, :], mask=mt[:, None] & mk[None, :],
                 other=0.0).to(tl.float32)
    vb = tl.load(v + b * sv_b + rt[:, None] * sv_t + h * sv_h + rv[None, :], mask=mt[:, None] & mv[None, :],
                 other=0.0).to(tl.float32)
    gv = tl.load(g + b * sg_b + rt * sg_t + h, mask=mt, other=0.0).to(tl.float32)  # padding: no decay
    bv = tl.load(beta + b * sb_b + rt * sb_t + h, mask=mt, other=0.0).to(tl.float32)  # padding: no update
    qb = qb * (tl.rsqrt(tl.sum(qb * qb, 1) + 1e-6) * scale)[:, None]
    kb = kb * tl.rsqrt(tl.sum(kb * kb, 1) + 1e-6)[:, None]
    gc = tl.cumsum(gv, 0)  # [C]
    ri = tl.arange(0, C)
    lower_eq = ri[:, None] >= ri[None, :]
    gamma = tl.exp(tl.where(lower_eq, gc[:, None] - gc[None, :], 0.0))  # masked before exp: no overflow
    kk = tl.dot(kb * bv[:, None], tl.trans(kb), input_precision=PREC)
    L = tl.where(ri[:, None] > ri[None, :], kk * gamma, 0.0)  # strictly lower
    # (I + L)^-1 = sum_{n < C} (-L)^n = (I - L)(I + L^2)(I + L^4)...(I + L^(C/2)) as L is nilpotent (L^C = 0):
    # log2(C) - 1 squarings and products on the tensor cores instead of C sequential row updates
    Tinv = tl.where(ri[:, None] == ri[None, :], 1.0, 0.0) - L
    P = L
    for _ in tl.static_range(LOG2C - 1):
        P = tl.dot(P, P, input_precision=PREC)
        Tinv = Tinv + tl.dot(Tinv, P, input_precision=PREC)
    eg = tl.exp(gc)
    w = tl.dot(Tinv, kb * (bv * eg)[:, None], input_precision=PREC)  # [C, BK]
    u = tl.dot(Tinv, vb * bv[:, None], input_precision=PREC)  # [C, BDV]
    A = tl.where(lower_eq, tl.dot(qb, tl.trans(kb), input_precision=PREC) * gamma, 0.0)  # [C, C]
    glast = tl.sum(tl.where(ri == C - 1, gc, 0.0), 0)
    row0 = i_bh.to(tl.int64) * NC * C + i_c * C  # row of this chunk in the [B*Hv, Tp, .] intermediates
    offs_k = (row0 + ri)[:, None] * DK + rk[None, :]
    tl.store(w_out + offs_k, w, mask=mk[None, :])
    tl.store(qg_out + offs_k, qb * eg[:, None], mask=mk[None, :])
    tl.store(kd_out + offs_k, kb * tl.exp(glast - gc)[:, None], mask=mk[None, :])
    tl.store(u_out + (row0 + ri)[:, None] * DV + rv[None, :], u, mask=mv[None, :])
    tl.store(a_out + (row0 + ri)[:, None] * C + ri[None, :], A)
    tl.store(gl_out + i_bh.to(tl.int64) * NC + i_c, glast)


@triton.jit(do_not_specialize=["T", "NC"])
def _chunk_state_kernel(
    w_in, u_in, qg_in, kd_in, a_in, gl_in, s_in, o, s_out, T,
    so_b, so_t, so_h, HV, DK, DV, NC,
    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // HV, i_bh % HV
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    ri = tl.arange(0, C)
    mk, mv = rk < DK, rv < DV
    s_off = i_bh.to(tl.int64) * DK * DV + rk[:, None] * DV + rv[None, :]
    m2 = mk[:, None] & mv[None, :]
    S = tl.load(s_in + s_off, mask=m2, other=0.0)  # [BK, BV] fp32
    for c in range(NC):
        row0 = i_bh.to(tl.int64) * NC * C + c * C
        offs_k = (row0 + ri)[:, None] * DK + rk[None, :]
        wc = tl.load(w_in + offs_k, mask=mk[None, :], other=0.0)
        uc = tl.load(u_in + (row0 + ri)[:, None] * DV + rv[None, :], mask=mv[None, :], other=0.0)
        uc = uc - tl.dot(wc, S, input_precision=PREC)  # values minus what the state already predicts
        qg = tl.load(qg_in + offs_k, mask=mk[None, :], other=0.0)
        A = tl.load(a_in + (row0 + ri)[:, None] * C + ri[None, :])
        oc = tl.dot(qg, S, input_precision=PREC) + tl.dot(A, uc, input_precision=PREC)
        rt = c * C + ri
        tl.store(o + b * so_b + rt[:, None] * so_t + h * so_h + rv[None, :], oc.to(o.dtype.element_ty),
                 mask=(rt < T)[:, None] & mv[None, :])
        kd = tl.load(kd_in + offs_k, mask=mk[None, :], other=0.0)
        glast = tl.load(gl_in + i_bh.to(tl.int64) * NC + c)
        S = S * tl.exp(glast) + tl.dot(tl.trans(kd), uc, input_precision=PREC)
    tl.store(s_out + s_off, S, mask=m2)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dim >= 16


def gdr_chunk_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   state: torch.Tensor, out: torch.Tensor, state_out: torch.Tensor) -> None:
    """Launch into given buffers. q, k: [B, T, Hk, Dk]; v, out: [B, T, Hv, Dv]; g, beta: [B, T, Hv] (last dim
    contiguous); state, state_out: contiguous fp32 [B, Hv, Dk, Dv] (may be the same tensor)."""
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out), ("g", g), ("beta", beta)):
        if x.stride(-1) != 1:
            raise ValueError(f"gdr_chunk: {name} needs a contiguous last dim, got strides {x.stride()}")
    if not state.is_contiguous() or not state_out.is_contiguous():
        raise ValueError("gdr_chunk: the states must be contiguous fp32 [B, Hv, Dk, Dv]")
    precision = dot_precision(v.dtype)
    nc = triton.cdiv(t, CHUNK)
    rows = b * hv * nc * CHUNK
    f32 = dict(dtype=torch.float32, device=q.device)
    w, qg, kd = (torch.empty(rows, dk, **f32) for _ in range(3))
    u = torch.empty(rows, dv, **f32)
    a = torch.empty(rows, CHUNK, **f32)
    gl = torch.empty(b * hv * nc, **f32)
    bk, bdv = _block(dk), _block(dv)
    _chunk_prep_kernel[(nc, b * hv)](
        q, k, v, g, beta, w, u, qg, kd, a, gl, t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), dk ** -0.5, hv, hv // hk, dk, dv, nc,
        BK=bk, BDV=bdv, C=CHUNK, LOG2C=CHUNK.bit_length() - 1, PREC=precision, num_warps=PREP_WARPS, num_stages=1,
    )
    bv = min(bdv, STATE_BV)
    _chunk_state_kernel[(triton.cdiv(dv, bv), b * hv)](
        w, u, qg, kd, a, gl, state, out, state_out, t, out.stride(0), out.stride(1), out.stride(2), hv, dk, dv, nc,
        BK=bk, BV=bv, C=CHUNK, PREC=precision, num_warps=4, num_stages=1,
    )


def gated_delta_rule_chunked(q, k, v, g, beta, state):
    """Same signature and result as runtime/ops.py `gated_delta_rule_chunked`: o [B, T, Hv, Dv] in v's dtype,
    final state fp32 [B, Hv, Dk, Dv]."""
    out = torch.empty_like(v)
    s_out = torch.empty(state.shape, dtype=torch.float32, device=state.device)
    gdr_chunk_into(q, k, v, g.contiguous(), beta.contiguous(), state.float().contiguous(), out, s_out)
    return out, s_out
