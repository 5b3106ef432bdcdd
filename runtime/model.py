"""The PyTorch executor of the canonical graph (fp32 or bf16; CPU, or CUDA when present).

State per layer kind: a KV cache for gated attention; conv state + recurrent state for Gated DeltaNet.
Math follows transformers' Qwen3-Next (the numerical reference): zero-centred RMSNorm x_hat * (offset + w) in
fp32, gated RMSNorm for the delta-rule output, partial split-half RoPE, sigmoid output gate on attention.

`LayerMath` holds the layer functions, the only CPU implementation of the model's math: `TorchModel` runs them
over a whole IR, runtime/stream.py over one layer's tensors at a time. Both report to an `Observer` (the input of
every weight, the routing of every MoE block, every layer's output): calibration statistics (quant/calibrate.py)
and per-layer drift (validate/compare.py) are observers, not copies of the layers. Weights are held as stored
(`Weights`): quantized ones stay packed and are dequantized when used, a routed expert only when a token reaches it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nextq.graph import Graph, GatedAttention, GatedDeltaNet, Layer, ModelConfig, SparseMoE, expected_tensors
from nextq.quant.schemes import row_block
from nextq.quant.tensor import QUANT_FIELDS, QuantizedTensor, slice_rows

from . import ops  # noqa: F401  (registers torch.ops.nextq.*)
from .rope import rope_cos_sin, rope_parameters

# Tensors kept in fp32 whatever the compute dtype: they feed fp32 math in the reference.
FP32_SUFFIXES = ("A_log", "dt_bias")
CAST_AT_LOAD = 1 << 16  # dense tensors up to this many elements are cast to the compute dtype once, at load


def keeps_fp32(name: str) -> bool:
    """Whether tensor `name` is used in fp32 whatever the compute dtype (norms, A_log, dt_bias)."""
    return name.endswith(FP32_SUFFIXES) or ".norm" in name or "_norm" in name


@dataclass
class LayerState:
    """Decode state of one layer: KV cache [B, Hkv, S, D] or conv [B, C, K-1] + recurrent [B, Hv, Dk, Dv].

    With `keep_steps` (speculative verify passes), a DeltaNet layer also keeps the state after each of the T
    tokens it was just fed: conv_steps [B, T, C, K-1], recurrent_steps [B, T, Hv, Dk, Dv].
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    conv: torch.Tensor | None = None
    recurrent: torch.Tensor | None = None
    keep_steps: bool = False
    conv_steps: torch.Tensor | None = None
    recurrent_steps: torch.Tensor | None = None


@dataclass
class State:
    """The whole model's decode state: per-layer states and the number of tokens seen."""

    layers: list[LayerState] = field(default_factory=list)
    position: int = 0


