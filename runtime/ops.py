"""Custom ops (torch.library): the gated delta rule, the causal depthwise conv with carry state, the sparse MoE.

Each op has a plain reference implementation beside its fast one, with the same signature; the registered op
dispatches between them and tests compare them (see tests/test_ops.py). Shapes use B (batch), T (tokens),
Hk / Hv (key / value heads), Dk / Dv (head dims), C (channels), K (kernel or top-k), E (experts), H (hidden).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

CHUNK = 64  # chunk length of the chunked delta rule (FLA's default)


# ---- gated delta rule ---------------------------------------------------------------------------------------


def _prepare(q, k, v, g, beta):
    """l2-normalise q, k (eps 1e-6, as FLA / transformers), scale q by Dk^-0.5, repeat q/k heads up to Hv,
    move heads first and go to fp32. Returns q, k [B, Hv, T, Dk], v [B, Hv, T, Dv], g, beta [B, Hv, T]."""
    hk, hv = q.shape[2], v.shape[2]
    q = q.float()
    k = k.float()
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * q.shape[-1] ** -0.5
    if hv != hk:  # value head j uses key head j // (Hv / Hk)
        q = q.repeat_interleave(hv // hk, dim=2)
        k = k.repeat_interleave(hv // hk, dim=2)
    return (x.transpose(1, 2).float().contiguous() for x in (q, k, v, g, beta))


def gated_delta_rule_recurrent(q, k, v, g, beta, state):
    """Reference: the delta rule token by token.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g (log decay, <= 0), beta: [B, T, Hv]; state: [B, Hv, Dk, Dv] fp32.
    Per value head and token: S = exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q.
    Returns o [B, T, Hv, Dv] in v's dtype and the final state [B, Hv, Dk, Dv] fp32.
    """
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    s = state.float().clone()
    out = torch.empty_like(v)
    for t in range(q.shape[2]):
        s = s * g[:, :, t].exp()[..., None, None]
        kv = (s * k[:, :, t, :, None]).sum(-2)  # S^T k: [B, Hv, Dv]
        delta = (v[:, :, t] - kv) * beta[:, :, t, None]
        s = s + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = (s * q[:, :, t, :, None]).sum(-2)
    return out.transpose(1, 2).to(dtype), s


def gated_delta_rule_chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """Chunked form (same signature and result as the recurrent reference).

    Within a chunk of C tokens, the delta rule's updates form a unit lower-triangular system: with
    Gamma[i, j] = exp(G_i - G_j) (G the in-chunk cumulative log decay) and L = strict_lower(diag(beta) K K^T * Gamma),
    the corrected values are U = (I + L)^-1 (diag(beta) (V - diag(exp G) K S)). One triangular solve per chunk
    replaces C sequential rank-1 updates; the state crosses chunk boundaries once.
    """
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    pad = -t % chunk
    if pad:  # zero k, v, beta and zero log decay leave the state untouched
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // chunk
    q, k, v = (x.reshape(b, h, n, chunk, -1) for x in (q, k, v))
    g, beta = (x.reshape(b, h, n, chunk) for x in (g, beta))
    gc = g.cumsum(-1)  # [B, H, N, C]
    lower = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=q.device))
    gamma = (gc[..., :, None] - gc[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # [B, H, N, C, C]
    kb = k * beta[..., None]
    sys_ = torch.eye(chunk, device=q.device) + (kb @ k.transpose(-1, -2) * gamma).tril(-1)
    # w = (I + L)^-1 diag(beta) exp(G) K ; u = (I + L)^-1 diag(beta) V
    w = torch.linalg.solve_triangular(sys_, kb * gc.exp()[..., None], upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(sys_, v * beta[..., None], upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)) * gamma  # causal in-chunk scores, [B, H, N, C, C]
    s = state.float().clone()
    out = torch.empty(b, h, n, chunk, dv, dtype=torch.float32, device=q.device)
    for i in range(n):
        u_i = u[:, :, i] - w[:, :, i] @ s  # values corrected by what the state already predicts, [B, H, C, Dv]
        out[:, :, i] = (q[:, :, i] * gc[:, :, i, :, None].exp()) @ s + qk[:, :, i] @ u_i
        last = gc[:, :, i, -1]
        s = s * last.exp()[..., None, None] + (k[:, :, i] * (last[..., None] - gc[:, :, i]).exp()[..., None]).transpose(-1, -2) @ u_i
    out = out.reshape(b, h, n * chunk, dv)[:, :, :t]
    return out.transpose(1, 2).to(dtype), s


@torch.library.custom_op("nextq::gated_delta_rule", mutates_args=())
def gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule with state in and out: recurrent for a single token (decode), chunked otherwise."""
    fn = gated_delta_rule_recurrent if q.shape[1] == 1 else gated_delta_rule_chunked
    return fn(q, k, v, g, beta, state)


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, state):
    return torch.empty_like(v), torch.empty(state.shape, dtype=torch.float32, device=state.device)


