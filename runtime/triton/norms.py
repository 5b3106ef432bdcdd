"""Fused RMS norms (one program per row): the plain, residual-add and gated forms of runtime/model.py.

    rms_norm        y = x_hat * (offset + w)                       (zero-centred RMSNorm: offset 1)
    add_rms_norm    s = x + h (rounded to x's dtype, as the eager residual add), y = rms_norm(s)
    gated_rms_norm  y = x_hat * w * silu(z) per row                 (the delta rule's output norm)
All statistics in fp32; results in x's dtype. Rows are the last dim, which must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_kernel(x, h, z, w, s_out, y, D, sx, sh, sz, ss, sy, offset, eps,
                HAS_ADD: tl.constexpr, GATED: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    rd = tl.arange(0, BD)
    m = rd < D
    xv = tl.load(x + r * sx + rd, mask=m, other=0.0)
    if HAS_ADD:
        xv = (xv.to(tl.float32) + tl.load(h + r * sh + rd, mask=m, other=0.0).to(tl.float32)).to(xv.dtype)
        tl.store(s_out + r * ss + rd, xv, mask=m)
    xf = xv.to(tl.float32)
    xf = xf * tl.rsqrt(tl.sum(xf * xf, 0) / D + eps)
    out = xf * (offset + tl.load(w + rd, mask=m, other=0.0).to(tl.float32))
    if GATED:
        zf = tl.load(z + r * sz + rd, mask=m, other=0.0).to(tl.float32)
        out = out * zf * tl.sigmoid(zf)
    tl.store(y + r * sy + rd, out.to(y.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError(f"rms_norm: rows need a contiguous last dim, got strides {t.stride()}")
    return t.reshape(-1, d)  # a view when possible; rows are then equally strided


def _launch(x, w, offset, eps, h=None, z=None, gated=False):
    d = x.shape[-1]
    x2 = _rows(x, d)
    n = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, d)
    s = torch.empty_like(y) if h is not None else None
    h2 = _rows(h, d) if h is not None else x2
    z2 = _rows(z, d) if z is not None else x2
    s2 = s.view(-1, d) if s is not None else y2
    bd = triton.next_power_of_2(d)
    _rms_kernel[(n,)](x2, h2, z2, w, s2, y2, d, x2.stride(0), h2.stride(0), z2.stride(0), s2.stride(0), y2.stride(0),
                      float(offset), float(eps), HAS_ADD=h is not None, GATED=gated, BD=bd,
                      num_warps=4 if bd >= 1024 else 1)
    return y, s


def rms_norm(x: torch.Tensor, w: torch.Tensor, offset: float, eps: float) -> torch.Tensor:
    """x [..., D], w [D] -> x_hat * (offset + w) in x's dtype."""
    return _launch(x, w, offset, eps)[0]


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, offset: float, eps: float):
    """x, h [..., D] -> (s = x + h, rms_norm(s)), both in x's dtype."""
    y, s = _launch(x, w, offset, eps, h=h)
    return s, y


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x, z [..., Dv], w [Dv] -> x_hat * w * silu(z) in x's dtype."""
    return _launch(x, w, 0.0, eps, z=z, gated=True)[0]
