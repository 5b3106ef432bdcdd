"""Readers for Qwen3.5 checkpoints, MoE and dense (see notes/qwen3_5.md): two tables for the generic loop.

Architectures: the vision-language `Qwen3_5MoeForConditionalGeneration` / `Qwen3_5ForConditionalGeneration` (the
Hub's layout: language model under `model.language_model.*`, its config under `text_config`) and the text-only
`Qwen3_5MoeForCausalLM` / `Qwen3_5ForCausalLM` (`model.*`, config at the top level). Quirks translated here:
- `linear_attn` projections are stored flat and separate: `in_proj_qkv` [2 Hk dk + Hv dv, H] = [q | k | v] (value
  head j uses key head j // (Hv / Hk), the canonical order already), `in_proj_z`, `in_proj_b`, `in_proj_a`.
- The MoE router always renormalises the top-k weights (`Qwen3_5MoeTopKRouter` has no flag): norm_topk_prob=True.
  MoE models have no dense-MLP layers, dense models no experts (num_experts 0); the sizes a config has no field
  for (intermediate_size of a MoE model, expert sizes of a dense one) keep ModelConfig's defaults, unused.
- M-RoPE: `rope_parameters.mrope_section` is kept (GGUF's `rope.dimension_sections`); on text positions all three
  axes carry the same position, so the rotation is ordinary partial RoPE (tests/test_qwen3_5.py checks it against
  transformers' Qwen3_5*ForConditionalGeneration, the M-RoPE code path).
- The vision tower `model.visual.*` is dropped, with its reason in the conversion log and the IR's provenance:
  nextq's targets run the language model; llama.cpp takes the tower as a separate mmproj file made by its own
  converter (`convert_hf_to_gguf.py --mmproj`) from the same checkpoint, which stays the source of truth for it.
"""

from __future__ import annotations

from collections.abc import Mapping

from nextq.errors import UnsupportedModelError
from nextq.graph import ModelConfig
from nextq.storage import StoredTensor

from .family import (COMMON_DROPPED, COMMON_LAYER_MAP, Family, copy_fields, read_layer_types, refuse_fields,
                     register_family)
from .hf_rope import read_rope

COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "rms_norm_eps", "hidden_act", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "mtp_num_hidden_layers",
)
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
DENSE_FIELDS = ("intermediate_size",)
# config values whose model nextq does not implement: field -> true for an unsupported value
REFUSED = {
    "attention_bias": bool,  # q/k/v/o biases: Qwen3.5 has none, nor does the canonical graph
    "attn_output_gate": lambda v: v is False,  # nextq's attention is the gated one (q_proj twice as wide)
    "mlp_only_layers": bool,  # Qwen3-Next's dense-layer knobs: Qwen3.5's modeling code ignores them, so a
    "decoder_sparse_step": lambda v: v not in (None, 1),  # config that sets them means something else
    "norm_topk_prob": lambda v: v is False,  # Qwen3.5's router always renormalises
}
REFUSED_ROPE = {"mrope_interleaved": lambda v: v is False}  # transformers always interleaves


def text_config(hf: Mapping) -> dict:
    """The language model's config: `text_config` of a vision-language config.json, else the file itself."""
    if "text_config" not in hf:
        return dict(hf)
    return {"tie_word_embeddings": hf.get("tie_word_embeddings", False), **hf["text_config"]}


def _read_config(hf: Mapping, moe: bool) -> ModelConfig:
    text = text_config(hf)
    refuse_fields(text, REFUSED, "config (text_config)" if "text_config" in hf else "config")
    rope = dict(text.get("rope_parameters") or {})
    refuse_fields(rope, REFUSED_ROPE, "config: rope_parameters")
    rope_theta, partial_rotary_factor, rope_scaling = read_rope(text)  # YaRN as for every family
    ffn = dict(norm_topk_prob=True) if moe else dict(num_experts=0, num_experts_per_tok=0)
    kw = copy_fields(text, COMMON_FIELDS + (MOE_FIELDS if moe else DENSE_FIELDS))
    return ModelConfig(
        layer_types=read_layer_types(text),
        rope_theta=rope_theta,
        partial_rotary_factor=partial_rotary_factor,
        rope_scaling=rope_scaling,
        mrope_section=tuple(rope.get("mrope_section") or ()),
        **{**ffn, **kw},
    )


def read_moe_config(hf: dict) -> ModelConfig:
    """A Qwen3.5-MoE config.json (vision-language or text-only) -> ModelConfig."""
    return _read_config(hf, moe=True)


def read_dense_config(hf: dict) -> ModelConfig:
    """A dense Qwen3.5 config.json (vision-language or text-only) -> ModelConfig."""
    return _read_config(hf, moe=False)


def qkv(c: ModelConfig, st: StoredTensor):
    """in_proj_qkv [q all heads | k all heads | v all heads] -> q, k, v (row ranges, read as they are)."""
    kd, vd = c.linear_num_key_heads * c.linear_key_head_dim, c.linear_num_value_heads * c.linear_value_head_dim
    width = st.shape[-1]
    bounds = {"q": (0, kd), "k": (kd, 2 * kd), "v": (2 * kd, 2 * kd + vd)}
    if st.shape[0] != 2 * kd + vd:
        raise UnsupportedModelError(f"{st.key}: {st.shape[0]} rows, expected 2*Hk*dk + Hv*dv = {2 * kd + vd}")
    return {part: ((hi - lo, width), lambda t, lo=lo, hi=hi: t[lo:hi].contiguous())
            for part, (lo, hi) in bounds.items()}


LAYER_MAP = {
    **COMMON_LAYER_MAP,
    "linear_attn.in_proj_qkv.weight": ("mixer.", qkv),
    "linear_attn.in_proj_z.weight": "mixer.z.weight",
    "linear_attn.in_proj_b.weight": "mixer.b.weight",
    "linear_attn.in_proj_a.weight": "mixer.a.weight",
}
PREFIXES = {"model.language_model.": "model."}  # the vision-language layout; text-only checkpoints use model.*
DROPPED = {
    **COMMON_DROPPED,
    r"model\.visual\..*": "vision tower (model.visual.*): nextq converts the language model; llama.cpp reads the "
                          "tower from the checkpoint as a separate mmproj file (convert_hf_to_gguf.py --mmproj)",
}

QWEN3_5_MOE = register_family(Family(
    name="qwen3_5_moe", architectures=("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"),
    read_config=read_moe_config, layer_map=LAYER_MAP, prefixes=PREFIXES, dropped=DROPPED,
))
QWEN3_5 = register_family(Family(
    name="qwen3_5", architectures=("Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM"),
    read_config=read_dense_config, layer_map=LAYER_MAP, prefixes=PREFIXES, dropped=DROPPED,
))
