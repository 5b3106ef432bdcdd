"""llama.cpp's per-tensor type choice for its K-quant mixes (Q4_K_M, Q5_K_M, Q6_K), on qwen3next's GGUF names.

A port of the rules that apply to qwen3next in llama.cpp's src/llama-quant.cpp (`llama_tensor_get_type_impl`,
`tensor_get_category`, `init_quantize_state_counters`), so that nextq's `q4_k_m`, `q5_k_m` and `q6_k` recipes
give every tensor the type `llama-quantize` would, and nextq's GGUF file is a drop-in replacement:

    output.weight          Q6_K (Q8_0 when its row length is not a multiple of the default type's block)
    token_embd.weight      the default type (embeddings are not tied in Qwen3-Next)
    attn_v / attn_qkv      "attention-v-like" (qwen3next's DeltaNet attn_qkv counts too; counter over them in
                           file order): Q4_K_M / Q5_K_M -> Q6_K when use_more_bits(i, n)
    *ffn_down*             (routed, shared and dense): Q4_K_M / Q5_K_M -> Q6_K when use_more_bits(layer, n_layer_all),
                           the layer parsed from the name (n_expert > 1), MTP blocks counted in n_layer_all
    everything else        the default type (Q4_K / Q5_K / Q6_K); norms, router, shared-expert gate, conv, A, dt:
                           not quantized (the GGUF writer keeps them F32)
    use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2   (integer division, as in C)

The Mixtral-only (n_expert == 8) and Falcon rules do not apply. Rows whose length is not a multiple of 256 are
handled afterwards by `recipes.plan_schemes` with each scheme's `fallback` (llama.cpp's tensor_type_fallback).
"""

from __future__ import annotations

import re

from nextq.graph import ModelConfig, build_blocks

DEFAULT_TYPE = {"q4_k_m": "q4_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}  # llama_ftype -> default ggml type
MORE_BITS = ("q4_k_m", "q5_k_m")  # the mixes whose attn_v-like and ffn_down tensors get Q6_K by use_more_bits


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's use_more_bits (C integer division; (i - n/8) % 3 is C's remainder, never negative here)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    """tensor_get_category on a GGUF tensor name (substring tests, in llama.cpp's order)."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def gguf_groups(c: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(GGUF tensor name, canonical sources) of every quantizable GGUF matrix, in file order. A GGUF tensor has one
    type, so its sources (all experts of a stacked tensor, DeltaNet q/k/v of attn_qkv) take one scheme together."""
    from nextq.convert import gguf_names
    from nextq.convert.gguf_export import layer_kinds_of

    return [(pt.name, pt.sources) for pt in gguf_names.plan_tensors(c, layer_kinds_of(build_blocks(c)))
            if not pt.rule.force_f32 and pt.name.endswith("weight")]


def llama_mix(mix: str, c: ModelConfig) -> dict[str, tuple[str, str]]:
    """Canonical tensor name -> (scheme, why) for every quantizable matrix under llama.cpp mix `mix`."""
    default = DEFAULT_TYPE[mix]
    planned = gguf_groups(c)
    n_attn_v = sum(_category(name) == "attn_v" for name, _ in planned)
    n_layer_all = c.num_hidden_layers + c.mtp_num_hidden_layers
    i_attn_v = 0
    out: dict[str, tuple[str, str]] = {}
    for gname, sources in planned:
        cat = _category(gname)
        scheme, why = default, f"llama.cpp {mix}: default"
        if cat == "output":
            scheme, why = "q6_k", f"llama.cpp {mix}: output"
        elif cat == "attn_v":
            if mix in MORE_BITS and use_more_bits(i_attn_v, n_attn_v):
                scheme, why = "q6_k", f"llama.cpp {mix}: attn_v-like {i_attn_v}/{n_attn_v} use_more_bits"
            i_attn_v += 1
        elif cat == "ffn_down":
            layer = int(re.match(r"blk\.(\d+)\.", gname).group(1))
            if mix in MORE_BITS and use_more_bits(layer, n_layer_all):
                scheme, why = "q6_k", f"llama.cpp {mix}: ffn_down layer {layer}/{n_layer_all} use_more_bits"
        for s in sources:
            out[s] = (scheme, why)
    return out
