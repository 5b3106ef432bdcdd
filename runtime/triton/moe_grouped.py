"""Sparse-MoE expert kernels with weights dequantized inside the kernel (int4 or float/fp8 with block scales).

Two paths over the routed (token, slot) pairs, a = token * top_k + slot:
- prefill, `_up_gemm_kernel` + `_down_gemm_kernel`: pairs sorted by expert and padded to BM-row blocks
  (`align`, torch ops only: no host synchronisation); each program multiplies one block of rows by one
  expert's dequantized weight tile with tl.dot; the down kernel scales each row by its routing weight and
  writes y [N*K, H], summed over the K slots afterwards.
- decode, `_up_gemv_kernel` + `_down_gemv_kernel`: one program per (pair, block of outputs) reads its expert's
  rows once (GEMV); the down kernel also sums the K slots of a token, so no intermediate is written.
The up kernels compute silu(gate x) * (up x) directly (gate and up rows of the same block side by side).

Weight formats (`ExpertMatrix.fmt`):
    "int4"   uint8 [E, N, K/2], low nibble = even k (quant/int4.py, ORT order); fp16 scales [E, N, K/g];
             w = (q - 8) * d  (int4_sym_g{32,64,128}, = GGUF Q4_0 at g32).
    "float"  any float dtype [E, N, K] (float8_e4m3fn, bf16, ...); fp32 scales [E, ceil(N/bn), ceil(K/bk)];
             w = q * s  (fp8_channel: bn = 1, bk = K; fp8_block128: bn = bk = 128; unscaled: ones, bn = N, bk = K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FORMATS = {"int4": 0, "float": 1}
GEMV_MAX_PAIRS = 128  # at most this many (token, slot) pairs: GEMV path (decode); above: grouped GEMM
GEMM_CFG = dict(BM=64, BN_UP=128, BN_DOWN=128, BKH=64, WARPS=8, STAGES=2)  # BKH: k pairs (bytes of int4) per step
GEMV_CFG = dict(BN_UP=8, BN_DOWN=8, BKH=256, WARPS=4)


@dataclass(frozen=True)
class ExpertMatrix:
    """One stacked expert projection, logical [E, N, K] (N out, K in), in one storage format.

    data / scales as in the module docstring; block = (bn, bk) = rows and columns sharing one scale
    (int4: (1, g)). The kernels index data as data[e, n, k or k/2] with unit stride on the last dim.
    """

    fmt: str
    data: torch.Tensor
    scales: torch.Tensor
    block: tuple[int, int]
    shape: tuple[int, int, int]

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"expert format {self.fmt!r} unknown; supported: {list(FORMATS)}")
        e, n, k = self.shape
        width = k // 2 if self.fmt == "int4" else k
        if tuple(self.data.shape) != (e, n, width) or self.data.stride(-1) != 1:
            raise ValueError(f"experts ({self.fmt}): data expected contiguous [{e}, {n}, {width}], "
                             f"got {tuple(self.data.shape)} strides {self.data.stride()}")
        if k % 2 or self.block[1] % 2:
            raise ValueError(f"experts ({self.fmt}): K={k} and the scale block {self.block} must be even")
        bn, bk = self.block
        want = (e, -(-n // bn), -(-k // bk))
        if tuple(self.scales.shape) != want:
            raise ValueError(f"experts ({self.fmt}): scales expected {list(want)} for block {self.block}, "
                             f"got {list(self.scales.shape)}")

    def args(self) -> tuple:
        """Kernel arguments: data, scales, their expert / row strides, the scale column stride."""
        d, s = self.data, self.scales
        return d, s, d.stride(0), d.stride(1), s.stride(0), s.stride(1), s.stride(2)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


@triton.jit
def _w_pair(wq, ws, e, rb, rn, mn, K, se_q, sn_q, se_s, sn_s, sk_s,
            FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr):
    """Dequantized fp32 weight tiles [BKH, BN] of expert e, k-major: columns k = 2 rb (even) and 2 rb + 1 (odd)
    of rows rn. Splitting by parity keeps int4 bytes whole (low nibble = even k) and needs no register shuffle."""
    e = e.to(tl.int64)
    m = (rb < K // 2)[:, None] & mn[None, :]
    sc = tl.load(ws + e * se_s + (rn // SBN)[None, :] * sn_s + ((2 * rb) // SBK)[:, None] * sk_s, mask=m,
                 other=0.0).to(tl.float32)  # k and k + 1 share a scale: SBK is even
    if FMT == 0:
        p = tl.load(wq + e * se_q + rn[None, :] * sn_q + rb[:, None], mask=m, other=0)
        we = ((p & 15).to(tl.float32) - 8.0) * sc
        wo = ((p >> 4).to(tl.float32) - 8.0) * sc
    else:
        ptr = wq + e * se_q + rn[None, :] * sn_q + 2 * rb[:, None]
        we = tl.load(ptr, mask=m, other=0.0).to(tl.float32) * sc
        wo = tl.load(ptr + 1, mask=m, other=0.0).to(tl.float32) * sc
    return we, wo


@triton.jit
def _up_gemv_kernel(x, sx, ids, act,
                    gq, gs, g_eq, g_nq, g_es, g_ns, g_ks, uq, us, u_eq, u_nq, u_es, u_ns, u_ks,
                    I, H, TOPK: tl.constexpr, FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                    BN: tl.constexpr, BKH: tl.constexpr):
    a, i_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids + a)
    tok = (a // TOPK).to(tl.int64)
    rn = i_n * BN + tl.arange(0, BN)
    mn = rn < I
    accg = tl.zeros((BKH, BN), dtype=tl.float32)  # reduced once at the end
    accu = tl.zeros((BKH, BN), dtype=tl.float32)
    for k0 in range(0, H // 2, BKH):
        rb = k0 + tl.arange(0, BKH)
        mb = rb < H // 2
        xe = tl.load(x + tok * sx + 2 * rb, mask=mb, other=0.0).to(tl.float32)[:, None]
        xo = tl.load(x + tok * sx + 2 * rb + 1, mask=mb, other=0.0).to(tl.float32)[:, None]
        we, wo = _w_pair(gq, gs, e, rb, rn, mn, H, g_eq, g_nq, g_es, g_ns, g_ks, FMT, SBN, SBK)
        accg += we * xe + wo * xo
        we, wo = _w_pair(uq, us, e, rb, rn, mn, H, u_eq, u_nq, u_es, u_ns, u_ks, FMT, SBN, SBK)
        accu += we * xe + wo * xo
    g = tl.sum(accg, 0)
    u = tl.sum(accu, 0)
    tl.store(act + a.to(tl.int64) * I + rn, (g * tl.sigmoid(g) * u).to(act.dtype.element_ty), mask=mn)


@triton.jit
def _down_gemv_kernel(act, ids, wts, y, sy,
                      dq, ds, d_eq, d_nq, d_es, d_ns, d_ks,
                      I, H, TOPK: tl.constexpr, FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                      BN: tl.constexpr, BKH: tl.constexpr):
    n, i_n = tl.program_id(0), tl.program_id(1)
    rn = i_n * BN + tl.arange(0, BN)
    mn = rn < H
    acc = tl.zeros((BKH, BN), dtype=tl.float32)
    for j in range(TOPK):  # sum the token's K slots in registers
        a = n * TOPK + j
        e = tl.load(ids + a)
        wt = tl.load(wts + a).to(tl.float32)
        for k0 in range(0, I // 2, BKH):
            rb = k0 + tl.arange(0, BKH)
            mb = rb < I // 2
            ae = tl.load(act + a.to(tl.int64) * I + 2 * rb, mask=mb, other=0.0).to(tl.float32)[:, None] * wt
            ao = tl.load(act + a.to(tl.int64) * I + 2 * rb + 1, mask=mb, other=0.0).to(tl.float32)[:, None] * wt
            we, wo = _w_pair(dq, ds, e, rb, rn, mn, I, d_eq, d_nq, d_es, d_ns, d_ks, FMT, SBN, SBK)
            acc += we * ae + wo * ao
    tl.store(y + n.to(tl.int64) * sy + rn, tl.sum(acc, 0).to(y.dtype.element_ty), mask=mn)


@triton.jit
def _up_gemm_kernel(x, sx, rows, block_e, act,
                    gq, gs, g_eq, g_nq, g_es, g_ns, g_ks, uq, us, u_eq, u_nq, u_es, u_ns, u_ks,
                    NK, I, H, E, TOPK: tl.constexpr, FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr, PREC: tl.constexpr):
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_e + i_m)
    if e < E:  # blocks past the last expert's padded rows do nothing
        ra = tl.load(rows + i_m * BM + tl.arange(0, BM))
        valid = ra < NK
        tok = (ra // TOPK).to(tl.int64)
        rn = i_n * BN + tl.arange(0, BN)
        mn = rn < I
        accg = tl.zeros((BM, BN), dtype=tl.float32)
        accu = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, H // 2, BKH):
            rb = k0 + tl.arange(0, BKH)
            mx = valid[:, None] & (rb < H // 2)[None, :]
            xe = tl.load(x + tok[:, None] * sx + 2 * rb[None, :], mask=mx, other=0.0)
            xo = tl.load(x + tok[:, None] * sx + 2 * rb[None, :] + 1, mask=mx, other=0.0)
            we, wo = _w_pair(gq, gs, e, rb, rn, mn, H, g_eq, g_nq, g_es, g_ns, g_ks, FMT, SBN, SBK)
            accg = tl.dot(xe, we.to(xe.dtype), accg, input_precision=PREC)
            accg = tl.dot(xo, wo.to(xo.dtype), accg, input_precision=PREC)
            we, wo = _w_pair(uq, us, e, rb, rn, mn, H, u_eq, u_nq, u_es, u_ns, u_ks, FMT, SBN, SBK)
            accu = tl.dot(xe, we.to(xe.dtype), accu, input_precision=PREC)
            accu = tl.dot(xo, wo.to(xo.dtype), accu, input_precision=PREC)
        out = accg * tl.sigmoid(accg) * accu
        tl.store(act + ra.to(tl.int64)[:, None] * I + rn[None, :], out.to(act.dtype.element_ty),
                 mask=valid[:, None] & mn[None, :])


@triton.jit
def _down_gemm_kernel(act, rows, block_e, wts, y,
                      dq, ds, d_eq, d_nq, d_es, d_ns, d_ks,
                      NK, I, H, E, FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr, PREC: tl.constexpr):
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_e + i_m)
    if e < E:
        ra = tl.load(rows + i_m * BM + tl.arange(0, BM))
        valid = ra < NK
        ra64 = ra.to(tl.int64)
        rn = i_n * BN + tl.arange(0, BN)
        mn = rn < H
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, I // 2, BKH):
            rb = k0 + tl.arange(0, BKH)
            ma = valid[:, None] & (rb < I // 2)[None, :]
            ae = tl.load(act + ra64[:, None] * I + 2 * rb[None, :], mask=ma, other=0.0)
            ao = tl.load(act + ra64[:, None] * I + 2 * rb[None, :] + 1, mask=ma, other=0.0)
            we, wo = _w_pair(dq, ds, e, rb, rn, mn, I, d_eq, d_nq, d_es, d_ns, d_ks, FMT, SBN, SBK)
            acc = tl.dot(ae, we.to(ae.dtype), acc, input_precision=PREC)
            acc = tl.dot(ao, wo.to(ao.dtype), acc, input_precision=PREC)
        wt = tl.load(wts + ra, mask=valid, other=0.0).to(tl.float32)
        tl.store(y + ra64[:, None] * H + rn[None, :], (acc * wt[:, None]).to(y.dtype.element_ty),
                 mask=valid[:, None] & mn[None, :])


def align(ids: torch.Tensor, num_experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert and pad each expert's run to a multiple of bm rows (torch ops, no sync).

    ids: [N, K] expert ids. Returns rows int32 [NB * bm] (pair index a, or N*K for padding) and block_e int32
    [NB] (expert of each row block, E for blocks past the end); NB is a static upper bound.
    """
    flat = ids.reshape(-1)
    nk = flat.numel()
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + bm - 1) // bm * bm
    ends = torch.cumsum(padded, 0)
    starts = torch.cumsum(counts, 0) - counts
    dest = (ends - padded)[sorted_e] + torch.arange(nk, device=ids.device) - starts[sorted_e]
    nb = triton.cdiv(nk + min(num_experts, nk) * (bm - 1), bm)
    rows = torch.full((nb * bm,), nk, dtype=torch.int32, device=ids.device)
    rows[dest] = order.to(torch.int32)
    block_e = torch.searchsorted(ends, torch.arange(nb, device=ids.device) * bm, right=True).to(torch.int32)
    return rows, block_e


