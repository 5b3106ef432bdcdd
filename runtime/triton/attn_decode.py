"""Gated attention over the KV cache for a few new tokens (decode, speculative verify), split over the span.

Math of runtime/model.py's attention: scores scaled by D^-0.5, key j visible to the token at position p iff
j <= p, GQA (query head h reads KV head h // (Hq / Hkv)), output o * sigmoid(gate) written straight into the
[B, T, Hq * D] layout the output projection reads. Scores and the softmax in fp32; the probabilities enter the
value product as two bf16 / fp16 terms (hi + lo, about 16 bits), so the result is that of fp32 probabilities, where
the eager path rounds both scores and probabilities to the compute dtype.

Split-K, as flash-decoding does: at batch 1 a decode step has 16 query heads over about 600 cache rows, so one
program per (token, head) walking the span alone (version 5's kernel, kept as `attn_decode_serial_into`) ran 16
programs on 132 SMs, each ~20 dependent block steps: latency-bound. Here
- `_attn_split_kernel`, grid (B * Hkv, splits): one program per (sequence, KV head, slice of the span) computes
  the T tokens x GROUP query heads of that KV head at once (one [R, D] query tile, R = GROUP * T padded, two tensor
  core products per block of BLOCK_S rows, so each KV row is read once per program, not once per query head), and
  writes its partial (running max m, sum l, unnormalised output acc) in fp32;
- `_attn_combine_kernel`, grid (B * T, Hq): rescales the partials of the slices that hold visible rows by
  exp(m - max m), normalises, applies the gate and writes the output.
The number of slices comes from the grid (B * Hkv programs per slice) and the span (`num_splits`): at most about
one program per SM, a few blocks of rows per slice on long spans (each slice costs the combine a read). It does
not depend on T, so a verify step slices the span as the decode step of the same span does. The visible length is read on the device (positions), so the grid is
fixed per (B, T, span) and the launch can be graph-captured; slices past the last visible row write nothing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_S = 32  # cache rows per step
MIN_SPLITS = 8  # slices of a short span
MIN_SLICE_BLOCKS = 3  # blocks per slice at least, past MIN_SPLITS slices (the combine reads every slice)
COMBINE_BLOCK = 8  # partials the combine kernel reads per step


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(groups: int, span: int, device: torch.device | str | None = None) -> int:
    """Slices of the span for `groups` = B * Hkv (sequence, KV head) pairs: MIN_SPLITS, or one per MIN_SLICE_BLOCKS
    blocks of BLOCK_S rows on longer spans, but no more programs than about one per SM, nor slices than blocks.
    From the fixed-count sweep of scripts/ab_attn.py on the H200 (132 SMs; docs/gpu.md): at B = 1 over 640 rows,
    8 - 16 slices took 8.1 - 8.2 us and 24 took 8.5; over 2000 rows 16 took 10.7 us and 64 took 15.0; at B = 8,
    8 slices were the fastest at both spans."""
    dev = torch.device(device if device is not None else "cuda")
    sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
    blocks = triton.cdiv(span, BLOCK_S)
    return max(1, min(blocks, triton.cdiv(sms, groups), max(MIN_SPLITS, blocks // MIN_SLICE_BLOCKS)))


@triton.jit
def _attn_split_kernel(q, sq_b, sq_h, sq_t, kc, vc, sc_b, sc_h, sc_s, positions, po, pm, pl, span, T, HKV, chunk,
                       scale, GROUP: tl.constexpr, TB: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                       BD: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr, P_HILO: tl.constexpr):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    n_s = tl.num_programs(1)
    b = (i_bh // HKV).to(tl.int64)
    hk = i_bh % HKV
    r = tl.arange(0, R)  # query row r: head hk * GROUP + r // TB, token r % TB
    g, t = r // TB, r % TB
    valid = (g < GROUP) & (t < T)
    last = tl.minimum(tl.load(positions + t, mask=valid, other=-1).to(tl.int32), span - 1)  # [R], -1 if padding
    top = tl.max(last, 0)  # the last row any token sees
    start = i_s * chunk
    end = tl.minimum(start + chunk, top + 1)
    rd = tl.arange(0, BD)
    md = rd < D
    h = hk * GROUP + g
    qt = tl.load(q + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + rd[None, :],
                 mask=valid[:, None] & md[None, :], other=0.0)  # [R, BD]
    kb, vb = kc + b * sc_b + hk * sc_h, vc + b * sc_b + hk * sc_h
    m_i = tl.full([R], float("-inf"), tl.float32)  # running max and sum of the online softmax
    l_i = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, BD], tl.float32)
    for s0 in range(start, end, BS):
        rs = s0 + tl.arange(0, BS)
        m2 = (rs <= top)[:, None] & md[None, :]  # rows past `top` are never read (stale or poison)
        kt = tl.load(kb + rs[:, None] * sc_s + rd[None, :], mask=m2, other=0.0)  # [BS, BD]
        vt = tl.load(vb + rs[:, None] * sc_s + rd[None, :], mask=m2, other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale  # [R, BS] fp32
        s = tl.where(rs[None, :] <= last[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        if P_HILO:  # p = hi + lo in the cache dtype: the product sees about 16 bits of p
            p_hi = p.to(vt.dtype)
            pv = tl.dot(p_hi, vt) + tl.dot((p - p_hi.to(tl.float32)).to(vt.dtype), vt)
        else:
            pv = tl.dot(p, vt, input_precision=PREC)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    keep = valid & (start <= last)  # this slice holds rows the token sees
    row = (i_bh * n_s + i_s).to(tl.int64) * R + r  # partials [B * Hkv, splits, R, (BD)]
    tl.store(po + row[:, None] * BD + rd[None, :], acc, mask=keep[:, None] & md[None, :])
    tl.store(pm + row, m_i, mask=keep)
    tl.store(pl + row, l_i, mask=keep)


@triton.jit
def _attn_combine_kernel(po, pm, pl, positions, gate, sg_b, sg_t, o, so_b, so_t, span, T, HKV, n_s, chunk,
                         GROUP: tl.constexpr, TB: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                         BD: tl.constexpr, NS: tl.constexpr, CB: tl.constexpr):
    i_bt, h = tl.program_id(0), tl.program_id(1)
    b, t = (i_bt // T).to(tl.int64), i_bt % T
    hk = h // GROUP
    r = (h % GROUP) * TB + t
    last = tl.minimum(tl.load(positions + t).to(tl.int32), span - 1)
    n_used = last // chunk + 1  # slices 0 .. n_used - 1 hold rows this token sees
    base = (b * HKV + hk) * n_s
    rn = tl.arange(0, NS)
    m_all = tl.load(pm + (base + rn) * R + r, mask=rn < n_used, other=float("-inf"))
    m_max = tl.max(m_all, 0)  # finite: row 0 is always visible
    rd = tl.arange(0, BD)
    md = rd < D
    acc = tl.zeros([BD], tl.float32)
    l_sum = tl.zeros([1], tl.float32)
    for c0 in range(0, n_used, CB):
        rc = c0 + tl.arange(0, CB)
        mc = rc < n_used
        row = (base + rc) * R + r
        w = tl.exp(tl.load(pm + row, mask=mc, other=float("-inf")) - m_max)  # [CB], 0 for slices left out
        pa = tl.load(po + row[:, None] * BD + rd[None, :], mask=mc[:, None] & md[None, :], other=0.0)
        acc += tl.sum(pa * w[:, None], 0)
        l_sum += tl.sum(w * tl.load(pl + row, mask=mc, other=0.0), 0)
    gv = tl.load(gate + b * sg_b + t * sg_t + h * D + rd, mask=md, other=0.0).to(tl.float32)
    out = acc / l_sum * tl.sigmoid(gv)
    tl.store(o + b * so_b + t * so_t + h * D + rd, out.to(o.dtype.element_ty), mask=md)


def _check(q, k_cache, v_cache, gate, out) -> None:
    b, hq, t, d = q.shape
    if q.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("attn_decode: q and the caches need unit last strides and the caches one layout")
    if gate.stride(-1) != 1 or out.stride(-1) != 1 or gate.shape != out.shape or out.shape != (b, t, hq * d):
        raise ValueError(f"attn_decode: gate and out must be [{b}, {t}, {hq * d}] with unit last strides, got "
                         f"{tuple(gate.shape)} and {tuple(out.shape)}")
    if hq % k_cache.shape[1]:
        raise ValueError(f"attn_decode: {hq} query heads do not group over {k_cache.shape[1]} KV heads")


def attn_decode_into(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     span: int, gate: torch.Tensor, out: torch.Tensor, splits: int | None = None) -> None:
    """q [B, Hq, T, D] (qk_rope's layout), caches [B, Hkv, S, D] (one layout, unit last stride; q's dtype),
    positions int [T] on the device (token t sees cache rows 0 .. positions[t], at most span - 1), gate
    [B, T, Hq * D] (a view of the projection: unit last stride) -> out [B, T, Hq * D] = attention *
    sigmoid(gate), in out's dtype. splits: slices of the span (default `num_splits`); two launches."""
    _check(q, k_cache, v_cache, gate, out)
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"attn_decode: q {q.dtype} and the caches {k_cache.dtype} / {v_cache.dtype} differ")
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    tb = triton.next_power_of_2(t)
    r = max(16, triton.next_power_of_2(group * tb))  # tensor-core products need 16 rows
    bd = max(16, triton.next_power_of_2(d))  # the products' inner dimension: 16 at least
    blocks = triton.cdiv(span, BLOCK_S)
    n = max(1, min(blocks, splits or num_splits(b * hkv, span, q.device)))
    chunk = triton.cdiv(blocks, n) * BLOCK_S  # rows per slice, a multiple of BLOCK_S
    n = triton.cdiv(span, chunk)
    po = torch.empty(b * hkv * n * r * bd, device=q.device, dtype=torch.float32)
    pm = torch.empty(b * hkv * n * r, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    fp32 = k_cache.dtype == torch.float32
    _attn_split_kernel[(b * hkv, n)](
        q, q.stride(0), q.stride(1), q.stride(2), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), positions, po, pm, pl, span, t, hkv, chunk, d ** -0.5, GROUP=group, TB=tb, R=r, D=d,
        BD=bd, BS=BLOCK_S, PREC="ieee" if fp32 else "tf32", P_HILO=not fp32, num_warps=4 if r * bd <= 8192 else 8)
    _attn_combine_kernel[(b * t, hq)](
        po, pm, pl, positions, gate, gate.stride(0), gate.stride(1), out, out.stride(0), out.stride(1), span, t,
        hkv, n, chunk, GROUP=group, TB=tb, R=r, D=d, BD=bd, NS=triton.next_power_of_2(n), CB=COMBINE_BLOCK,
        num_warps=4)


# ---- version 5's kernel: one program per (sequence, token, query head) over the whole span (for A/B) --------


@triton.jit
def _attn_serial_kernel(q, sq_b, sq_h, sq_t, kc, vc, sc_b, sc_h, sc_s, positions, gate, sg_b, sg_t, o, so_b, so_t,
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


def attn_decode_serial_into(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                            span: int, gate: torch.Tensor, out: torch.Tensor) -> None:
    """attn_decode_into's contract with version 5's kernel: grid (B * T, Hq), each program over the whole span."""
    _check(q, k_cache, v_cache, gate, out)
    b, hq, t, d = q.shape
    _attn_serial_kernel[(b * t, hq)](
        q, q.stride(0), q.stride(1), q.stride(2), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), positions, gate, gate.stride(0), gate.stride(1), out, out.stride(0), out.stride(1),
        span, t, hq // k_cache.shape[1], d, d ** -0.5, BS=BLOCK_S, BD=triton.next_power_of_2(d), num_warps=4)
