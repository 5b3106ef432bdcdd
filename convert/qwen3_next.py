"""Reader for `Qwen3NextForCausalLM` checkpoints (Hub layout; see notes/qwen3-next.md).

Every stored key is mapped or explicitly dropped with a reason; leftovers are an error that lists them.
Quirks translated here (and nowhere else):
- `linear_attn.in_proj_qkvz` is grouped per key head: for each of Hk groups [q dk | k dk | v r*dv | z r*dv]
  with r = Hv / Hk; `in_proj_ba` likewise [b r | a r]. Canonical form: flat q, k, v, z, b, a.
- `self_attn.q_proj` interleaves query and output gate per head: [Hq, 2*D] -> q, gate.
- `conv1d.weight` [C, 1, K] -> [C, K].
- transformers 5 may save experts fused (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]);
  the Hub stores them one by one. Both read into per-expert tensors.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch

from nextq.errors import CheckpointError, UnsupportedModelError
from nextq.graph import Graph, ModelConfig, SourceTensor
from nextq.storage import DTYPES, StoredTensor

from .hf import HFCheckpoint, register_reader

# Config fields read from config.json; everything else there is ignored on purpose (training-only knobs such as
# router_aux_loss_coef, initializer_range, output_router_logits, use_cache, dtype...).
CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "intermediate_size", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
    "rms_norm_eps", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)


def read_config(hf: dict) -> ModelConfig:
    """Translate a Qwen3-Next config.json into ModelConfig (both rope spellings, both layer-type spellings)."""
    if hf.get("attention_bias"):
        raise UnsupportedModelError("config: attention_bias=true is not supported (Qwen3-Next has none)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedModelError(f"config: rope_type={rope_type!r}, supported: ['default']")
    n = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        interval = hf.get("full_attention_interval", 4)
        layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)]
    kw = {k: hf[k] for k in CONFIG_FIELDS if k in hf and hf[k] is not None}
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = tuple(kw["eos_token_id"])
    kw.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    return ModelConfig(
        layer_types=tuple(layer_types),
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))),
        mtp_num_hidden_layers=int(hf.get("mtp_num_hidden_layers", hf.get("num_nextn_predict_layers", 0)) or 0),
        **kw,
    )


# ---- the tensor map -----------------------------------------------------------------------------------------

Split = Callable[[ModelConfig, StoredTensor], dict[str, tuple[tuple[int, ...], Callable | None]]]


def grouped_rows(groups: int, sizes: dict[str, int]) -> Split:
    """Split a weight whose rows are `groups` repeats of [part sizes...] into one flat tensor per part."""

    def split(c: ModelConfig, st: StoredTensor):
        width = st.shape[-1]
        out, start = {}, 0
        for name, size in sizes.items():
            lo, hi = start, start + size

            def take(t: torch.Tensor, lo=lo, hi=hi) -> torch.Tensor:
                return t.reshape(groups, -1, width)[:, lo:hi].reshape(-1, width).contiguous()

            out[name] = ((groups * size, width), take)
            start = hi
        return out

    return split


def qkvz(c: ModelConfig, st: StoredTensor):
    r = c.linear_num_value_heads // c.linear_num_key_heads
    dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
    return grouped_rows(c.linear_num_key_heads, {"q": dk, "k": dk, "v": r * dv, "z": r * dv})(c, st)


def ba(c: ModelConfig, st: StoredTensor):
    r = c.linear_num_value_heads // c.linear_num_key_heads
    return grouped_rows(c.linear_num_key_heads, {"b": r, "a": r})(c, st)


def q_gate(c: ModelConfig, st: StoredTensor):
    d = c.head_dim
    return grouped_rows(c.num_attention_heads, {"q": d, "gate": d})(c, st)


def squeeze_conv(c: ModelConfig, st: StoredTensor):
    return {"": ((st.shape[0], st.shape[-1]), lambda t: t.reshape(st.shape[0], st.shape[-1]))}


# Per-layer map (relative to `model.layers.{i}.` / `mtp.layers.{j}.`): HF suffix -> canonical suffix, or a split
# that yields several canonical tensors named `canonical + part + ".weight"`.
LAYER_MAP: dict[str, str | tuple[str, Split]] = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_norm.weight",
    "linear_attn.in_proj_qkvz.weight": ("mixer.", qkvz),
    "linear_attn.in_proj_ba.weight": ("mixer.", ba),
    "linear_attn.conv1d.weight": ("mixer.conv.weight", squeeze_conv),
    "linear_attn.A_log": "mixer.A_log",
    "linear_attn.dt_bias": "mixer.dt_bias",
    "linear_attn.norm.weight": "mixer.norm.weight",
    "linear_attn.out_proj.weight": "mixer.out.weight",
    "self_attn.q_proj.weight": ("mixer.", q_gate),
    "self_attn.k_proj.weight": "mixer.k.weight",
    "self_attn.v_proj.weight": "mixer.v.weight",
    "self_attn.o_proj.weight": "mixer.o.weight",
    "self_attn.q_norm.weight": "mixer.q_norm.weight",
    "self_attn.k_norm.weight": "mixer.k_norm.weight",
    "mlp.gate.weight": "ffn.router.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn.shared.gate.weight",
    "mlp.shared_expert.up_proj.weight": "ffn.shared.up.weight",
    "mlp.shared_expert.down_proj.weight": "ffn.shared.down.weight",
    "mlp.shared_expert_gate.weight": "ffn.shared_gate.weight",
    "mlp.gate_proj.weight": "ffn.gate.weight",
    "mlp.up_proj.weight": "ffn.up.weight",
    "mlp.down_proj.weight": "ffn.down.weight",
}
EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
FUSED_EXPERTS = {"mlp.experts.gate_up_proj": ("gate", "up"), "mlp.experts.down_proj": ("down",)}
GLOBAL_MAP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "mtp.fc.weight": "mtp.fc.weight",
    "mtp.pre_fc_norm_embedding.weight": "mtp.embed_norm.weight",
    "mtp.pre_fc_norm_hidden.weight": "mtp.hidden_norm.weight",
    "mtp.norm.weight": "mtp.norm.weight",
}
DROPPED = {
    re.compile(r".*rotary_emb\.inv_freq"): "recomputed from rope_theta and partial_rotary_factor",
}
LAYER_PREFIX = re.compile(r"^(model\.layers|mtp\.layers)\.(\d+)\.(.+)$")


def _source(st: StoredTensor, shape: tuple[int, ...], transform: Callable | None = None) -> SourceTensor:
    """A stored tensor read on demand; without a transform it can also be read a few rows at a time."""
    rows = None if transform is not None else (lambda start, stop: st.rows(start, stop).read())
    return SourceTensor(st.read, tuple(shape), DTYPES[st.dtype], transform, f"{st.path}:{st.key}", rows)


def _expert_slice(st: StoredTensor, e: int) -> StoredTensor:
    """Expert e of a fused [E, ...] tensor, as a byte range (reads only that expert)."""
    return dataclasses.replace(st.rows(e, e + 1), key=f"{st.key}[{e}]", shape=st.shape[1:])


@register_reader("Qwen3NextForCausalLM")
def read_qwen3_next(ckpt: HFCheckpoint) -> Graph:
    config = read_config(ckpt.config)
    tensors: dict[str, SourceTensor] = {}
    unknown: list[str] = []

    def put(name: str, src: SourceTensor):
        if name in tensors:
            raise CheckpointError(f"{name}: produced twice (second time from {src.origin})")
        tensors[name] = src

    for key, st in ckpt.tensors.items():
        if key in GLOBAL_MAP:
            put(GLOBAL_MAP[key], _source(st, st.shape))
            continue
        if any(p.fullmatch(key) for p in DROPPED):
            continue
        m = LAYER_PREFIX.match(key)
        if m is None:
            unknown.append(key)
            continue
        prefix = f"{'layers' if m[1] == 'model.layers' else 'mtp.layers'}.{m[2]}."
        suffix = m[3]
        if (em := EXPERT_KEY.fullmatch(suffix)) is not None:
            put(f"{prefix}ffn.experts.{em[1]}.{em[2]}.weight", _source(st, st.shape))
        elif suffix in FUSED_EXPERTS:
            parts = FUSED_EXPERTS[suffix]
            for e in range(st.shape[0]):
                sub = _expert_slice(st, e)
                rows = sub.shape[0] // len(parts)
                for j, part in enumerate(parts):
                    shape = (rows, sub.shape[1])
                    put(f"{prefix}ffn.experts.{e}.{part}.weight",
                        _source(sub, shape, lambda t, j=j, rows=rows: t[j * rows:(j + 1) * rows].contiguous()))
        elif suffix in LAYER_MAP:
            target = LAYER_MAP[suffix]
            if isinstance(target, str):
                put(prefix + target, _source(st, st.shape))
            else:
                base, split = target
                for part, (shape, fn) in split(config, st).items():
                    name = base + (f"{part}.weight" if part else "")
                    put(prefix + name, _source(st, shape, fn))
        else:
            unknown.append(key)
    if unknown:
        unknown.sort()
        raise CheckpointError(
            f"unknown tensors in checkpoint ({len(unknown)}): {', '.join(unknown[:8])}"
            + (f", ... (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        )
    if config.mtp_num_hidden_layers == 0 and any(k.startswith("mtp.") for k in tensors):
        # Checkpoints on the Hub carry mtp.* without declaring it in config.json (transformers ignores them).
        n = len({k.split(".")[2] for k in tensors if k.startswith("mtp.layers.")})
        config = ModelConfig(**{**config.__dict__, "mtp_num_hidden_layers": n})
    return Graph(config, tensors)
