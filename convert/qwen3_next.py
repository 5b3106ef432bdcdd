"""Reader for `Qwen3NextForCausalLM` checkpoints (Hub layout; see notes/qwen3-next.md).

The family's table for the generic reader loop (convert/family.py): every stored key is mapped or explicitly
dropped with a reason; leftovers are an error that lists them. Quirks translated here (and nowhere else):
- `linear_attn.in_proj_qkvz` is grouped per key head: for each of Hk groups [q dk | k dk | v r*dv | z r*dv]
  with r = Hv / Hk; `in_proj_ba` likewise [b r | a r]. Canonical form: flat q, k, v, z, b, a.
The attention, norms and experts (fused or one by one) are read by the entries every family shares.
"""

from __future__ import annotations

from nextq.errors import UnsupportedModelError
from nextq.graph import ModelConfig
from nextq.storage import StoredTensor

from .family import COMMON_LAYER_MAP, Family, copy_fields, grouped_rows, read_layer_types, register_family
from .hf_rope import read_rope

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
    rope_theta, partial_rotary_factor, rope_scaling = read_rope(hf)
    return ModelConfig(
        layer_types=read_layer_types(hf),
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
        rope_theta=rope_theta,
        partial_rotary_factor=partial_rotary_factor,
        rope_scaling=rope_scaling,
        mtp_num_hidden_layers=int(hf.get("mtp_num_hidden_layers", hf.get("num_nextn_predict_layers", 0)) or 0),
        **copy_fields(hf, CONFIG_FIELDS),
    )


# ---- the tensor map -----------------------------------------------------------------------------------------

def qkvz(c: ModelConfig, st: StoredTensor):
    """in_proj_qkvz, per key head [q dk | k dk | v r*dv | z r*dv] -> flat q, k, v, z."""
    r = c.linear_num_value_heads // c.linear_num_key_heads
    dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
    return grouped_rows(c.linear_num_key_heads, {"q": dk, "k": dk, "v": r * dv, "z": r * dv})(c, st)


def ba(c: ModelConfig, st: StoredTensor):
    """in_proj_ba, per key head [b r | a r] -> flat b, a."""
    r = c.linear_num_value_heads // c.linear_num_key_heads
    return grouped_rows(c.linear_num_key_heads, {"b": r, "a": r})(c, st)


QWEN3_NEXT = register_family(Family(
    name="qwen3_next",
    architectures=("Qwen3NextForCausalLM",),
    read_config=read_config,
    layer_map={
        **COMMON_LAYER_MAP,
        "linear_attn.in_proj_qkvz.weight": ("mixer.", qkvz),
        "linear_attn.in_proj_ba.weight": ("mixer.", ba),
    },
))
