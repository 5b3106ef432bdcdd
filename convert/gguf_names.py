"""Canonical graph <-> GGUF `qwen3next` / `qwen35moe` / `qwen35`: tensor names, layouts and metadata keys, as data.

The targets are llama.cpp's loaders (src/models/qwen3next.cpp, qwen35moe.cpp, qwen35.cpp, pinned through
llama-cpp-python 0.3.36) and the layouts its converter writes (conversion/qwen.py, classes Qwen3NextModel,
Qwen3_5MoeTextModel, Qwen3_5TextModel); the IR's family (config.family) picks the architecture (`ARCHS`).
Every GGUF tensor is built from
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

qwen35moe / qwen35 differ in the DeltaNet: `ssm_beta` / `ssm_alpha` (b, a apart) instead of `ssm_ba`, and value
heads in **tiled** order (G0v0, G1v0, ..., G0v1, G1v1, ...; value head g*r + m of the canonical grouped order goes
to m*Hk + g) in every tensor indexed by value head: the v rows of attn_qkv, attn_gate, ssm_beta, ssm_alpha, ssm_a,
ssm_dt, the v channels of ssm_conv1d and the columns of ssm_out (llama.cpp's _LinearAttentionVReorderBase: ggml
broadcasts q/k by tiling). qwen35 has dense `ffn_{gate,up,down}` instead of experts; both add
`rope.dimension_sections` (M-RoPE, required by the loader) and drop the keys their configs lack.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nextq.errors import UnsupportedModelError
from nextq.graph import ModelConfig

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


def _tile(groups: int, per: int, head: int, x: np.ndarray, axis: int) -> np.ndarray:
    """Heads along `axis` from [groups, per, head] order to [per, groups, head] order (head = elements per head)."""
    x = np.moveaxis(x, axis, 0)
    shape = x.shape
    x = x.reshape(groups, per, head, *shape[1:]).swapaxes(0, 1).reshape(shape)
    return np.ascontiguousarray(np.moveaxis(x, 0, axis))


def _v_tiled(head: Callable[[ModelConfig], int] | None, axis: int = 0, inverse: bool = False):
    """Value heads grouped by key head (canonical) -> tiled (qwen35), or back with inverse=True. `head(c)` is a
    head's size along `axis` in the data as packed: elements, or GGUF bytes for columns of an encoded row."""

    def move(c: ModelConfig, x: np.ndarray) -> np.ndarray:
        hk, r = c.linear_num_key_heads, c.linear_num_value_heads // c.linear_num_key_heads
        size = x.shape[axis] // c.linear_num_value_heads if head is None else head(c)
        return _tile(r, hk, size, x, axis) if inverse else _tile(hk, r, size, x, axis)

    return move


def _v_rows(head: Callable[[ModelConfig], int]) -> tuple[Pack, Unpack]:
    """One tensor whose rows are value heads of `head(c)` rows each, in tiled order."""
    fwd, inv = _v_tiled(head), _v_tiled(head, inverse=True)
    return (lambda c, xs: fwd(c, xs[0])), (lambda c, x: [inv(c, x)])


def _qkv_tiled(c: ModelConfig, xs: Sequence[np.ndarray]) -> np.ndarray:
    q, k, v = xs
    return np.concatenate([q, k, _v_tiled(lambda c: c.linear_value_head_dim)(c, v)], axis=0)


def _qkv_tiled_inv(c: ModelConfig, x: np.ndarray) -> list[np.ndarray]:
    q, k, v = _qkv_inv(c, x)
    return [q, k, _v_tiled(lambda c: c.linear_value_head_dim, inverse=True)(c, v)]


def _conv_tiled(c: ModelConfig, xs: Sequence[np.ndarray]) -> np.ndarray:
    """conv [C, K] over q | k | v channels: the v channels in tiled head order."""
    (x,) = xs
    kd = 2 * c.linear_num_key_heads * c.linear_key_head_dim
    return np.concatenate([x[:kd], _v_tiled(lambda c: c.linear_value_head_dim)(c, x[kd:])], axis=0)


def _conv_tiled_inv(c: ModelConfig, x: np.ndarray) -> list[np.ndarray]:
    kd = 2 * c.linear_num_key_heads * c.linear_key_head_dim
    return [np.concatenate([x[:kd], _v_tiled(lambda c: c.linear_value_head_dim, inverse=True)(c, x[kd:])])]


