"""nextq's Hugging Face export checked against what vLLM's Qwen3-Next loader expects (vLLM cannot run here): every
stored name, dtype and shape, the quantization_config's groups against vLLM's compressed-tensors requirements,
fused module sets in one scheme, and the modules vLLM builds without a quant config left dense and ignored.

The expectations are data taken from vLLM's source (main, read for this test; no vLLM code is copied):
- vllm/model_executor/models/qwen3_next.py: `Qwen3NextForCausalLM.packed_modules_mapping` (qkv_proj <- q_proj,
  k_proj, v_proj; gate_up_proj <- gate_proj, up_proj; in_proj_qkvz and in_proj_ba one tensor each),
  `Qwen3NextModel.hf_to_vllm_mapper` (the checkpoint names it stacks), `Qwen3NextSparseMoeBlock.__init__` (`gate`
  and `shared_expert_gate` are `ReplicatedLinear(quant_config=None)`: dense weights), `Qwen3NextAttention` (q_proj
  holds the query and its output gate: 2 * heads * head_dim rows);
- vllm/model_executor/models/qwen3_next_mtp.py: `Qwen3NextMultiTokenPredictor` (mtp.fc [H, 2H], mtp.norm,
  mtp.pre_fc_norm_hidden, mtp.pre_fc_norm_embedding, mtp.layers.{i} = a full-attention decoder layer);
- the GDN linear attention (`conv1d = ColumnParallelLinear(...)`, weight unsqueezed to [C, 1, K]);
- vllm/model_executor/layers/fused_moe (`FusedMoE.make_expert_params_mapping`: checkpoint experts are
  `experts.{e}.{gate,up,down}_proj.*`) and quantization/compressed_tensors/compressed_tensors_moe.py (WNA16 MoE
  `create_weights`: per expert `weight_packed` int32, `weight_scale` [N, K / G] (or [N, 1] per channel),
  `weight_shape` [2]; the scheme must be symmetric, strategy group or channel, actorder not 'group', 4 or 8 bits,
  format pack-quantized), schemes/compressed_tensors_wNa16.py (`weight_packed` int32 [N, K * bits / 32],
  `weight_scale`, `weight_shape` int64 [2] for every other Linear).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import build_checkpoint
from nextq.convert.hf import read_hf

SHAPE = dict(hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32)
FLOATS = ("BF16", "F16", "F32")  # vLLM copies dense weights and scales into its params dtype
WNA16_BITS = (4, 8)


def logical_shapes(c: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Module name regex -> (kind, logical shape) from the config, as vLLM's modules are sized.

    kind: "linear" (built with the quant config: packed or dense), "expert" (FusedMoE, the same), "dense"
    (ReplicatedLinear(quant_config=None), must stay dense), "embedding", "vector", "conv"."""
    h, v, e = c["hidden_size"], c["vocab_size"], c["num_experts"]
    d, hq, hkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    hk, hv, dk, dv = (c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                      c["linear_value_head_dim"])
    i, s = c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    layer = r"(model|mtp)\.layers\.\d+\."
    return {
        r"model\.embed_tokens\.weight": ("embedding", (v, h)),
        r"lm_head": ("linear", (v, h)),
        r"(model|mtp)\.norm\.weight|mtp\.pre_fc_norm_(hidden|embedding)\.weight": ("vector", (h,)),
        r"mtp\.fc": ("linear", (h, 2 * h)),
        layer + r"(input|post_attention)_layernorm\.weight": ("vector", (h,)),
        layer + r"self_attn\.q_proj": ("linear", (2 * hq * d, h)),  # query and output gate
        layer + r"self_attn\.[kv]_proj": ("linear", (hkv * d, h)),
        layer + r"self_attn\.o_proj": ("linear", (h, hq * d)),
        layer + r"self_attn\.[qk]_norm\.weight": ("vector", (d,)),
        layer + r"linear_attn\.in_proj_qkvz": ("linear", (2 * hk * dk + 2 * hv * dv, h)),
        layer + r"linear_attn\.in_proj_ba": ("linear", (2 * hv, h)),
        layer + r"linear_attn\.out_proj": ("linear", (h, hv * dv)),
        layer + r"linear_attn\.conv1d\.weight": ("conv", (2 * hk * dk + hv * dv, 1, c["linear_conv_kernel_dim"])),
        layer + r"linear_attn\.(A_log|dt_bias)": ("vector", (hv,)),
        layer + r"linear_attn\.norm\.weight": ("vector", (dv,)),
        layer + r"mlp\.gate": ("dense", (e, h)),
        layer + r"mlp\.shared_expert_gate": ("dense", (1, h)),
        layer + r"mlp\.experts\.\d+\.(gate|up)_proj": ("expert", (i, h)),
        layer + r"mlp\.experts\.\d+\.down_proj": ("expert", (h, i)),
        layer + r"mlp\.shared_expert\.(gate|up)_proj": ("linear", (s, h)),
        layer + r"mlp\.shared_expert\.down_proj": ("linear", (h, s)),
    }


