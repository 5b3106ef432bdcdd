"""A checkpoint family as a table, and the one reader loop that runs every table.

A family (Qwen3-Next, Qwen3.5, Qwen3.5-MoE, ...) is data: which `architectures` it reads, how its config.json
becomes a ModelConfig, key prefixes to rewrite first (`model.language_model.` -> `model.`), a global map, a
per-layer map (HF suffix -> canonical suffix, or a split into several canonical tensors), and the keys it drops,
each with the reason. `read_family` walks the stored keys once: every key is mapped, or dropped with its reason
(the reasons are printed and land in the IR's provenance), or reported; leftovers are one error listing them.

Experts are read the same way for every family: one by one (`mlp.experts.{e}.{gate,up,down}_proj.weight`, the
per-expert layout the Hub stores for Qwen3-Next and transformers' save_pretrained writes) or fused
(`mlp.experts.gate_up_proj` [E, 2I, H] rows [gate | up], `mlp.experts.down_proj` [E, H, I], the layout the Hub
stores for Qwen3.5-MoE); both become the same per-expert canonical tensors, each read as its own byte range.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from nextq.errors import CheckpointError, UnsupportedModelError
from nextq.graph import Graph, ModelConfig, SourceTensor
from nextq.storage import DTYPES, StoredTensor

from .quant_source import QuantizedStored
from .hf import HFCheckpoint, register_reader

# ---- splits: one stored tensor -> several canonical ones ----------------------------------------------------

# (config, stored tensor) -> {part name: (canonical shape, transform of the stored tensor or None)}
Split = Callable[[ModelConfig, StoredTensor], dict[str, tuple[tuple[int, ...], Callable | None]]]


def grouped_rows(groups: int, sizes: Mapping[str, int]) -> Split:
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


def q_gate(c: ModelConfig, st: StoredTensor):
    """Gated attention's q_proj [Hq * 2D, H], per head [query D | gate D] -> `q`, `gate` [Hq * D, H]."""
    d = c.head_dim
    return grouped_rows(c.num_attention_heads, {"q": d, "gate": d})(c, st)


def squeeze_conv(c: ModelConfig, st: StoredTensor):
    """The depthwise conv1d weight [C, 1, K] -> [C, K]."""
    return {"": ((st.shape[0], st.shape[-1]), lambda t: t.reshape(st.shape[0], st.shape[-1]))}


# ---- the parts every family here shares -----------------------------------------------------------------------

LayerMap = dict[str, "str | tuple[str, Split]"]

# Per-layer keys (relative to `model.layers.{i}.` / `mtp.layers.{j}.`) of the gated attention, norms and FFNs.
COMMON_LAYER_MAP: LayerMap = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_norm.weight",
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
COMMON_GLOBAL_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "mtp.fc.weight": "mtp.fc.weight",
    "mtp.pre_fc_norm_embedding.weight": "mtp.embed_norm.weight",
    "mtp.pre_fc_norm_hidden.weight": "mtp.hidden_norm.weight",
    "mtp.norm.weight": "mtp.norm.weight",
}
COMMON_DROPPED: dict[str, str] = {
    r".*rotary_emb\.inv_freq": "recomputed from rope_theta and partial_rotary_factor",
}
EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
FUSED_EXPERTS = {"mlp.experts.gate_up_proj": ("gate", "up"), "mlp.experts.down_proj": ("down",)}
LAYER_PREFIX = re.compile(r"^(model\.layers|mtp\.layers)\.(\d+)\.(.+)$")
CANONICAL_LAYER_PREFIX = {"model.layers": "layers", "mtp.layers": "mtp.layers"}


def read_layer_types(hf: Mapping) -> tuple[str, ...]:
    """`layer_types`, or the older `full_attention_interval` spelling (every interval-th layer full attention)."""
    layer_types = hf.get("layer_types")
    if layer_types is None:
        interval = hf.get("full_attention_interval", 4)
        layer_types = ["linear_attention" if (i + 1) % interval else "full_attention"
                       for i in range(hf["num_hidden_layers"])]
    return tuple(layer_types)


def copy_fields(hf: Mapping, fields: tuple[str, ...]) -> dict:
    """The config.json fields that ModelConfig takes under the same name (None and absent ones left out)."""
    kw = {k: hf[k] for k in fields if k in hf and hf[k] is not None}
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = tuple(kw["eos_token_id"])
    kw.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    return kw


