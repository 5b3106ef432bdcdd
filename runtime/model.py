"""The PyTorch executor of the canonical graph (fp32 or bf16; CPU, or CUDA when present).

State per layer kind: a KV cache for gated attention; conv state + recurrent state for Gated DeltaNet.
Math follows transformers' Qwen3-Next (the numerical reference): zero-centred RMSNorm x_hat * (offset + w) in
fp32, gated RMSNorm for the delta-rule output, partial split-half RoPE, sigmoid output gate on attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nextq.graph import Graph, GatedAttention, GatedDeltaNet, Layer, ModelConfig, SparseMoE

from . import ops  # noqa: F401  (registers torch.ops.nextq.*)
from .rope import rope_cos_sin, rope_parameters

# Tensors kept in fp32 whatever the compute dtype: they feed fp32 math in the reference.
FP32_SUFFIXES = ("A_log", "dt_bias")


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


class TorchModel:
    """Executes an IR graph. `forward(ids, state)` returns logits [B, T, V] and advances `state`."""

    def __init__(self, graph: Graph, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.config: ModelConfig = graph.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.layers: list[Layer] = [b for b in graph.blocks if isinstance(b, Layer)]
        self.mtp = next((b for b in graph.blocks if b.kind == "MTP"), None)
        self.w: dict[str, torch.Tensor] = {}
        self.offsets: dict[str, float] = {}
        for name in graph.tensors:
            t = graph.get(name)
            if not isinstance(t, torch.Tensor):  # quantized: dequantize once (fused kernels come with the GPU work)
                t = t.dequantize()
            keep32 = name.endswith(FP32_SUFFIXES) or ".norm" in name or "_norm" in name
            self.w[name] = t.to(self.device, torch.float32 if keep32 else dtype)
            off = graph.norm_offset(name)
            if off is not None:
                self.offsets[name] = off
        for layer in [*self.layers, *(self.mtp.layers if self.mtp else ())]:
            if isinstance(layer.ffn, SparseMoE):  # stack experts once: [E, I, H] / [E, H, I]
                p = layer.ffn.prefix
                for part in ("gate", "up", "down"):
                    self.w[f"{p}.experts.{part}"] = torch.stack(
                        [self.w.pop(f"{p}.experts.{e}.{part}.weight") for e in range(self.config.num_experts)]
                    )
        self.lm_head = self.w["embed.weight"] if self.config.tie_word_embeddings else self.w["lm_head.weight"]
        inv_freq, self.attention_factor = rope_parameters(self.config)  # fp32 [rot / 2], float
        self.inv_freq = inv_freq.to(self.device)

    # -- blocks ---------------------------------------------------------------------------------------------

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return rms_norm(x, self.w[name], self.offsets[name], self.config.rms_norm_eps)

    def deltanet(self, x: torch.Tensor, p: str, st: LayerState) -> torch.Tensor:
        c, w = self.config, self.w
        b, t, _ = x.shape
        hk, hv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        qkv = torch.cat([F.linear(x, w[f"{p}.{n}.weight"]) for n in ("q", "k", "v")], dim=-1)  # [B, T, C]
        z = F.linear(x, w[f"{p}.z.weight"]).view(b, t, hv, dv)
        beta = torch.sigmoid(F.linear(x, w[f"{p}.b.weight"]))  # [B, T, Hv]
        a = F.linear(x, w[f"{p}.a.weight"])
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
        return F.linear(o.reshape(b, t, hv * dv), w[f"{p}.out.weight"])

    def attention(self, x: torch.Tensor, p: str, st: LayerState, positions: torch.Tensor) -> torch.Tensor:
        c, w = self.config, self.w
        b, t, _ = x.shape
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = self.norm(F.linear(x, w[f"{p}.q.weight"]).view(b, t, hq, d), f"{p}.q_norm.weight").transpose(1, 2)
        k = self.norm(F.linear(x, w[f"{p}.k.weight"]).view(b, t, hkv, d), f"{p}.k_norm.weight").transpose(1, 2)
        v = F.linear(x, w[f"{p}.v.weight"]).view(b, t, hkv, d).transpose(1, 2)
        gate = F.linear(x, w[f"{p}.gate.weight"])  # [B, T, Hq*D]
        q, k = (rope(y, positions, self.inv_freq, self.attention_factor) for y in (q, k))
        if st.k is not None:
            k, v = torch.cat([st.k, k], dim=2), torch.cat([st.v, v], dim=2)
        st.k, st.v = k, v
        s = k.shape[2]
        # causal over the whole cache: query i (absolute s - t + i) sees keys 0..s - t + i
        mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hkv, scale=d ** -0.5)
        o = o.transpose(1, 2).reshape(b, t, hq * d) * torch.sigmoid(gate)
        return F.linear(o, w[f"{p}.o.weight"])

    def ffn(self, x: torch.Tensor, layer: Layer) -> torch.Tensor:
        p, w, c = layer.ffn.prefix, self.w, self.config
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if isinstance(layer.ffn, SparseMoE):
            y = torch.ops.nextq.moe(
                x2, w[f"{p}.router.weight"], w[f"{p}.experts.gate"], w[f"{p}.experts.up"], w[f"{p}.experts.down"],
                w[f"{p}.shared.gate.weight"], w[f"{p}.shared.up.weight"], w[f"{p}.shared.down.weight"],
                w[f"{p}.shared_gate.weight"], c.num_experts_per_tok, c.norm_topk_prob,
            )
        else:
            y = ops.swiglu(x2, w[f"{p}.gate.weight"], w[f"{p}.up.weight"], w[f"{p}.down.weight"])
        return y.reshape(shape)

    def layer(self, x: torch.Tensor, layer: Layer, st: LayerState, positions: torch.Tensor) -> torch.Tensor:
        h = self.norm(x, f"{layer.prefix}.input_norm.weight")
        if isinstance(layer.mixer, GatedDeltaNet):
            h = self.deltanet(h, layer.mixer.prefix, st)
        else:
            assert isinstance(layer.mixer, GatedAttention)
            h = self.attention(h, layer.mixer.prefix, st, positions)
        x = x + h
        return x + self.ffn(self.norm(x, f"{layer.prefix}.post_norm.weight"), layer)

    # -- model ----------------------------------------------------------------------------------------------

    def new_state(self) -> State:
        return State([LayerState() for _ in self.layers])

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, state: State) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] for ids [B, T]; advances `state`."""
        positions = torch.arange(state.position, state.position + ids.shape[1], device=self.device)
        x = F.embedding(ids.to(self.device), self.w["embed.weight"])
        for layer, st in zip(self.layers, state.layers):
            x = self.layer(x, layer, st, positions)
        state.position += ids.shape[1]
        return self.norm(x, "norm.weight")

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """Logits [B, T, V] (compute dtype) for ids [B, T]; with `state`, continues from it and advances it."""
        with few_threads(ids.numel(), self.device):
            return F.linear(self.hidden(ids, state or self.new_state()), self.lm_head)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] from final-normed hidden states [B, T, H] (the tied embedding when tied)."""
        return F.linear(h, self.lm_head)

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
            e = self.norm(F.embedding(next_ids.to(self.device), self.w["embed.weight"]), "mtp.embed_norm.weight")
            h = self.norm(hidden.to(self.device, self.dtype), "mtp.hidden_norm.weight")
            x = F.linear(torch.cat([e, h], dim=-1), self.w["mtp.fc.weight"])
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
