"""Fused recurrent gated delta rule (decode): one program per (batch, value head, block of Dv) keeps its slice
of the state S [Dk, BV] in registers for all T tokens, so the state is read and written once per call.

Math per token (runtime/ops.py `gated_delta_rule_recurrent`, FLA `fused_recurrent_gated_delta_rule`):
q, k l2-normalised (eps 1e-6), q scaled by Dk^-0.5; S = exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q.
With `gates=(A_log, dt_bias)` the kernel also takes the raw projections: g = -exp(A_log) softplus(a + dt_bias),
beta = sigmoid(b) (the Gated DeltaNet gates of runtime/model.py), saving a decode step its gate launches.
With `steps` (speculative verify) the state after each token t is stored to its own slot state_out[t], so the
T tokens of a verify step are one launch that reads the kept state once and never writes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T"])
def _gdr_recurrent_kernel(
    q, k, v, g, beta, s_in, o, s_out, T, s_step,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sg_b, sg_t, sb_b, sb_t, so_b, so_t, so_h,
    a_log, dt_bias, scale, HV, GROUP, DK, DV,
    BK: tl.constexpr, BV: tl.constexpr, RAW: tl.constexpr, STEPS: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // HV, i_bh % HV
    hk = h // GROUP  # value head h reads key head h // (Hv / Hk)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < DK, rv < DV
    s_off = i_bh.to(tl.int64) * DK * DV + rk[:, None] * DV + rv[None, :]
    m2 = mk[:, None] & mv[None, :]
    S = tl.load(s_in + s_off, mask=m2, other=0.0).to(tl.float32)  # [BK, BV]
    for t in range(T):
        qt = tl.load(q + b * sq_b + t * sq_t + hk * sq_h + rk, mask=mk, other=0.0).to(tl.float32)
        kt = tl.load(k + b * sk_b + t * sk_t + hk * sk_h + rk, mask=mk, other=0.0).to(tl.float32)
        vt = tl.load(v + b * sv_b + t * sv_t + h * sv_h + rv, mask=mv, other=0.0).to(tl.float32)
        gt = tl.load(g + b * sg_b + t * sg_t + h).to(tl.float32)
        bt = tl.load(beta + b * sb_b + t * sb_t + h).to(tl.float32)
        if RAW:  # torch's softplus: x above 20 passes through; exp(x) below -15 (log(1 + e^x) rounds to 0 there)
            xa = gt + tl.load(dt_bias + h).to(tl.float32)
            sp = tl.where(xa > 20.0, xa, tl.where(xa < -15.0, tl.exp(xa), tl.log(1.0 + tl.exp(xa))))
            gt = -tl.exp(tl.load(a_log + h).to(tl.float32)) * sp
            bt = tl.sigmoid(bt)
        qt = qt * tl.rsqrt(tl.sum(qt * qt, 0) + 1e-6) * scale
        kt = kt * tl.rsqrt(tl.sum(kt * kt, 0) + 1e-6)
        S = S * tl.exp(gt)
        delta = (vt - tl.sum(S * kt[:, None], 0)) * bt  # beta (v - S^T k), [BV]
        S = S + kt[:, None] * delta[None, :]
        ot = tl.sum(S * qt[:, None], 0)
        tl.store(o + b * so_b + t * so_t + h * so_h + rv, ot.to(o.dtype.element_ty), mask=mv)
        if STEPS:
            tl.store(s_out + t * s_step + s_off, S, mask=m2)
    if not STEPS:
        tl.store(s_out + s_off, S, mask=m2)


def _block(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


def gdr_recurrent_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor, out: torch.Tensor, state_out: torch.Tensor,
                       gates: tuple[torch.Tensor, torch.Tensor] | None = None, steps: bool = False) -> None:
    """Launch into given buffers. q, k: [B, T, Hk, Dk]; v, out: [B, T, Hv, Dv]; g, beta: [B, T, Hv];
    state, state_out: contiguous fp32 [B, Hv, Dk, Dv] (may be the same tensor: each program reads its own
    slice before writing it). Last dims must be contiguous; other strides are free (views of a projection).
    gates = (A_log, dt_bias) fp32 [Hv]: g and beta are the raw projections a and b (see the module docstring).
    steps: state_out is [>= T, B, Hv, Dk, Dv] (each slot contiguous, not overlapping `state`), slot t gets the
    state after token t."""
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        if x.stride(-1) != 1:
            raise ValueError(f"gdr_recurrent: {name} needs a contiguous last dim, got strides {x.stride()}")
    slot = state_out[0] if steps else state_out
    if g.stride(-1) != 1 or beta.stride(-1) != 1 or not state.is_contiguous() or not slot.is_contiguous():
        raise ValueError("gdr_recurrent: g, beta need a contiguous last dim and the states must be contiguous")
    if steps and (state_out.shape[0] < t or state_out.shape[1:] != state.shape):
        raise ValueError(f"gdr_recurrent: steps need state_out [>= {t}, {', '.join(map(str, state.shape))}], got "
                         f"{tuple(state_out.shape)}")
    bk = _block(dk)
    bv = min(_block(dv), 16)
    grid = (triton.cdiv(dv, bv), b * hv)
    _gdr_recurrent_kernel[grid](
        q, k, v, g, beta, state, out, state_out, t, state_out.stride(0) if steps else 0,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), out.stride(0), out.stride(1),
        out.stride(2), *(gates if gates is not None else (g, g)), dk ** -0.5, hv, hv // hk, dk, dv,
        BK=bk, BV=bv, RAW=gates is not None, STEPS=steps, num_warps=2 if bk * bv <= 2048 else 4,
    )


def gated_delta_rule_recurrent(q, k, v, g, beta, state):
    """Same signature and result as runtime/ops.py `gated_delta_rule_recurrent`: o [B, T, Hv, Dv] in v's dtype,
    final state fp32 [B, Hv, Dk, Dv]."""
    out = torch.empty_like(v)
    s_out = torch.empty(state.shape, dtype=torch.float32, device=state.device)
    gdr_recurrent_into(q, k, v, g.contiguous(), beta.contiguous(), state.float().contiguous(), out, s_out)
    return out, s_out
