"""Data-aware quantizers on a scheme's own grid: GPTQ and importance-weighted grid search ("awmse").

    quantize_gptq(w [N, K], hessian [K, K], scheme)  -> QuantizedTensor
    quantize_awmse(w [N, K], hessian [K, K], scheme) -> QuantizedTensor
    quantize_gptq_batch(w [B, N, K], hessian [B, K, K], scheme) -> [QuantizedTensor] * B  (a chunk of experts)

hessian = sum over calibration tokens of x x^T for the weight's input (per expert: over the tokens routed to it);
its diagonal is the per-column importance (llama.cpp's imatrix is the same diagonal divided by the token count).
Both return exactly the format the scheme's round-to-nearest produces, so exporters copy it unchanged (Q4_0 blocks,
K-quant blocks, ...). Each scheme family contributes one `Grid` (a registry keyed by `Scheme.family`):

    width     columns sharing one set of qparams (int4: the group; K-quants: the 256-column super-block)
    choose    qparams of a column block `[N, width]` given the importance of its columns (`[width]`, or `[N, width]`:
              rows of weights with different inputs side by side, as batched GPTQ does)
              int4:    the importance-weighted MSE search over shrunk RTN scales (`search_group_params`)
              kquant:  ggml's own imatrix search (make_qkx3_quants + make_qp_quants / make_qx_quants,
                       quant/kquants.py): the grid llama.cpp would pick with this importance
    levels    (step, offset) `[N, width]` of those qparams: value = code * step + offset, codes 0..qmax
    codes     nearest codes of a block on its qparams, as the scheme's own quantizer computes them
    encode    codes `[N, K]` + the blocks' qparams -> the QuantizedTensor

awmse = choose + nearest codes per block (for K-quants: llama.cpp's imatrix quantization, with per-expert
statistics). gptq = Frantar et al. 2022: columns quantized in order on the grid chosen when their block comes up
(on the error-updated weights), each column's error pushed onto the columns not yet quantized through the Cholesky
factor of H^-1 (H + 1% of its mean diagonal as damping), the factor shared by weights of one input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .int4 import pack_int4
from .gguf_blocks import GGUF_BLOCK_TYPES
from .kquants import KQUANTS, QK_K, KQParams
from .schemes import get_scheme
from .tensor import QuantizedTensor, as_float32_matrix, check_group

SHRINK = torch.linspace(1.0, 0.6, 9)  # candidate fractions of the RTN range (1.0 = RTN's own scale)
DAMP = 0.01  # fraction of the mean Hessian diagonal (the GPTQ paper's default); also keeps unseen columns weighted
GPTQ_BLOCK = 256  # columns per lazy-update block; a multiple of every grid width


@dataclass(frozen=True)
class Grid:
    """How the data-aware quantizers use one scheme (see the module docstring)."""

    width: int
    qmax: int
    choose: Callable[[torch.Tensor, torch.Tensor], Any]
    levels: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
    codes: Callable[[torch.Tensor, Any], torch.Tensor]
    encode: Callable[[torch.Tensor, list[Any]], QuantizedTensor]


# ---- int4 (Q4_0 / Q4_1 grids) ---------------------------------------------------------------------------------


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _codes(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, qmax: int = 15) -> torch.Tensor:
    """Nearest codes 0..qmax of w on the grid q * d + m (d may be 0: then every code is the one nearest m)."""
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return torch.round((w - m) * inv).clamp(0, qmax)


def search_group_params(wg: torch.Tensor, h: torch.Tensor, sym: bool, qmax: int = 15
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid (d, m), fp16-exact, minimising sum_k h_k (w_k - (q_k d + m))^2, codes q in 0..qmax.

    wg: [..., g] weights of one group per row; h: [g] (or broadcastable) non-negative weights per input channel.
    sym (Q4_0 / Q5_0 / Q8_0 grids, m = -z d with z = (qmax + 1) // 2): candidates d = s * vmax / -z and
    s * vmax / (qmax - z), vmax the signed largest-|w| element; asym (Q4_1 / Q5_1): candidates d = s (max - min) /
    qmax, m = s min, both ends shrunk by s. Returns d, m: [...] float32 (m = -z d when sym).
    """
    shrink = SHRINK.to(wg.device)
    if sym:
        z = (qmax + 1) // 2
        vmax = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))  # [..., 1]
        d = _fp16(torch.cat([vmax * shrink / -z, vmax * shrink / (qmax - z)], dim=-1))  # [..., S]
        m = -z * d
    else:
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        m = _fp16(lo * shrink)  # [..., S]
        d = _fp16((hi - lo) * shrink / qmax)
    w = wg.unsqueeze(-2)  # [..., 1, g]
    q = _codes(w, d.unsqueeze(-1), m.unsqueeze(-1), qmax)  # [..., S, g]
    err = ((w - (q * d.unsqueeze(-1) + m.unsqueeze(-1))) ** 2 * h.unsqueeze(-2)).sum(-1)  # [..., S]
    best = err.argmin(-1, keepdim=True)
    return d.gather(-1, best).squeeze(-1), m.gather(-1, best).squeeze(-1)


