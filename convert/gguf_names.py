"""Canonical graph <-> GGUF `qwen3next`: tensor names, layouts and metadata keys, declared as data.

The target is llama.cpp's `qwen3next` loader (src/models/qwen3next.cpp, pinned through llama-cpp-python 0.3.36)
and the layout its converter writes (conversion/qwen.py, class Qwen3NextModel). Every GGUF tensor is built from
one or more canonical tensors by **row operations only** (concatenate, regroup, stack), so the same plan works on
float weights `[N, K]` and on quantized block rows `[N, bytes_per_row]` -- a quantized IR is copied without
re-quantizing. Element-wise changes (+1 on zero-centred norms, `ssm_a = -exp(A_log)`) only touch tensors that are
always stored as F32.

    GGUF tensor (blk.{i}.)       canonical (layers.{i}. / mtp.layers.{j}.)      layout
    attn_qkv                     mixer.q, mixer.k, mixer.v                       rows concatenated (flat heads)
    attn_gate                    mixer.z
    ssm_ba                       mixer.b, mixer.a                                per key head [b r | a r], r = Hv/Hk
    ssm_conv1d                   mixer.conv [C, K]                               F32
    ssm_a / ssm_dt.bias          mixer.A_log / mixer.dt_bias                     -exp(A_log) / as is, F32
    ssm_norm                     mixer.norm                                      no +1 (gated norm), F32
    attn_q                       mixer.q, mixer.gate                             per head [q D | gate D] (HF q_proj)
    ffn_{gate,up,down}_exps      ffn.experts.{e}.{gate,up,down}                  stacked [E, N, K]
    ffn_gate_inp / _shexp        ffn.router / ffn.shared_gate                    F32
MTP layer j is block n_layers + j; the head's own tensors live in block n_layers as `nextn.*`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from nextq.graph import ModelConfig

ARCH = "qwen3next"

# ---- row layouts: each takes arrays whose first axis is rows and returns the GGUF array (or the inverse) -----

Pack = Callable[[ModelConfig, Sequence[np.ndarray]], np.ndarray]
Unpack = Callable[[ModelConfig, np.ndarray], list[np.ndarray]]


def _same(c: ModelConfig, xs: Sequence[np.ndarray]) -> np.ndarray:
    (x,) = xs
    return x


def _same_inv(c: ModelConfig, x: np.ndarray) -> list[np.ndarray]:
    return [x]


def _concat(c: ModelConfig, xs: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(xs, axis=0)


def _qkv_inv(c: ModelConfig, x: np.ndarray) -> list[np.ndarray]:
    kd = c.linear_num_key_heads * c.linear_key_head_dim
    return [x[:kd], x[kd:2 * kd], x[2 * kd:]]


def _interleave(groups: Callable[[ModelConfig], int]) -> tuple[Pack, Unpack]:
    """[a rows | b rows] (flat) <-> per group g: [a_g | b_g] (equal halves per group)."""

    def pack(c, xs):
        g = groups(c)
        parts = [x.reshape(g, x.shape[0] // g, *x.shape[1:]) for x in xs]  # [G, n, X] each
        out = np.concatenate(parts, axis=1)  # [G, 2n, X]
        return out.reshape(-1, *out.shape[2:])

    def unpack(c, x):
        g = groups(c)
        grouped = x.reshape(g, x.shape[0] // g, *x.shape[1:])  # [G, 2n, X]
        half = grouped.shape[1] // 2
        return [np.ascontiguousarray(grouped[:, :half].reshape(-1, *x.shape[1:])),
                np.ascontiguousarray(grouped[:, half:].reshape(-1, *x.shape[1:]))]

    return pack, unpack


_ba, _ba_inv = _interleave(lambda c: c.linear_num_key_heads)  # ssm_ba: per key head [b r | a r]
_qgate, _qgate_inv = _interleave(lambda c: c.num_attention_heads)  # attn_q: per head [q D | gate D]


def _stack(c: ModelConfig, xs: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(xs, axis=0)  # [E, N, X]


def _stack_inv(c: ModelConfig, x: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(x[e]) for e in range(x.shape[0])]


# ---- element-wise value maps (only for tensors stored as F32) ------------------------------------------------

def _neg_exp(x: np.ndarray) -> np.ndarray:
    """ssm_a = -exp(A_log) in float32 with torch's exp (what llama.cpp's converter and transformers compute)."""
    import torch

    return (-torch.exp(torch.from_numpy(np.array(x, np.float32)))).numpy()


def _neg_exp_inv(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.log(-torch.from_numpy(np.array(x, np.float32))).numpy()


@dataclass(frozen=True)
class TensorRule:
    """One GGUF tensor: its name template, the canonical tensors it is made of, and how.

    gguf:    name relative to the block (`attn_qkv.weight`) or global (`token_embd.weight`).
    sources: canonical names relative to the layer prefix; `{e}` expands over experts.
    force_f32: stored as F32 whatever the requested type (norms, router, conv, 1-D: llama.cpp's converter rule).
    norm:    a norm weight: llama.cpp wants the effective scale, so the canonical norm offset is added.
    value:   element-wise map applied after packing (and its inverse), for F32-only tensors.
    """

    gguf: str
    sources: tuple[str, ...]
    pack: Pack = _same
    unpack: Unpack = _same_inv
    force_f32: bool = False
    norm: bool = False
    value: tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]] | None = None

    def expand(self, c: ModelConfig) -> tuple[str, ...]:
        out: list[str] = []
        for s in self.sources:
            out += [s.format(e=e) for e in range(c.num_experts)] if "{e}" in s else [s]
        return tuple(out)


def _rule(gguf, *sources, **kw) -> TensorRule:
    return TensorRule(gguf, tuple(sources), **kw)


NORM = dict(force_f32=True, norm=True)

GLOBAL_RULES: dict[str, TensorRule] = {
    "token_embd.weight": _rule("token_embd.weight", "embed.weight"),
    "output_norm.weight": _rule("output_norm.weight", "norm.weight", **NORM),
    "output.weight": _rule("output.weight", "lm_head.weight"),  # absent when tied: llama.cpp reuses token_embd
}
LAYER_RULES: tuple[TensorRule, ...] = (
    _rule("attn_norm.weight", "input_norm.weight", **NORM),
    _rule("post_attention_norm.weight", "post_norm.weight", **NORM),
)
DELTANET_RULES: tuple[TensorRule, ...] = (
    _rule("attn_qkv.weight", "mixer.q.weight", "mixer.k.weight", "mixer.v.weight", pack=_concat, unpack=_qkv_inv),
    _rule("attn_gate.weight", "mixer.z.weight"),
    _rule("ssm_ba.weight", "mixer.b.weight", "mixer.a.weight", pack=_ba, unpack=_ba_inv),
    _rule("ssm_conv1d.weight", "mixer.conv.weight", force_f32=True),
    _rule("ssm_a", "mixer.A_log", force_f32=True, value=(_neg_exp, _neg_exp_inv)),
    _rule("ssm_dt.bias", "mixer.dt_bias", force_f32=True),
    _rule("ssm_norm.weight", "mixer.norm.weight", **NORM),
    _rule("ssm_out.weight", "mixer.out.weight"),
)
ATTENTION_RULES: tuple[TensorRule, ...] = (
    _rule("attn_q.weight", "mixer.q.weight", "mixer.gate.weight", pack=_qgate, unpack=_qgate_inv),
    _rule("attn_k.weight", "mixer.k.weight"),
    _rule("attn_v.weight", "mixer.v.weight"),
    _rule("attn_output.weight", "mixer.o.weight"),
    _rule("attn_q_norm.weight", "mixer.q_norm.weight", **NORM),
    _rule("attn_k_norm.weight", "mixer.k_norm.weight", **NORM),
)
MOE_RULES: tuple[TensorRule, ...] = (
    _rule("ffn_gate_inp.weight", "ffn.router.weight", force_f32=True),
    *(_rule(f"ffn_{p}_exps.weight", f"ffn.experts.{{e}}.{p}.weight", pack=_stack, unpack=_stack_inv)
      for p in ("gate", "up", "down")),
    *(_rule(f"ffn_{p}_shexp.weight", f"ffn.shared.{p}.weight") for p in ("gate", "up", "down")),
    _rule("ffn_gate_inp_shexp.weight", "ffn.shared_gate.weight", force_f32=True),
)
MIXER_RULES = {"GatedDeltaNet": DELTANET_RULES, "GatedAttention": ATTENTION_RULES}
FFN_RULES = {"SparseMoE": MOE_RULES}
# The MTP head's own tensors, in block n_layers (canonical name -> GGUF name relative to the block).
NEXTN_RULES: tuple[TensorRule, ...] = (
    _rule("nextn.eh_proj.weight", "mtp.fc.weight"),  # input = concat(enorm(embed), hnorm(hidden)): embedding first
    _rule("nextn.enorm.weight", "mtp.embed_norm.weight", **NORM),
    _rule("nextn.hnorm.weight", "mtp.hidden_norm.weight", **NORM),
    _rule("nextn.shared_head.norm.weight", "mtp.norm.weight", **NORM),
)
# llama.cpp's loader name for the last one (LLM_TENSOR_NEXTN_SHARED_HEAD_NORM)
NEXTN_GGUF_NAMES = {"nextn.shared_head.norm.weight": "nextn.shared_head_norm.weight"}


@dataclass(frozen=True)
class PlannedTensor:
    """A GGUF tensor with its full name and the full canonical names it is built from."""

    name: str
    rule: TensorRule
    sources: tuple[str, ...]


def plan_tensors(c: ModelConfig, layer_kinds: Sequence[tuple[str, str, str]]) -> list[PlannedTensor]:
    """Every GGUF tensor in file order. layer_kinds: (canonical prefix, mixer kind, ffn kind) per block, MTP last."""
    out: list[PlannedTensor] = []

    def add(name: str, rule: TensorRule, prefix: str = ""):
        out.append(PlannedTensor(name, rule, tuple(prefix + s for s in rule.expand(c))))

    add("token_embd.weight", GLOBAL_RULES["token_embd.weight"])
    add("output_norm.weight", GLOBAL_RULES["output_norm.weight"])
    if not c.tie_word_embeddings:
        add("output.weight", GLOBAL_RULES["output.weight"])
    for bid, (prefix, mixer, ffn) in enumerate(layer_kinds):
        rules = (*LAYER_RULES, *MIXER_RULES[mixer], *FFN_RULES[ffn])
        for r in rules:
            add(f"blk.{bid}.{r.gguf}", r, prefix + ".")
        if bid == c.num_hidden_layers:  # first MTP block carries the head's own tensors
            for r in NEXTN_RULES:
                add(f"blk.{bid}.{NEXTN_GGUF_NAMES.get(r.gguf, r.gguf)}", r)
    return out


# ---- metadata --------------------------------------------------------------------------------------------------

U32, F32, BOOLS, STR = "u32", "f32", "bools", "str"


@dataclass(frozen=True)
class MetaKey:
    """A `{arch}.*` key: its GGUF value kind, how to compute it from the config, and the config field it restores."""

    key: str
    kind: str
    value: Callable[[ModelConfig], object]


def _recurrent(c: ModelConfig) -> list[bool]:
    return [t == "linear_attention" for t in c.layer_types] + [False] * c.mtp_num_hidden_layers


def _interval(c: ModelConfig) -> int:
    """The full-attention period when layer_types follow one, else 4 (llama.cpp's converter writes the config's
    `full_attention_interval` or 4; the explicit recurrent_layers array is what the loader uses)."""
    full = [i for i, t in enumerate(c.layer_types) if t == "full_attention"]
    for p in range(1, c.num_hidden_layers + 1):
        if full == [i for i in range(c.num_hidden_layers) if (i + 1) % p == 0]:
            return p
    return 4


# Order follows llama.cpp's converter so that files compare key by key.
METADATA: tuple[MetaKey, ...] = (
    MetaKey("block_count", U32, lambda c: c.num_hidden_layers + c.mtp_num_hidden_layers),
    MetaKey("context_length", U32, lambda c: c.max_position_embeddings),
    MetaKey("embedding_length", U32, lambda c: c.hidden_size),
    MetaKey("feed_forward_length", U32, lambda c: c.intermediate_size),
    MetaKey("attention.head_count", U32, lambda c: c.num_attention_heads),
    MetaKey("attention.head_count_kv", U32, lambda c: c.num_key_value_heads),
    MetaKey("rope.freq_base", F32, lambda c: c.rope_theta),
    MetaKey("attention.layer_norm_rms_epsilon", F32, lambda c: c.rms_norm_eps),
    MetaKey("expert_count", U32, lambda c: c.num_experts),
    MetaKey("expert_used_count", U32, lambda c: c.num_experts_per_tok),
    MetaKey("attention.key_length", U32, lambda c: c.head_dim),
    MetaKey("attention.value_length", U32, lambda c: c.head_dim),
    MetaKey("expert_feed_forward_length", U32, lambda c: c.moe_intermediate_size),
    MetaKey("expert_shared_feed_forward_length", U32, lambda c: c.shared_expert_intermediate_size),
    MetaKey("nextn_predict_layers", U32, lambda c: c.mtp_num_hidden_layers),  # written only when > 0
    MetaKey("ssm.conv_kernel", U32, lambda c: c.linear_conv_kernel_dim),
    MetaKey("ssm.state_size", U32, lambda c: c.linear_key_head_dim),
    MetaKey("ssm.group_count", U32, lambda c: c.linear_num_key_heads),
    MetaKey("ssm.time_step_rank", U32, lambda c: c.linear_num_value_heads),
    MetaKey("ssm.inner_size", U32, lambda c: c.linear_value_head_dim * c.linear_num_value_heads),
    MetaKey("attention.recurrent_layers", BOOLS, _recurrent),
    MetaKey("full_attention_interval", U32, _interval),
    MetaKey("rope.dimension_count", U32, lambda c: c.rotary_dim),
)
OPTIONAL_KEYS = {"nextn_predict_layers"}  # omitted when zero, as llama.cpp's converter does


# ---- what llama.cpp's qwen3next loader cannot represent -----------------------------------------------------

@dataclass(frozen=True)
class Limit:
    """A configuration llama.cpp's `qwen3next` loader/graph cannot represent: a check and the message naming it."""

    ok: Callable[[ModelConfig], bool]
    message: Callable[[ModelConfig], str]


LIMITS: tuple[Limit, ...] = (
    Limit(lambda c: all(c.is_sparse(i) for i in range(c.num_hidden_layers)),
          lambda c: f"mlp_only_layers={list(c.mlp_only_layers)} / decoder_sparse_step={c.decoder_sparse_step} make "
                    f"layers {[i for i in range(c.num_hidden_layers) if not c.is_sparse(i)]} dense MLPs; "
                    "llama.cpp's qwen3next requires a sparse MoE block (ffn_gate_inp) in every layer"),
    Limit(lambda c: c.linear_key_head_dim == c.linear_value_head_dim,
          lambda c: f"linear_key_head_dim={c.linear_key_head_dim} != linear_value_head_dim={c.linear_value_head_dim}; "
                    "llama.cpp's qwen3next uses ssm.state_size for both"),
    Limit(lambda c: c.norm_topk_prob,
          lambda c: "norm_topk_prob=false; llama.cpp's qwen3next always renormalises the top-k routing weights"),
    Limit(lambda c: c.num_experts > 0,
          lambda c: "num_experts=0; llama.cpp's qwen3next cannot load a model without experts"),
)


def unsupported(c: ModelConfig) -> list[str]:
    """Messages for every limit the config breaks (empty when llama.cpp can represent it)."""
    return [lim.message(c) for lim in LIMITS if not lim.ok(c)]
