"""RoPE settings of a Hugging Face config.json, for every family: theta, partial rotary factor and YaRN scaling.

Two spellings exist: transformers 5 writes `rope_parameters`; older configs (and the Qwen3-Next model card's
1M-context recipe) use `rope_scaling`. transformers lets `rope_scaling` replace `rope_parameters`; llama.cpp's
converter reads `rope_parameters` first. nextq follows transformers and refuses a config where the two disagree
on the rope type, since the engines would then run different models.

    theta, partial, scaling = read_rope(config_json)                    # scaling: RopeScaling | None
    scaling = parse_rope_override("yarn:4:262144", max_position_embeddings)   # `nextq convert --rope-scaling`
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from nextq.errors import UnsupportedModelError
from nextq.graph import ROPE_SCALING_TYPES, RopeScaling

# RopeScaling fields read from a rope dict beside the three required ones; other keys of the dict are ignored on
# purpose (rope_theta / partial_rotary_factor are read separately; mrope keys belong to the family reader).
YARN_OPTIONAL = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def rope_type_of(rope: Mapping[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def scaling_from_dict(rope: Mapping[str, Any], max_position_embeddings: int, where: str = "config") -> RopeScaling | None:
    """A rope dict (`rope_parameters` / `rope_scaling` / an override) -> RopeScaling, or None for plain RoPE.

    original_max_position_embeddings defaults to max_position_embeddings, as transformers' standardize_rope_params.
    """
    kind = rope_type_of(rope)
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise UnsupportedModelError(f"{where}: rope_type={kind!r}, supported: "
                                    f"['default', {', '.join(map(repr, ROPE_SCALING_TYPES))}]")
    if rope.get("factor") is None:
        raise UnsupportedModelError(f"{where}: rope_type={kind!r} needs a factor (e.g. 4.0)")
    opt = {k: rope[k] for k in YARN_OPTIONAL if rope.get(k) is not None}
    return RopeScaling(rope_type=kind, factor=float(rope["factor"]),
                       original_max_position_embeddings=int(rope.get("original_max_position_embeddings")
                                                            or max_position_embeddings), **opt)


def read_rope(hf: Mapping[str, Any], default_partial: float = 0.25) -> tuple[float, float, RopeScaling | None]:
    """(rope_theta, partial_rotary_factor, scaling) of a config.json (or a family's text_config)."""
    params, legacy = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    if params and legacy and rope_type_of(params) != rope_type_of(legacy):
        raise UnsupportedModelError(
            f"config: rope_parameters (rope_type={rope_type_of(params)!r}) and rope_scaling "
            f"(rope_type={rope_type_of(legacy)!r}) disagree; transformers uses rope_scaling, llama.cpp's converter "
            "rope_parameters. Keep one of them (or pass `nextq convert --rope-scaling`)")
    rope = legacy or params
    theta = float(rope.get("rope_theta", params.get("rope_theta", hf.get("rope_theta", 10000.0))))
    partial = float(rope.get("partial_rotary_factor", params.get("partial_rotary_factor",
                                                                hf.get("partial_rotary_factor", default_partial))))
    return theta, partial, scaling_from_dict(rope, hf.get("max_position_embeddings", 32768))


def parse_rope_override(text: str, max_position_embeddings: int) -> RopeScaling | None:
    """`--rope-scaling` value: `yarn:FACTOR[:ORIGINAL]`, `default` (turn scaling off), or a JSON rope dict
    (`{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}`). ORIGINAL defaults to the
    checkpoint's max_position_embeddings."""
    where = f"--rope-scaling {text!r}"
    if text.lstrip().startswith("{"):
        try:
            rope = json.loads(text)
        except ValueError as e:
            raise UnsupportedModelError(f"{where}: not valid JSON ({e})") from None
        return scaling_from_dict(rope, max_position_embeddings, where)
    kind, *rest = text.split(":")
    if kind == "default" and not rest:
        return None
    if len(rest) not in (1, 2):
        raise UnsupportedModelError(f"{where}: expected yarn:FACTOR[:ORIGINAL], default, or a JSON rope dict")
    try:
        rope = {"rope_type": kind, "factor": float(rest[0])}
        if len(rest) == 2:
            rope["original_max_position_embeddings"] = int(rest[1])
    except ValueError:
        raise UnsupportedModelError(f"{where}: FACTOR must be a number and ORIGINAL an integer") from None
    return scaling_from_dict(rope, max_position_embeddings, where)