def _check(x: torch.Tensor, gate: ExpertMatrix, up: ExpertMatrix, down: ExpertMatrix) -> None:
    e, i, h = gate.shape
    if up.shape != gate.shape or down.shape != (e, h, i) or x.shape[-1] != h:
        raise ValueError(f"experts: gate {gate.shape}, up {up.shape} must be [E, I, H] and down {down.shape} "
                         f"[E, H, I] with H = x's width {x.shape[-1]}")
    if len({gate.fmt, up.fmt, down.fmt}) != 1 or gate.block != up.block:
        raise ValueError(f"experts: gate, up and down must share one format ({gate.fmt}, {up.fmt}, {down.fmt}) "
                         f"and gate / up one scale block ({gate.block}, {up.block})")
    if x.stride(-1) != 1:
        raise ValueError("experts: x needs a contiguous last dim")


def experts_forward(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate: ExpertMatrix, up: ExpertMatrix,
                    down: ExpertMatrix, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j weights[n, j] * swiglu_e(x[n]) over the routed experts e = ids[n, j].

    x: [N, H]; weights fp32 [N, K]; ids [N, K]; gate, up: [E, I, H]; down: [E, H, I]. Returns [N, H] in x's dtype.
    """
    _check(x, gate, up, down)
    n, h = x.shape
    e, i, _ = gate.shape
    top_k = ids.shape[1]
    nk = n * top_k
    ids32 = ids.to(torch.int32).contiguous()
    wts = weights.float().contiguous()
    fmt = FORMATS[gate.fmt]
    act = torch.empty(nk, i, dtype=x.dtype, device=x.device)
    if nk <= GEMV_MAX_PAIRS:
        c = GEMV_CFG
        _up_gemv_kernel[(nk, triton.cdiv(i, c["BN_UP"]))](
            x, x.stride(0), ids32, act, *gate.args(), *up.args(), i, h,
            TOPK=top_k, FMT=fmt, SBN=gate.block[0], SBK=gate.block[1], BN=c["BN_UP"],
            BKH=min(c["BKH"], triton.next_power_of_2(h // 2)), num_warps=c["WARPS"])
        y = out if out is not None else torch.empty(n, h, dtype=x.dtype, device=x.device)
        _down_gemv_kernel[(n, triton.cdiv(h, c["BN_DOWN"]))](
            act, ids32, wts, y, y.stride(0), *down.args(), i, h,
            TOPK=top_k, FMT=fmt, SBN=down.block[0], SBK=down.block[1], BN=c["BN_DOWN"],
            BKH=min(c["BKH"], triton.next_power_of_2(i // 2)), num_warps=c["WARPS"])
        return y
    c = GEMM_CFG
    bm = c["BM"]
    prec = "tf32x3" if x.dtype == torch.float32 else "tf32"  # fp32 inputs: about fp32 accuracy (bf16: unused)
    rows, block_e = align(ids, e, bm)
    nb = block_e.numel()
    _up_gemm_kernel[(nb, triton.cdiv(i, c["BN_UP"]))](
        x, x.stride(0), rows, block_e, act, *gate.args(), *up.args(), nk, i, h, e,
        TOPK=top_k, FMT=fmt, SBN=gate.block[0], SBK=gate.block[1], BM=bm, BN=c["BN_UP"],
        BKH=min(c["BKH"], max(16, triton.next_power_of_2(h // 2))),
        PREC=prec, num_warps=c["WARPS"], num_stages=c["STAGES"])
    ys = torch.empty(nk, h, dtype=x.dtype, device=x.device)
    _down_gemm_kernel[(nb, triton.cdiv(h, c["BN_DOWN"]))](
        act, rows, block_e, wts, ys, *down.args(), nk, i, h, e,
        FMT=fmt, SBN=down.block[0], SBK=down.block[1], BM=bm, BN=c["BN_DOWN"],
        BKH=min(c["BKH"], max(16, triton.next_power_of_2(i // 2))),
        PREC=prec, num_warps=c["WARPS"], num_stages=c["STAGES"])
    y = ys.view(n, top_k, h).sum(1, dtype=torch.float32).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y