def _int4_grid(scheme: str) -> Grid:
    s = get_scheme(scheme)
    g = s.block

    def levels(p: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        d, m = p  # [N] each
        return d[:, None].expand(-1, g), m[:, None].expand(-1, g)

    def encode(q: torch.Tensor, ps: list[tuple[torch.Tensor, torch.Tensor]]) -> QuantizedTensor:
        n, k = q.shape
        d, m = torch.stack([p[0] for p in ps], 1), torch.stack([p[1] for p in ps], 1)  # [N, K/g]
        return QuantizedTensor(scheme=scheme, shape=(n, k), data=pack_int4(q.to(torch.uint8)),
                               scales=d.to(torch.float16), zero_points=None if s.symmetric else m.to(torch.float16),
                               block_size=g, nibble_order="low_even")

    return Grid(g, 15, lambda wb, h: search_group_params(wb, h, s.symmetric), levels,
                lambda wb, p: _codes(wb, p[0][:, None], p[1][:, None]), encode)


# ---- K-quants ---------------------------------------------------------------------------------------------------


def _kquant_grid(scheme: str) -> Grid:
    kq = KQUANTS[scheme]

    def levels(p: KQParams) -> tuple[torch.Tensor, torch.Tensor]:
        step, offset = kq.grid(p)  # [N, S, 1]
        n = step.shape[0]
        return step.expand(-1, -1, kq.sub).reshape(n, QK_K), offset.expand(-1, -1, kq.sub).reshape(n, QK_K)

    def encode(q: torch.Tensor, ps: list[KQParams]) -> QuantizedTensor:
        p = KQParams(*(torch.cat([getattr(x, f) for x in ps], dim=1) for f in ("d", "dmin", "sc", "m", "L0")))
        return kq.encode(q, p)

    return Grid(QK_K, kq.qmax, lambda wb, h: kq.choose_qparams(wb, h), levels, kq.codes, encode)


# ---- Q5_0 / Q5_1 (llama.cpp's fallbacks) and Q8_0: groups of 32 ------------------------------------------------


def _group32_grid(scheme: str) -> Grid:
    """Q5_0 (sym, codes 0..31, value d (q - 16)), Q5_1 (d q + m) and Q8_0 (int8_g32: codes 0..254 = q + 127)."""
    s = get_scheme(scheme)
    qmax = 254 if scheme == "int8_g32" else 31

    def levels(p: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return p[0][:, None].expand(-1, 32), p[1][:, None].expand(-1, 32)

    def encode(q: torch.Tensor, ps: list[tuple[torch.Tensor, torch.Tensor]]) -> QuantizedTensor:
        n, k = q.shape
        d, m = torch.stack([p[0] for p in ps], 1), torch.stack([p[1] for p in ps], 1)  # [N, K/32]
        if scheme == "int8_g32":
            return QuantizedTensor(scheme=scheme, shape=(n, k), data=(q - 127).to(torch.int8),
                                   scales=d.to(torch.float16), block_size=32)
        return GGUF_BLOCK_TYPES[scheme].encode(q, d, None if s.symmetric else m)

    return Grid(32, qmax, lambda wb, h: search_group_params(wb, h, s.symmetric, qmax), levels,
                lambda wb, p: _codes(wb, p[0][:, None], p[1][:, None], qmax), encode)


GRIDS: dict[str, Callable[[str], Grid]] = {"int4": _int4_grid, "kquant": _kquant_grid, "gguf": _group32_grid,
                                           "int8": _group32_grid}


def grid_for(scheme: str) -> Grid:
    """The data-aware grid of a calibratable scheme; other schemes raise ValueError naming the calibratable ones."""
    s = get_scheme(scheme)
    if not s.calibratable or s.family not in GRIDS:
        from .schemes import SCHEMES

        ok = [n for n, x in SCHEMES.items() if x.calibratable]
        raise ValueError(f"data-aware quantization: scheme {scheme!r} has no grid; calibratable: {', '.join(ok)}")
    return GRIDS[s.family](scheme)


def _importance(hessian: torch.Tensor) -> torch.Tensor:
    """Per-column importance `[K]` from H `[K, K]`: its diagonal plus DAMP of the mean (columns never seen keep a
    little weight, as they still carry weights that must be represented)."""
    h = hessian.diagonal().float().clamp_min(0)
    return h + DAMP * h.mean() + 1e-30


def quantize_awmse(w: torch.Tensor, hessian: torch.Tensor, scheme: str) -> QuantizedTensor:
    """Importance-weighted grid search per block, nearest codes. w: [N, K]; hessian: [K, K] (its diagonal)."""
    grid = grid_for(scheme)
    w = as_float32_matrix(w)
    n, k = w.shape
    check_group(k, grid.width, scheme)
    h = _importance(hessian)
    ps, qs = [], []
    for b0 in range(0, k, grid.width):
        wb = w[:, b0:b0 + grid.width]
        p = grid.choose(wb, h[b0:b0 + grid.width])
        ps.append(p)
        qs.append(grid.codes(wb, p))
    return grid.encode(torch.cat(qs, dim=1), ps)


def gptq_factor(hessian: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U `[..., K, K]` float32 of (H + damping)^-1 (U^T U = H^-1) for H `[..., K, K]`
    (one Hessian or a batch of them), which GPTQ pushes each column's error through. Float32, as in the GPTQ
    paper's reference code; a Hessian too ill-conditioned for that (the factorisation fails) is factored in float64
    instead. Columns never seen (H_kk = 0) get H_kk = 1.

    One factor serves every weight fed the same input (an expert's gate and up), so calibration computes it once
    per input (quant/calibrate.py `CalibrationStats.gptq_factor`)."""
    if hessian.dim() > 2:
        return torch.stack([gptq_factor(h) for h in hessian]) if hessian.dim() > 3 else _factor_batch(hessian)
    return _factor_batch(hessian[None])[0]


def _factor_batch(hessian: torch.Tensor) -> torch.Tensor:
    """`gptq_factor` of H `[B, K, K]`: the batch in float32 at once, each one that fails again in float64."""
    k = hessian.shape[-1]
    out = torch.empty(hessian.shape, dtype=torch.float32, device=hessian.device)
    todo = torch.arange(hessian.shape[0], device=hessian.device)
    for dtype in (torch.float32, torch.float64):
        h = hessian[todo].to(dtype, copy=True)
        diag = h.diagonal(dim1=-2, dim2=-1)
        diag.masked_fill_(diag <= 0, 1.0)
        diag.add_(DAMP * diag.mean(-1, keepdim=True))
        # U^T U = H^-1 with U upper is H = V V^T with V = U^-1 upper: J H J = (J V J)(J V J)^T with J V J lower,
        # so V = J chol(J H J) J and U = J chol(J H J)^-1 J (J reverses the order: one Cholesky, one inverse)
        chol, info = torch.linalg.cholesky_ex(h.flip(-2, -1))
        eye = torch.eye(k, dtype=dtype, device=h.device).expand_as(chol)
        u = torch.linalg.solve_triangular(chol, eye, upper=False).flip(-2, -1)
        ok = (info == 0) & torch.isfinite(u).flatten(1).all(-1)
        out[todo[ok]] = u[ok].float()
        todo = todo[~ok]
        if todo.numel() == 0:
            return out
    raise ValueError(f"GPTQ: the Hessian [{k}, {k}] is not positive definite even with {DAMP:.0%} damping")


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, scheme: str,
                  factor: torch.Tensor | None = None) -> QuantizedTensor:
    """GPTQ on the scheme's grid of one weight w `[N, K]` with its hessian `[K, K]`; `factor`: `gptq_factor(hessian)`
    when the caller already has it. `quantize_gptq_batch` of a batch of one."""
    w = as_float32_matrix(w)
    return quantize_gptq_batch(w[None], hessian[None], scheme, None if factor is None else factor[None])[0]


def quantize_gptq_batch(w: torch.Tensor, hessian: torch.Tensor | Sequence[torch.Tensor], scheme: str,
                        factor: torch.Tensor | Sequence[torch.Tensor] | None = None) -> list[QuantizedTensor]:
    """GPTQ of B weights of one shape at once (a chunk of experts' gate, up or down), each on its own Hessian.
    w: [B, N, K] (finite floats); hessian: [B, K, K] (or B tensors [K, K]); factor: `gptq_factor(hessian)`
    `[B, K, K]` (or B tensors [K, K]; None: computed here). Returns the B QuantizedTensors, each the same computation as `quantize_gptq`
    of that weight alone (bit-identical on CPU, tests/test_quant_recipes.py).

    The weights are worked on transposed and side by side (`[K, B*N]`: a column of every weight is one contiguous
    row), so each column costs a few kernels for the whole batch (on a GPU the loop is launch-bound: batching is what
    makes it fast); each column's error is added onto the rest of its lazy-update block in place, each weight's
    through its own factor row, the block's errors onto the columns after it as one batched matrix product. Grids
    are chosen per row, with each weight's own importance."""
    grid = grid_for(scheme)
    b, n, k = w.shape
    g = grid.width
    check_group(k, g, scheme)
    u = gptq_factor(torch.stack(list(hessian))) if factor is None else factor  # B factors [K, K]
    dev = u[0].device
    inv_diag = torch.stack([1.0 / x.diagonal() for x in u], 1)  # [K, B]
    imp = torch.stack([_importance(h) for h in hessian]).to(dev)  # [B, K]
    wt = w.to(device=dev, dtype=torch.float32).permute(2, 0, 1).reshape(k, b * n).contiguous()  # [K, B*N]
    wt3 = wt.view(k, b, n)
    qt = torch.zeros(k, b * n, device=dev)
    ps = []
    block = max(GPTQ_BLOCK // g, 1) * g
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        errs = torch.zeros(b1 - b0, b, n, device=dev)
        ut = torch.stack([x[b0:b1, b0:b1] for x in u], -1)  # [row i, column, B]: the block's factor rows
        for j0 in range(b0, b1, g):  # a grid block lies inside the lazy-update block (block is a multiple of g)
            rows_imp = imp[:, None, j0:j0 + g].expand(b, n, g).reshape(b * n, g)
            p = grid.choose(wt[j0:j0 + g].T, rows_imp)  # qparams of every row of every weight
            ps.append(p)
            step, offset = (x.T.contiguous() for x in grid.levels(p))  # [g, B*N]
            inv = torch.where(step == 0, 0.0, 1.0 / torch.where(step == 0, 1.0, step))
            for c in range(g):  # in place, a few kernels per column for the whole batch
                i = j0 + c
                r, q, e = wt[i] - offset[c], qt[i], errs[i - b0].view(b * n)
                torch.mul(r, inv[c], out=q).round_().clamp_(0, grid.qmax)  # the nearest code 0..qmax
                torch.addcmul(r, q, step[c], value=-1, out=e).view(b, n).mul_(inv_diag[i, :, None])  # (w-w^)/U_ii
                wt3[i + 1:b1].addcmul_(ut[i - b0, i + 1 - b0:, :, None], errs[i - b0][None], value=-1)
        for i, x in enumerate(u if b1 < k else ()):  # wt[b1:] -= U[b0:b1, b1:]^T errs, weight by weight
            wt3[b1:, i].addmm_(x[b0:b1, b1:].T, errs[:, i], alpha=-1)
    q_rows = qt.T  # [B*N, K]
    return [grid.encode(q_rows[i * n:(i + 1) * n].contiguous(), [_rows(p, slice(i * n, (i + 1) * n)) for p in ps])
            for i in range(b)]


def _rows(p: Any, rows: slice) -> Any:
    """Grid qparams (a tuple of tensors or a dataclass of them, each `[rows, ...]`) restricted to `rows`."""
    if dataclasses.is_dataclass(p):
        return dataclasses.replace(p, **{f.name: getattr(p, f.name)[rows] for f in dataclasses.fields(p)})
    return tuple(t[rows] for t in p)


QUANTIZERS: dict[str, Callable[[torch.Tensor, torch.Tensor, str], QuantizedTensor]] = {
    "gptq": quantize_gptq,
    "awmse": quantize_awmse,
}