# vLLM fuses these checkpoint modules into one layer (packed_modules_mapping / hf_to_vllm_mapper): one scheme each
FUSED = {r"\.self_attn\.(q|k|v)_proj$": ".self_attn.qkv_proj", r"\.shared_expert\.(gate|up)_proj$": ".shared_expert.gate_up"}
# built with quant_config=None (always) and kept dense for tensor parallelism >= 2 (notes: 2 Hv rows split too thin)
NEVER_QUANTIZED = (r".*\.mlp\.gate", r".*\.mlp\.shared_expert_gate")
TP_DENSE = r".*\.linear_attn\.in_proj_ba"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from nextq.convert.hf_export import export_hf
    from nextq.graph import Graph
    from nextq.quant.apply import quantize_graph
    from nextq.quant.recipes import get_recipe

    root = tmp_path_factory.mktemp("vllm")
    src = build_checkpoint(root / "src", "base", mtp=True, dtype=torch.bfloat16, **SHAPE)
    quantize_graph(read_hf(str(src), hash_shards=False), get_recipe("int4-compact"), root / "ir")
    export_hf(Graph.load(root / "ir"), root / "hf", tensor_parallel=4, progress=False)
    return root / "hf"


def stored(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                t = f.get_slice(k)
                out[k] = (t.get_dtype(), tuple(t.get_shape()))
    return out


def group_of(module: str, qc: dict):
    """The config group vLLM applies to `module`: compressed-tensors' own matching (exact, re:, class Linear);
    None when the module is ignored."""
    from compressed_tensors.utils.match import is_match, match_targets

    linear = torch.nn.Linear(1, 1)
    targets = {t: g for g in qc["config_groups"].values() for t in g["targets"]}
    if not is_match(module, linear, list(targets), qc.get("ignore") or []):
        return None
    return targets[match_targets(module, linear, list(targets))[0]]


def test_names_dtypes_and_shapes_are_what_vllm_loads(export):
    config = json.loads((export / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == \
           ("compressed-tensors", "pack-quantized", "compressed")
    table = logical_shapes(config)
    tensors = stored(export)
    seen = set()
    for key, (dtype, shape) in tensors.items():
        module, _, part = key.rpartition(".")
        if part not in ("weight_packed", "weight_scale", "weight_shape"):
            module, part = key.removesuffix(".weight"), "weight"
        matches = [rx for rx in table if re.fullmatch(rx, module) or re.fullmatch(rx, key)]
        assert len(matches) == 1, (key, matches)
        kind, logical = table[matches[0]]
        seen.add(matches[0])
        if part == "weight" or kind in ("vector", "conv"):
            assert dtype in FLOATS and shape == logical, (key, dtype, shape, logical)
            continue
        assert kind in ("linear", "expert"), (key, kind)  # only modules built with the quant config are packed
        group = group_of(module, qc)
        assert group is not None, key
        w = group["weights"]
        n, k = logical
        expected = {"weight_packed": ("I32", (n, k * w["num_bits"] // 32)),
                    "weight_scale": (FLOATS, (n, k // w["group_size"] if w["strategy"] == "group" else 1)),
                    "weight_shape": ("I64", (2,))}[part]
        assert (dtype in expected[0] if part == "weight_scale" else dtype == expected[0]) and shape == expected[1], \
            (key, dtype, shape, expected)
    assert seen == set(table), set(table) - seen  # every kind of module is there (MTP included)


def test_quantization_config_meets_vllms_compressed_tensors_requirements(export):
    config = json.loads((export / "config.json").read_text())
    qc = config["quantization_config"]
    tensors = stored(export)
    modules = {k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")}
    experts = sorted(m for m in modules if ".mlp.experts." in m)
    assert experts
    for m in modules:  # WNA16 (and its MoE method): symmetric int groups or channels, no g_idx, pack-quantized
        g = group_of(m, qc)
        w = g["weights"]
        assert (w["type"], w["symmetric"], w["num_bits"] in WNA16_BITS) == ("int", True, True), m
        assert w["strategy"] in ("group", "channel") and w.get("actorder") != "group", m
        assert (g.get("format") or qc["format"]) == "pack-quantized" and g["input_activations"] is None, m
    for rx, fused in FUSED.items():  # one vLLM layer, one scheme
        sets: dict[str, set] = {}
        for m in modules | {k.removesuffix(".weight") for k in tensors if k.endswith(".weight")}:
            if re.search(rx, m):
                g = group_of(m, qc)
                sets.setdefault(re.sub(rx, fused, m), set()).add(json.dumps(g, sort_keys=True) if g else None)
        assert sets and all(len(s) == 1 for s in sets.values()), (fused, sets)
    dense = [k.removesuffix(".weight") for k in tensors
             if any(re.fullmatch(rx + r"\.weight", k) for rx in (*NEVER_QUANTIZED, TP_DENSE))]
    moe_layers = config["num_hidden_layers"] + config["mtp_num_hidden_layers"]  # every layer of this model is MoE
    assert len(dense) == 2 * moe_layers + config["layer_types"].count("linear_attention"), dense
    for m in dense:  # stored dense and listed in ignore (vLLM matches ignore before building the layer's method)
        assert f"{m}.weight_packed" not in tensors and group_of(m, qc) is None, m
