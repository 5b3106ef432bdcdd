"""The GPU executor: Triton kernels, quantized experts kept packed on the device, static caches, CUDA-graph decode.

    model = GpuModel.from_graph(Graph.load(ir), max_batch=8, max_seq=8192)
    logits = model.prefill(ids)            # ids [B, T] -> last-position logits [B, V] fp32 (device)
    logits = model.decode(next_ids)        # [B, 1] -> [B, V]; one CUDA-graph replay, no host synchronisation
    tokens = model.generate_greedy(64)     # [B, 64], every step a graph replay that feeds its own argmax back

Math is runtime/model.py's TorchModel (zero-centred RMSNorm, gated delta rule, gated attention with partial
split-half RoPE, softmax -> top-k MoE with a sigmoid-gated shared expert); differences are in the execution:
- projections that read the same input are concatenated once at load (DeltaNet q|k|v|z|b|a, attention
  q|gate|k|v, router|shared_gate, shared gate|up): one GEMM/GEMV instead of four to six;
- routed experts stay packed (int4_sym codes + fp16 scales, fp8 codes + fp32 scales, or float) and are
  dequantized inside the MoE kernels (runtime/triton/moe_grouped.py); experts of the other integer schemes
  (int4 with zero points, int8, Q5, K-quants: no packed kernel) and the other quantized tensors are dequantized
  once at load to the compute dtype;
- fused launches: residual add + RMSNorm (runtime/triton/norms.py); routing (softmax, top-k, the shared gate's
  sigmoid) in one kernel; in decode, the shared expert inside the routed experts' two GEMV kernels, the DeltaNet
  gates inside the recurrent step, the conv state updated in place; attention's q/k norm + RoPE + KV-cache write
  in one kernel (runtime/triton/qk_rope.py), and for decode and verify over short spans scores, softmax, values
  and the output gate in two more (runtime/triton/attn_decode.py: split-K over the span, then the combine);
- caches are allocated once for `max_batch` x `max_seq`; a decode step reads the position from a device
  tensor, so the step is captured once per (batch, attention-length bucket) as a CUDA graph and replayed.
Prefill always starts a new sequence (caches reset); `decode` accepts one token per sequence.

Speculative decoding with the MTP head (greedy, batch 1), `generate_speculative_greedy(ids, steps, k)`: the head
(its own KV cache, its one layer reused for each draft) drafts k tokens, one graph per draft step; the verify step
runs the k + 1 tokens through the model as one captured graph, the DeltaNet conv and recurrent kernels one launch
each over the k + 1 tokens from the kept state, the state after each token written to its own slot (the kept
state untouched);
a captured commit graph copies the slot of the last accepted token back and moves the position (KV rows past it
are masked by position and overwritten later). One host read per verify step: the accepted count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nextq.errors import BackendError
from nextq.graph import GatedDeltaNet, Graph, Layer, ModelConfig, SparseMoE, build_blocks, expected_tensors
from nextq.quant import QuantizedTensor
from nextq.quant.schemes import SCHEMES

from . import cuda_ops  # noqa: F401  (registers the CUDA kernels of the custom ops)
from .backends import Model, register_backend
from .rope import rope_parameters

ATTN_BUCKET = 256  # decode attends over the cache rounded up to this many positions (one graph per bucket)
ATTN_FUSED_MAX_SPAN = 2048  # decode / verify attention up to this span: fused kernels (triton/attn_decode.py)
ATTN_DECODE_KERNEL = "split"  # "split": split-K over the span + combine; "serial": version 5's one-launch kernel

# name -> tensor, QuantizedTensor, ExpertMatrix (for the stacked names f"{prefix}.experts.{part}") or None
TensorSource = Callable[[str], Any]


def cache_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, positions: torch.Tensor, span: int
                    ) -> torch.Tensor:
    """Unfused decode / verify attention (spans past ATTN_FUSED_MAX_SPAN, and the A/B baseline): q [B, Hq, T, D]
    over the first `span` rows of the caches [B, Hkv, S, D], key j visible to token t iff j <= positions[t];
    scores in fp32, probabilities in q's dtype -> [B, Hq, T, D]."""
    b, hq, t, d = q.shape
    hkv = kc.shape[1]
    qg = q.reshape(b, hkv, (hq // hkv) * t, d)  # query heads of one KV head side by side (GQA)
    s = (qg @ kc[:, :, :span].transpose(-1, -2)).float() * d ** -0.5  # [B, Hkv, r*T, span]
    visible = torch.arange(span, device=q.device)[None, :] <= positions[:, None]  # [T, span]
    s = s.view(b, hkv, hq // hkv, t, span).masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype).view(b, hkv, -1, span)
    return (p @ vc[:, :, :span]).view(b, hq, t, d)


# ---- expert packing (registry: storage kind -> packer) ------------------------------------------------------


def _expert_kind(t: Any) -> str:
    """The expert packer a weight needs: the scheme registry's `gpu` field (the scheme's name when it has none)."""
    if isinstance(t, torch.Tensor):
        return "float"
    return SCHEMES[t.scheme].gpu or t.scheme


def _pack_int4(items: list, device, dtype):
    from .triton.moe_int4 import int4_experts

    return int4_experts(torch.stack([q.data for q in items]).to(device), torch.stack([q.scales for q in items]).to(device))


def _pack_fp8(items: list, device, dtype):
    from .triton.moe_fp8 import float_experts

    scales = torch.stack([q.scales.reshape(q.scales.shape[0], -1) for q in items])  # [E, sN, sK]
    return float_experts(torch.stack([q.data for q in items]).to(device), scales.to(device))


def _pack_float(items: list, device, dtype):
    from .triton.moe_fp8 import float_experts

    ws = [t.data if isinstance(t, QuantizedTensor) else t for t in items]
    return float_experts(torch.stack([w.to(device, dtype) for w in ws]))


def _pack_dequantized(items: list, device, dtype):
    """Integer block experts without a packed kernel (int4 with zero points, int8, Q5, K-quants): each expert
    dequantized exactly (its scheme's own dequantize, float32) and cast to the compute dtype at load, then run by
    the float expert kernels: 16 bits per weight on the device for bf16."""
    from .triton.moe_fp8 import float_experts

    return float_experts(torch.stack([q.dequantize().to(device, dtype) for q in items]))


EXPERT_PACKERS = {"int4_sym": _pack_int4, "fp8": _pack_fp8, "float": _pack_float, "dequant": _pack_dequantized}


def pack_experts(items: list, name: str, device, dtype):
    """Per-expert weights (all one storage kind) -> one ExpertMatrix on `device`."""
    kinds = sorted({_expert_kind(t) for t in items})
    if len(kinds) != 1 or kinds[0] not in EXPERT_PACKERS:
        raise BackendError(f"{name}: experts stored as {kinds}; the GPU runtime runs one of {list(EXPERT_PACKERS)} "
                           f"per projection")
    return EXPERT_PACKERS[kinds[0]](items, device, dtype)


# ---- weights and caches ---------------------------------------------------------------------------------------


@dataclass
class MtpWeights:
    """The MTP head's device weights: fc [H, 2H] over concat(embed_norm(embed), hidden_norm(h)), its layers, norm."""

    fc: torch.Tensor
    embed_norm: torch.Tensor
    hidden_norm: torch.Tensor
    norm: torch.Tensor
    layers: list[LayerWeights]


@dataclass
class LayerWeights:
    """One layer's device weights. `w_in`: the concatenated input projections; `splits`: their widths."""

    kind: str  # "deltanet" | "attention"
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    w_in: torch.Tensor
    splits: list[int]
    out: torch.Tensor
    mixer: dict[str, torch.Tensor] = field(default_factory=dict)
    ffn: dict[str, Any] = field(default_factory=dict)
    sparse: bool = True
    offsets: dict[str, float] = field(default_factory=dict)  # norm offsets: input, post, q, k (scale = offset + w)


class GpuModel:
    """Executes a Qwen3-Next-style model on one CUDA device (see the module docstring)."""

    def __init__(self, config: ModelConfig, get: TensorSource, device: str | torch.device = "cuda",
                 dtype: torch.dtype = torch.bfloat16, max_batch: int = 1, max_seq: int = 4096):
        self.config = c = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch, self.max_seq = max_batch, max_seq
        specs = expected_tensors(c)
        self.offsets = {n: s.norm_offset for n, s in specs.items() if s.norm_offset is not None}

        def dense(name: str, keep32: bool = False) -> torch.Tensor:
            t = get(name)
            if isinstance(t, QuantizedTensor):
                t = t.dequantize()
            return t.to(self.device, torch.float32 if keep32 else dtype)

        self.blocks: list[Layer] = [b for b in build_blocks(c) if isinstance(b, Layer)]
        inv_freq, attention_factor = rope_parameters(c)  # plain or YaRN (runtime/rope.py)
        self.rope = (inv_freq.to(self.device), attention_factor)
        self.embed = dense("embed.weight")
        self.lm_head = self.embed if c.tie_word_embeddings else dense("lm_head.weight")
        self.final_norm = dense("norm.weight", keep32=True)
        self.layers = [self._load_layer(blk, get, dense) for blk in self.blocks]
        mtp = next((b for b in build_blocks(c) if b.kind == "MTP"), None)
        self.mtp = None
        if mtp is not None and get("mtp.fc.weight") is not None:
            self.mtp = MtpWeights(dense("mtp.fc.weight"), *(dense(f"mtp.{n}.weight", True)
                                                            for n in ("embed_norm", "hidden_norm", "norm")),
                                  [self._load_layer(layer, get, dense) for layer in mtp.layers])
        self._alloc_caches()

    @classmethod
    def from_graph(cls, graph: Graph, **kw) -> GpuModel:
        names = set(graph.tensors)
        return cls(graph.config, lambda n: graph.get(n) if n in names else None, **kw)

    def _load_layer(self, blk: Layer, get: TensorSource, dense) -> LayerWeights:
        from .triton.moe_grouped import SharedExpert

        c, m = self.config, blk.mixer.prefix
        if isinstance(blk.mixer, GatedDeltaNet):
            parts = [dense(f"{m}.{n}.weight") for n in ("q", "k", "v", "z", "b", "a")]
            lw = LayerWeights("deltanet", dense(f"{blk.prefix}.input_norm.weight", True),
                              dense(f"{blk.prefix}.post_norm.weight", True), torch.cat(parts),
                              [p.shape[0] for p in parts], dense(f"{m}.out.weight"))
            lw.mixer = {"conv": dense(f"{m}.conv.weight").contiguous(), "A_log": dense(f"{m}.A_log", True),
                        "dt_bias": dense(f"{m}.dt_bias", True), "norm": dense(f"{m}.norm.weight", True)}
        else:
            parts = [dense(f"{m}.{n}.weight") for n in ("q", "gate", "k", "v")]
            lw = LayerWeights("attention", dense(f"{blk.prefix}.input_norm.weight", True),
                              dense(f"{blk.prefix}.post_norm.weight", True), torch.cat(parts),
                              [p.shape[0] for p in parts], dense(f"{m}.o.weight"))
            lw.mixer = {"q_norm": dense(f"{m}.q_norm.weight", True), "k_norm": dense(f"{m}.k_norm.weight", True)}
        lw.offsets = {"input": self.offsets[f"{blk.prefix}.input_norm.weight"],
                      "post": self.offsets[f"{blk.prefix}.post_norm.weight"]}
        if lw.kind == "attention":
            lw.offsets.update(q=self.offsets[f"{m}.q_norm.weight"], k=self.offsets[f"{m}.k_norm.weight"])
        p = blk.ffn.prefix
        lw.sparse = isinstance(blk.ffn, SparseMoE)
        if lw.sparse:
            router = torch.cat([dense(f"{p}.router.weight"), dense(f"{p}.shared_gate.weight")])  # [E + 1, H]
            # zero rows up to a multiple of 64: cuBLAS has fast tiles for N = 576, not for 513 (measured 8x)
            lw.ffn["router"] = F.pad(router, (0, 0, 0, -router.shape[0] % 64))
            lw.ffn["shared"] = SharedExpert.from_dense(*(dense(f"{p}.shared.{n}.weight")
                                                         for n in ("gate", "up", "down")))
            for part in ("gate", "up", "down"):
                stacked = get(f"{p}.experts.{part}")
                if stacked is None:
                    items = [get(f"{p}.experts.{e}.{part}.weight") for e in range(c.num_experts)]
                    stacked = pack_experts(items, f"{p}.experts.*.{part}", self.device, self.dtype)
                lw.ffn[part] = stacked
        else:
            lw.ffn["gate_up"] = torch.cat([dense(f"{p}.gate.weight"), dense(f"{p}.up.weight")])
            lw.ffn["down"] = dense(f"{p}.down.weight")
        return lw

    def _alloc_caches(self) -> None:
        c, b, dev = self.config, self.max_batch, self.device
        conv_ch = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
        self.cache: list[dict[str, torch.Tensor]] = []
        for lw in self.layers:
            if lw.kind == "deltanet":
                self.cache.append({
                    "conv": torch.zeros(b, conv_ch, c.linear_conv_kernel_dim - 1, device=dev, dtype=self.dtype),
                    "rec": torch.zeros(b, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim,
                                       device=dev, dtype=torch.float32)})
            else:
                shape = (b, c.num_key_value_heads, self.max_seq, c.head_dim)
                self.cache.append({"k": torch.zeros(shape, device=dev, dtype=self.dtype),
                                   "v": torch.zeros(shape, device=dev, dtype=self.dtype)})
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # tokens seen (device copy, read by graphs)
        self.length = 0  # the same on the host
        self.batch = 0
        self.ids_buf = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.logits_buf = torch.zeros(b, c.vocab_size, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.cache for t in d.values())

    # -- blocks -----------------------------------------------------------------------------------------------

    def deltanet(self, x: torch.Tensor, lw: LayerWeights, st: dict[str, torch.Tensor], steps: bool = False
                 ) -> torch.Tensor:
        """steps (speculative verify): the conv and recurrent kernels run the T tokens in one launch each from the
        kept state, the state after token i written to slot i of st["conv_steps"] / st["rec_steps"] [T_max, B, ...];
        the kept state is not touched."""
        from .triton.conv_update import conv_into
        from .triton.gdr_chunk import gdr_chunk_into
        from .triton.gdr_recurrent import gdr_recurrent_into
        from .triton.norms import gated_rms_norm

        c = self.config
        b, t, _ = x.shape
        hk, hv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        proj = F.linear(x, lw.w_in)  # [B, T, q|k|v|z|b|a]
        nq, nk, nv, nz, nb, _ = lw.splits
        ch = nq + nk + nv
        qkv_in, z = proj[..., :ch], proj[..., ch:ch + nz]
        b_raw, a_raw = proj[..., ch + nz:ch + nz + nb], proj[..., ch + nz + nb:]
        qkv = torch.empty(b, t, ch, dtype=x.dtype, device=x.device)
        conv = st["conv"][:b]
        # steps: one launch over the t tokens, the state after token i into slot i; else the state in place
        conv_into(qkv_in, lw.mixer["conv"], conv, qkv, st["conv_steps"][:, :b] if steps else conv, steps=steps)
        q = qkv[..., :nq].view(b, t, hk, dk)
        k = qkv[..., nq:nq + nk].view(b, t, hk, dk)
        v = qkv[..., nq + nk:].view(b, t, hv, dv)
        o = torch.empty(b, t, hv, dv, dtype=x.dtype, device=x.device)
        rec = st["rec"][:b]
        gates = (lw.mixer["A_log"], lw.mixer["dt_bias"])
        if steps or t == 1:  # gates computed in the kernel from the raw projections; decode: state in place
            gdr_recurrent_into(q, k, v, a_raw, b_raw, rec, o, st["rec_steps"][:, :b] if steps else rec, gates=gates,
                               steps=steps)
        else:
            beta = torch.sigmoid(b_raw).contiguous()
            g = -lw.mixer["A_log"].exp() * F.softplus(a_raw.float() + lw.mixer["dt_bias"])  # log decay [B, T, Hv]
            gdr_chunk_into(q, k, v, g, beta, rec, o, rec)
        o = gated_rms_norm(o, z.reshape(b, t, hv, dv), lw.mixer["norm"], c.rms_norm_eps)
        return F.linear(o.reshape(b, t, hv * dv), lw.out)

    def attention(self, x: torch.Tensor, lw: LayerWeights, st: dict[str, torch.Tensor], positions: torch.Tensor,
                  fresh: bool, span: int) -> torch.Tensor:
        """fresh: the cache is empty (prefill) -> causal flash attention over the new keys; else attend over the
        first `span` cache positions, key j visible to query t iff j <= positions[t]."""
        from .triton.attn_decode import attn_decode_into, attn_decode_serial_into
        from .triton.qk_rope import qk_norm_rope_into

        c = self.config
        b, t, _ = x.shape
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        proj = F.linear(x, lw.w_in)  # [B, T, q | gate | k | v]
        nq, ng, nk, _ = lw.splits
        gate = proj[..., nq:nq + ng]
        q = torch.empty(b, hq, t, d, dtype=x.dtype, device=x.device)
        kc, vc = st["k"][:b], st["v"][:b]
        qk_norm_rope_into(proj, (hq, hkv, d), (nq + ng, nq + ng + nk), positions, self.rope, lw.mixer["q_norm"],
                          lw.mixer["k_norm"], (lw.offsets["q"], lw.offsets["k"]), c.rms_norm_eps, q, kc, vc)
        if not fresh and span <= ATTN_FUSED_MAX_SPAN:  # scores, softmax, values and the gate fused
            o = torch.empty(b, t, hq * d, dtype=x.dtype, device=x.device)
            fused = attn_decode_serial_into if ATTN_DECODE_KERNEL == "serial" else attn_decode_into
            fused(q, kc, vc, positions, span, gate, o)
            return F.linear(o, lw.out)
        if fresh:  # positions are 0 .. t-1: the new keys are the cache's first t rows
            r = hq // hkv
            o = F.scaled_dot_product_attention(q, kc[:, :, :t].repeat_interleave(r, 1),
                                               vc[:, :, :t].repeat_interleave(r, 1), is_causal=True, scale=d ** -0.5)
        else:
            o = cache_attention(q, kc, vc, positions, span)
        o = o.transpose(1, 2).reshape(b, t, hq * d) * torch.sigmoid(gate)
        return F.linear(o, lw.out)

    def ffn(self, x: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        from .triton.moe_grouped import experts_forward, route_into

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        f = lw.ffn
        if lw.sparse:
            c = self.config
            logits = F.linear(x2, f["router"])  # [N, E + 1 + padding]: router | shared-expert gate | zeros
            w, ids, sg = route_into(logits, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, shared=True)
            y = experts_forward(x2, w, ids, f["gate"], f["up"], f["down"], shared=f["shared"], shared_gate=sg)
        else:
            gs, us = F.linear(x2, f["gate_up"]).chunk(2, dim=-1)
            y = F.linear(F.silu(gs) * us, f["down"])
        return y.view(shape)

    # -- model ------------------------------------------------------------------------------------------------

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor, fresh: bool, span: int, steps: bool = False
                ) -> torch.Tensor:
        """Final-normed hidden states [B, T, H]; updates the caches (positions: device [T]; steps: see deltanet)."""
        from .triton.norms import add_rms_norm, rms_norm

        eps = self.config.rms_norm_eps
        x = F.embedding(ids, self.embed)
        h = rms_norm(x, self.layers[0].input_norm, self.layers[0].offsets["input"], eps)
        for i, (lw, st) in enumerate(zip(self.layers, self.cache)):
            if lw.kind == "deltanet":
                m = self.deltanet(h, lw, st, steps)
            else:
                m = self.attention(h, lw, st, positions, fresh, span)
            x, h = add_rms_norm(x, m, lw.post_norm, lw.offsets["post"], eps)
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            w, off = (nxt.input_norm, nxt.offsets["input"]) if nxt else (self.final_norm, self.offsets["norm.weight"])
            x, h = add_rms_norm(x, self.ffn(h, lw), w, off, eps)
        return h

    def _check_batch(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.shape[0] > self.max_batch:
            raise BackendError(f"ids: expected [B, T] with B <= max_batch={self.max_batch}, got {tuple(ids.shape)}")

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Start new sequences: ids [B, T] -> fp32 logits of the last position [B, V] (all: [B, T, V])."""
        h = self._prefill_hidden(ids)
        return F.linear(h if all_logits else h[:, -1], self.lm_head).float()

    def _prefill_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Reset the caches and run ids [B, T] from position 0: final-normed hidden states [B, T, H]."""
        self._check_batch(ids)
        b, t = ids.shape
        if t > self.max_seq:
            raise BackendError(f"prompt of {t} tokens exceeds max_seq={self.max_seq}")
        for st in self.cache:
            for name in ("conv", "rec"):
                if name in st:
                    st[name][:b].zero_()
        ids = ids.to(self.device)
        positions = torch.arange(t, device=self.device)
        h = self._hidden(ids, positions, fresh=True, span=t)
        self.pos.fill_(t)
        self.length, self.batch = t, b
        return h

    def _step(self, b: int, span: int, greedy: bool) -> None:
        """One decode step on the static buffers (graph-capturable): ids_buf -> logits_buf, pos += 1."""
        positions = self.pos.clone()  # [1]
        h = self._hidden(self.ids_buf[:b], positions, fresh=False, span=span)
        logits = F.linear(h[:, -1], self.lm_head)
        self.logits_buf[:b].copy_(logits)
        if greedy:
            self.ids_buf[:b].copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)

    def _capture(self, key: tuple, fn: Callable[[], None], keep: Callable[[], list[torch.Tensor]]
                 ) -> torch.cuda.CUDAGraph:
        """fn as a CUDA graph, captured once per key: a warm-up run first (it compiles the Triton kernels) on a
        side stream, after which the tensors `keep()` lists get their values back, then the capture."""
        if key not in self.graphs:
            kept = keep()
            saved = [t.clone() for t in kept]
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream(self.device).wait_stream(s)
            for t, sv in zip(kept, saved):
                t.copy_(sv)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                fn()
            self.graphs[key] = graph
        return self.graphs[key]

    def _graph(self, b: int, span: int, greedy: bool) -> torch.cuda.CUDAGraph:
        def keep():
            states = [t[:b] for st in self.cache for n, t in st.items() if n in ("conv", "rec")]
            return [*states, self.pos, self.ids_buf]

        return self._capture((b, span, greedy), lambda: self._step(b, span, greedy), keep)

    def _span(self, need: int | None = None) -> int:
        """Cache positions a step attends over for `need` positions (default: the next token), bucketed."""
        need = self.length + 1 if need is None else need
        if need > self.max_seq:
            raise BackendError(f"sequence of {need} tokens exceeds max_seq={self.max_seq}")
        return min(self.max_seq, -(-need // ATTN_BUCKET) * ATTN_BUCKET)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (ids [B, 1], B as in prefill) -> fp32 logits [B, V] (a view of a static buffer:
        copy it before the next call)."""
        b = self.batch
        if ids.shape != (b, 1):
            raise BackendError(f"decode: expected ids [{b}, 1] after a prefill of batch {b}, got {tuple(ids.shape)}")
        self.ids_buf[:b].copy_(ids, non_blocking=True)
        self._graph(b, self._span(), greedy=False).replay()
        self.length += 1
        return self.logits_buf[:b]

    @torch.no_grad()
    def generate_greedy(self, steps: int, first: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding for `steps` tokens, each step one graph replay that writes its argmax as the next input.
        first: [B, 1] the first input (default: argmax of the prefill logits, which the caller passes). Returns the
        generated ids [B, steps] (device); no host synchronisation inside the loop."""
        b = self.batch
        if first is not None:
            self.ids_buf[:b].copy_(first)
        out = []
        for _ in range(steps):
            self._graph(b, self._span(), greedy=True).replay()
            self.length += 1
            out.append(self.ids_buf[:b].clone())
        return torch.cat(out, dim=1)


    # -- speculative decoding with the MTP head (greedy, batch 1) ---------------------------------------------

    def _spec_buffers(self, t_max: int) -> dict[str, torch.Tensor]:
        """Buffers of verify passes of up to t_max tokens (per-position DeltaNet state slots, ids, hidden states,
        the target's picks) and the MTP head's KV cache and inputs; allocated once (graphs keep their addresses)."""
        if getattr(self, "spec", None) is not None and self.spec["vids"].shape[1] >= t_max:
            return self.spec
        if self.mtp is None:
            raise BackendError("this model has no MTP head; speculative decoding needs one")
        c, b, dev = self.config, self.max_batch, self.device
        for lw, st in zip(self.layers, self.cache):
            if lw.kind == "deltanet":
                st["conv_steps"] = st["conv"].new_zeros(t_max, *st["conv"].shape)
                st["rec_steps"] = st["rec"].new_zeros(t_max, *st["rec"].shape)
        shape = (b, c.num_key_value_heads, self.max_seq, c.head_dim)
        self.mtp_cache = [{"k": torch.zeros(shape, device=dev, dtype=self.dtype),
                           "v": torch.zeros(shape, device=dev, dtype=self.dtype)} for _ in self.mtp.layers]
        self.mtp_pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs = {k: g for k, g in self.graphs.items() if k[0] not in ("verify", "commit", "mtp")}
        self.spec = {
            "arange": torch.arange(t_max, device=dev),
            "vids": torch.zeros(b, t_max, dtype=torch.long, device=dev),  # [last token, d1 .. dk]
            "vtok": torch.zeros(b, t_max, dtype=torch.long, device=dev),  # the target's pick after each
            "vh": torch.zeros(b, t_max, c.hidden_size, device=dev, dtype=self.dtype),
            "mids": torch.zeros(b, t_max, dtype=torch.long, device=dev),  # MTP input pairs: (mh, mids)
            "mh": torch.zeros(b, t_max, c.hidden_size, device=dev, dtype=self.dtype)}
        return self.spec

    def _mtp_forward(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, fresh: bool,
                     span: int) -> torch.Tensor:
        """The MTP head over pairs (final-normed hidden h_t [B, T, H], token x_{t+1} ids [B, T]) at `positions`:
        its normed output [B, T, H]; writes its KV cache."""
        from .triton.norms import add_rms_norm, rms_norm

        m, eps, off = self.mtp, self.config.rms_norm_eps, self.offsets
        e = rms_norm(F.embedding(ids, self.embed), m.embed_norm, off["mtp.embed_norm.weight"], eps)
        h = rms_norm(hidden.contiguous(), m.hidden_norm, off["mtp.hidden_norm.weight"], eps)
        x = F.linear(torch.cat([e, h], dim=-1), m.fc)
        h = rms_norm(x, m.layers[0].input_norm, m.layers[0].offsets["input"], eps)
        for i, (lw, st) in enumerate(zip(m.layers, self.mtp_cache)):
            x, h = add_rms_norm(x, self.attention(h, lw, st, positions, fresh, span), lw.post_norm,
                                lw.offsets["post"], eps)
            nxt = m.layers[i + 1] if i + 1 < len(m.layers) else None
            w, o = (nxt.input_norm, nxt.offsets["input"]) if nxt else (m.norm, off["mtp.norm.weight"])
            x, h = add_rms_norm(x, self.ffn(h, lw), w, o, eps)
        return h

    def _mtp_emit(self, h: torch.Tensor, b: int, slot: int) -> None:
        """From the head's output h [B, T, H]: its draft (argmax at the last pair) into verify slot `slot`, and the
        next draft step's input pair (h at the last pair, the draft)."""
        sp = self.spec
        tok = F.linear(h[:, -1], self.lm_head).argmax(-1, keepdim=True)  # [B, 1]
        sp["vids"][:b, slot:slot + 1].copy_(tok)
        sp["mids"][:b, :1].copy_(tok)
        sp["mh"][:b, :1].copy_(h[:, -1:])

    def _mtp_step(self, b: int, t: int, span: int, slot: int) -> None:
        """Draft step (graph-capturable): the head over its t pending pairs (mh, mids) from mtp_pos; draft -> slot."""
        sp = self.spec
        h = self._mtp_forward(sp["mids"][:b, :t], sp["mh"][:b, :t], self.mtp_pos + sp["arange"][:t], False, span)
        self._mtp_emit(h, b, slot)
        self.mtp_pos.add_(t)

    def _verify_step(self, b: int, t: int, span: int) -> None:
        """Verify step (graph-capturable): vids [B, t] at positions pos .. pos+t-1 -> hidden states and the target's
        greedy pick after each; per-position DeltaNet states into the slots, KV rows written, pos not moved."""
        sp = self.spec
        h = self._hidden(sp["vids"][:b, :t], self.pos + sp["arange"][:t], fresh=False, span=span, steps=True)
        sp["vh"][:b, :t].copy_(h)
        sp["vtok"][:b, :t].copy_(F.linear(h, self.lm_head).argmax(-1))

    def _commit(self, b: int, n: int) -> None:
        """Keep the first n verified tokens (graph-capturable): DeltaNet states from slot n-1, pos += n; the head's
        next input pairs (h at those n positions, the target's picks) and the next verify's first token."""
        for lw, st in zip(self.layers, self.cache):
            if lw.kind == "deltanet":
                st["conv"][:b].copy_(st["conv_steps"][n - 1, :b])
                st["rec"][:b].copy_(st["rec_steps"][n - 1, :b])
        sp = self.spec
        sp["mh"][:b, :n].copy_(sp["vh"][:b, :n])
        sp["mids"][:b, :n].copy_(sp["vtok"][:b, :n])
        sp["vids"][:b, :1].copy_(sp["vtok"][:b, n - 1:n])
        self.pos.add_(n)

    def _spec_graph(self, kind: str, b: int, *args: int) -> torch.cuda.CUDAGraph:
        """The captured draft ("mtp": t, span, slot), verify ("verify": t, span) or commit ("commit": n) step."""
        sp = self.spec
        fns = {"mtp": self._mtp_step, "verify": self._verify_step, "commit": self._commit}

        def keep():  # what a warm-up run changes that the graph reads (KV rows past the position aside)
            states = [st[n] for st in self.cache for n in ("conv", "rec", "conv_steps", "rec_steps") if n in st]
            return [*states, self.pos, self.mtp_pos, *(sp[n] for n in ("vids", "vtok", "vh", "mids", "mh"))]

        return self._capture((kind, b, *args), lambda: fns[kind](b, *args), keep)

    @torch.no_grad()
    def generate_speculative_greedy(self, ids: torch.Tensor, steps: int, k: int) -> tuple[torch.Tensor, dict]:
        """Greedy decoding of `steps` tokens after the prompt ids [1, T], the MTP head drafting k per verify step.

        Every step is a graph replay; the host reads one number per verify step (the accepted count). Returns the
        new ids [1, steps] (device) and counts {drafted, accepted, verify_steps}.
        """
        from .speculative import check_draft_tokens

        check_draft_tokens(k)
        if ids.shape[0] != 1:
            raise BackendError(f"speculative decoding runs one sequence; got ids of shape {tuple(ids.shape)}")
        sp, b = self._spec_buffers(k + 1), 1
        h = self._prefill_hidden(ids)
        first = F.linear(h[:, -1], self.lm_head).argmax(-1, keepdim=True)  # [1, 1]
        t = ids.shape[1]
        pairs = torch.cat([ids.to(self.device)[:, 1:], first], dim=1)  # (h_p, x_{p+1}) over the prompt
        self._mtp_emit(self._mtp_forward(pairs, h, torch.arange(t, device=self.device), True, t), b, 1)
        sp["vids"][:b, :1].copy_(first)
        mtp_len = t
        self.mtp_pos.fill_(mtp_len)
        out, n_out, counts = [first], 1, {"drafted": 0, "accepted": 0, "verify_steps": 0}
        while n_out < steps:
            for i in range(1, k):  # drafts 2 .. k from the head's own output
                self._spec_graph("mtp", b, 1, self._span(mtp_len + i + 1), i + 1).replay()
            self._spec_graph("verify", b, k + 1, self._span(self.length + k + 1)).replay()
            n = int((sp["vids"][:b, 1:k + 1] == sp["vtok"][:b, :k]).int().cumprod(-1).sum())  # accepted drafts
            out.append(sp["vtok"][:b, :n + 1].clone())
            n_out += n + 1
            counts["drafted"] += k
            counts["accepted"] += n
            counts["verify_steps"] += 1
            self._spec_graph("commit", b, n + 1).replay()
            self.length += n + 1
            self.mtp_pos.fill_(mtp_len)  # drop the draft steps' pairs; the true ones come next
            self._spec_graph("mtp", b, n + 1, self._span(mtp_len + n + 1), 1).replay()
            mtp_len += n + 1
        return torch.cat(out, dim=1)[:, :steps], counts


@register_backend("gpu")
class GpuBackend(Model):
    """nextq's GPU executor (runtime/gpu.py) over an IR directory: bf16 compute, experts packed."""

    def __init__(self, path, device: str = "cuda", dtype: str = "bfloat16", max_batch: int = 8, max_seq: int = 4096):
        super().__init__(path, device)
        from .backends import _torch_dtype

        if not torch.cuda.is_available():
            raise BackendError("backend 'gpu' needs CUDA, which this machine lacks")
        self.model = GpuModel.from_graph(Graph.load(path), device=device, dtype=_torch_dtype(dtype),
                                         max_batch=max_batch, max_seq=max_seq)

    def _ids(self, ids) -> torch.Tensor:
        return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.model.device)

    def logits(self, ids):
        return self.model.prefill(self._ids(ids), all_logits=True).cpu().numpy()

    def prefill(self, ids):
        return self.model.prefill(self._ids(ids)).cpu().numpy()

    def decode(self, ids):
        ids = self._ids(ids)
        out = None
        for i in range(ids.shape[1]):
            out = self.model.decode(ids[:, i:i + 1])
        return out.cpu().numpy()

    def generate_ids(self, ids, max_new_tokens, sampling, on_token=None, speculative=None, draft_tokens=2,
                     stats=None):
        """Speculative decoding here is GpuModel.generate_speculative_greedy: greedy, no penalties, batch 1."""
        if speculative is None:
            return super().generate_ids(ids, max_new_tokens, sampling, on_token)
        penalties = sampling.repetition_penalty != 1 or sampling.presence_penalty
        if speculative != "mtp" or sampling.temperature or penalties:
            raise BackendError("the gpu backend drafts greedily: --speculative mtp needs --temperature 0 and no "
                               "penalties here (sampled speculative decoding runs on the torch and ort backends)")
        if self.model.mtp is None:
            raise BackendError(f"{self.path}: the model has no MTP head; --speculative {speculative} needs one")
        new, counts = self.model.generate_speculative_greedy(self._ids(ids), max_new_tokens, draft_tokens)
        new = new.cpu().numpy()
        stop = np.isin(new[0], list(self.stop_ids)).nonzero()[0]
        new = new[:, :stop[0] + 1] if stop.size else new
        for t in new.T:
            if on_token is not None:
                on_token(t)
        if stats is not None:
            stats.drafted, stats.accepted, stats.verify_steps = (counts[f] for f in ("drafted", "accepted",
                                                                                     "verify_steps"))
        return new
