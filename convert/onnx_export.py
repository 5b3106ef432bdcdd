"""ONNX export: the canonical graph -> `model.onnx` (+ `mtp.onnx`) on ONNX Runtime's contrib ops.

One decoder graph serves prefill (T > 1) and decode (T = 1); the caller carries the state between calls:

    inputs   input_ids [B, T] int64, position_ids [B, T] int64,
             per full-attention layer i:  past.{i}.key / past.{i}.value   [B, Hkv, P, D]
             per Gated DeltaNet layer i:  past.{i}.conv [B, K-1, C] (channels last), past.{i}.recurrent [B, Hv, Dk, Dv]
    outputs  logits [B, T, V] float32, hidden [B, T, H] (final-normed, feeds the MTP draft graph),
             present.{i}.* (same layouts; the key/value length grows to P + T)

Ops (chosen to run on onnxruntime >= 1.32 and onnxruntime-gpu 1.31.1, see docs/onnx.md):
LinearAttention(update_rule="gated_delta"), CausalConvWithState, GatedRMSNorm, MoE / QMoE, MatMulNBits,
GatherBlockQuantized (com.microsoft); RMSNormalization, RotaryEmbedding, Attention (ai.onnx opset 23);
DequantizeLinear + MatMul for fp8. Integer block schemes (int4, int8, Q5_0/Q5_1, K-quants) go through their block
form (quant/affine.py): codes and the exact float32 scale factors, an integer zero point, a per-block offset term.
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
from nextq.quant.affine import AFFINE_VIEWS, AffineBlocks, affine_blocks
from nextq.quant.int4 import pack_int4
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


@dataclass(frozen=True)
class Uint4:
    """4-bit codes for an ONNX uint4 initializer: `packed` uint8 `[..., K/2]` (element 2j in the low nibble of byte
    j, ONNX's order and nextq's low_even) standing for codes of `shape` `[..., K]`."""

    packed: torch.Tensor
    shape: tuple[int, ...]

    @classmethod
    def of(cls, codes: torch.Tensor) -> Uint4:
        """uint8 codes (0..15) of any shape, packed as ONNX packs 4-bit tensors: flattened, two per byte, a last odd
        element in a byte of its own."""
        flat = codes.reshape(1, -1)
        if flat.shape[1] % 2:
            flat = torch.cat((flat, flat.new_zeros(1, 1)), dim=1)
        return cls(pack_int4(flat)[0], tuple(codes.shape))


class ExternalData:
    """Appends tensors to one data file; a tensor written once (by name) is shared by every graph that uses it."""

    def __init__(self, path: Path):
        self.path, self.location = path, path.name
        self.f: BinaryIO = open(path, "wb")
        self.written: dict[str, TensorProto] = {}

    def add(self, name: str, t: torch.Tensor) -> TensorProto:
        """Append `t` (aligned) and return its TensorProto, which points into the file. A `Uint4` wrapper is
        written as ONNX uint4: its packed bytes, with the dims of the unpacked codes."""
        dims = None
        if isinstance(t, Uint4):
            t, dims, elem = t.packed, list(t.shape), TensorProto.UINT4
        t = t.detach().contiguous().cpu()
        if t.dtype not in TORCH_TO_ONNX:
            raise UnsupportedModelError(f"{name}: dtype {t.dtype} has no ONNX export, supported: "
                                        f"{sorted(str(d) for d in TORCH_TO_ONNX)}")
        if dims is None:
            dims, elem = list(t.shape), TORCH_TO_ONNX[t.dtype]
        arr = (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).numpy()
        self.f.seek(-self.f.tell() % ALIGN, 1)
        offset = self.f.tell()
        self.f.write(arr.data)  # a view of the tensor's memory, no copy
        proto = TensorProto(name=name, data_type=elem, dims=dims, data_location=TensorProto.EXTERNAL)
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


ONNX_BLOCKS = (128, 64, 32, 16)  # MatMulNBits / GatherBlockQuantized / blocked DequantizeLinear: powers of 2 >= 16


def onnx_blocks(name: str, w: QuantizedTensor) -> AffineBlocks:
    """The weight's integer block form (quant/affine.py) on blocks ONNX Runtime takes: the scheme's own block when it
    is a power of two >= 16 (every group and K-quant scheme), else (int8_channel, one block per row) the largest
    such divisor of K with the row scale repeated."""
    ab = affine_blocks(w)
    if ab.block in ONNX_BLOCKS:
        return ab
    bs = next((bs for bs in ONNX_BLOCKS if ab.block % bs == 0), None)
    if bs is None:
        raise UnsupportedModelError(f"{name}: scheme {w.scheme!r} on K={w.shape[1]}: ONNX Runtime's block-quantized "
                                    f"ops need blocks of a power of two >= 16 dividing K")
    return ab.reblock(bs)


def onnx_bits(ab: AffineBlocks) -> int:
    """The code width ONNX Runtime stores: 4 for codes of up to 4 bits (Q3_K's 3-bit codes included), else 8."""
    return 4 if ab.bits <= 4 else 8


def packed_codes(ab: AffineBlocks, bits: int) -> torch.Tensor:
    """uint8 codes `[N, K]` -> `[N, K * bits / 8]`: bits 8 as they are, bits 4 two per byte, low nibble first."""
    return pack_int4(ab.codes) if bits == 4 else ab.codes


def zero_points(ab: AffineBlocks, bits: int) -> torch.Tensor | None:
    """MatMulNBits / GatherBlockQuantized uint8 zero points `[N, nb]` (4 bits: two per byte along nb, padded to an
    even count), or None when the scheme's zero is the ops' default 2^(bits - 1)."""
    if ab.zero == 1 << (bits - 1):
        return None
    n, nb = ab.scale.shape
    if bits == 8:
        return torch.full((n, nb), ab.zero, dtype=torch.uint8)
    return torch.full((n, -(-nb // 2)), ab.zero | ab.zero << 4, dtype=torch.uint8)


def block_matrix(b: Builder, k: int, bs: int) -> str:
    """0/1 matrix S `[K, K/bs]` with S[k, j] = 1 when k // bs == j (shared by every weight of that K and block):
    x @ S sums x over each block, S^T spreads a per-block value over its block. Exact (products by 1, sums of 0)."""
    return b.weight(f"blocks.{k}x{bs}", lambda: torch.eye(k // bs).repeat_interleave(bs, 0))


def make_matmul_nbits(b: Builder, x: str, name: str, w: Any) -> str:
    """Integer block schemes (int4 / int8 / Q5 / K-quants) -> MatMulNBits, bits 4 or 8, in the scheme's own blocks:
    B = the codes `[N, K/bs, bs*bits/8]`, scales float32 (the exact factors the scheme dequantizes with), uint8 zero
    points when the scheme's zero is not ORT's default 2^(bits-1). accuracy_level 0: fp32 activations, never int8.
    A per-block offset (Q4_1's min, Q4_K/Q5_K's -dmin*m: no integer zero point expresses it) is its own exact term:
    (x @ S) @ offset^T, S the block-sum matrix.

        x ──MatMulNBits(B, scales[, zero_points])─────────────── Add ── y
          └─ MatMul(S [K, K/bs]) ─ MatMul(offset^T [K/bs, N]) ──┘        (offset schemes only)
    """
    n, k = w.shape
    ab = onnx_blocks(f"{name}.weight", w)
    bits, bs = onnx_bits(ab), ab.block
    inputs = [x, b.weight(f"{name}.qweight", lambda: packed_codes(ab, bits).reshape(n, k // bs, bs * bits // 8)),
              b.weight(f"{name}.scales", lambda: ab.scale)]
    zp = zero_points(ab, bits)
    if zp is not None:
        inputs.append(b.weight(f"{name}.zero_points", lambda: zp))
    y = b.op1("MatMulNBits", inputs, f"/{name}/MatMulNBits", domain="com.microsoft", K=k, N=n, bits=bits,
              block_size=bs, accuracy_level=0)
    if ab.offset is None:
        return y
    sums = b.op1("MatMul", [x, block_matrix(b, k, bs)], f"/{name}/offset/BlockSum")
    off = b.op1("MatMul", [sums, b.weight(f"{name}.offset.T", lambda: ab.offset.T)], f"/{name}/offset/MatMul")
    return b.op1("Add", [y, off], f"/{name}/offset/Add")


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
    **{s: make_matmul_nbits for s in AFFINE_VIEWS},
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


FC_PARTS = {"fc1": ("gate", "up"), "fc2": ("down",)}  # MoE / QMoE fc1 = gate and up rows interleaved, fc2 = down


def _expert_schemes(b: Builder, p: str) -> dict[str, str]:
    """{"fc1": scheme, "fc2": scheme} of a layer's experts: one scheme for every expert's gate and up, one for every
    expert's down (llama.cpp's mixes give down its own type; MoE / QMoE take one format per fc)."""
    out = {}
    for fc, parts in FC_PARTS.items():
        schemes = {stored_scheme(b.graph, f"{p}.experts.{e}.{part}.weight")
                   for part in parts for e in range(b.config.num_experts)}
        if len(schemes) != 1:
            raise UnsupportedModelError(f"{p}.experts: one scheme for every expert's {'/'.join(parts)} expected "
                                        f"(MoE/QMoE take one format per fc), got {sorted(schemes)}")
        out[fc] = schemes.pop()
    return out


def _stack_fc(fc: str, rows: Callable[[str], list[torch.Tensor]]) -> torch.Tensor:
    """rows(part) (one tensor per expert) stacked `[E, ...]`; fc1: gate and up rows interleaved."""
    stacks = [torch.stack(rows(part)) for part in FC_PARTS[fc]]
    return _interleave(*stacks) if fc == "fc1" else stacks[0]


def _expert_rows(b: Builder, p: str, f: Callable[[Any], torch.Tensor]) -> Callable[[str], list[torch.Tensor]]:
    """part -> [f(weight of expert e) for each expert]."""
    return lambda part: [f(t) for t in _experts(b, p, part)]


def _float_experts(b: Builder, p: str, fc: str) -> str:
    """Float experts -> fc1 [E, 2I, H] interleaved / fc2 [E, H, I], float32 initializers."""
    return b.weight(f"{p}.experts.{fc}", lambda: _stack_fc(fc, _expert_rows(b, p, dense)))


def _row_block_scales(t: Any) -> torch.Tensor:
    """An fp8 weight's scales as per-row blocks along K: [N, ceil(K/bk)] (bk = K for fp8_channel)."""
    n = t.shape[0]
    if t.scheme == "fp8_channel":
        return t.scales.reshape(n, 1).float()
    return t.scales.repeat_interleave(t.block_size[0], 0)[:n].float()


def _fp8_experts(b: Builder, p: str, fc: str) -> str:
    """fp8 experts stay e4m3fn in the file: DequantizeLinear (blocked along K) -> float fc1 / fc2 for MoE.
    ORT has no fp8 MoE kernel on CPU; dequantizing in the graph is exact in fp32.

        fc1 fp8 [E,2I,H], scales [E,2I,nb] ─ DequantizeLinear(axis 2) ─ fc1 f32 ─ MoE
    """
    t0 = _experts(b, p, FC_PARTS[fc][0])[0]
    k = t0.shape[1]
    bk = k if t0.scheme == "fp8_channel" else t0.block_size[1]
    q = b.weight(f"{p}.experts.{fc}.fp8", lambda: _stack_fc(fc, _expert_rows(b, p, lambda t: t.data)))
    sc = b.weight(f"{p}.experts.{fc}.scales", lambda: _stack_fc(fc, _expert_rows(b, p, _row_block_scales)))
    return b.op1("DequantizeLinear", [q, sc], f"/{p}/experts/{fc}/DequantizeLinear", axis=2, block_size=min(bk, k))


def _block_experts(b: Builder, p: str, fc: str) -> str:
    """Integer block experts (int4 with zero points, int8 groups, Q5, K-quants; int4_sym when fc1 and fc2 differ)
    -> float fc1 / fc2 for MoE, dequantized
    in the graph from the codes in the file: DequantizeLinear(codes uint4/uint8 [E,N,K], scales [E,N,nb], zero
    points, axis 2, blocked), then + offset per block. Each element is (q - zero) * scale (+ offset) in float32, the
    operations of the scheme's own dequantize: bit-exact. QMoE cannot take these exactly: its zero points are
    integers (no Q4_1 / Q4_K offsets) and its block-wise 8-bit path quantizes the activations to int8 (notes,
    gotcha 2).

        codes, scales[, zero_points] ─ DequantizeLinear ─ Reshape [E,N,nb,bs] ─ Add(offset [E,N,nb,1]) ─ Reshape
    """
    name = f"{p}.experts.{fc}"
    views = {part: [onnx_blocks(f"{p}.experts.{e}.{part}.weight", t) for e, t in enumerate(_experts(b, p, part))]
             for part in FC_PARTS[fc]}
    ab0 = views[FC_PARTS[fc][0]][0]
    bits, bs, zero = onnx_bits(ab0), ab0.block, ab0.zero

    def stacked(field: str) -> torch.Tensor:
        return _stack_fc(fc, lambda part: [getattr(v, field) for v in views[part]])

    def typed(codes: torch.Tensor) -> torch.Tensor | Uint4:  # the initializer of ONNX type uint4 / uint8
        return Uint4.of(codes) if bits == 4 else codes

    scales = stacked("scale")  # [E, N, nb]
    e, n, nb = scales.shape
    inputs = [b.weight(f"{name}.codes", lambda: typed(stacked("codes"))), b.weight(f"{name}.scales", lambda: scales)]
    if zero:  # DequantizeLinear's default zero point is 0
        inputs.append(b.weight(f"{name}.zero_points", lambda: typed(torch.full((e, n, nb), zero, dtype=torch.uint8))))
    w = b.op1("DequantizeLinear", inputs, f"/{name}/DequantizeLinear", axis=2, block_size=bs)
    if ab0.offset is None:
        return w
    off = b.weight(f"{name}.offset", lambda: stacked("offset")[..., None])
    w4 = make_reshape(b, w, [e, n, nb, bs], f"/{name}/offset/Reshape")
    return make_reshape(b, b.op1("Add", [w4, off], f"/{name}/offset/Add"), [e, n, nb * bs],
                        f"/{name}/offset/Reshape_out")


EXPERT_WEIGHTS: dict[str, Callable[[Builder, str, str], str]] = {
    **{s: _float_experts for s in FLOAT_SCHEMES}, "fp8_channel": _fp8_experts, "fp8_block128": _fp8_experts,
    "fp8_g128": _fp8_experts, **{s: _block_experts for s in AFFINE_VIEWS},
}


def make_moe_float(b: Builder, x: str, logits: str, p: str, schemes: dict[str, str]) -> str:
    """Float, fp8 or integer block experts (fc1 and fc2 each in its own format) -> com.microsoft MoE on float fc1 /
    fc2 (swiglu_fusion=1: the only form its CPU kernel supports)."""
    fc1, fc2 = (EXPERT_WEIGHTS[schemes[fc]](b, p, fc) for fc in FC_PARTS)
    c = b.config
    return b.op1("MoE", [x, logits, fc1, "", fc2, ""], f"/{p}/experts/MoE", domain="com.microsoft",
                 k=c.num_experts_per_tok, normalize_routing_weights=int(c.norm_topk_prob), activation_type="swiglu",
                 swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)


def make_qmoe_int4(b: Builder, x: str, logits: str, p: str, schemes: dict[str, str]) -> str:
    """int4_sym_g* experts (one group size for fc1 and fc2) -> QMoE int4: codes uint8 [E, N, K/2] (low nibble =
    even k, as nextq stores them), scales float32 [E, N, K/bs], no zero points (default 8 = nextq's implicit 8), fc1
    rows interleaved gate/up. weights_prepacked stays unset (1 returns garbage on 1.32) and accuracy_level 0 keeps
    fp32 activations."""
    c = b.config
    bs = _experts(b, p, "gate")[0].block_size
    (q1, s1), (q2, s2) = ((b.weight(f"{p}.experts.{fc}.qweight", lambda: _stack_fc(fc, _expert_rows(b, p, lambda t: t.data))),
                           b.weight(f"{p}.experts.{fc}.scales",
                                    lambda: _stack_fc(fc, _expert_rows(b, p, lambda t: t.scales.float()))))
                          for fc in FC_PARTS)
    return b.op1("QMoE", [x, logits, q1, s1, "", q2, s2], f"/{p}/experts/QMoE", domain="com.microsoft",
                 k=c.num_experts_per_tok, normalize_routing_weights=int(c.norm_topk_prob), activation_type="swiglu",
                 swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, expert_weight_bits=4, block_size=bs,
                 accuracy_level=0)


EXPERT_FORMATS: dict[str, Callable[[Builder, str, str, str, dict[str, str]], str]] = {
    **{s: make_moe_float for s in EXPERT_WEIGHTS},
    **{f"int4_sym_g{g}": make_qmoe_int4 for g in (32, 64, 128)},
}


def expert_format(schemes: dict[str, str]) -> Callable[[Builder, str, str, str, dict[str, str]], str] | None:
    """The emitter for a layer's experts with fc1 / fc2 schemes `schemes`: the scheme's own (QMoE for int4_sym) when
    both agree, MoE on float weights when each fc can be made float, else None."""
    if schemes["fc1"] == schemes["fc2"]:
        return EXPERT_FORMATS.get(schemes["fc1"])
    return make_moe_float if all(s in EXPERT_WEIGHTS for s in schemes.values()) else None


def make_sparse_moe(b: Builder, x: str, p: str) -> str:
    """Routed experts + gated shared expert. router_probs are the router *logits*: the op applies softmax over
    all experts, top-k and the optional renormalisation itself (Qwen3-Next's routing).

        x ─ [N,H] ─┬─ router ─ logits ─ MoE/QMoE ───────────────────── Add ─ [B,T,H]
                   ├─ shared swiglu ─────────────── Mul ───────────────┘
                   └─ shared_gate ─ Sigmoid ─────────┘
    """
    h = b.config.hidden_size
    x2 = make_reshape(b, x, [-1, h], f"/{p}/Reshape")
    schemes = _expert_schemes(b, p)
    emit = expert_format(schemes)
    if emit is None:
        raise UnsupportedModelError(f"{p}.experts: schemes fc1 {schemes['fc1']!r} / fc2 {schemes['fc2']!r} have no "
                                    f"ONNX export, supported: {sorted(EXPERT_FORMATS)} (int4_sym for both, or any "
                                    f"of {sorted(EXPERT_WEIGHTS)} each)")
    routed = emit(b, x2, make_linear(b, x2, f"{p}.router"), p, schemes)
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
    """logits = h @ lm_head^T; tied: the embedding table, transposed in the graph (stored once), or a quantized
    embedding's codes as a linear (MatMulNBits; its codes are stored a second time, in MatMulNBits' layout)."""
    if not b.config.tie_word_embeddings:
        return make_linear(b, h, "lm_head")
    if "embed" not in b.cache:
        return make_linear(b, h, "embed")
    wt = b.op1("Transpose", [b.cache["embed"]], "/lm_head/Transpose", perm=[1, 0])
    return b.op1("MatMul", [h, wt], "/lm_head/MatMul")


def make_gather_float(b: Builder, ids: str, w: Any) -> str:
    """Gather from the float32 table (shared with a tied lm_head and the MTP graph)."""
    table = b.cache["embed"] = b.weight("embed.weight", lambda: dense(w))
    return b.op1("Gather", [table, ids], "/embed/Gather", axis=0)


def make_gather_blocks(b: Builder, ids: str, w: Any) -> str:
    """Integer block embeddings -> com.microsoft GatherBlockQuantized on uint8 data (bits 4: two codes per byte,
    low first; bits 8: one), gather_axis 0, quantize_axis 1, the scheme's own blocks and float32 scales, uint8 zero
    points when the zero is not the op's default 2^(bits-1) for uint8 data. A per-block offset (Q5_1) is gathered
    too and spread over its block with the 0/1 matrix S^T.

        ids ─ GatherBlockQuantized(data, scales[, zero_points]) ───────────────── Add ── [B, T, H]
            └ Gather(offset [V, nb]) ─ MatMul(S^T [nb, H]) ───────────────────────┘    (offset schemes only)
    """
    v, k = w.shape
    ab = onnx_blocks("embed.weight", w)
    bits, bs = onnx_bits(ab), ab.block
    inputs = [b.weight("embed.qdata", lambda: packed_codes(ab, bits)), ids,
              b.weight("embed.scales", lambda: ab.scale)]
    zp = zero_points(ab, bits)
    if zp is not None:
        inputs.append(b.weight("embed.zero_points", lambda: zp))
    x = b.op1("GatherBlockQuantized", inputs, "/embed/GatherBlockQuantized", domain="com.microsoft", bits=bits,
              block_size=bs, gather_axis=0, quantize_axis=1)
    if ab.offset is None:
        return x
    off = b.op1("Gather", [b.weight("embed.offset", lambda: ab.offset), ids], "/embed/gather_offset/Gather", axis=0)
    spread = b.op1("Transpose", [block_matrix(b, k, bs)], "/embed/gather_offset/Transpose", perm=[1, 0])
    return b.op1("Add", [x, b.op1("MatMul", [off, spread], "/embed/gather_offset/MatMul")],
                "/embed/gather_offset/Add")


EMBED_FORMATS: dict[str, Callable[[Builder, str, Any], str]] = {
    **{s: make_gather_float for s in FLOAT_SCHEMES},
    **{s: make_gather_blocks for s in AFFINE_VIEWS},
}


def make_embedding(b: Builder, ids: str) -> str:
    """Token embeddings in whatever format the table is stored (EMBED_FORMATS)."""
    fmt = stored_scheme(b.graph, "embed.weight")
    if fmt not in EMBED_FORMATS:
        raise UnsupportedModelError(f"embed.weight: scheme {fmt!r} has no ONNX export, "
                                    f"supported: {sorted(EMBED_FORMATS)}")
    return EMBED_FORMATS[fmt](b, ids, b.graph.get("embed.weight"))


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