def rms_norm(x: torch.Tensor, w: torch.Tensor, offset: float, eps: float) -> torch.Tensor:
    """x_hat * (offset + w), computed in fp32 and cast back (transformers' Qwen3NextRMSNorm for offset 1)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (offset + w.float())).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """norm(x) * w * silu(z) per head, no offset (transformers' Qwen3NextRMSNormGated). x, z: [..., Dv]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((w * xf.to(x.dtype)) * F.silu(z.float())).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float) -> torch.Tensor:
    """Split-half (rotate_half) RoPE on the first rot = 2 * len(inv_freq) dims, cos/sin scaled by the attention
    factor (runtime/rope.py: plain or YaRN). x: [B, H, T, D]; positions: [T]."""
    rot = 2 * inv_freq.numel()
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor, x.dtype)  # [T, rot]
    xr, xp = x[..., :rot], x[..., rot:]
    half = torch.cat([-xr[..., rot // 2:], xr[..., : rot // 2]], dim=-1)
    return torch.cat([xr * cos + half * sin, xp], dim=-1)


class few_threads:
    """Run small CPU steps (decode) on one thread: each op on a few hundred numbers costs less than waking the
    intra-op thread pool, and on a busy machine the pool's spin-waiting made decode 50x slower (measured:
    2.8 vs 151 tokens/s on the embedded model with the other core loaded)."""

    SMALL = 16  # tokens per call

    def __init__(self, tokens: int, device: torch.device):
        self.active = device.type == "cpu" and tokens <= self.SMALL

    def __enter__(self):
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.saved)


class Observer:
    """What the layer math shows while it runs; every method is a no-op. Subclasses collect what they need."""

    def on_linear(self, name: str, x: torch.Tensor) -> None:
        """x [N, K]: the input of IR weight `name` (an expert's too: `layers.3.ffn.experts.7.down.weight`)."""

    def on_route(self, prefix: str, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """x [N, H]: the tokens entering MoE block `prefix`; ids, weights [N, K]: their top-k experts and weights."""

    def on_layer(self, index: int, h: torch.Tensor) -> None:
        """h [B, T, H]: the output of decoder layer `index`."""


class Weights:
    """IR tensors by name on one device, as stored, handed out in the compute dtype when used.

    Quantized weights stay packed (their fields moved to the device) and are dequantized each time they are used;
    dense tensors above CAST_AT_LOAD elements keep their stored dtype and are cast when used. So a model holds
    about its IR's size. A large weight that needs converting is used in row blocks (quant.schemes.row_block): no
    float copy of an embedding or LM head is made whole. Norms, A_log and dt_bias are fp32 (`keeps_fp32`).
    """

    def __init__(self, config: ModelConfig, device: str | torch.device, dtype: torch.dtype):
        self.device, self.dtype = torch.device(device), dtype
        self.specs = expected_tensors(config)
        self.stored: dict[str, torch.Tensor | QuantizedTensor] = {}

    def put(self, name: str, t: torch.Tensor | QuantizedTensor) -> None:
        """Hold `t` (a dense tensor or a QuantizedTensor, as stored) under `name`, replacing what was there."""
        if isinstance(t, QuantizedTensor):
            t = dataclasses.replace(t, **{f: getattr(t, f).to(self.device) for f in QUANT_FIELDS
                                          if getattr(t, f) is not None})
        else:
            cast = self.compute_dtype(name) if t.numel() <= CAST_AT_LOAD or keeps_fp32(name) else t.dtype
            t = t.to(self.device, cast)
        self.stored[name] = t

    def clear(self) -> None:
        self.stored.clear()

    def compute_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if keeps_fp32(name) else self.dtype

    def offset(self, name: str) -> float:
        """The norm offset of norm weight `name`: its effective scale is offset + w."""
        return self.specs[name].norm_offset

    def __getitem__(self, name: str) -> torch.Tensor:
        """Tensor `name` in its compute dtype (a quantized weight dequantized, `[N, K]`)."""
        return self.rows(name, 0, self.stored[name].shape[0])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `name` in its compute dtype (start a multiple of 128 for quantized weights)."""
        t = self.stored[name]
        if isinstance(t, QuantizedTensor):
            t = (t if (start, stop) == (0, t.shape[0]) else slice_rows(t, start, stop)).dequantize()
        else:
            t = t[start:stop]
        return t.to(self.compute_dtype(name))

    def row_ranges(self, name: str) -> list[tuple[int, int]]:
        """Row blocks [start, stop) to convert a large weight in (one range for a small one)."""
        shape = tuple(self.stored[name].shape)
        step = row_block(shape) or shape[0]
        return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x [..., K] times weight `name` [N, K] transposed -> [..., N]."""
        t = self.stored[name]
        if isinstance(t, torch.Tensor) and t.dtype == self.dtype:
            return F.linear(x, t)
        return torch.cat([F.linear(x, self.rows(name, a, b)) for a, b in self.row_ranges(name)], dim=-1)

    def embedding(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        """Rows `ids` [...] of weight `name` -> [..., K] in the compute dtype (quantized: only the row blocks that
        hold an id are dequantized)."""
        t = self.stored[name]
        if isinstance(t, torch.Tensor):
            return F.embedding(ids, t).to(self.dtype)
        flat = ids.reshape(-1)
        out = torch.empty(flat.shape[0], t.shape[1], dtype=self.dtype, device=self.device)
        for a, b in self.row_ranges(name):
            sel = ((flat >= a) & (flat < b)).nonzero().squeeze(-1)
            if sel.numel():
                out[sel] = self.rows(name, a, b)[flat[sel] - a]
        return out.reshape(*ids.shape, t.shape[1])


class LayerMath:
    """The model's layer functions over `Weights` (a whole model's, or one layer's: runtime/stream.py), reporting
    every weight's input, every routing and every layer's output to `observer`."""

    def __init__(self, config: ModelConfig, weights: Weights, observer: Observer | None = None):
        self.config, self.w = config, weights
        self.device, self.dtype = weights.device, weights.dtype
        self.observer = observer or Observer()
        inv_freq, self.attention_factor = rope_parameters(config)  # fp32 [rot / 2], float
        self.inv_freq = inv_freq.to(self.device)
        self.head_name = "embed.weight" if config.tie_word_embeddings else "lm_head.weight"

    # -- blocks ---------------------------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x [..., K] through weight `name` [N, K] -> [..., N] (the observer sees x as [N', K])."""
        self.observer.on_linear(name, x.reshape(-1, x.shape[-1]))
        return self.w.linear(x, name)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H] of ids [B, T]."""
        return self.w.embedding(ids.to(self.device), "embed.weight")

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] from final-normed hidden states [B, T, H] (the tied embedding when tied)."""
        return self.linear(h, self.head_name)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return rms_norm(x, self.w[name], self.w.offset(name), self.config.rms_norm_eps)

    def deltanet(self, x: torch.Tensor, p: str, st: LayerState) -> torch.Tensor:
        c, w = self.config, self.w
        b, t, _ = x.shape
        hk, hv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        qkv = torch.cat([self.linear(x, f"{p}.{n}.weight") for n in ("q", "k", "v")], dim=-1)  # [B, T, C]
        z = self.linear(x, f"{p}.z.weight").view(b, t, hv, dv)
        beta = torch.sigmoid(self.linear(x, f"{p}.b.weight"))  # [B, T, Hv]
        a = self.linear(x, f"{p}.a.weight")
        g = -w[f"{p}.A_log"].exp() * F.softplus(a.float() + w[f"{p}.dt_bias"])  # log decay, fp32
        if st.conv is None:
            st.conv = x.new_zeros(b, qkv.shape[-1], c.linear_conv_kernel_dim - 1)
            st.recurrent = torch.zeros(b, hv, dk, dv, device=x.device)
        if st.keep_steps:  # the conv state after token i is the window i+1 .. i+K-1 of [state, inputs]
            xs = torch.cat([st.conv.to(qkv.dtype), qkv.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
            st.conv_steps = xs.unfold(-1, st.conv.shape[-1], 1)[:, :, 1:].transpose(1, 2).contiguous()
        qkv, st.conv = torch.ops.nextq.causal_conv1d(qkv, w[f"{p}.conv.weight"], st.conv)
        q, k, v = qkv.split([hk * dk, hk * dk, hv * dv], dim=-1)
        args = (q.reshape(b, t, hk, dk), k.reshape(b, t, hk, dk), v.reshape(b, t, hv, dv), g, beta.to(x.dtype))
        if st.keep_steps:  # token by token (the decode op itself), keeping the state after each
            outs, steps = [], []
            for i in range(t):
                o_i, st.recurrent = torch.ops.nextq.gated_delta_rule(*(a[:, i:i + 1] for a in args), st.recurrent)
                outs.append(o_i)
                steps.append(st.recurrent)
            o, st.recurrent_steps = torch.cat(outs, dim=1), torch.stack(steps, dim=1)
        else:
            o, st.recurrent = torch.ops.nextq.gated_delta_rule(*args, st.recurrent)
        o = gated_rms_norm(o, z, w[f"{p}.norm.weight"], c.rms_norm_eps)
        return self.linear(o.reshape(b, t, hv * dv), f"{p}.out.weight")

    def attention(self, x: torch.Tensor, p: str, st: LayerState, positions: torch.Tensor) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = self.norm(self.linear(x, f"{p}.q.weight").view(b, t, hq, d), f"{p}.q_norm.weight").transpose(1, 2)
        k = self.norm(self.linear(x, f"{p}.k.weight").view(b, t, hkv, d), f"{p}.k_norm.weight").transpose(1, 2)
        v = self.linear(x, f"{p}.v.weight").view(b, t, hkv, d).transpose(1, 2)
        gate = self.linear(x, f"{p}.gate.weight")  # [B, T, Hq*D]
        q, k = (rope(y, positions, self.inv_freq, self.attention_factor) for y in (q, k))
        if st.k is not None:
            k, v = torch.cat([st.k, k], dim=2), torch.cat([st.v, v], dim=2)
        st.k, st.v = k, v
        s = k.shape[2]
        # causal over the whole cache: query i (absolute s - t + i) sees keys 0..s - t + i
        mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hkv, scale=d ** -0.5)
        o = o.transpose(1, 2).reshape(b, t, hq * d) * torch.sigmoid(gate)
        return self.linear(o, f"{p}.o.weight")

    def mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        """SwiGLU down(silu(gate x) * up x) with weights `{p}.gate|up|down.weight`: x [N, H] -> [N, H]."""
        mid = F.silu(self.linear(x, f"{p}.gate.weight")) * self.linear(x, f"{p}.up.weight")  # [N, I]
        return self.linear(mid, f"{p}.down.weight")

    def moe(self, x: torch.Tensor, p: str) -> torch.Tensor:
        """Sparse MoE block `p` on tokens x [N, H] (the math of nextq::moe): tokens dispatched per expert, each
        routed expert's weights used (dequantized) only for its own tokens, plus the gated shared expert."""
        c = self.config
        weights, ids = ops.route(self.linear(x, f"{p}.router.weight"), c.num_experts_per_tok, c.norm_topk_prob)
        self.observer.on_route(p, x, ids, weights)
        out = torch.zeros_like(x)
        for e, rows, slots in ops.expert_groups(ids, c.num_experts):
            out.index_add_(0, rows, self.mlp(x[rows], f"{p}.experts.{e}") * weights[rows, slots, None].to(x.dtype))
        return out + self.shared_expert(x, p)

    def shared_expert(self, x: torch.Tensor, p: str) -> torch.Tensor:
        """The gated shared expert of MoE block `p`: sigmoid(shared_gate x) * mlp(x). x [N, H] -> [N, H]."""
        return torch.sigmoid(self.linear(x, f"{p}.shared_gate.weight")) * self.mlp(x, f"{p}.shared")

    def ffn(self, x: torch.Tensor, layer: Layer) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = self.moe(x2, layer.ffn.prefix) if isinstance(layer.ffn, SparseMoE) else self.mlp(x2, layer.ffn.prefix)
        return y.reshape(x.shape)

    def layer(self, x: torch.Tensor, layer: Layer, st: LayerState, positions: torch.Tensor) -> torch.Tensor:
        """One decoder layer: x [B, T, H] -> [B, T, H]."""
        mid, _, y = self.layer_parts(x, layer, st, positions)
        x = mid + y
        self.observer.on_layer(layer.index, x)
        return x

    def layer_parts(self, x: torch.Tensor, layer: Layer, st: LayerState, positions: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder layer in its parts, each [B, T, H]: (x + the mixer's update, the feed-forward's input, the
        feed-forward's update); the layer's output is the first plus the last."""
        h = self.norm(x, f"{layer.prefix}.input_norm.weight")
        if isinstance(layer.mixer, GatedDeltaNet):
            h = self.deltanet(h, layer.mixer.prefix, st)
        else:
            assert isinstance(layer.mixer, GatedAttention)
            h = self.attention(h, layer.mixer.prefix, st, positions)
        x = x + h
        f_in = self.norm(x, f"{layer.prefix}.post_norm.weight")
        return x, f_in, self.ffn(f_in, layer)

    def mtp_input(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """The MTP head's input fc(concat(embed_norm(embed(t+1)), hidden_norm(h_t))) [B, T, H] from final-normed
        hidden h_t [B, T, H] and token t+1 ids [B, T]."""
        e = self.norm(self.embed(next_ids), "mtp.embed_norm.weight")
        h = self.norm(hidden.to(self.device, self.dtype), "mtp.hidden_norm.weight")
        return self.linear(torch.cat([e, h], dim=-1), "mtp.fc.weight")


class TorchModel(LayerMath):
    """Executes an IR graph, all of it held (as stored). `forward(ids, state)` returns logits [B, T, V] and
    advances `state`."""

    def __init__(self, graph: Graph, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 observer: Observer | None = None):
        weights = Weights(graph.config, device, dtype)
        for name in graph.tensors:
            weights.put(name, graph.get(name))
        super().__init__(graph.config, weights, observer)
        self.layers: list[Layer] = [b for b in graph.blocks if isinstance(b, Layer)]
        self.mtp = next((b for b in graph.blocks if b.kind == "MTP"), None)

    # -- model ----------------------------------------------------------------------------------------------

    def new_state(self) -> State:
        return State([LayerState() for _ in self.layers])

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, state: State) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] for ids [B, T]; advances `state`."""
        positions = torch.arange(state.position, state.position + ids.shape[1], device=self.device)
        x = self.embed(ids)
        for layer, st in zip(self.layers, state.layers):
            x = self.layer(x, layer, st, positions)
        state.position += ids.shape[1]
        return self.norm(x, "norm.weight")

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """Logits [B, T, V] (compute dtype) for ids [B, T]; with `state`, continues from it and advances it."""
        with few_threads(ids.numel(), self.device):
            return self.head(self.hidden(ids, state or self.new_state()))

    def new_mtp_state(self) -> State:
        """An empty KV state for the MTP head's own layers."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head")
        return State([LayerState() for _ in self.mtp.layers])

    @torch.no_grad()
    def mtp_step(self, hidden: torch.Tensor, next_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP head over pairs (h_t, x_{t+1}): final-normed hidden h_t [B, T, H], token t+1 ids [B, T].

        Continues the head's own KV `state` (RoPE positions state.position ..) and advances it. Returns logits
        [B, T, V] for token t+2 and the head's normed output [B, T, H], the hidden input of the next draft step.
        """
        with few_threads(next_ids.numel(), self.device):
            x = self.mtp_input(hidden, next_ids)
            positions = torch.arange(state.position, state.position + x.shape[1], device=self.device)
            for layer, st in zip(self.mtp.layers, state.layers):
                x = self.layer(x, layer, st, positions)
            state.position += x.shape[1]
            h = self.norm(x, "mtp.norm.weight")
            return self.head(h), h

    @torch.no_grad()
    def mtp_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """The MTP head's logits [B, T, V] for token t+2 from final-normed hidden h_t [B, T, H] and token t+1 ids
        [B, T], over a whole sequence from an empty KV state."""
        return self.mtp_step(hidden, next_ids, self.new_mtp_state())[0]