# ---- causal depthwise conv with carry state ------------------------------------------------------------------


@torch.library.custom_op("nextq::causal_conv1d", mutates_args=())
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU over time, carrying the last K-1 inputs.

    x: [B, T, C]; weight: [C, K]; state: [B, C, K-1] (zeros at the start of a sequence).
    Returns y [B, T, C] and the new state [B, C, K-1].
    """
    xs = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
    y = F.conv1d(xs, weight.to(x.dtype)[:, None, :], groups=x.shape[-1])  # [B, C, T]
    return F.silu(y).transpose(1, 2).contiguous(), xs[:, :, xs.shape[-1] - state.shape[-1]:].contiguous()


@causal_conv1d.register_fake
def _(x, weight, state):
    return torch.empty_like(x), torch.empty_like(state)


# ---- sparse MoE ---------------------------------------------------------------------------------------------


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (fp32) -> top-k -> renormalise. logits: [N, E] -> weights [N, K] fp32, ids [N, K]."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return w, ids


def expert_groups(ids: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Token dispatch per expert: (expert e, token rows [n_e] ascending, their top-k slots [n_e]) for every expert
    some token is routed to, in expert order. ids: [N, K]."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs sorted by expert, token order kept
    start = 0
    for e, c in enumerate(torch.bincount(flat, minlength=num_experts).tolist()):
        if c:
            pairs = order[start:start + c]
            yield e, pairs // ids.shape[1], pairs % ids.shape[1]
            start += c


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x). x: [N, H]; gate, up: [I, H]; down: [H, I]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def moe_reference(x, router, gate, up, down, shared_gate, shared_up, shared_down, shared_gate_w, top_k: int,
                  normalize: bool):
    """Reference: every token through each of its top-k experts one at a time.

    x: [N, H]; router: [E, H]; gate, up: [E, I, H]; down: [E, H, I]; shared_*: the shared expert [Is, H] / [H, Is];
    shared_gate_w: [1, H]. Returns [N, H].
    """
    w, ids = route(F.linear(x, router), top_k, normalize)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(top_k):
            e = ids[n, j]
            out[n] += (w[n, j].to(x.dtype) * swiglu(x[n:n + 1], gate[e], up[e], down[e]))[0]
    shared = torch.sigmoid(F.linear(x, shared_gate_w)) * swiglu(x, shared_gate, shared_up, shared_down)
    return out + shared


@torch.library.custom_op("nextq::moe", mutates_args=())
def moe(
    x: torch.Tensor, router: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    shared_gate: torch.Tensor, shared_up: torch.Tensor, shared_down: torch.Tensor, shared_gate_w: torch.Tensor,
    top_k: int, normalize: bool,
) -> torch.Tensor:
    """Sparse MoE block with tokens dispatched per expert (same signature and result as moe_reference)."""
    w, ids = route(F.linear(x, router), top_k, normalize)  # [N, K]
    out = torch.zeros_like(x)
    for e, rows, slots in expert_groups(ids, router.shape[0]):
        out.index_add_(0, rows, swiglu(x[rows], gate[e], up[e], down[e]) * w[rows, slots, None].to(x.dtype))
    shared = torch.sigmoid(F.linear(x, shared_gate_w)) * swiglu(x, shared_gate, shared_up, shared_down)
    return out + shared


@moe.register_fake
def _(x, router, gate, up, down, shared_gate, shared_up, shared_down, shared_gate_w, top_k, normalize):
    return torch.empty_like(x)
