"""llama.cpp K-quants Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256 along K with two-level scales, as GGUF blocks.

    Q4_K / Q5_K  8 sub-blocks of 32: value = d*sc*q - dmin*m, q 0..15 / 0..31, sc and m 6-bit, d and dmin fp16
    Q6_K         16 sub-blocks of 16: value = d*sc*(q - 32), q 0..63, sc int8, d fp16
    Q3_K         16 sub-blocks of 16: value = d*(sc - 32)*(q - 4), q 0..7, sc 6-bit, d fp16

The QuantizedTensor of a K-quant scheme holds the GGUF blocks themselves (uint8 `[N, K/256 * block bytes]`), so
the GGUF exporter copies them and gguf-py's dequantizer is the reference for `dequantize`.

Quantization follows ggml/src/ggml-quants.c operation by operation in float32 (same sums in the same order,
`nearest_int` = round half to even, no fused multiply-add), vectorized over every sub-block of the tensor:
    rtn (no importance)   quantize_row_q{4,5}_K_ref: weights rms(sub-block) + |x|, make_qkx2_quants,
                          6-bit scales linear in max/63; quantize_row_q6_K_ref: make_qx_quants(16, 32, rmse 1);
                          quantize_row_q3_K_ref: make_q3_quants, 6-bit scales linear in max/32
    with importance qw    quantize_row_q{4,5}_K_impl: w = qw * sqrt(sigma2 + x^2), make_qkx3_quants, 6-bit
    `[K]` per column      scales by make_qp_quants weighted by the sub-block weight sums;
                          quantize_row_q6_K_impl: make_qx_quants weighted by qw; quantize_row_q3_K_impl:
                          make_qx_quants for the codes and again for the scales
so `quantize` is byte-identical to llama.cpp's quantizer (`ggml_quantize_chunk`, which `llama_model_quantize`
calls) with and without an importance matrix (tests/test_kquants.py).

The math is split as every scheme's: `choose_qparams` (scales and mins of each super-block, from the weights and
an optional per-column importance), `codes` (nearest codes on those grids) and `encode` (codes + qparams -> the
blocks), so GPTQ (quant/gptq.py) quantizes on exactly the grid the reference search picked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .tensor import QuantizedTensor, as_float32_matrix, check_group, fp16_bytes

QK_K = 256
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a sub-block with max |x| below this is all zero
F32 = np.float32


def _rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """float32 c / t with one rounding (torch's `scalar / tensor` is reciprocal times scalar: two roundings)."""
    return torch.full_like(t, c) / t


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrtf (torch's vectorized float32 sqrt is off by an ulp at times): float64, rounded."""
    return torch.sqrt(x.double()).float()


def _pos_max(x: torch.Tensor) -> torch.Tensor:
    """`float m = 0; for (...) if (v > m) m = v;` over the last dim: +0.0 (never -0.0) when no value is positive."""
    mx = x.amax(-1)
    return torch.where(mx > 0, mx, torch.zeros_like(mx))


def _rint(x: torch.Tensor) -> torch.Tensor:
    """ggml nearest_int (adds 1.5 * 2^23 in float32: round half to even), as float32 integers."""
    return torch.round(x)


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in index order, in float32 (the C loops' `s += t[i]` starting from 0), `[..., n] -> [...]`."""
    cols = t.movedim(-1, 0).contiguous()  # [n, ...]: each step adds one contiguous vector
    acc = torch.zeros(cols.shape[1:], dtype=torch.float32, device=t.device)
    for c in cols:
        acc += c
    return acc


def _weighted_sq_err(w: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, mn: torch.Tensor,
                     x: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * (scale * q_i + mn - x_i)^2 in the C order, `[M, n]` (scale, mn `[M, 1]`) -> `[M]`."""
    diff = scale * q + mn - x
    return _seq_sum(w * (diff * diff))


def make_qkx_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                    nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml make_qkx2_quants / make_qkx3_quants (the same arithmetic when weights are given): per row of x `[M, n]`,
    the (scale, min) minimising sum w (scale*q + min - x)^2 over nstep + 1 grid stretches, min <= 0.

    Returns (scale [M], the_min = -min [M], codes L [M, n] float32 in 0..nmax).
    """
    mn = torch.clamp(x.amin(-1), max=0.0)  # [M]; `if (min > 0) min = 0`
    mx = x.amax(-1)
    sum_w = weights[:, 0].clone()
    sum_x = sum_w * x[:, 0]
    for i in range(1, x.shape[1]):
        sum_w = sum_w + weights[:, i]
        sum_x = sum_x + weights[:, i] * x[:, i]
    flat = mx <= mn  # max == min: all codes 0, scale 0
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = _rdiv(nmax, rng)
    scale = _rdiv(1.0, iscale)
    L = _rint(iscale[:, None] * (x - mn[:, None])).clamp_(0, nmax)
    best = _weighted_sq_err(weights, scale[:, None], L, mn[:, None], x)
    for step in range(nstep + 1):
        rng = torch.where(flat, torch.ones_like(mx), mx - mn)  # min follows the best fit so far, as in ggml
        iscale = _rdiv(float(F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)), rng)
        laux = _rint(iscale[:, None] * (x - mn[:, None])).clamp_(0, nmax)  # [M, n]
        wl = weights * laux
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * laux), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        err = _weighted_sq_err(weights, this_scale[:, None], laux, this_min[:, None], x)
        take = ok & (err < best) & ~flat
        L = torch.where(take[:, None], laux, L)
        best = torch.where(take, err, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return scale, -mn, L


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml make_qx_quants(n, nmax, x, L, rmse_type=1, qw): symmetric scale search per row of x `[M, n]`, weights
    qw (or x^2). Returns (scale [M] (negative when the largest-|x| element is positive), codes L [M, n] in 0..2nmax-1).
    """
    ax = x.abs()
    amax = ax.amax(-1)
    first = (ax == amax[:, None]).float().argmax(-1, keepdim=True)  # first of strictly largest |x|
    vmax = x.gather(-1, first).squeeze(-1)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    w = x * x if qw is None else qw

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lv = _rint(iscale[:, None] * x).clamp_(-nmax, nmax - 1)
        return lv, _seq_sum(w * x * lv), _seq_sum(w * lv * lv)

    lv, sumlx, suml2 = sums(_rdiv(-nmax, vmax))
    L = lv + nmax
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = sums(_rdiv(-float(F32(nmax) + F32(0.1) * F32(step)), vmax))
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        L = torch.where(take[:, None], lv + nmax, L)
        scale = torch.where(take, new_scale, scale)
        best = torch.where(take, new_scale * sumlx, best)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[:, None], torch.zeros_like(L), L)


def _refine_codes(x: torch.Tensor, w: torch.Tensor, L: torch.Tensor, lo: int | None, hi: int,
                  positive_sl2_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coordinate descent ending ggml's make_qp_quants and make_q3_quants, per row of x `[M, n]`: each code in
    turn moves to the value that best fits the scale sum(w x l) / sum(w l^2) of the others, kept when it raises
    (sum w x l)^2 / sum w l^2; up to 5 passes (a pass without a change leaves the state as it is: running all 5
    is the same as ggml's early exit). make_qp_quants asks sum w l^2 > 0 of the others first (and clamps codes to
    <= hi only), make_q3_quants of the new sum. Returns (codes, sum w x l, sum w l^2)."""
    sumlx, suml2 = _seq_sum(w * x * L), _seq_sum(w * L * L)
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0) if positive_sl2_first else slx > 0
            new_l = torch.clamp(_rint(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))), min=lo, max=hi)
            slx2 = slx + wi * xi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if not positive_sl2_first:
                take &= sl22 > 0
            L[:, i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    return L, sumlx, suml2


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml make_qp_quants: non-negative values x `[M, n]` (sub-block scales or mins) on a grid scale*L, L 0..nmax,
    weighted by qw `[M, n]`: stretch search, then up to 5 passes of coordinate descent. Returns (scale [M], L [M, n])."""
    mx = _pos_max(x)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _rdiv(nmax, mx)
    L = _rint(iscale[:, None] * x)
    scale = _rdiv(1.0, iscale)
    diff = x - scale[:, None] * L
    best = _seq_sum(qw * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = _rdiv(float(F32(0.1) * F32(step) + F32(nmax)), mx)
        scale_is = _rdiv(1.0, iscale_is)
        lv = torch.clamp(_rint(iscale_is[:, None] * x), max=nmax)
        diff = x - scale_is[:, None] * lv
        mse = _seq_sum(qw * diff * diff)
        take = mse < best
        best = torch.where(take, mse, best)
        iscale = torch.where(take, iscale_is, iscale)
    L = torch.clamp(_rint(iscale[:, None] * x), max=nmax)
    L, sumlx, suml2 = _refine_codes(x, qw, L, None, nmax, positive_sl2_first=True)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(suml2))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[:, None], torch.zeros_like(L), L)


# ---- qparams: what a super-block's grid is -----------------------------------------------------------------------


@dataclass(frozen=True)
class KQParams:
    """Grids of one K-quant tensor `[N, K]` (nb = K/256 super-blocks per row, S sub-blocks per super-block).

    d:     fp16-exact float32 `[N, nb]` super-block scale
    dmin:  fp16-exact float32 `[N, nb]` super-block min scale (Q4_K/Q5_K; zeros for Q6_K)
    sc:    float32 `[N, nb, S]` integer sub-block scale codes (0..63; Q6_K -128..127)
    m:     float32 `[N, nb, S]` integer sub-block min codes (0..63; zeros for Q6_K)
    L0:    float32 `[N, nb * S, g]` codes of the search itself, kept where d*sc == 0 (as ggml does)
    """

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    L0: torch.Tensor


@dataclass(frozen=True)
class KQuant:
    """One K-quant format: sub-block length g, code range 0..qmax, block byte layout, and its ggml search."""

    name: str  # "q4_k"
    ggml: str  # GGML type name "Q4_K"
    sub: int  # sub-block length (32 or 16)
    qmax: int  # largest code (15, 31, 63)
    block_bytes: int
    asymmetric: bool  # value = d*sc*q - dmin*m (Q4_K/Q5_K) or d*sc*(q - zero) (Q6_K, Q3_K)
    zero: int = 32  # symmetric types: the code of value 0 (Q6_K 32, Q3_K 4)

    @property
    def subs(self) -> int:
        return QK_K // self.sub

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / QK_K

    def data_shape(self, n: int, k: int) -> tuple[int, int]:
        """Shape of the stored blocks of an `[N, K]` weight."""
        return n, k // QK_K * self.block_bytes

    def blocks(self, w: torch.Tensor) -> torch.Tensor:
        """float32 `[N, K]` -> sub-blocks `[N * K/sub, sub]`, refusing K that is not a multiple of 256."""
        n, k = w.shape
        check_group(k, QK_K, self.name)
        return w.reshape(-1, self.sub)

    def choose_qparams(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> KQParams:
        """Grids for w `[N, K]`: ggml's reference search (importance None) or its importance-weighted search
        (importance `[K]` or `[N, K]`, non-negative: llama.cpp's imatrix = mean x^2 per input column)."""
        w = as_float32_matrix(w)
        n, k = w.shape
        nb = k // QK_K
        x = self.blocks(w)  # [M, g], M = N * nb * S
        qw = None
        if importance is not None:
            qw = torch.as_tensor(importance, dtype=torch.float32).expand(n, k).reshape(-1, self.sub)
        if self.asymmetric:
            return self._qparams_asym(x, qw, n, nb)
        return self._qparams_sym(x, qw, n, nb)

    def _qparams_asym(self, x: torch.Tensor, qw: torch.Tensor | None, n: int, nb: int) -> KQParams:
        s = self.subs
        if qw is None:  # quantize_row_q{4,5}_K_ref
            av_x = _sqrt(_seq_sum(x * x) / 32.0)  # [M]
            weights = av_x[:, None] + x.abs()
            rmin, nstep = (-1.0, 20) if self.qmax == 15 else (-0.5, 15)
            scales, mins, L0 = make_qkx_quants(x, weights, self.qmax, rmin, 0.1, nstep)
            scales, mins = scales.reshape(n * nb, s), mins.reshape(n * nb, s)
            max_scale, max_min = _pos_max(scales), _pos_max(mins)
            inv_scale = torch.where(max_scale > 0, _rdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
            inv_min = torch.where(max_min > 0, _rdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
            sc = _uint8_min63(_rint(inv_scale[:, None] * scales))
            m = _uint8_min63(_rint(inv_min[:, None] * mins))
            d, dmin = _fp16(max_scale / 63.0), _fp16(max_min / 63.0)
        else:  # quantize_row_q{4,5}_K_impl
            xs = x.reshape(n * nb, QK_K)
            sigma2 = 2.0 * _seq_sum(xs * xs) / float(QK_K)  # [n*nb]
            sig = sigma2.repeat_interleave(s)[:, None]  # [M, 1]
            weights = qw * _sqrt(sig + x * x)
            sw = _seq_sum(weights).reshape(n * nb, s)
            scales, mins, L0 = make_qkx_quants(x, weights, self.qmax, -0.9, 0.05, 36)
            d, sc = make_qp_quants(scales.reshape(n * nb, s), 63, sw)
            dmin, m = make_qp_quants(mins.reshape(n * nb, s), 63, sw)
            d, dmin = _fp16(d), _fp16(dmin)
            sc, m = _uint8_min63(sc), _uint8_min63(m)  # Q5_K clamps to 63; Q4_K's codes are <= 63 already
        return KQParams(d.reshape(n, nb), dmin.reshape(n, nb), sc.reshape(n, nb, s), m.reshape(n, nb, s),
                        L0.reshape(n, nb * s, self.sub))

    def _qparams_sym(self, x: torch.Tensor, qw: torch.Tensor | None, n: int, nb: int) -> KQParams:
        """quantize_row_q6_K_ref / _impl."""
        s = self.subs
        scales, L0 = make_qx_quants(x, 32, qw)  # [M], [M, 16]
        scales = scales.reshape(n * nb, s)
        ab = scales.abs()
        amax = ab.amax(-1)
        first = (ab == amax[:, None]).float().argmax(-1, keepdim=True)
        max_scale = scales.gather(-1, first).squeeze(-1)  # signed, first of the largest |scale|
        zero = amax < GROUP_MAX_EPS
        iscale = _rdiv(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
        d = torch.where(zero, torch.zeros_like(iscale), _fp16(_rdiv(1.0, iscale)))
        sc = torch.where(zero[:, None], 0.0, torch.clamp(_rint(iscale[:, None] * scales), max=127))
        L0 = torch.where(zero.repeat_interleave(s)[:, None], 0.0, L0)
        return KQParams(d.reshape(n, nb), torch.zeros(n, nb, device=d.device), sc.reshape(n, nb, s),
                        torch.zeros(n, nb, s, device=d.device),
                        L0.reshape(n, nb * s, self.sub))

    def grid(self, p: KQParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(step [N, nb*S, 1], offset [N, nb*S, 1]) of each sub-block: value = code * step + offset, float32 as
        ggml computes them (d*sc, and -dmin*m or -32*d*sc)."""
        n = p.d.shape[0]
        step = (p.d[..., None] * p.sc).reshape(n, -1, 1)
        if self.asymmetric:
            return step, -(p.dmin[..., None] * p.m).reshape(n, -1, 1)
        return step, -float(self.zero) * step

    def codes(self, w: torch.Tensor, p: KQParams) -> torch.Tensor:
        """Nearest codes of w `[N, K]` on the grids p, float32 `[N, K]`, as ggml's final pass: l = nearest((x + dm)/d)
        (Q6_K: nearest(x/d) + 32), clamped; sub-blocks with d*sc == 0 keep the search's codes."""
        n, k = w.shape
        x = w.reshape(n, -1, self.sub)
        step, offset = self.grid(p)
        dead = step == 0
        safe = torch.where(dead, torch.ones_like(step), step)
        if self.asymmetric:
            q = _rint((x - offset) / safe).clamp_(0, self.qmax)  # x + dm, dm = dmin*m
        else:
            q = _rint(x / safe).clamp_(-self.zero, self.zero - 1) + self.zero
        return torch.where(dead, p.L0, q).reshape(n, k)

    def encode(self, q: torch.Tensor, p: KQParams) -> QuantizedTensor:
        """Codes `[N, K]` and grids p -> the QuantizedTensor holding the GGUF blocks `[N, K/256 * block_bytes]`."""
        n, k = q.shape
        nb = k // QK_K
        q = q.to(torch.uint8).reshape(n, nb, QK_K)
        if self.asymmetric:
            parts = [fp16_bytes(p.d.to(torch.float16)), fp16_bytes(p.dmin.to(torch.float16)),
                     _pack_scales_k4(p.sc.to(torch.uint8), p.m.to(torch.uint8))]
            lo = q.reshape(n, nb, 4, 2, 32)  # per 64-chunk: elements l and l + 32 share byte l
            if self.qmax == 31:
                hi = (lo >> 4).to(torch.uint8)  # [n, nb, 4, 2, 32] fifth bits
                ar = torch.arange(4, dtype=torch.uint8, device=q.device)
                shifts = 2 * ar[:, None] + ar[:2]
                qh = (hi << shifts[..., None]).sum(dim=(2, 3), dtype=torch.uint8)  # [n, nb, 32], disjoint bits
                parts.append(qh)
                lo = lo & 0x0F
            parts.append((lo[:, :, :, 0] | (lo[:, :, :, 1] << 4)).reshape(n, nb, 128))
        else:
            parts = self._pack_sym(q, p, n, nb)
        data = torch.cat(parts, dim=-1).reshape(n, nb * self.block_bytes)
        return QuantizedTensor(scheme=self.name, shape=(n, k), data=data, scales=None, block_size=QK_K)

    def _pack_sym(self, q: torch.Tensor, p: KQParams, n: int, nb: int) -> list[torch.Tensor]:
        """block_q6_K: ql[128], qh[64], int8 scales[16], fp16 d."""
        v = q.reshape(n, nb, 2, 4, 32)  # per 128-half: quarters at +0, +32, +64, +96
        ql = torch.cat(((v[:, :, :, 0] & 0xF) | ((v[:, :, :, 2] & 0xF) << 4),
                        (v[:, :, :, 1] & 0xF) | ((v[:, :, :, 3] & 0xF) << 4)), dim=-1)  # [n, nb, 2, 64]
        qh = ((v[:, :, :, 0] >> 4) | ((v[:, :, :, 1] >> 4) << 2) | ((v[:, :, :, 2] >> 4) << 4)
              | ((v[:, :, :, 3] >> 4) << 6))  # [n, nb, 2, 32]
        return [ql.reshape(n, nb, 128), qh.reshape(n, nb, 64), p.sc.to(torch.int8).view(torch.uint8),
                fp16_bytes(p.d.to(torch.float16))]

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedTensor:
        """w `[N, K]` -> GGUF blocks, byte-identical to ggml_quantize_chunk (with `importance` as its imatrix)."""
        w = as_float32_matrix(w)
        p = self.choose_qparams(w, importance)
        return self.encode(self.codes(w, p), p)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        """Float32 `[N, K]` (ggml dequantize_row_q{4,5,6}_K, = gguf.quants.dequantize)."""
        q, p = self.decode(qt)
        step, offset = self.grid(p)
        n, k = qt.shape
        x = q.reshape(n, -1, self.sub)
        if self.asymmetric:
            return (step * x + offset).reshape(n, k)  # d*sc*q - dmin*m
        return (step * (x - float(self.zero))).reshape(n, k)

    def decode(self, qt: QuantizedTensor) -> tuple[torch.Tensor, KQParams]:
        """GGUF blocks -> (codes float32 `[N, K]`, grids): the inverse of `encode`."""
        n, k = qt.shape
        nb = k // QK_K
        b = qt.data.reshape(n, nb, self.block_bytes)
        dev = b.device
        if self.asymmetric:
            d = b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
            dmin = b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
            sc, m = _unpack_scales_k4(b[..., 4:16])
            at = 16
            qh = None
            if self.qmax == 31:
                qh, at = b[..., 16:48], 48
            qs = b[..., at:at + 128].reshape(n, nb, 4, 1, 32)
            q = torch.cat((qs & 0x0F, qs >> 4), dim=3)  # [n, nb, 4, 2, 32]
            if qh is not None:
                shifts = (2 * torch.arange(4, dtype=torch.uint8, device=dev)[:, None]
                          + torch.arange(2, dtype=torch.uint8, device=dev))
                q = q | (((qh[:, :, None, None, :] >> shifts[..., None]) & 1) << 4)
            q = q.reshape(n, k).float()
            p = KQParams(d, dmin, sc.float(), m.float(), torch.zeros(0, device=dev))
        else:
            q, p = self._unpack_sym(b, n, nb)
        return q, p

    def _unpack_sym(self, b: torch.Tensor, n: int, nb: int) -> tuple[torch.Tensor, KQParams]:
        """block_q6_K bytes `[N, nb, 210]` -> codes `[N, K]` and grids."""
        dev, k = b.device, nb * QK_K
        ql = b[..., 0:128].reshape(n, nb, 2, 2, 32)  # [half][first|second 32 bytes][l]
        qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()
        d = b[..., 208:210].contiguous().view(torch.float16).float().squeeze(-1)
        lo = torch.stack((ql[:, :, :, 0] & 0xF, ql[:, :, :, 1] & 0xF, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4),
                         dim=3)  # [n, nb, 2, 4, 32]
        hi = (qh >> (2 * torch.arange(4, dtype=torch.uint8, device=dev))[:, None]) & 3  # [n, nb, 2, 4, 32]
        q = (lo | (hi << 4)).reshape(n, k).float()
        p = KQParams(d, torch.zeros_like(d), sc, torch.zeros_like(sc), torch.zeros(0, device=dev))
        return q, p


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml make_q3_quants(n, nmax, x, L, do_rmse=true) per row of x `[M, n]`: symmetric codes weighted by x^2,
    refined by up to 5 passes of coordinate descent. Returns (scale [M], codes L [M, n] in 0..2nmax-1; 0 if zero)."""
    ax = x.abs()
    amax = ax.amax(-1)
    first = (ax == amax[:, None]).float().argmax(-1, keepdim=True)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(amax), x.gather(-1, first).squeeze(-1))
    L = _rint(_rdiv(-nmax, vmax)[:, None] * x).clamp_(-nmax, nmax - 1)
    L, sumlx, suml2 = _refine_codes(x, x * x, L, -nmax, nmax - 1, positive_sl2_first=False)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(suml2))
    return torch.where(zero, 0.0, scale), torch.where(zero[:, None], 0.0, L + nmax)


class Q3K(KQuant):
    """Q3_K: 16 sub-blocks of 16, value = d * (sc - 32) * (q - 4), q 0..7 (2 bits in qs, the third in hmask), 6-bit
    sc, fp16 d. block_q3_K: hmask[32], qs[64], scales[12], d."""

    def _qparams_sym(self, x: torch.Tensor, qw: torch.Tensor | None, n: int, nb: int) -> KQParams:
        """quantize_row_q3_K_ref (make_q3_quants) / quantize_row_q3_K_impl (make_qx_quants twice)."""
        s = self.subs
        if qw is None:
            scales, L0 = make_q3_quants(x, 4)
            scales = scales.reshape(n * nb, s)
            ab = scales.abs()
            first = (ab == ab.amax(-1, keepdim=True)).float().argmax(-1, keepdim=True)
            max_scale = scales.gather(-1, first).squeeze(-1)  # signed, first of the largest |scale|
            zero = max_scale == 0
            iscale = _rdiv(-32.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
            # an all-zero super-block keeps its memset scale bytes: 6-bit 0 = sc -32 (times d = 0)
            sc = torch.where(zero[:, None], -32.0, _rint(iscale[:, None] * scales).clamp_(-32, 31))
            d = torch.where(zero, 0.0, _fp16(_rdiv(1.0, iscale)))
        else:
            xs = x.reshape(n * nb, QK_K)
            sigma2 = 2.0 * _seq_sum(xs * xs) / float(QK_K)
            weights = qw * _sqrt(sigma2.repeat_interleave(s)[:, None] + x * x)
            sw = _seq_sum(weights).reshape(n * nb, s)
            scales, L0 = make_qx_quants(x, 4, weights)
            d, ls = make_qx_quants(scales.reshape(n * nb, s), 32, sw)
            d, sc = _fp16(d), ls - 32
        return KQParams(d.reshape(n, nb), torch.zeros(n, nb, device=d.device), sc.reshape(n, nb, s),
                        torch.zeros(n, nb, s, device=d.device),
                        L0.reshape(n, nb * s, self.sub))

    def _pack_sym(self, q: torch.Tensor, p: KQParams, n: int, nb: int) -> list[torch.Tensor]:
        q = q.reshape(n, nb, 8, 32)  # element j = 32 * bit + m: its third bit goes to hmask[m] bit `bit`
        bits = torch.arange(8, dtype=torch.uint8, device=q.device)[:, None]
        hmask = ((q >> 2) << bits).sum(dim=2, dtype=torch.uint8)  # [n, nb, 32], disjoint bits
        lo = (q & 3).reshape(n, nb, 2, 4, 32)  # per 128-half: quarters at +0, +32, +64, +96 -> bits 0, 2, 4, 6
        qs = (lo[:, :, :, 0] | (lo[:, :, :, 1] << 2) | (lo[:, :, :, 2] << 4) | (lo[:, :, :, 3] << 6)).reshape(n, nb, 64)
        l6 = (p.sc + 32).to(torch.uint8)  # [n, nb, 16] 0..63
        low = torch.cat((l6[..., :8] & 0xF, torch.zeros_like(l6[..., :4])), dim=-1)  # [n, nb, 12]
        low[..., :8] |= (l6[..., 8:] & 0xF) << 4
        hi2 = (l6 >> 4).reshape(n, nb, 4, 4)  # [j // 4][j % 4]
        low[..., 8:] = (hi2 << (2 * torch.arange(4, dtype=torch.uint8, device=q.device))[:, None]).sum(
            dim=2, dtype=torch.uint8)
        return [hmask, qs, low, fp16_bytes(p.d.to(torch.float16))]

    def _unpack_sym(self, b: torch.Tensor, n: int, nb: int) -> tuple[torch.Tensor, KQParams]:
        dev, k = b.device, nb * QK_K
        hmask, qs, sb = b[..., 0:32], b[..., 32:96], b[..., 96:108]
        d = b[..., 108:110].contiguous().view(torch.float16).float().squeeze(-1)
        bits = torch.arange(8, dtype=torch.uint8, device=dev)[:, None]
        hi = (hmask[:, :, None, :] >> bits) & 1  # [n, nb, 8, 32]
        shifts = (2 * torch.arange(4, dtype=torch.uint8, device=dev))[:, None]
        lo = (qs.reshape(n, nb, 2, 1, 32) >> shifts) & 3  # [n, nb, 2, 4, 32]
        q = (lo.reshape(n, nb, 8, 32) | (hi << 2)).reshape(n, k).float()
        low = torch.cat((sb[..., :8] & 0xF, sb[..., :8] >> 4), dim=-1)  # [n, nb, 16]
        hi2 = (sb[..., 8:12][:, :, None, :] >> shifts[:, :1].reshape(4, 1)) & 3  # [n, nb, 4 (j // 4), 4 (j % 4)]
        sc = (low | (hi2.reshape(n, nb, 16) << 4)).float() - 32.0
        return q, KQParams(d, torch.zeros_like(d), sc, torch.zeros_like(sc), torch.zeros(0, device=dev))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 then back: round to nearest even fp16, as float32."""
    return x.to(torch.float16).to(torch.float32)


def _uint8_min63(x: torch.Tensor) -> torch.Tensor:
    """`uint8_t ls = nearest_int(...); ls = MIN(63, ls)`: wrap to 0..255 (as the C assignment), then clamp."""
    return torch.clamp(torch.remainder(x, 256.0), max=63.0)


def _pack_scales_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """6-bit scale and min codes uint8 `[..., 8]` -> the 12 bytes of block_q4_K.scales (inverse of get_scale_min_k4)."""
    lo = torch.cat((sc[..., :4], m[..., :4]), dim=-1) | ((torch.cat((sc[..., 4:], m[..., 4:]), dim=-1) >> 4) << 6)
    tail = (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)
    return torch.cat((lo, tail), dim=-1)


def _unpack_scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """block_q4_K.scales `[..., 12]` -> 6-bit (sc, m) `[..., 8]` (ggml get_scale_min_k4)."""
    sc = torch.cat((s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)), dim=-1)
    m = torch.cat((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), dim=-1)
    return sc, m


KQUANTS: dict[str, KQuant] = {k.name: k for k in (
    KQuant("q4_k", "Q4_K", 32, 15, 144, True),
    KQuant("q5_k", "Q5_K", 32, 31, 176, True),
    KQuant("q6_k", "Q6_K", 16, 63, 210, False),
    Q3K("q3_k", "Q3_K", 16, 7, 110, False, zero=4),
)}
