"""ONNX export: the canonical graph -> `model.onnx` (+ `mtp.onnx`) on ONNX Runtime's contrib ops.

One decoder graph serves prefill (T > 1) and decode (T = 1); the caller carries the state between calls:

    inputs   input_ids [B, T] int64, position_ids [B, T] int64,
             per full-attention layer i:  past.{i}.key / past.{i}.value   [B, Hkv, P, D]
             per Gated DeltaNet layer i:  past.{i}.conv [B, K-1, C] (channels last), past.{i}.recurrent [B, Hv, Dk, Dv]
    outputs  logits [B, T, V] float32, hidden [B, T, H] (final-normed, feeds the MTP draft graph),
             present.{i}.* (same layouts; the key/value length grows to P + T)

Ops (chosen to run on onnxruntime >= 1.32 and onnxruntime-gpu 1.31.1, see ../shared notes on the contrib ops):
LinearAttention(update_rule="gated_delta"), CausalConvWithState, GatedRMSNorm, MoE / QMoE, MatMulNBits
(com.microsoft); RMSNormalization, RotaryEmbedding, Attention (ai.onnx opset 23); DequantizeLinear + MatMul for fp8.
Weights stream into one external data file, so memory stays bounded by the largest tensor and the 2 GB
protobuf limit does not apply. Every emitter is a small `make_<op>` function; node names are path-style
(`/layers.3/mixer/q/MatMul`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import click
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from nextq.errors import UnsupportedModelError
from nextq.quant import QuantizedTensor
from nextq.runtime.rope import rope_parameters
from nextq.graph import (
    DenseMLP, GatedAttention, GatedDeltaNet, Graph, Layer, ModelConfig, QuantRef, SparseMoE, atomic_output_dir,
)

OPSET = 23  # RMSNormalization, RotaryEmbedding, Attention; both ORT packages run it without extra env flags
MS_OPSET = 1
IR_VERSION = 10
MODEL_FILE, MTP_FILE, DATA_FILE = "model.onnx", "mtp.onnx", "model.onnx.data"
ALIGN = 64  # byte alignment of each tensor in the data file
FLOAT_SCHEMES = ("dense", "f32", "bf16", "f16")  # a plain tensor, or a float pass-through QuantizedTensor

TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.uint8: TensorProto.UINT8,
    torch.int8: TensorProto.INT8, torch.int64: TensorProto.INT64, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
}


# ---- graph builder ------------------------------------------------------------------------------------------


class ExternalData:
    """Appends tensors to one data file; a tensor written once (by name) is shared by every graph that uses it."""

    def __init__(self, path: Path):
        self.path, self.location = path, path.name
        self.f: BinaryIO = open(path, "wb")
        self.written: dict[str, TensorProto] = {}

    def add(self, name: str, t: torch.Tensor) -> TensorProto:
        """Append `t` (aligned) and return its TensorProto, which points into the file."""
        t = t.detach().contiguous().cpu()
        if t.dtype not in TORCH_TO_ONNX:
            raise UnsupportedModelError(f"{name}: dtype {t.dtype} has no ONNX export, supported: "
                                        f"{sorted(str(d) for d in TORCH_TO_ONNX)}")
        arr = (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).numpy()
        self.f.seek(-self.f.tell() % ALIGN, 1)
        offset = self.f.tell()
        self.f.write(arr.data)  # a view of the tensor's memory, no copy
        proto = TensorProto(name=name, data_type=TORCH_TO_ONNX[t.dtype], dims=list(t.shape),
                            data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(arr.nbytes))):
            proto.external_data.add(key=k, value=v)
        self.written[name] = proto
        return proto

    def close(self) -> None:
        self.f.close()


@dataclass
class Builder:
    """Nodes, initializers and I/O of one ONNX graph. `b.op(...)` returns its output names."""

    graph: Graph
    data: ExternalData
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: dict[str, TensorProto] = field(default_factory=dict)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)  # per-graph values computed once (cos/sin, mask, ...)

    @property
    def config(self) -> ModelConfig:
        return self.graph.config

    def op(self, op_type: str, inputs: Sequence[str], name: str, n_out: int = 1, domain: str = "",
           outputs: Sequence[str] | None = None, **attrs) -> list[str]:
        outs = list(outputs) if outputs else [f"{name}/out{j}" if n_out > 1 else f"{name}/out" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs

    def op1(self, op_type: str, inputs: Sequence[str], name: str, **kw) -> str:
        return self.op(op_type, inputs, name, **kw)[0]

    def weight(self, name: str, make: Callable[[], torch.Tensor]) -> str:
        """An external initializer `name`, computed by `make()` the first time any graph asks for it."""
        if name not in self.inits:
            proto = self.data.written.get(name)
            self.inits[name] = proto if proto is not None else self.data.add(name, make())
        return name

    def const(self, name: str, value: Any, dtype=np.int64) -> str:
        """A small inline initializer (shapes, axes, scalars)."""
        if name not in self.inits:
            self.inits[name] = onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def input(self, name: str, elem: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, name: str, elem: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    def model(self, graph_name: str, doc: str) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, initializer=list(self.inits.values()),
                              doc_string=doc)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET),
                                                helper.make_opsetid("com.microsoft", MS_OPSET)],
                              producer_name="nextq")
        m.ir_version = IR_VERSION
        return m


def dense(t: Any) -> torch.Tensor:
    """A float32 tensor from a dense tensor or a float pass-through QuantizedTensor."""
    return (t if isinstance(t, torch.Tensor) else t.dequantize()).to(torch.float32)


# ---- linears: one emitter per weight format -----------------------------------------------------------------


def make_matmul(b: Builder, x: str, name: str, w: Any) -> str:
    """Float weight: x [.., K] @ W^T [K, N] (stored float32).

        x ──MatMul── y
            W^T ─┘
    """
    wt = b.weight(f"{name}.T", lambda: dense(w).T)
    return b.op1("MatMul", [x, wt], f"/{name}/MatMul")


def make_matmul_nbits(b: Builder, x: str, name: str, w: Any) -> str:
    """int4_sym_g{32,64,128} -> MatMulNBits, bits 4, no zero points (ORT's default 8 = nextq's implicit 8).

    nextq's codes are already in ORT order (low nibble = even k); B is the same bytes viewed [N, K/bs, bs/2];
    scales fp16 -> float32 (exact), in the activation dtype. accuracy_level 0: fp32 activations, never int8.

        x ──MatMulNBits── y
            B, scales ─┘
    """
    n, k = w.shape
    bs = w.block_size
    qb = b.weight(f"{name}.qweight", lambda: w.data.reshape(n, k // bs, bs // 2))
    sc = b.weight(f"{name}.scales", lambda: w.scales.to(torch.float32))
    return b.op1("MatMulNBits", [x, qb, sc], f"/{name}/MatMulNBits", domain="com.microsoft",
                 K=k, N=n, bits=4, block_size=bs, accuracy_level=0)


def _fp8_dequant(b: Builder, name: str, w: Any) -> str:
    """fp8 e4m3fn codes kept in the file, dequantized in the graph to W^T [K, N] float32.

    fp8_channel: per-axis scale [N] on axis 1. fp8_block128 / fp8_g128: 128x128 / 1x128 tiles become blocks of
    128 along K (axis 0) with the tile scale repeated per column, scale [ceil(K/128), N].
    """
    n, k = w.shape
    q = b.weight(f"{name}.fp8", lambda: w.data.T)  # [K, N]
    if w.scheme == "fp8_channel":
        s = b.weight(f"{name}.scale", lambda: w.scales.reshape(n).to(torch.float32))
        return b.op1("DequantizeLinear", [q, s], f"/{name}/DequantizeLinear", axis=1)
    bk = w.block_size[1]
    s = b.weight(f"{name}.scale", lambda: w.scales.repeat_interleave(w.block_size[0], 0)[:n].T.contiguous())
    return b.op1("DequantizeLinear", [q, s], f"/{name}/DequantizeLinear", axis=0, block_size=bk)


def make_fp8_matmul(b: Builder, x: str, name: str, w: Any) -> str:
    """fp8 -> DequantizeLinear(float8e4m3fn) + MatMul (ORT has no fp8 weight kernel on CPU; exact in fp32).

        W^T fp8, scale ──DequantizeLinear── W^T f32
                                 x ──MatMul──┘── y
    """
    return b.op1("MatMul", [x, _fp8_dequant(b, name, w)], f"/{name}/MatMul")


LINEAR_FORMATS: dict[str, Callable[[Builder, str, str, Any], str]] = {
    **{s: make_matmul for s in FLOAT_SCHEMES},
    **{f"int4_sym_g{g}": make_matmul_nbits for g in (32, 64, 128)},
    "fp8_channel": make_fp8_matmul,
    "fp8_block128": make_fp8_matmul,
    "fp8_g128": make_fp8_matmul,
}


def scheme_of(t: Any) -> str:
    return "dense" if isinstance(t, torch.Tensor) else t.scheme


def make_linear(b: Builder, x: str, name: str) -> str:
    """y = x W^T for the canonical weight `name` (without `.weight`), in whatever format it is stored."""
    w = b.graph.get(f"{name}.weight")
    fmt = scheme_of(w)
    if fmt not in LINEAR_FORMATS:
        raise UnsupportedModelError(f"{name}.weight: scheme {fmt!r} has no ONNX export, "
                                    f"supported: {sorted(LINEAR_FORMATS)}")
    return LINEAR_FORMATS[fmt](b, x, name, w)


# ---- norms, small helpers -----------------------------------------------------------------------------------


def make_rms_norm(b: Builder, x: str, name: str) -> str:
    """RMSNormalization (opset 23, fp32 stash) with scale = norm_offset + w folded at export (1 + w for
    Qwen3-Next's zero-centred norms), normalising the last axis."""
    wname = f"{name}.weight"
    off = b.graph.norm_offset(wname)
    scale = b.weight(f"{wname}.scale", lambda: off + dense(b.graph.get(wname)))
    return b.op1("RMSNormalization", [x, scale], f"/{name}/RMSNormalization", axis=-1,
                 epsilon=b.config.rms_norm_eps, stash_type=1)


def make_reshape(b: Builder, x: str, shape: Sequence[int], name: str) -> str:
    """Reshape with 0 = keep that dim (batch and sequence stay symbolic)."""
    return b.op1("Reshape", [x, b.const(f"shape{list(shape)}", shape)], name)


def make_swiglu(b: Builder, x: str, prefix: str) -> str:
    """down(silu(gate x) * up x): the dense MLP and the shared expert.

        x ─┬─ gate ── Sigmoid ─ Mul(gate) ─┐
           └─ up ─────────────────────────Mul── down ── y
    """
    g = make_linear(b, x, f"{prefix}.gate")
    act = b.op1("Mul", [g, b.op1("Sigmoid", [g], f"/{prefix}/act/Sigmoid")], f"/{prefix}/act/Mul")
    h = b.op1("Mul", [act, make_linear(b, x, f"{prefix}.up")], f"/{prefix}/Mul")
    return make_linear(b, h, f"{prefix}.down")


# ---- Gated DeltaNet -----------------------------------------------------------------------------------------


def make_l2norm_repeat(b: Builder, x: str, name: str) -> str:
    """[B, T, Hk*Dk] -> l2-normalised per head (eps 1e-6 inside the sqrt, as FLA / transformers) and repeated
    to Hv heads (value head j reads key head j // (Hv/Hk)) -> [B, T, Hv*Dk]."""
    c = b.config
    hk, hv, dk = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim
    x4 = make_reshape(b, x, [0, 0, hk, dk], f"/{name}/Reshape")
    ss = b.op1("ReduceSumSquare", [x4, b.const("axes[-1]", [-1])], f"/{name}/ReduceSumSquare", keepdims=1)
    eps = b.const("l2norm_eps", 1e-6, np.float32)
    nrm = b.op1("Sqrt", [b.op1("Add", [ss, eps], f"/{name}/Add")], f"/{name}/Sqrt")
    y = b.op1("Div", [x4, nrm], f"/{name}/Div")
    if hv != hk:
        y = b.op1("Unsqueeze", [y, b.const("axes[3]", [3])], f"/{name}/Unsqueeze")  # [B, T, Hk, 1, Dk]
        y = b.op1("Expand", [y, b.const(f"repeat{hv // hk}", [1, 1, 1, hv // hk, 1])], f"/{name}/Expand")
    return make_reshape(b, y, [0, 0, hv * dk], f"/{name}/Reshape_out")


def make_deltanet(b: Builder, x: str, i: int, p: str) -> str:
    """Gated DeltaNet mixer with conv and recurrent state I/O.

        x ─┬─ q,k,v ─ Concat ─ CausalConvWithState(silu) ─ Split ─ q,k: l2norm+repeat ─┐
           │            past.i.conv ──┘  └─ present.i.conv        v ──────────────────┤
           ├─ b ─ Sigmoid ─────────────────────────────────────────── beta ───────────┤
           ├─ a ─ Add(dt_bias) ─ Softplus ─ Mul(-exp(A_log)) ──────── decay (log) ────┤
           │                                        past.i.recurrent ─ LinearAttention(gated_delta)
           └─ z ─────────────────────────────────────── GatedRMSNorm(silu) ─┘   └─ present.i.recurrent
                                                              └─ out ─ y
    """
    c, g = b.config, b.graph
    hk, hv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    ch = 2 * hk * dk + hv * dv
    qkv = b.op1("Concat", [make_linear(b, x, f"{p}.{n}") for n in ("q", "k", "v")], f"/{p}/qkv/Concat", axis=-1)
    conv_w = b.weight(f"{p}.conv.weight.oik", lambda: dense(g.get(f"{p}.conv.weight"))[:, None, :])  # [C, 1, K]
    past_conv = b.input(f"past.{i}.conv", TensorProto.FLOAT, ["batch", c.linear_conv_kernel_dim - 1, ch])
    qkv, _ = b.op("CausalConvWithState", [qkv, conv_w, "", past_conv], f"/{p}/conv/CausalConvWithState",
                  domain="com.microsoft", outputs=[f"/{p}/conv/out", f"present.{i}.conv"], activation="silu",
                  channels_last=1)
    q, k, v = b.op("Split", [qkv, b.const(f"split{[hk * dk, hk * dk, hv * dv]}", [hk * dk, hk * dk, hv * dv])],
                   f"/{p}/qkv/Split", n_out=3, axis=-1)
    q, k = make_l2norm_repeat(b, q, f"{p}/q_l2norm"), make_l2norm_repeat(b, k, f"{p}/k_l2norm")
    beta = b.op1("Sigmoid", [make_linear(b, x, f"{p}.b")], f"/{p}/beta/Sigmoid")
    dt_bias = b.weight(f"{p}.dt_bias", lambda: dense(g.get(f"{p}.dt_bias")))
    neg_a = b.weight(f"{p}.A_log.neg_exp", lambda: -dense(g.get(f"{p}.A_log")).exp())
    sp = b.op1("Softplus", [b.op1("Add", [make_linear(b, x, f"{p}.a"), dt_bias], f"/{p}/decay/Add")],
               f"/{p}/decay/Softplus")
    decay = b.op1("Mul", [sp, neg_a], f"/{p}/decay/Mul")
    past_rec = b.input(f"past.{i}.recurrent", TensorProto.FLOAT, ["batch", hv, dk, dv])
    o, _ = b.op("LinearAttention", [q, k, v, past_rec, decay, beta], f"/{p}/LinearAttention", domain="com.microsoft",
                outputs=[f"/{p}/LinearAttention/out", f"present.{i}.recurrent"], q_num_heads=hv, kv_num_heads=hv,
                update_rule="gated_delta")
    b.output(f"present.{i}.conv", TensorProto.FLOAT, ["batch", c.linear_conv_kernel_dim - 1, ch])
    b.output(f"present.{i}.recurrent", TensorProto.FLOAT, ["batch", hv, dk, dv])
    nw = b.weight(f"{p}.norm.weight.scale", lambda: g.norm_offset(f"{p}.norm.weight") + dense(g.get(f"{p}.norm.weight")))
    o = b.op1("GatedRMSNorm", [o, nw, make_linear(b, x, f"{p}.z")], f"/{p}/norm/GatedRMSNorm", domain="com.microsoft",
              activation="silu", epsilon=c.rms_norm_eps)
    return make_linear(b, o, f"{p}.out")


# ---- gated attention ----------------------------------------------------------------------------------------


def make_rope_cache(b: Builder, positions: str) -> tuple[str, str]:
    """cos, sin [B, T, rot/2] from position_ids, in fp32 as transformers computes them (no max-position table):
    inverse frequencies and attention factor from runtime/rope.py (plain or YaRN); the factor multiplies cos and
    sin (the op's pass-through dims stay unscaled, as in transformers).

        position_ids ─ Cast ─ Unsqueeze ─ Mul(inv_freq) ─┬─ Cos ─ [Mul(attention factor)]
                                                         └─ Sin ─ [Mul(attention factor)]
    """
    if "rope" not in b.cache:
        inv, factor = rope_parameters(b.config)
        pf = b.op1("Cast", [positions], "/rope/Cast", to=TensorProto.FLOAT)
        pf = b.op1("Unsqueeze", [pf, b.const("axes[-1]", [-1])], "/rope/Unsqueeze")
        f = b.op1("Mul", [pf, b.const("rope.inv_freq", inv.numpy(), np.float32)], "/rope/Mul")
        cos, sin = b.op1("Cos", [f], "/rope/Cos"), b.op1("Sin", [f], "/rope/Sin")
        if factor != 1.0:
            scale = b.const("rope.attention_factor", np.float32(factor), np.float32)
            cos, sin = (b.op1("Mul", [v, scale], f"/rope/{n}/Mul") for v, n in ((cos, "Cos"), (sin, "Sin")))
        b.cache["rope"] = (cos, sin)
    return b.cache["rope"]


def make_causal_mask(b: Builder, past_key: str) -> str:
    """Boolean [T, P + T]: query t (absolute P + t) attends to keys 0..P + t. P comes from the first KV cache,
    so the mask is explicit and does not depend on how an engine aligns `is_causal` when a past is given.

        past_key ─ Shape[2] = P ──┬─ Range(P, P+T) ─ Unsqueeze ─┐
        input_ids ─ Shape[1] = T ─┴─ Range(0, P+T) ─────────── LessOrEqual ── mask
    """
    if "mask" not in b.cache:
        one = b.const("one", 1)
        past = b.op1("Shape", [past_key], "/mask/past_len", start=2, end=3)
        t = b.op1("Shape", [b.cache["input_ids"]], "/mask/seq_len", start=1, end=2)
        past, t = (b.op1("Squeeze", [v, b.const("axes[0]", [0])], f"/mask/Squeeze_{j}") for j, v in enumerate((past, t)))
        total = b.op1("Add", [past, t], "/mask/total")
        qpos = b.op1("Unsqueeze", [b.op1("Range", [past, total, one], "/mask/q_range"), b.const("axes[-1]", [-1])],
                     "/mask/Unsqueeze")
        kpos = b.op1("Range", [b.const("zero", 0), total, one], "/mask/k_range")
        b.cache["mask"] = b.op1("LessOrEqual", [kpos, qpos], "/mask/LessOrEqual")
    return b.cache["mask"]


def make_attention(b: Builder, x: str, i: int, p: str) -> str:
    """Gated attention with KV state I/O. (1 + w) q/k RMSNorm and the sigmoid output gate stay outside the op
    (ORT's CPU GroupQueryAttention rejects q/k norm weights); RoPE is split-half on the first rot dims.

        x ─┬─ q ─ [B,T,Hq,D] ─ RMSNorm ─ RotaryEmbedding ─┐
           ├─ k ─ [B,T,Hkv,D] ─ RMSNorm ─ RotaryEmbedding ─┤ past.i.key/value, causal mask
           ├─ v ──────────────────────────────────────── Attention(23) ─ present.i.key/value
           └─ gate ─ Sigmoid ──────────────────────────────── Mul ─ o ─ y
    """
    c = b.config
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    cos, sin = make_rope_cache(b, b.cache["position_ids"])

    def qk(n: str, heads: int) -> str:
        h = make_reshape(b, make_linear(b, x, f"{p}.{n}"), [0, 0, heads, d], f"/{p}/{n}/Reshape")
        h = make_reshape(b, make_rms_norm(b, h, f"{p}.{n}_norm"), [0, 0, heads * d], f"/{p}/{n}_norm/Reshape")
        return b.op1("RotaryEmbedding", [h, cos, sin], f"/{p}/{n}/RotaryEmbedding", num_heads=heads,
                     rotary_embedding_dim=c.rotary_dim, interleaved=0)

    q, k, v = qk("q", hq), qk("k", hkv), make_linear(b, x, f"{p}.v")
    past = [b.input(f"past.{i}.{n}", TensorProto.FLOAT, ["batch", hkv, "past_sequence", d]) for n in ("key", "value")]
    mask = make_causal_mask(b, past[0])
    o, _, _ = b.op("Attention", [q, k, v, mask, *past], f"/{p}/Attention",
                   outputs=[f"/{p}/Attention/out", f"present.{i}.key", f"present.{i}.value"],
                   q_num_heads=hq, kv_num_heads=hkv, scale=d ** -0.5)
    for n in ("key", "value"):
        b.output(f"present.{i}.{n}", TensorProto.FLOAT, ["batch", hkv, "total_sequence", d])
    gate = b.op1("Sigmoid", [make_linear(b, x, f"{p}.gate")], f"/{p}/gate/Sigmoid")
    return make_linear(b, b.op1("Mul", [o, gate], f"/{p}/gate/Mul"), f"{p}.o")


# ---- feed-forward -------------------------------------------------------------------------------------------


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[E, I, ...] x 2 -> [E, 2I, ...] with row 2i = gate_i, row 2i+1 = up_i (ORT's swiglu_fusion=1)."""
    return torch.stack([gate, up], dim=2).flatten(1, 2)


def _experts(b: Builder, p: str, part: str) -> list[Any]:
    return [b.graph.get(f"{p}.experts.{e}.{part}.weight") for e in range(b.config.num_experts)]


def stored_scheme(graph: Graph, name: str) -> str:
    """The scheme of tensor `name` from the IR index, without loading it."""
    t = graph.tensors[name]
    if isinstance(t, QuantRef):
        return t.meta["scheme"]
    if isinstance(t, QuantizedTensor):
        return t.scheme
    return getattr(t, "scheme", None) or "dense"  # a pending quantized tensor knows its scheme; dense ones: None


def _expert_scheme(b: Builder, p: str) -> str:
    schemes = {stored_scheme(b.graph, f"{p}.experts.{e}.{part}.weight")
               for part in ("gate", "up", "down") for e in range(b.config.num_experts)}
    if len(schemes) != 1:
        raise UnsupportedModelError(f"{p}.experts: one scheme for every expert's gate/up/down expected "
                                    f"(QMoE/MoE take one format per layer), got {sorted(schemes)}")
    return schemes.pop()


def _float_experts(b: Builder, p: str) -> tuple[str, str]:
    """Float experts -> fc1 [E, 2I, H] interleaved, fc2 [E, H, I], float32 initializers."""
    fc1 = b.weight(f"{p}.experts.fc1", lambda: _interleave(*(torch.stack([dense(t) for t in _experts(b, p, part)])
                                                            for part in ("gate", "up"))))
    fc2 = b.weight(f"{p}.experts.fc2", lambda: torch.stack([dense(t) for t in _experts(b, p, "down")]))
    return fc1, fc2


def _row_block_scales(t: Any) -> torch.Tensor:
    """An fp8 weight's scales as per-row blocks along K: [N, ceil(K/bk)] (bk = K for fp8_channel)."""
    n = t.shape[0]
    if t.scheme == "fp8_channel":
        return t.scales.reshape(n, 1).float()
    return t.scales.repeat_interleave(t.block_size[0], 0)[:n].float()


def _fp8_experts(b: Builder, p: str) -> tuple[str, str]:
    """fp8 experts stay e4m3fn in the file: DequantizeLinear (blocked along K) -> float fc1 / fc2 for MoE.
    ORT has no fp8 MoE kernel on CPU; dequantizing in the graph is exact in fp32.

        fc1 fp8 [E,2I,H], scales [E,2I,nb] ─ DequantizeLinear(axis 2) ─ fc1 f32 ─ MoE
    """
    ts = {part: _experts(b, p, part) for part in ("gate", "up", "down")}
    k1, k2 = ts["gate"][0].shape[1], ts["down"][0].shape[1]
    bk1, bk2 = ((k1, k2) if ts["gate"][0].scheme == "fp8_channel" else (ts["gate"][0].block_size[1],) * 2)

    def stack(part, f):
        return torch.stack([f(t) for t in ts[part]])

    q1 = b.weight(f"{p}.experts.fc1.fp8", lambda: _interleave(stack("gate", lambda t: t.data), stack("up", lambda t: t.data)))
    s1 = b.weight(f"{p}.experts.fc1.scales", lambda: _interleave(stack("gate", _row_block_scales),
                                                                 stack("up", _row_block_scales)))
    q2 = b.weight(f"{p}.experts.fc2.fp8", lambda: stack("down", lambda t: t.data))
    s2 = b.weight(f"{p}.experts.fc2.scales", lambda: stack("down", _row_block_scales))
    fc1 = b.op1("DequantizeLinear", [q1, s1], f"/{p}/experts/fc1/DequantizeLinear", axis=2, block_size=min(bk1, k1))
    fc2 = b.op1("DequantizeLinear", [q2, s2], f"/{p}/experts/fc2/DequantizeLinear", axis=2, block_size=min(bk2, k2))
    return fc1, fc2


EXPERT_WEIGHTS = {**{s: _float_experts for s in FLOAT_SCHEMES}, "fp8_channel": _fp8_experts,
                  "fp8_block128": _fp8_experts, "fp8_g128": _fp8_experts}


def make_moe_float(b: Builder, x: str, logits: str, p: str) -> str:
    """Float or fp8 experts -> com.microsoft MoE (swiglu_fusion=1: the only form its CPU kernel supports)."""
    fc1, fc2 = EXPERT_WEIGHTS[_expert_scheme(b, p)](b, p)
    c = b.config
    return b.op1("MoE", [x, logits, fc1, "", fc2, ""], f"/{p}/experts/MoE", domain="com.microsoft",
                 k=c.num_experts_per_tok, normalize_routing_weights=int(c.norm_topk_prob), activation_type="swiglu",
                 swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)


def make_qmoe_int4(b: Builder, x: str, logits: str, p: str) -> str:
    """int4_sym_g* experts -> QMoE int4: codes uint8 [E, N, K/2] (low nibble = even k, as nextq stores them),
    scales float32 [E, N, K/bs], no zero points (default 8 = nextq's implicit 8), fc1 rows interleaved
    gate/up. weights_prepacked stays unset (1 returns garbage on 1.32) and accuracy_level 0 keeps fp32
    activations."""
    c = b.config
    qs = {part: _experts(b, p, part) for part in ("gate", "up", "down")}
    bs = qs["gate"][0].block_size
    fc1 = b.weight(f"{p}.experts.fc1.qweight", lambda: _interleave(torch.stack([t.data for t in qs["gate"]]),
                                                                   torch.stack([t.data for t in qs["up"]])))
    s1 = b.weight(f"{p}.experts.fc1.scales", lambda: _interleave(torch.stack([t.scales for t in qs["gate"]]),
                                                                 torch.stack([t.scales for t in qs["up"]])).float())
    fc2 = b.weight(f"{p}.experts.fc2.qweight", lambda: torch.stack([t.data for t in qs["down"]]))
    s2 = b.weight(f"{p}.experts.fc2.scales", lambda: torch.stack([t.scales for t in qs["down"]]).float())
    return b.op1("QMoE", [x, logits, fc1, s1, "", fc2, s2], f"/{p}/experts/QMoE", domain="com.microsoft",
                 k=c.num_experts_per_tok, normalize_routing_weights=int(c.norm_topk_prob), activation_type="swiglu",
                 swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, expert_weight_bits=4, block_size=bs,
                 accuracy_level=0)


EXPERT_FORMATS: dict[str, Callable[[Builder, str, str, str], str]] = {
    **{s: make_moe_float for s in EXPERT_WEIGHTS},
    **{f"int4_sym_g{g}": make_qmoe_int4 for g in (32, 64, 128)},
}


def make_sparse_moe(b: Builder, x: str, p: str) -> str:
    """Routed experts + gated shared expert. router_probs are the router *logits*: the op applies softmax over
    all experts, top-k and the optional renormalisation itself (Qwen3-Next's routing).

        x ─ [N,H] ─┬─ router ─ logits ─ MoE/QMoE ───────────────────── Add ─ [B,T,H]
                   ├─ shared swiglu ─────────────── Mul ───────────────┘
                   └─ shared_gate ─ Sigmoid ─────────┘
    """
    h = b.config.hidden_size
    x2 = make_reshape(b, x, [-1, h], f"/{p}/Reshape")
    fmt = _expert_scheme(b, p)
    if fmt not in EXPERT_FORMATS:
        raise UnsupportedModelError(f"{p}.experts: scheme {fmt!r} has no ONNX export, supported: "
                                    f"{sorted(EXPERT_FORMATS)}")
    routed = EXPERT_FORMATS[fmt](b, x2, make_linear(b, x2, f"{p}.router"), p)
    sg = b.op1("Sigmoid", [make_linear(b, x2, f"{p}.shared_gate")], f"/{p}/shared_gate/Sigmoid")
    shared = b.op1("Mul", [make_swiglu(b, x2, f"{p}.shared"), sg], f"/{p}/shared/Mul")
    y = b.op1("Add", [routed, shared], f"/{p}/Add")
    return b.op1("Reshape", [y, b.op1("Shape", [x], f"/{p}/Shape")], f"/{p}/Reshape_out")


# ---- layers and graphs --------------------------------------------------------------------------------------


MIXERS: dict[type, Callable[[Builder, str, int, str], str]] = {
    GatedDeltaNet: make_deltanet, GatedAttention: make_attention,
}
FFNS: dict[type, Callable[[Builder, str, str], str]] = {SparseMoE: make_sparse_moe, DenseMLP: make_swiglu}


def make_layer(b: Builder, x: str, layer: Layer, i: int) -> str:
    """pre-norm -> mixer -> residual -> pre-norm -> ffn -> residual."""
    p = layer.prefix
    h = MIXERS[type(layer.mixer)](b, make_rms_norm(b, x, f"{p}.input_norm"), i, layer.mixer.prefix)
    x = b.op1("Add", [x, h], f"/{p}/mixer/residual")
    h = FFNS[type(layer.ffn)](b, make_rms_norm(b, x, f"{p}.post_norm"), layer.ffn.prefix)
    return b.op1("Add", [x, h], f"/{p}/ffn/residual")


def make_lm_head(b: Builder, h: str) -> str:
    """logits = h @ lm_head^T; tied: the embedding table, transposed in the graph (stored once)."""
    if not b.config.tie_word_embeddings:
        return make_linear(b, h, "lm_head")
    wt = b.op1("Transpose", [b.cache["embed"]], "/lm_head/Transpose", perm=[1, 0])
    return b.op1("MatMul", [h, wt], "/lm_head/MatMul")


def make_embedding(b: Builder, ids: str) -> str:
    """Gather from the float32 table (shared with a tied lm_head and the MTP graph)."""
    fmt = stored_scheme(b.graph, "embed.weight")
    if fmt not in FLOAT_SCHEMES:
        raise UnsupportedModelError(f"embed.weight: scheme {fmt!r} has no ONNX export, "
                                    f"supported: a float embedding {list(FLOAT_SCHEMES)}")
    table = b.cache["embed"] = b.weight("embed.weight", lambda: dense(b.graph.get("embed.weight")))
    return b.op1("Gather", [table, ids], "/embed/Gather", axis=0)


def _token_inputs(b: Builder) -> tuple[str, str]:
    ids = b.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    pos = b.input("position_ids", TensorProto.INT64, ["batch", "sequence"])
    b.cache.update(input_ids=ids, position_ids=pos)
    return ids, pos


def make_decoder(graph: Graph, data: ExternalData) -> onnx.ModelProto:
    """The decoder graph: embedding -> layers (with state) -> final norm (`hidden`) -> lm_head (`logits`)."""
    b = Builder(graph, data)
    c = graph.config
    ids, _ = _token_inputs(b)
    x = make_embedding(b, ids)
    for layer in (blk for blk in graph.blocks if isinstance(blk, Layer)):
        x = make_layer(b, x, layer, layer.index)
    h = make_rms_norm(b, x, "norm")
    b.op1("Identity", [h], "/hidden/Identity", outputs=["hidden"])
    b.op1("Identity", [make_lm_head(b, h)], "/logits/Identity", outputs=["logits"])
    b.output("logits", TensorProto.FLOAT, ["batch", "sequence", c.vocab_size])
    b.output("hidden", TensorProto.FLOAT, ["batch", "sequence", c.hidden_size])
    return b.model("nextq_decoder", "Qwen3-Next decoder (nextq export): prefill and decode with state I/O")


def make_mtp(graph: Graph, data: ExternalData) -> onnx.ModelProto:
    """The MTP draft graph: logits for token t+2 from final-normed hidden h_t and token t+1, with its own KV.

        input_ids ─ embed ─ RMSNorm(embed_norm) ─┐
        hidden ───────── RMSNorm(hidden_norm) ─ Concat ─ fc ─ layers (attention + MoE, past.j.*) ─ norm ─ lm_head
                                                                                                   └─ mtp_hidden
    """
    b = Builder(graph, data)
    c = graph.config
    mtp = next(blk for blk in graph.blocks if blk.kind == "MTP")
    ids, _ = _token_inputs(b)
    hidden = b.input("hidden", TensorProto.FLOAT, ["batch", "sequence", c.hidden_size])
    e = make_rms_norm(b, make_embedding(b, ids), "mtp.embed_norm")
    h = make_rms_norm(b, hidden, "mtp.hidden_norm")
    x = make_linear(b, b.op1("Concat", [e, h], "/mtp/Concat", axis=-1), "mtp.fc")
    for j, layer in enumerate(mtp.layers):
        x = make_layer(b, x, layer, j)
    h = make_rms_norm(b, x, "mtp.norm")
    b.op1("Identity", [h], "/mtp_hidden/Identity", outputs=["mtp_hidden"])  # the next draft step's hidden input
    b.op1("Identity", [make_lm_head(b, h)], "/logits/Identity", outputs=["logits"])
    b.output("logits", TensorProto.FLOAT, ["batch", "sequence", c.vocab_size])
    b.output("mtp_hidden", TensorProto.FLOAT, ["batch", "sequence", c.hidden_size])
    return b.model("nextq_mtp", "Qwen3-Next MTP head (nextq export): draft logits for token t+2")


def check_supported(graph: Graph) -> None:
    """Refuse configurations the chosen ops cannot represent, naming the field and the expected value."""
    c = graph.config
    if c.hidden_act != "silu":
        raise UnsupportedModelError(f"hidden_act={c.hidden_act!r}, the ONNX export supports 'silu'")


def export_onnx(ir: str | Path | Graph, out: str | Path, force: bool = False) -> Path:
    """Write `out/` = model.onnx (+ mtp.onnx when the IR has an MTP head) + model.onnx.data + tokenizer files.

    Atomic (temporary sibling renamed at the end); both graphs are checked with onnx.checker and shape inference
    before the rename.
    """
    graph = ir if isinstance(ir, Graph) else Graph.load(ir)
    check_supported(graph)
    out = Path(out)
    with atomic_output_dir(out, force) as tmp:
        data = ExternalData(tmp / DATA_FILE)
        try:
            models = {MODEL_FILE: make_decoder(graph, data)}
            if any(blk.kind == "MTP" for blk in graph.blocks):
                models[MTP_FILE] = make_mtp(graph, data)
        finally:
            data.close()
        meta = {"config": json.dumps(graph.config.to_json()), "producer": "nextq",
                "state": "past.{i}.key/value [B,Hkv,P,D]; past.{i}.conv [B,K-1,C]; past.{i}.recurrent [B,Hv,Dk,Dv]"}
        for fname, m in models.items():
            helper.set_model_props(m, meta)
            onnx.save_model(m, tmp / fname)
            check_model(tmp / fname)
        for fname, src in graph.assets.items():
            (tmp / fname).write_bytes(Path(src).read_bytes())
    return out


def check_model(path: Path) -> None:
    """onnx.checker (full: with strict shape inference) on the saved file; external data is read from disk."""
    onnx.checker.check_model(str(path), full_check=True)


@click.command("onnx")
@click.argument("ir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Directory to write.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def onnx_cmd(ir, output, force):
    """Export an IR directory to ONNX (model.onnx + external data, mtp.onnx when present) for ONNX Runtime."""
    from nextq.console import console

    export_onnx(ir, output, force)
    files = sorted(p.name for p in output.iterdir())
    size = sum(p.stat().st_size for p in output.iterdir()) / 2**20
    console.print(f"[green]wrote[/] {output}: {', '.join(files)} ({size:.1f} MiB)")
