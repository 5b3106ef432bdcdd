"""Causal depthwise conv1d + SiLU with carry state (prefill and decode), as runtime/ops.py `causal_conv1d`.

y[b, t, c] = silu(sum_j w[c, j] xs[b, c, t + j]) with xs = concat(state, x) over time (state = last K-1 inputs);
the new state is the last K-1 columns of xs. Accumulates in fp32; x may be a strided view of a projection.
With `steps` (speculative verify) the state after each token t, xs[t + 1 : t + K], goes to its own slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T"])
def _conv_kernel(
    x, w, s_in, y, s_out, T, C, s_step,
    sx_b, sx_t, sy_b, sy_t,
    KW: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr, STEPS: tl.constexpr,
):
    i_t, i_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rt = i_t * BT + tl.arange(0, BT)
    rc = i_c * BC + tl.arange(0, BC)
    mt, mc = rt < T, rc < C
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(KW):
        p = rt + j - (KW - 1)  # input time; < 0 reads the carried state
        in_x = p >= 0
        xv = tl.load(x + b * sx_b + p[:, None] * sx_t + rc[None, :], mask=(mt & in_x)[:, None] & mc[None, :],
                     other=0.0).to(tl.float32)
        sv = tl.load(s_in + (b * C + rc[None, :]) * (KW - 1) + (p + KW - 1)[:, None],
                     mask=(mt & ~in_x)[:, None] & mc[None, :], other=0.0).to(tl.float32)
        wj = tl.load(w + rc * KW + j, mask=mc, other=0.0).to(tl.float32)
        acc += (xv + sv) * wj[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(y + b * sy_b + rt[:, None] * sy_t + rc[None, :], out.to(y.dtype.element_ty), mask=mt[:, None] & mc[None, :])
    if i_t == 0:  # new state = xs[T : T + K - 1]; only these programs read the state (rows t < K - 1)
        ri = tl.arange(0, BS)
        ms = (ri < KW - 1)[:, None] & mc[None, :]
        for js in range(T if STEPS else 1):  # slot js: the state after token js (steps), else the last one
            m = (js + 1 if STEPS else T) + ri  # index into xs
            from_x = m >= KW - 1
            xk = tl.load(x + b * sx_b + (m - (KW - 1))[:, None] * sx_t + rc[None, :], mask=ms & from_x[:, None],
                         other=0.0)
            sk = tl.load(s_in + (b * C + rc[None, :]) * (KW - 1) + m[:, None], mask=ms & ~from_x[:, None], other=0.0)
            new = tl.where(from_x[:, None], xk.to(tl.float32), sk.to(tl.float32))
            tl.debug_barrier()  # in place (state_out is state): all reads before the first write
            tl.store(s_out + js * s_step + (b * C + rc[None, :]) * (KW - 1) + ri[:, None],
                     new.to(s_out.dtype.element_ty), mask=ms)


def conv_into(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, y: torch.Tensor, state_out: torch.Tensor,
              steps: bool = False) -> None:
    """Launch into given buffers. x, y: [B, T, C] (channel stride 1); weight: contiguous [C, K];
    state, state_out: contiguous [B, C, K-1], the same tensor or disjoint ones (the program of the first time
    block of a channel block is the only one reading those channels' state, and it writes after a barrier).
    steps: state_out is [>= T, B, C, K-1] (each slot contiguous, disjoint from `state`), slot t gets the state
    after token t."""
    b, t, c = x.shape
    kw = weight.shape[1]
    if x.stride(-1) != 1 or y.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError("causal_conv1d: x and y need channel stride 1 and the weight must be contiguous")
    if not state.is_contiguous() or not (state_out[0] if steps else state_out).is_contiguous():
        raise ValueError("causal_conv1d: state and state_out must be contiguous [B, C, K-1] tensors")
    if steps and (state_out.shape[0] < t or state_out.shape[1:] != state.shape):
        raise ValueError(f"causal_conv1d: steps need state_out [>= {t}, {', '.join(map(str, state.shape))}], got "
                         f"{tuple(state_out.shape)}")
    bt = min(16, triton.next_power_of_2(t))
    bc = 256 if t > 1 else 512
    grid = (triton.cdiv(t, bt), triton.cdiv(c, bc), b)
    _conv_kernel[grid](x, weight, state, y, state_out, t, c, state_out.stride(0) if steps else 0, x.stride(0),
                       x.stride(1), y.stride(0), y.stride(1), KW=kw, BT=bt, BC=bc,
                       BS=triton.next_power_of_2(max(kw - 1, 1)), STEPS=steps, num_warps=4)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as runtime/ops.py `causal_conv1d`: y [B, T, C], new state [B, C, K-1]."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s_out = torch.empty(state.shape, dtype=state.dtype, device=state.device)
    conv_into(x, weight.contiguous(), state.contiguous(), y, s_out)
    return y, s_out