# ---- the table and the loop ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """One checkpoint family as data (see the module docstring). `name` is recorded in the IR (config.family)."""

    name: str
    architectures: tuple[str, ...]
    read_config: Callable[[dict], ModelConfig]
    layer_map: LayerMap
    global_map: dict[str, str] = field(default_factory=lambda: dict(COMMON_GLOBAL_MAP))
    prefixes: dict[str, str] = field(default_factory=dict)  # stored key prefix -> prefix the maps are written for
    dropped: dict[str, str] = field(default_factory=lambda: dict(COMMON_DROPPED))  # key regex -> reason

    def config(self, hf: dict) -> ModelConfig:
        """The ModelConfig of a config.json of this family, the family recorded."""
        return dataclasses.replace(self.read_config(hf), family=self.name)

    def canonical_key(self, key: str) -> str:
        for old, new in self.prefixes.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key

    def drop_reason(self, key: str) -> str | None:
        return next((why for rx, why in self.dropped.items() if re.fullmatch(rx, key)), None)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make `family` the reader of each of its architectures."""
    FAMILIES[family.name] = family
    for arch in family.architectures:
        register_reader(arch)(lambda ckpt, family=family: read_family(family, ckpt))
    return family


def _source(st: StoredTensor, shape: tuple[int, ...], transform: Callable | None = None) -> SourceTensor:
    """A stored tensor read on demand; without a transform it can also be read a few rows at a time. A quantized
    module's merged parts (convert/quant_source.py: FP8, compressed-tensors) become a quantized tensor with the
    same transform."""
    if isinstance(st, QuantizedStored):
        return st.source(shape, transform)
    rows = None if transform is not None else (lambda start, stop: st.rows(start, stop).read())
    return SourceTensor(st.read, tuple(shape), DTYPES[st.dtype], transform, f"{st.path}:{st.key}", rows)


def _expert_slice(st: StoredTensor, e: int) -> StoredTensor:
    """Expert e of a fused [E, ...] tensor, as a byte range (reads only that expert)."""
    return dataclasses.replace(st.rows(e, e + 1), key=f"{st.key}[{e}]", shape=st.shape[1:])


def _layer_sources(config: ModelConfig, layer_map: LayerMap, suffix: str,
                   st: StoredTensor) -> dict[str, SourceTensor] | None:
    """Canonical tensors (relative to the layer) made from one stored layer tensor; None for an unknown suffix."""
    if (em := EXPERT_KEY.fullmatch(suffix)) is not None:
        return {f"ffn.experts.{em[1]}.{em[2]}.weight": _source(st, st.shape)}
    if suffix in FUSED_EXPERTS:
        parts, out = FUSED_EXPERTS[suffix], {}
        for e in range(st.shape[0]):
            sub = _expert_slice(st, e)
            rows = sub.shape[0] // len(parts)
            for j, part in enumerate(parts):
                out[f"ffn.experts.{e}.{part}.weight"] = _source(
                    sub, (rows, sub.shape[1]), lambda t, j=j, rows=rows: t[j * rows:(j + 1) * rows].contiguous())
        return out
    target = layer_map.get(suffix)
    if target is None:
        return None
    if isinstance(target, str):
        return {target: _source(st, st.shape)}
    base, split = target
    return {base + (f"{part}.weight" if part else ""): _source(st, shape, fn)
            for part, (shape, fn) in split(config, st).items()}


def read_family(family: Family, ckpt: HFCheckpoint) -> Graph:
    """The canonical graph of `ckpt` read through `family`'s table (lazy: no tensor data is loaded).

    The graph's provenance gets `dropped`: {reason: number of stored tensors dropped for it}.
    """
    config = family.config(ckpt.config)
    tensors: dict[str, SourceTensor] = {}
    unknown: list[str] = []
    dropped: dict[str, int] = {}

    def put(name: str, src: SourceTensor):
        if name in tensors:
            raise CheckpointError(f"{name}: produced twice (second time from {src.origin})")
        tensors[name] = src

    for stored_key, st in ckpt.tensors.items():
        key = family.canonical_key(stored_key)
        if key in family.global_map:
            put(family.global_map[key], _source(st, st.shape))
            continue
        if (why := family.drop_reason(key)) is not None:
            dropped[why] = dropped.get(why, 0) + 1
            continue
        m = LAYER_PREFIX.match(key)
        made = None if m is None else _layer_sources(config, family.layer_map, m[3], st)
        if made is None:
            unknown.append(stored_key)
            continue
        prefix = f"{CANONICAL_LAYER_PREFIX[m[1]]}.{m[2]}."
        for name, src in made.items():
            put(prefix + name, src)
    if unknown:
        unknown.sort()
        raise CheckpointError(
            f"unknown tensors in checkpoint ({len(unknown)}): {', '.join(unknown[:8])}"
            + (f", ... (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        )
    stored = len({k.split(".")[2] for k in tensors if k.startswith("mtp.layers.")})
    if (config.mtp_num_hidden_layers == 0) != (stored == 0):
        # Qwen3-Next checkpoints on the Hub carry mtp.* without declaring it in config.json; transformers'
        # save_pretrained drops mtp.* (it ignores them on load) but keeps a declared mtp_num_hidden_layers.
        config = dataclasses.replace(config, mtp_num_hidden_layers=stored)
    return Graph(config, tensors, provenance={"dropped": dropped} if dropped else {})


def refuse_fields(hf: Mapping, refused: Mapping[str, Callable[[object], bool]], where: str = "config") -> None:
    """One clear error for the first config field whose value nextq does not implement (`refused`: field ->
    predicate true for unsupported values)."""
    for name, bad in refused.items():
        if name in hf and bad(hf[name]):
            raise UnsupportedModelError(f"{where}: {name}={hf[name]!r} is not implemented by nextq")


__all__ = ["COMMON_DROPPED", "COMMON_GLOBAL_MAP", "COMMON_LAYER_MAP", "FAMILIES", "Family", "Split", "copy_fields",
           "grouped_rows", "q_gate", "read_family", "read_layer_types", "refuse_fields", "register_family",
           "squeeze_conv"]
