"""Sparse-MoE expert kernels with weights dequantized inside the kernel (int4 or float/fp8 with block scales).

Routing (`route_into`, one program per token): fp32 softmax over the experts, top-k, renormalisation, and the
sigmoid of the shared-expert gate logit, from the router GEMV's output in one launch.

Two expert paths over the routed (token, slot) pairs, a = token * top_k + slot:
- prefill, `_up_gemm_kernel` + `_down_gemm_kernel`: pairs sorted by expert and padded to BM-row blocks
  (`align`, torch ops only: no host synchronisation); each program multiplies one block of rows (gathered
  straight from x) by one expert's dequantized [BN, BK] weight tiles with tl.dot; programs of one row block are
  adjacent in the launch order, so the rows stay in L2 while each N block reads its slice of the expert. The down
  kernel scales each row by its routing weight and writes y [N*K, H], summed over the K slots afterwards; the
  shared expert runs through cuBLAS.
- decode, `_up_gemv_kernel` + `_down_gemv_kernel`: one program per (pair, block of outputs) streams its
  expert's rows (k contiguous, loads pipelined with tl.range); the down kernel sums the token's K slots and the
  shared expert (weighted by its sigmoid gate) in registers, so a MoE layer's decode is two launches after routing.
The up kernels compute silu(gate x) * (up x) directly (gate and up rows of the same block side by side).

Weight formats (`ExpertMatrix.fmt`):
    "int4"   uint8 [E, N, K/2], low nibble = even k (quant/int4.py, ORT order); fp16 scales [E, N, K/g];
             w = (q - 8) * d  (int4_sym_g{32,64,128}, = GGUF Q4_0 at g32).
    "float"  any float dtype [E, N, K] (float8_e4m3fn, bf16, ...); fp32 scales [E, ceil(N/bn), ceil(K/bk)];
             w = q * s  (fp8_channel: bn = 1, bk = K; fp8_block128: bn = bk = 128; unscaled: ones, bn = N, bk = K).
Tile sizes (`GEMM_UP`, `GEMM_DOWN`, `GEMV_UP`, `GEMV_DOWN`) were chosen on an H100 with scripts/tune_moe_gpu.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import dot_precision

FORMATS = {"int4": 0, "float": 1}
GEMV_MAX_PAIRS = 128  # at most this many (token, slot) pairs: GEMV path (decode); above: grouped GEMM
GEMM_UP = dict(BM=128, BN=64, BK=64, WARPS=8, STAGES=3)
GEMM_DOWN = dict(BM=128, BN=64, BK=64, WARPS=8, STAGES=3)
GEMV_UP = dict(BN=8, BK=256, WARPS=4, STAGES=3)
GEMV_DOWN = dict(BN=4, BK=1024, WARPS=4, STAGES=2)
UNSCALED = tl.constexpr(1 << 30)  # scale block of the shared expert's unscaled float matrices: one block


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
            raise ValueError(f"experts ({self.fmt}): data expected [{e}, {n}, {width}] with unit last stride, "
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

    def meta(self, bk: int) -> dict:
        """Format constexprs for a kernel that walks K in tiles of bk columns (a power of two): NS = scale blocks
        per tile. A scale block narrower than K must be a power of two (int4 groups, fp8's 128) to tile evenly."""
        sbn, sbk = self.block
        if sbk < self.shape[2] and sbk & (sbk - 1):
            raise ValueError(f"experts: scale blocks of {sbk} columns do not tile K={self.shape[2]} evenly")
        return dict(FMT=FORMATS[self.fmt], SBN=sbn, SBK=sbk, NS=max(bk // sbk, 1) if sbk < self.shape[2] else 1)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


@dataclass(frozen=True)
class SharedExpert:
    """The always-on expert as two unscaled float ExpertMatrix of one expert: gate|up [1, 2 Is, H], down [1, H, Is]."""

    gate_up: ExpertMatrix
    down: ExpertMatrix

    @classmethod
    def from_dense(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> SharedExpert:
        from .moe_fp8 import float_experts

        return cls(float_experts(torch.cat([gate, up])[None]), float_experts(down[None]))

    @property
    def inner(self) -> int:
        return self.down.shape[2]

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


@triton.jit
def _w_tile(wq, ws, e, rn, mn, k0, K, se_q, sn_q, se_s, sn_s, sk_s,
            FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, NS: tl.constexpr,
            BN: tl.constexpr, BK: tl.constexpr):
    """Dequantized fp32 tile [BN, BK] of expert e: rows rn (mask mn), columns k0 .. k0 + BK, k contiguous.
    The tile spans NS scale blocks along k (ExpertMatrix.meta), applied on a [BN, NS, BK / NS] view.

    int4 without an integer-to-float conversion (a quarter-rate instruction, the GEMV's bottleneck; the
    magic-number trick of Marlin / FasterTransformer): each nibble q is moved into the top mantissa bits of
    1.0f, giving f = 1 + q / 16 by two bit operations, and w = (q - 8) d = f (16 d) - 24 d in one exact fma.
    The two nibbles of a byte are interleaved back in k order (low = even k)."""
    e = e.to(tl.int64)
    rs = k0 // SBK + tl.arange(0, NS)
    sc = tl.load(ws + e * se_s + (rn // SBN)[:, None] * sn_s + rs[None, :] * sk_s,
                 mask=mn[:, None] & (rs < tl.cdiv(K, SBK))[None, :], other=0.0).to(tl.float32)  # [BN, NS]
    if FMT == 0:
        rb = k0 // 2 + tl.arange(0, BK // 2)
        p = tl.load(wq + e * se_q + rn[:, None] * sn_q + rb[None, :], mask=mn[:, None] & (rb < K // 2)[None, :],
                    other=0).to(tl.int32)
        lo = ((p << 19) & 0x780000) | 0x3F800000  # bits 0-3 -> mantissa bits 19-22 of 1.0f
        hi = ((p << 15) & 0x780000) | 0x3F800000  # bits 4-7
        f = tl.join(lo, hi).reshape(BN, BK).to(tl.float32, bitcast=True)  # 1 + q / 16
        if NS == 1:
            w = f * (16.0 * sc) - 24.0 * sc  # masked rows and tiles past K: sc = 0 -> w = 0
        else:
            s3 = sc[:, :, None]
            w = (f.reshape(BN, NS, BK // NS) * (16.0 * s3) - 24.0 * s3).reshape(BN, BK)
    else:
        rk = k0 + tl.arange(0, BK)
        raw = tl.load(wq + e * se_q + rn[:, None] * sn_q + rk[None, :], mask=mn[:, None] & (rk < K)[None, :],
                      other=0.0).to(tl.float32)
        if NS == 1:
            w = raw * sc
        else:
            w = (raw.reshape(BN, NS, BK // NS) * sc[:, :, None]).reshape(BN, BK)
    return w


@triton.jit
def _route_kernel(logits, sl, wts, ids, sg, E, TOPK: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
                  SHARED: tl.constexpr, BE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    re = tl.arange(0, BE)
    z = tl.load(logits + n * sl + re, mask=re < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(z - tl.max(z, 0))
    p = p / tl.sum(p, 0)  # softmax over all experts, fp32 (ops.route)
    rk = tl.arange(0, BK)
    wv = tl.zeros((BK,), dtype=tl.float32)
    iv = tl.zeros((BK,), dtype=tl.int32)
    for j in tl.static_range(TOPK):  # the largest, then the next: K passes over E values in registers
        m = tl.max(p, 0)
        i = tl.min(tl.where(p == m, re, BE), 0)
        wv = tl.where(rk == j, m, wv)
        iv = tl.where(rk == j, i, iv)
        p = tl.where(re == i, -1.0, p)
    if NORM:
        wv = wv / tl.sum(wv, 0)
    tl.store(wts + n * TOPK + rk, wv, mask=rk < TOPK)
    tl.store(ids + n * TOPK + rk, iv, mask=rk < TOPK)
    if SHARED:
        zs = tl.load(logits + n * sl + E).to(tl.float32)
        tl.store(sg + n, tl.sigmoid(zs))


def route_into(logits: torch.Tensor, num_experts: int, top_k: int, normalize: bool, shared: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits [N, W] (W >= E, + 1 with `shared`: column E is the shared-expert gate; columns past that are
    padding) -> routing weights fp32 [N, K], expert ids int32 [N, K] and sigmoid(shared gate) fp32 [N] (None
    without `shared`). ops.route's math; ties go to the lower expert id."""
    n, width = logits.shape
    if logits.stride(-1) != 1 or width < num_experts + shared:
        raise ValueError(f"route: logits expected [N, >= {num_experts + shared}] with a contiguous last dim, got "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    wts = torch.empty(n, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=logits.device)
    sg = torch.empty(n, dtype=torch.float32, device=logits.device) if shared else wts
    _route_kernel[(n,)](logits, logits.stride(0), wts, ids, sg, num_experts, TOPK=top_k,
                        BK=triton.next_power_of_2(top_k), NORM=normalize, SHARED=shared,
                        BE=triton.next_power_of_2(num_experts), num_warps=4 if num_experts >= 256 else 1)
    return wts, ids, sg if shared else None


@triton.jit
def _gemv_pair(xp, aq, a_s, a_eq, a_nq, a_es, a_ns, a_ks, bq, b_s, b_eq, b_nq, b_es, b_ns, b_ks, e, rn, mn, K,
               FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, NS: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    """(A x, B x) for rows rn of expert e of two matrices in one format, x at xp [K]: fp32 [BN] each."""
    acca = tl.zeros((BN, BK), dtype=tl.float32)  # reduced once at the end
    accb = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        rk = k0 + tl.arange(0, BK)
        xk = tl.load(xp + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
        acca += _w_tile(aq, a_s, e, rn, mn, k0, K, a_eq, a_nq, a_es, a_ns, a_ks, FMT, SBN, SBK, NS, BN, BK) * xk
        accb += _w_tile(bq, b_s, e, rn, mn, k0, K, b_eq, b_nq, b_es, b_ns, b_ks, FMT, SBN, SBK, NS, BN, BK) * xk
    return tl.sum(acca, 1), tl.sum(accb, 1)


@triton.jit
def _up_gemv_kernel(x, sx, ids, act, act_s,
                    gq, gs, g_eq, g_nq, g_es, g_ns, g_ks, uq, us, u_eq, u_nq, u_es, u_ns, u_ks,
                    sq, ss, s_eq, s_nq, s_es, s_ns, s_ks,
                    NK, I, IS, H, TOPK: tl.constexpr, FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                    NS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    a, i_n = tl.program_id(0), tl.program_id(1)
    rn = i_n * BN + tl.arange(0, BN)
    if a < NK:  # routed pair a
        e = tl.load(ids + a)
        xp = x + (a // TOPK).to(tl.int64) * sx
        g, u = _gemv_pair(xp, gq, gs, g_eq, g_nq, g_es, g_ns, g_ks, uq, us, u_eq, u_nq, u_es, u_ns, u_ks,
                          e, rn, rn < I, H, FMT, SBN, SBK, NS, BN, BK, STAGES)
        tl.store(act + a.to(tl.int64) * I + rn, (g * tl.sigmoid(g) * u).to(act.dtype.element_ty), mask=rn < I)
    else:  # shared expert of token a - NK: unscaled float rows [gate | up] of one matrix
        n = (a - NK).to(tl.int64)
        g, u = _gemv_pair(x + n * sx, sq, ss, s_eq, s_nq, s_es, s_ns, s_ks, sq + IS * s_nq, ss, s_eq, s_nq, s_es,
                          s_ns, s_ks, n * 0, rn, rn < IS, H, 1, UNSCALED, UNSCALED, 1, BN, BK, STAGES)
        tl.store(act_s + n * IS + rn, (g * tl.sigmoid(g) * u).to(act_s.dtype.element_ty), mask=rn < IS)


@triton.jit
def _down_gemv_kernel(act, ids, wts, y, sy, act_s, sg,
                      dq, ds, d_eq, d_nq, d_es, d_ns, d_ks, sq, ss, s_eq, s_nq, s_es, s_ns, s_ks,
                      I, IS, H, TOPK: tl.constexpr, FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                      NS: tl.constexpr, SHARED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      STAGES: tl.constexpr):
    n, i_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rn = i_n * BN + tl.arange(0, BN)
    mn = rn < H
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    ip = tl.cdiv(I, BK) * BK  # the K slots laid end to end, each padded to whole tiles: one pipelined loop
    for kk in tl.range(0, TOPK * ip, BK, num_stages=STAGES):
        j = kk // ip
        k0 = kk - j * ip
        a = n * TOPK + j
        e = tl.load(ids + a)
        wt = tl.load(wts + a)
        rk = k0 + tl.arange(0, BK)
        av = tl.load(act + a * I + rk, mask=rk < I, other=0.0).to(tl.float32) * wt
        acc += _w_tile(dq, ds, e, rn, mn, k0, I, d_eq, d_nq, d_es, d_ns, d_ks, FMT, SBN, SBK, NS, BN, BK) * av[None, :]
    if SHARED:
        gate = tl.load(sg + n)
        for k0 in tl.range(0, IS, BK, num_stages=STAGES):
            rk = k0 + tl.arange(0, BK)
            av = tl.load(act_s + n * IS + rk, mask=rk < IS, other=0.0).to(tl.float32) * gate
            acc += _w_tile(sq, ss, n * 0, rn, mn, k0, IS, s_eq, s_nq, s_es, s_ns, s_ks, 1, UNSCALED, UNSCALED, 1,
                           BN, BK) * av[None, :]
    tl.store(y + n * sy + rn, tl.sum(acc, 1).to(y.dtype.element_ty), mask=mn)


@triton.jit
def _up_gemm_kernel(x, sx, rows, block_e, act,
                    gq, gs, g_eq, g_nq, g_es, g_ns, g_ks, uq, us, u_eq, u_nq, u_es, u_ns, u_ks,
                    NK, I, H, E, TOPK: tl.constexpr, FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr,
                    NS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    nn = tl.cdiv(I, BN)
    i_m, i_n = pid // nn, pid % nn  # the N blocks of one row block run side by side
    e = tl.load(block_e + i_m)
    if e < E:  # blocks past the last expert's padded rows do nothing
        ra = tl.load(rows + i_m * BM + tl.arange(0, BM))
        valid = ra < NK
        tok = (ra // TOPK).to(tl.int64)
        rn = i_n * BN + tl.arange(0, BN)
        mn = rn < I
        accg = tl.zeros((BM, BN), dtype=tl.float32)
        accu = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, H, BK):
            rk = k0 + tl.arange(0, BK)
            xt = tl.load(x + tok[:, None] * sx + rk[None, :], mask=valid[:, None] & (rk < H)[None, :], other=0.0)
            wg = _w_tile(gq, gs, e, rn, mn, k0, H, g_eq, g_nq, g_es, g_ns, g_ks, FMT, SBN, SBK, NS, BN, BK)
            accg = tl.dot(xt, tl.trans(wg.to(xt.dtype)), accg, input_precision=PREC)
            wu = _w_tile(uq, us, e, rn, mn, k0, H, u_eq, u_nq, u_es, u_ns, u_ks, FMT, SBN, SBK, NS, BN, BK)
            accu = tl.dot(xt, tl.trans(wu.to(xt.dtype)), accu, input_precision=PREC)
        out = accg * tl.sigmoid(accg) * accu
        tl.store(act + ra.to(tl.int64)[:, None] * I + rn[None, :], out.to(act.dtype.element_ty),
                 mask=valid[:, None] & mn[None, :])


@triton.jit
def _down_gemm_kernel(act, rows, block_e, wts, y,
                      dq, ds, d_eq, d_nq, d_es, d_ns, d_ks,
                      NK, I, H, E, FMT: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, NS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    nn = tl.cdiv(H, BN)
    i_m, i_n = pid // nn, pid % nn
    e = tl.load(block_e + i_m)
    if e < E:
        ra = tl.load(rows + i_m * BM + tl.arange(0, BM))
        valid = ra < NK
        ra64 = ra.to(tl.int64)
        rn = i_n * BN + tl.arange(0, BN)
        mn = rn < H
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, I, BK):
            rk = k0 + tl.arange(0, BK)
            at = tl.load(act + ra64[:, None] * I + rk[None, :], mask=valid[:, None] & (rk < I)[None, :], other=0.0)
            wd = _w_tile(dq, ds, e, rn, mn, k0, I, d_eq, d_nq, d_es, d_ns, d_ks, FMT, SBN, SBK, NS, BN, BK)
            acc = tl.dot(at, tl.trans(wd.to(at.dtype)), acc, input_precision=PREC)
        wt = tl.load(wts + ra, mask=valid, other=0.0).to(tl.float32)
        tl.store(y + ra64[:, None] * H + rn[None, :], (acc * wt[:, None]).to(y.dtype.element_ty),
                 mask=valid[:, None] & mn[None, :])


def align(ids: torch.Tensor, num_experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert and pad each expert's run to a multiple of bm rows (torch ops, no host
    synchronisation).

    ids: [N, K] expert ids. Returns rows int32 [NB * bm] (pair index a, or N*K for padding) and block_e int32
    [NB] (expert of each row block, E for blocks past the end); NB is a static upper bound.
    """
    flat = ids.reshape(-1).long()
    nk = flat.numel()
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    # not torch.bincount: on CUDA it reads the largest id back to the host, a sync per MoE layer
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device).index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + bm - 1) // bm * bm
    ends = torch.cumsum(padded, 0)
    starts = torch.cumsum(counts, 0) - counts
    dest = (ends - padded)[sorted_e] + torch.arange(nk, device=ids.device) - starts[sorted_e]
    nb = triton.cdiv(nk + min(num_experts, nk) * (bm - 1), bm)
    rows = torch.full((nb * bm,), nk, dtype=torch.int32, device=ids.device)
    rows[dest] = order.to(torch.int32)
    block_e = torch.searchsorted(ends, torch.arange(nb, device=ids.device) * bm, right=True).to(torch.int32)
    return rows, block_e


def _check(x: torch.Tensor, gate: ExpertMatrix, up: ExpertMatrix, down: ExpertMatrix,
           shared: SharedExpert | None) -> None:
    e, i, h = gate.shape
    if up.shape != gate.shape or down.shape != (e, h, i) or x.shape[-1] != h:
        raise ValueError(f"experts: gate {gate.shape}, up {up.shape} must be [E, I, H] and down {down.shape} "
                         f"[E, H, I] with H = x's width {x.shape[-1]}")
    if len({gate.fmt, up.fmt, down.fmt}) != 1 or gate.block != up.block:
        raise ValueError(f"experts: gate, up and down must share one format ({gate.fmt}, {up.fmt}, {down.fmt}) "
                         f"and gate / up one scale block ({gate.block}, {up.block})")
    if shared is not None and (shared.gate_up.shape[::2] != (1, h) or shared.down.shape[:2] != (1, h)):
        raise ValueError(f"experts: the shared expert {shared.gate_up.shape} / {shared.down.shape} does not take "
                         f"H={h}")
    if x.stride(-1) != 1:
        raise ValueError("experts: x needs a contiguous last dim")


def _tile(cfg: dict, k: int) -> int:
    """K tile of a kernel config for reduction length k: a power of two, at least one int4 group (32), whose
    half (the int4 bytes) still meets tl.dot's minimum of 16."""
    return min(cfg["BK"], max(32, triton.next_power_of_2(k)))


def experts_forward(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate: ExpertMatrix, up: ExpertMatrix,
                    down: ExpertMatrix, out: torch.Tensor | None = None, shared: SharedExpert | None = None,
                    shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j weights[n, j] * swiglu_e(x[n]) over the routed experts e = ids[n, j], plus, with `shared`,
    shared_gate[n] * swiglu_shared(x[n]).

    x: [N, H]; weights fp32 [N, K]; ids [N, K]; gate, up: [E, I, H]; down: [E, H, I]; shared_gate fp32 [N]
    (route_into's sigmoid). Returns [N, H] in x's dtype (into `out` when given).
    """
    _check(x, gate, up, down, shared)
    n, h = x.shape
    e, i, _ = gate.shape
    top_k = ids.shape[1]
    nk = n * top_k
    ids32 = ids.to(torch.int32).contiguous()
    wts = weights.float().contiguous()
    act = torch.empty(nk, i, dtype=x.dtype, device=x.device)
    y = out if out is not None else torch.empty(n, h, dtype=x.dtype, device=x.device)
    if nk <= GEMV_MAX_PAIRS:
        s = shared if shared is not None else SharedExpert(gate, down)  # unused stand-in: SHARED=False
        i_s = s.inner if shared is not None else 0
        act_s = torch.empty(n, max(i_s, 1), dtype=x.dtype, device=x.device)
        sg = shared_gate if shared is not None else wts
        cu, cd = GEMV_UP, GEMV_DOWN
        bk = _tile(cu, h)
        _up_gemv_kernel[(nk + (n if shared is not None else 0), triton.cdiv(max(i, i_s), cu["BN"]))](
            x, x.stride(0), ids32, act, act_s, *gate.args(), *up.args(), *s.gate_up.args(), nk, i, i_s, h,
            TOPK=top_k, **gate.meta(bk), BN=cu["BN"], BK=bk, STAGES=cu["STAGES"], num_warps=cu["WARPS"])
        bk = _tile(cd, i if shared is None else max(i, i_s))
        _down_gemv_kernel[(n, triton.cdiv(h, cd["BN"]))](
            act, ids32, wts, y, y.stride(0), act_s, sg, *down.args(), *s.down.args(), i, i_s, h,
            TOPK=top_k, **down.meta(bk), SHARED=shared is not None, BN=cd["BN"], BK=bk, STAGES=cd["STAGES"],
            num_warps=cd["WARPS"])
        return y
    prec = dot_precision(x.dtype)
    cu, cd = GEMM_UP, GEMM_DOWN
    rows, block_e = align(ids, e, cu["BM"])
    bk = _tile(cu, h)
    _up_gemm_kernel[(block_e.numel() * triton.cdiv(i, cu["BN"]),)](
        x, x.stride(0), rows, block_e, act, *gate.args(), *up.args(), nk, i, h, e,
        TOPK=top_k, **gate.meta(bk), BM=cu["BM"], BN=cu["BN"], BK=bk, PREC=prec,
        num_warps=cu["WARPS"], num_stages=cu["STAGES"])
    if cd["BM"] != cu["BM"]:
        rows, block_e = align(ids, e, cd["BM"])
    ys = torch.empty(nk, h, dtype=x.dtype, device=x.device)
    bk = _tile(cd, i)
    _down_gemm_kernel[(block_e.numel() * triton.cdiv(h, cd["BN"]),)](
        act, rows, block_e, wts, ys, *down.args(), nk, i, h, e,
        **down.meta(bk), BM=cd["BM"], BN=cd["BN"], BK=bk, PREC=prec, num_warps=cd["WARPS"], num_stages=cd["STAGES"])
    acc = ys.view(n, top_k, h).sum(1, dtype=torch.float32)
    if shared is not None:
        gu = torch.nn.functional.linear(x, shared.gate_up.data[0])
        g_s, u_s = gu.chunk(2, dim=-1)
        acc += shared_gate[:, None] * torch.nn.functional.linear(torch.nn.functional.silu(g_s) * u_s,
                                                                  shared.down.data[0])
    y.copy_(acc)
    return y


def moe_forward(x: torch.Tensor, router: torch.Tensor, gate: ExpertMatrix, up: ExpertMatrix, down: ExpertMatrix,
                shared_gate: torch.Tensor, shared_up: torch.Tensor, shared_down: torch.Tensor,
                shared_gate_w: torch.Tensor, top_k: int, normalize: bool) -> torch.Tensor:
    """A sparse-MoE layer as GpuModel runs it (the CUDA kernel of the nextq::moe, moe_int4 and moe_fp8 ops):
    one GEMM for router | shared gate, fused routing, routed experts, sigmoid-gated shared expert.

    x [N, H]; router [E, H]; gate, up [E, I, H], down [E, H, I] in any ExpertMatrix format; shared_gate,
    shared_up [Is, H], shared_down [H, Is], shared_gate_w [1, H] (float). Returns [N, H] in x's dtype.
    """
    logits = torch.nn.functional.linear(x, torch.cat([router, shared_gate_w]))  # [N, E + 1]
    w, ids, sg = route_into(logits, router.shape[0], top_k, normalize, shared=True)
    return experts_forward(x.contiguous(), w, ids, gate, up, down,
                           shared=SharedExpert.from_dense(shared_gate, shared_up, shared_down), shared_gate=sg)