# ssm_out's columns are value heads; packed data may be encoded rows (bytes), so a head is 1/Hv of a row (whole
# quant blocks when dv is a multiple of 32, which choose_type's F16 fallback for short rows does not guarantee:
# gguf_export checks it)
_cols_tiled = _v_tiled(None, axis=-1)
_cols_grouped = _v_tiled(None, axis=-1, inverse=True)


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
    col_group: the pack moves columns in groups of this many elements (a block type needs whole blocks per group).
    """

    gguf: str
    sources: tuple[str, ...]
    pack: Pack = _same
    unpack: Unpack = _same_inv
    force_f32: bool = False
    norm: bool = False
    value: tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]] | None = None
    col_group: Callable[[ModelConfig], int] | None = None

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
_DV = (lambda c: c.linear_value_head_dim)
_z_tiled, _z_grouped = _v_rows(_DV)
_heads_tiled, _heads_grouped = _v_rows(lambda c: 1)
# qwen35moe / qwen35: b and a apart, value heads tiled (see the module docstring)
DELTANET_TILED_RULES: tuple[TensorRule, ...] = (
    _rule("attn_qkv.weight", "mixer.q.weight", "mixer.k.weight", "mixer.v.weight", pack=_qkv_tiled,
          unpack=_qkv_tiled_inv),
    _rule("attn_gate.weight", "mixer.z.weight", pack=_z_tiled, unpack=_z_grouped),
    _rule("ssm_beta.weight", "mixer.b.weight", pack=_heads_tiled, unpack=_heads_grouped),
    _rule("ssm_alpha.weight", "mixer.a.weight", pack=_heads_tiled, unpack=_heads_grouped),
    _rule("ssm_conv1d.weight", "mixer.conv.weight", pack=_conv_tiled, unpack=_conv_tiled_inv, force_f32=True),
    _rule("ssm_a", "mixer.A_log", pack=_heads_tiled, unpack=_heads_grouped, force_f32=True,
          value=(_neg_exp, _neg_exp_inv)),
    _rule("ssm_dt.bias", "mixer.dt_bias", pack=_heads_tiled, unpack=_heads_grouped, force_f32=True),
    _rule("ssm_norm.weight", "mixer.norm.weight", **NORM),
    _rule("ssm_out.weight", "mixer.out.weight", pack=lambda c, xs: _cols_tiled(c, xs[0]),
          unpack=lambda c, x: [_cols_grouped(c, x)], col_group=_DV),
)
DENSE_RULES: tuple[TensorRule, ...] = tuple(_rule(f"ffn_{p}.weight", f"ffn.{p}.weight") for p in ("gate", "up", "down"))
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
    arch = arch_of(c)
    for bid, (prefix, mixer, ffn) in enumerate(layer_kinds):
        rules = (*LAYER_RULES, *arch.mixer_rules[mixer], *arch.ffn_rules[ffn])
        for r in rules:
            add(f"blk.{bid}.{r.gguf}", r, prefix + ".")
        if bid == c.num_hidden_layers:  # first MTP block carries the head's own tensors
            for r in NEXTN_RULES:
                add(f"blk.{bid}.{NEXTN_GGUF_NAMES.get(r.gguf, r.gguf)}", r)
    return out


# ---- metadata --------------------------------------------------------------------------------------------------

U32, F32, BOOLS, INTS, STR = "u32", "f32", "bools", "ints", "str"


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


def _sections(c: ModelConfig) -> list[int]:
    """M-RoPE sections padded to 4 (llama.cpp's converter; [11, 11, 10, 0] when the checkpoint states none)."""
    return [*c.mrope_section, 0, 0, 0, 0][:4] if c.mrope_section else [11, 11, 10, 0]


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
# keys a Qwen3.5 config has no field for, so llama.cpp's converter writes none
MOE_KEYS = {"expert_count", "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length"}
QWEN35MOE_METADATA = (*(m for m in METADATA if m.key != "feed_forward_length"),
                      MetaKey("rope.dimension_sections", INTS, _sections))
QWEN35_METADATA = (*(m for m in METADATA if m.key not in MOE_KEYS), MetaKey("rope.dimension_sections", INTS, _sections))


# ---- what llama.cpp's qwen3next loader cannot represent -----------------------------------------------------

@dataclass(frozen=True)
class Limit:
    """A configuration llama.cpp's `qwen3next` loader/graph cannot represent: a check and the message naming it."""

    ok: Callable[[ModelConfig], bool]
    message: Callable[[ModelConfig], str]


def _moe_limits(arch: str) -> tuple[Limit, ...]:
    return (
        Limit(lambda c: all(c.is_sparse(i) for i in range(c.num_hidden_layers)),
              lambda c: f"mlp_only_layers={list(c.mlp_only_layers)} / decoder_sparse_step={c.decoder_sparse_step} "
                        f"make layers {[i for i in range(c.num_hidden_layers) if not c.is_sparse(i)]} dense MLPs; "
                        f"llama.cpp's {arch} requires a sparse MoE block (ffn_gate_inp) in every layer"),
        _state_size_limit(arch),
        Limit(lambda c: c.norm_topk_prob,
              lambda c: f"norm_topk_prob=false; llama.cpp's {arch} always renormalises the top-k routing weights"),
        Limit(lambda c: c.num_experts > 0,
              lambda c: f"num_experts=0; llama.cpp's {arch} cannot load a model without experts"),
    )


def _state_size_limit(arch: str) -> Limit:
    return Limit(lambda c: c.linear_key_head_dim == c.linear_value_head_dim,
                 lambda c: f"linear_key_head_dim={c.linear_key_head_dim} != linear_value_head_dim="
                           f"{c.linear_value_head_dim}; llama.cpp's {arch} uses ssm.state_size for both")


LIMITS = _moe_limits("qwen3next")
DENSE_LIMITS: tuple[Limit, ...] = (
    _state_size_limit("qwen35"),
    Limit(lambda c: c.num_experts == 0,
          lambda c: f"num_experts={c.num_experts}; llama.cpp's qwen35 has dense MLPs only"),
)


# ---- the architectures, one per family -------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture: its name (`general.architecture`, the metadata key prefix), the tensor rules per
    mixer and FFN kind, its metadata keys and what its loader cannot represent."""

    name: str
    mixer_rules: Mapping[str, tuple[TensorRule, ...]]
    ffn_rules: Mapping[str, tuple[TensorRule, ...]]
    metadata: tuple[MetaKey, ...]
    limits: tuple[Limit, ...]


ARCHS: dict[str, Arch] = {  # IR family -> GGUF architecture
    "qwen3_next": Arch("qwen3next", {"GatedDeltaNet": DELTANET_RULES, "GatedAttention": ATTENTION_RULES},
                       {"SparseMoE": MOE_RULES}, METADATA, LIMITS),
    "qwen3_5_moe": Arch("qwen35moe", {"GatedDeltaNet": DELTANET_TILED_RULES, "GatedAttention": ATTENTION_RULES},
                        {"SparseMoE": MOE_RULES}, QWEN35MOE_METADATA, _moe_limits("qwen35moe")),
    "qwen3_5": Arch("qwen35", {"GatedDeltaNet": DELTANET_TILED_RULES, "GatedAttention": ATTENTION_RULES},
                    {"DenseMLP": DENSE_RULES}, QWEN35_METADATA, DENSE_LIMITS),
}


def arch_of(c: ModelConfig) -> Arch:
    """The GGUF architecture of an IR's family."""
    if c.family not in ARCHS:
        raise UnsupportedModelError(f"family {c.family!r} has no GGUF architecture; supported: {sorted(ARCHS)}")
    return ARCHS[c.family]


def family_of(arch: str) -> str:
    """The IR family of a GGUF `general.architecture`."""
    by_name = {a.name: fam for fam, a in ARCHS.items()}
    if arch not in by_name:
        raise UnsupportedModelError(f"GGUF general.architecture={arch!r}, supported: {sorted(by_name)}")
    return by_name[arch]


def unsupported(c: ModelConfig) -> list[str]:
    """Messages for every limit the config breaks (empty when llama.cpp can represent it)."""
    return [lim.message(c) for lim in arch_of(c).limits if not lim.ok(c)]
