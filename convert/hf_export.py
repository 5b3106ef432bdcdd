"""`nextq export hf IR -o DIR`: the IR back in its family's Hugging Face layout, for transformers, vLLM and SGLang.

The writer is the reader's table (convert/family.py) run backwards, so it knows no layout of its own:
- a key the table maps one to one is written under its stored name;
- a split (grouped `in_proj_qkvz` / `in_proj_ba`, `q_proj` interleaved with the output gate) is inverted by probing
  it: the split's own row selection, run on a column of row numbers, says which stored row each canonical row came
  from, and the stored tensor is those rows put back in place (a split that is not a row selection is refused);
  the conv kernel's reshape gets back its Conv1d shape `[C, 1, K]`;
- experts are written one by one (`mlp.experts.{e}.{gate,up,down}_proj`), the layout every family here reads and
  compressed-tensors quantizes per expert; Qwen3.5 goes out as its text-only `*ForCausalLM` class (the vision tower
  was dropped by the reader).
An unquantized IR gives back the source checkpoint tensor for tensor (same names, dtypes and bytes); config.json is
the source's (kept in the IR) with the fields nextq knows set from the IR's config.

Quantized weights keep their codes and scales, nothing is re-quantized:
    int4_sym_g{G}, int8_g32, int8_channel  compressed-tensors `pack-quantized` (W4A16 / W8A16): `weight_packed`
        int32 [N, K*bits/32] (nextq's int4 bytes are already its nibble order, low nibble first: q - 8 is the signed
        code; int8 codes + 128), `weight_scale` [N, K/G] (float32: nextq's fp16 scales exactly),
        `weight_shape` [2]; the scheme covering the routed experts targets `Linear` (vLLM's MoE loader reads that
        one) and the experts by a regex (transformers' MoE loader looks for one), any other scheme names its
        modules and comes first (compressed-tensors matches targets in order); float modules are in `ignore`.
    fp8_block128 (alone)  Qwen's own FP8 layout: e4m3 `weight` + `weight_scale_inv` [ceil(N/128), ceil(K/128)],
        `quantization_config` {quant_method fp8, fmt e4m3, weight_block_size [128, 128], activation_scheme dynamic,
        modules_to_not_convert}, which vLLM's FP8 loader and nextq's own FP8 reader take.
    fp8_block128 beside integer schemes  a compressed-tensors `float-quantized` group (weight + weight_scale tiles).
Refused, naming the tensor: schemes without such a form (zero-point int4 = GGUF Q4_1, K-quants, 5-bit blocks,
parts of one stored tensor in different schemes, fp8 scales that do not make whole 128x128 tiles of the stored
tensor (per-row fp8 scales of an FP8 source, where its tiles straddled two canonical tensors, become tiles again).
Modules the serving engines need unquantized (the router `mlp.gate`, `mlp.shared_expert_gate`, and with
`--tensor-parallel N` >= 2 `in_proj_ba`, whose 2·Hv rows are sharded too thin) and embeddings (compressed-tensors
quantizes Linear layers only) are written dequantized, exactly, with a note.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from nextq.console import console, progress_iter
from nextq.errors import UnsupportedModelError
from nextq.graph import MTP, Graph, Layer, ModelConfig, atomic_output_dir, shape_of
from nextq.quant import QuantizedTensor
from nextq.storage import ShardWriter

from .family import CANONICAL_LAYER_PREFIX, FAMILIES, Family

CT_GROUP_SCHEMES = {"int4_sym": 4, "int8_g32": 8}  # scheme name prefix -> bits (pack-quantized, group strategy)
CT_CHANNEL_SCHEMES = {"int8_channel": 8}
FP8 = "fp8_block128"
FP8_ROWS = "fp8_g128"  # one scale per row and 128 columns: what FP8 sources become where tiles straddle
FP8_SCHEMES = (FP8, FP8_ROWS)
FP8_TILE = 128
ALWAYS_FLOAT = (r".*\.mlp\.gate", r".*\.mlp\.shared_expert_gate")  # ReplicatedLinear(quant_config=None) in vLLM
BA = r".*\.linear_attn\.in_proj_ba"
# the experts' group names them too: transformers takes the group whose `re:` target mentions experts for them
EXPERTS_TARGET = r"re:.*\.mlp\.experts\..*"
# stored keys of the mixer a layer does NOT have (both have a canonical `mixer.k`, `mixer.v`)
OTHER_MIXER = {"GatedDeltaNet": "self_attn.", "GatedAttention": "linear_attn."}


@dataclass
class StoredPlan:
    """One tensor to write: its stored key, the canonical tensors it is made of, and how.

    order: stored row i = concat(parts)[order[i]] (None: one part, written as is); shape: the stored shape when it
    differs from the canonical one (the conv kernel)."""

    key: str
    parts: list[str]
    order: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None


@dataclass
class ExportReport:
    """What the writer did: the quantization config written, dequantized modules and why."""

    quantization: dict[str, Any] | None = None
    dequantized: dict[str, str] = field(default_factory=dict)  # module -> reason


# ---- the inverse of the reader's table ------------------------------------------------------------------------


class _Probe:
    """A stand-in StoredTensor for running a split on shapes alone."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape, self.key = shape, "probe"


def _invert_split(family: Family, graph: Graph, key: str, base: str, split) -> StoredPlan | None:
    """The stored tensor `key` that split `split` made canonical tensors under `base` from (None: not in this IR)."""
    c = graph.config
    probe = split(c, _Probe((0, 1)))  # part -> (canonical shape, transform); grouped splits need the width only
    names = {part: base + (f"{part}.weight" if part else "") for part in probe}
    if not all(n in graph.tensors for n in names.values()):
        return None
    if list(probe) == [""]:  # a reshape: the depthwise conv kernel [C, K] comes from Conv1d's [C, 1, K]
        canonical = shape_of(graph.tensors[names[""]])
        return StoredPlan(key, [names[""]], shape=(canonical[0], 1, canonical[1]))
    rows = sum(shape[0] for shape, _ in probe.values())
    index = torch.arange(rows).reshape(rows, 1)
    chosen = []
    for part, (shape, take) in split(c, _Probe((rows, 1))).items():
        got = take(index)
        if tuple(got.shape) != (shape[0], 1):
            raise UnsupportedModelError(f"{key}: the reader's split into {names[part]} is not a row selection; "
                                        "cannot write it back")
        chosen.append(got[:, 0])
    source_rows = torch.cat(chosen)  # canonical row j (parts concatenated) came from stored row source_rows[j]
    if not torch.equal(source_rows.sort().values, torch.arange(rows)):
        raise UnsupportedModelError(f"{key}: the reader's split does not use every stored row exactly once")
    return StoredPlan(key, list(names.values()), order=source_rows.argsort())


def plan_tensors(graph: Graph, family: Family) -> list[StoredPlan]:
    """Every stored tensor of the HF layout, in the reader's key order; every canonical tensor used exactly once."""
    plans: list[StoredPlan] = []
    inverse_global = {v: k for k, v in family.global_map.items()}
    for name in ("embed.weight",):
        plans.append(StoredPlan(inverse_global[name], [name]))
    layers = [b for b in graph.blocks if isinstance(b, Layer)]
    layers += [layer for b in graph.blocks if isinstance(b, MTP) for layer in b.layers]
    stored_prefix = {v: k for k, v in CANONICAL_LAYER_PREFIX.items()}
    for layer in layers:
        prefix = layer.prefix + "."
        head, index = layer.prefix.rsplit(".", 1)
        hf = f"{stored_prefix[head]}.{index}."
        other = OTHER_MIXER[layer.mixer.kind]  # both mixers have a `mixer.k`: only this layer's mixer's keys
        for suffix, target in family.layer_map.items():
            if suffix.startswith(other):
                continue
            if isinstance(target, str):
                if prefix + target in graph.tensors:
                    plans.append(StoredPlan(hf + suffix, [prefix + target]))
            elif (p := _invert_split(family, graph, hf + suffix, prefix + target[0], target[1])) is not None:
                plans.append(p)
        experts = sorted({int(m[1]) for n in graph.tensors
                          if (m := re.fullmatch(re.escape(prefix) + r"ffn\.experts\.(\d+)\.gate\.weight", n))})
        for e in experts:
            for part in ("gate", "up", "down"):
                plans.append(StoredPlan(f"{hf}mlp.experts.{e}.{part}_proj.weight",
                                        [f"{prefix}ffn.experts.{e}.{part}.weight"]))
    for name, key in inverse_global.items():
        if name != "embed.weight" and name in graph.tensors:
            plans.append(StoredPlan(key, [name]))
    used = Counter(n for p in plans for n in p.parts)
    missing = sorted(set(graph.tensors) - set(used))
    twice = sorted(n for n, k in used.items() if k > 1)
    if missing or twice:
        raise UnsupportedModelError(f"{family.name}: the reader's table does not write back "
                                    f"{missing[:4] or twice[:4]} ({'unmapped' if missing else 'used twice'})")
    return plans


# ---- quantized forms ---------------------------------------------------------------------------------------------


def _form(scheme: str) -> tuple[str, int] | None:
    """(compressed-tensors strategy, bits) of an integer scheme, ("fp8", 8) for fp8 tiles, None for a float one."""
    for prefix, bits in CT_GROUP_SCHEMES.items():
        if scheme.startswith(prefix):
            return "group", bits
    if scheme in CT_CHANNEL_SCHEMES:
        return "channel", CT_CHANNEL_SCHEMES[scheme]
    if scheme in FP8_SCHEMES:
        return "fp8", 8
    if scheme in ("bf16", "f16", "f32"):
        return None
    raise UnsupportedModelError(f"scheme {scheme!r} has no compressed-tensors or Qwen FP8 form (supported: "
                                f"int4_sym_g*, int8_g32, int8_channel, {FP8}, float); export GGUF or ONNX instead")


def pack_codes(qt: QuantizedTensor) -> torch.Tensor:
    """compressed-tensors `weight_packed` int32 [N, K*bits/32] from nextq's codes (no arithmetic on the values).

    int4: nextq's bytes hold k = 2j in the low nibble and 2j+1 in the high one, code = signed value + 8, which read
    as little-endian int32 is exactly `pack_to_int32` (element i of each word at bit 4i, offset 8). int8: signed
    codes + 128 as bytes, four to a word."""
    if qt.scheme.startswith("int4_sym"):
        data = qt.data.contiguous()
    else:
        data = (qt.data.to(torch.int16) + 128).to(torch.uint8)
    assert data.shape[1] % 4 == 0, data.shape
    return data.view(torch.int32)


def _join(parts: list[Any], plan: StoredPlan, where: str) -> Any:
    """The stored tensor of `plan` from its canonical parts (dense, or quantized field by field)."""
    if plan.order is None:
        t = parts[0]
        if isinstance(t, QuantizedTensor):
            return _as_tiles(t, where) if t.scheme in FP8_SCHEMES else t
        return t.reshape(plan.shape) if plan.shape is not None else t
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)[plan.order]
    schemes = {p.scheme if isinstance(p, QuantizedTensor) else str(p.dtype) for p in parts}
    if len(schemes) != 1 and not schemes <= set(FP8_SCHEMES):
        raise UnsupportedModelError(f"{where}: its parts {plan.parts} are stored as {sorted(schemes)}; one stored "
                                    "tensor takes one scheme")
    first, n = parts[0], plan.order.numel()
    if first.scheme in FP8_SCHEMES:
        rows = torch.cat([_row_scales(p) for p in parts])[plan.order]
        qt = QuantizedTensor(FP8_ROWS, (n, first.shape[1]), torch.cat([p.data for p in parts])[plan.order], rows,
                             block_size=(1, FP8_TILE))
        return _as_tiles(qt, where)
    zeros = torch.cat([p.zero_points for p in parts])[plan.order] if first.zero_points is not None else None
    return QuantizedTensor(first.scheme, (n, first.shape[1]), torch.cat([p.data for p in parts])[plan.order],
                           torch.cat([p.scales for p in parts])[plan.order], zeros, first.block_size,
                           first.nibble_order)


def _row_scales(qt: QuantizedTensor) -> torch.Tensor:
    """An fp8 tensor's scales as one row per weight row, float32 [N, ceil(K/128)]."""
    if qt.scheme == FP8_ROWS:
        return qt.scales
    return qt.scales.repeat_interleave(FP8_TILE, dim=0)[:qt.shape[0]]


def _as_tiles(qt: QuantizedTensor, where: str) -> QuantizedTensor:
    """An fp8 tensor as 128x128 tiles, the only fp8 layout the engines load: per-row scales (FP8 sources whose
    tiles straddled two canonical tensors, or a fused tensor put back together) collapse to tiles when each 128-row
    block's rows share their scales, which is the case for anything that came from tiles; otherwise refused."""
    if qt.scheme == FP8:
        return qt
    rows = _row_scales(qt)
    tiles = rows[::FP8_TILE]
    if not torch.equal(rows, tiles.repeat_interleave(FP8_TILE, dim=0)[:qt.shape[0]]):
        raise UnsupportedModelError(f"{where}: fp8 scales differ inside a 128-row block (scheme {qt.scheme}, or "
                                    "tiles cut by a fused tensor): no 128x128-tile form; quantize it with another "
                                    "scheme or keep it in float")
    return QuantizedTensor(FP8, qt.shape, qt.data, tiles.contiguous(), block_size=(FP8_TILE, FP8_TILE))


def _module(key: str) -> str:
    return key.removesuffix(".weight")


def _stored(key: str, t: Any, ct: bool) -> dict[str, torch.Tensor]:
    """The safetensors entries of one stored weight (dense, compressed-tensors, or Qwen FP8)."""
    if isinstance(t, torch.Tensor):
        return {key: t}
    m = _module(key)
    form = _form(t.scheme)
    if form is None:
        return {key: t.data}
    if form[0] == "fp8":
        return {f"{m}.weight": t.data, f"{m}.weight_scale" if ct else f"{m}.weight_scale_inv": t.scales}
    # float32 scales, exact copies of nextq's fp16 ones: compressed-tensors decompresses in the scale's dtype, and
    # an fp16 weight would then run the experts in fp16 (transformers); engines cast scales to their own dtype
    return {f"{m}.weight_packed": pack_codes(t), f"{m}.weight_scale": t.scales.to(torch.float32),
            f"{m}.weight_shape": torch.tensor(t.shape, dtype=torch.int64)}


# ---- config -------------------------------------------------------------------------------------------------------


def hf_config(graph: Graph, family: Family) -> dict[str, Any]:
    """config.json: the source's (kept in the IR), the fields nextq reads set from the IR's config, text-only."""
    src = graph.assets.get("source_config.json")
    doc = json.loads(Path(src).read_text()) if src else {}
    doc = {**doc.pop("text_config", {}), **{k: v for k, v in doc.items() if k not in ("vision_config",)}}
    for k in [k for k in doc if k.endswith("token_id") and k.startswith(("image", "video", "vision"))]:
        del doc[k]
    c = graph.config.to_json()
    for k in ("family", "rope_scaling", "rope_theta", "partial_rotary_factor", "mrope_section"):
        c.pop(k, None)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    doc.update({k: list(v) if isinstance(v, tuple) else v for k, v in c.items()
                if v is not None and (k in doc or v != defaults[k])})  # the source's keys, and what differs
    if family.name != "qwen3_next":  # Qwen3.5's configs have no dense-layer knobs
        for k in ("mlp_only_layers", "decoder_sparse_step", "norm_topk_prob"):
            doc.pop(k, None)
    rope = dict(doc.get("rope_parameters") or {})
    rope.update({"rope_theta": graph.config.rope_theta, "partial_rotary_factor": graph.config.partial_rotary_factor})
    rs = graph.config.rope_scaling
    if rs is not None:
        rope.update({k: v for k, v in rs.to_json().items() if v is not None})
    else:
        rope.setdefault("rope_type", "default")
    if graph.config.mrope_section:
        rope["mrope_section"] = list(graph.config.mrope_section)
    doc["rope_parameters"] = rope
    doc.pop("rope_scaling", None)
    arch, model_type = text_class(family)
    doc["architectures"], doc["model_type"] = [arch], model_type
    doc.pop("quantization_config", None)
    return doc


def _ct_args(scheme: str) -> dict[str, Any]:
    strategy, bits = _form(scheme)
    if strategy == "fp8":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                   "block_structure": [FP8_TILE, FP8_TILE], "dynamic": False}
        return {"weights": weights, "input_activations": None, "output_activations": None, "format": "float-quantized"}
    group = int(re.search(r"g(\d+)", scheme)[1]) if strategy == "group" else None
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group,
               "dynamic": False, "actorder": None, "observer": "minmax"}
    return {"weights": weights, "input_activations": None, "output_activations": None, "format": "pack-quantized"}


def quantization_config(modules: dict[str, str], floats: list[str]) -> dict[str, Any] | None:
    """`quantization_config` for quantized `modules` (name -> scheme) and the Linear / Embedding modules left in
    `floats` (`ignore`, `modules_to_not_convert`)."""
    if not modules:
        return None
    schemes = Counter(modules.values())
    if set(schemes) == {FP8}:  # Qwen's own FP8 layout
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [FP8_TILE, FP8_TILE], "modules_to_not_convert": sorted(floats)}
    experts = Counter(s for m, s in modules.items() if ".mlp.experts." in m)
    main = (experts or schemes).most_common(1)[0][0]  # the routed experts' scheme targets Linear (vLLM's MoE path)
    groups = {}
    # the groups naming their modules first: compressed-tensors matches a module against the targets in order
    for i, s in enumerate(sorted(schemes, key=lambda s: s == main)):
        if s == main:
            targets = ["Linear", *([EXPERTS_TARGET] if experts else [])]
        else:
            targets = sorted(m for m, ms in modules.items() if ms == s)
        groups[f"group_{i}"] = {"targets": targets, **_ct_args(s)}
    formats = {g["format"] for g in groups.values()}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": groups, "ignore": sorted(floats),
            "kv_cache_scheme": None}


# ---- the writer --------------------------------------------------------------------------------------------------


def family_of(graph: Graph) -> Family:
    from . import qwen3_5, qwen3_next  # noqa: F401  (register the families)

    name = graph.config.family
    if name not in FAMILIES:
        raise UnsupportedModelError(f"config.family={name!r}: no Hugging Face writer; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def text_class(family: Family) -> tuple[str, str]:
    """(architecture, model_type) of the family's text-only transformers class: what the export is loaded as."""
    import transformers

    arch = next(a for a in family.architectures if a.endswith("ForCausalLM"))
    return arch, getattr(transformers, arch).config_class.model_type


def scheme_of(t: Any) -> str | None:
    """A graph entry's quantization scheme without loading it (IR reference, source, or loaded tensor)."""
    meta = getattr(t, "meta", None)
    return meta["scheme"] if isinstance(meta, dict) else getattr(t, "scheme", None)


def _is_matrix(key: str, shape: tuple[int, ...]) -> bool:
    """Whether a stored weight is an nn.Linear's or an nn.Embedding's (listed as a module when left in float)."""
    return key.endswith(".weight") and len(shape) == 2 and "norm" not in key


def export_hf(graph: Graph, out: str | Path, *, tensor_parallel: int = 1, force: bool = False,
              progress: bool = True) -> ExportReport:
    """Write `graph` as a Hugging Face checkpoint directory `out` (see the module docstring); returns what was done.

    Memory: one stored tensor at a time (a fused tensor's parts together) plus one shard's write buffer."""
    family = family_of(graph)
    plans = plan_tensors(graph, family)
    schemes = {s for t in graph.tensors.values() if (s := scheme_of(t)) is not None}
    for s in sorted(schemes):
        _form(s)  # refuse schemes without a form before writing anything
    ct = bool(schemes - {*FP8_SCHEMES, "bf16", "f16", "f32"})  # compressed-tensors, else Qwen's FP8 layout (or none)
    report = ExportReport()
    keep_float = [*ALWAYS_FLOAT, *([BA] if tensor_parallel >= 2 else [])]
    config = hf_config(graph, family)
    modules: dict[str, str] = {}
    floats: list[str] = []
    out = Path(out)
    with atomic_output_dir(out, force) as tmp:
        writer = ShardWriter(tmp, shard_bytes=4 << 30)
        for plan in progress_iter(plans, "export hf") if progress else plans:
            t = _join([graph.get(n) for n in plan.parts], plan, plan.key)
            module = _module(plan.key)
            if isinstance(t, QuantizedTensor) and _form(t.scheme) is None:
                t = t.data  # float pass-through scheme
            if isinstance(t, QuantizedTensor):
                why = ("the serving engines need it unquantized" if any(re.fullmatch(rx, module) for rx in keep_float)
                       else "the checkpoint formats quantize Linear layers only"
                       if "embed_tokens" in plan.key or not _is_matrix(plan.key, t.shape) else None)
                if why:
                    report.dequantized[module] = why
                    t = t.dequantize()  # float32: q * scale is exact there, not always in bf16
                else:
                    modules[module] = t.scheme
            if isinstance(t, torch.Tensor) and _is_matrix(plan.key, tuple(t.shape)):
                floats.append(module)
            writer.add(plan.key, _stored(plan.key, t, ct))
        writer.flush()
        report.quantization = quantization_config(modules, floats)
        if report.quantization:
            config["quantization_config"] = report.quantization
        _finish_shards(tmp, writer)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for fname, src in graph.assets.items():
            if fname != "source_config.json":
                (tmp / fname).write_bytes(Path(src).read_bytes())
    for module, why in report.dequantized.items():
        console.print(f"note: {module} written dequantized (exact values): {why}", soft_wrap=True)
    return report


def _finish_shards(tmp: Path, writer: ShardWriter) -> None:
    """Rename the shards to the Hub's `model-0000i-of-0000n.safetensors` and write the index of every stored key."""
    from safetensors import safe_open

    n = len(writer.shards)
    weight_map, total = {}, 0
    for i, old in enumerate(writer.shards, 1):
        new = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / old, tmp / new)
        with safe_open(tmp / new, "pt") as f:
            for k in f.keys():
                weight_map[k] = new
        total += (tmp / new).stat().st_size
    if n > 1:
        doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(doc, indent=2) + "\n")


@click.command("hf")
@click.argument("ir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output checkpoint directory.")
@click.option("--tensor-parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Tensor-parallel size the checkpoint is served with: from 2 on, in_proj_ba stays unquantized.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def hf_cmd(ir: Path, output: Path, tensor_parallel: int, force: bool) -> None:
    """Export an IR as a Hugging Face checkpoint (compressed-tensors / Qwen FP8 for quantized IRs)."""
    report = export_hf(Graph.load(ir), output, tensor_parallel=tensor_parallel, force=force)
    q = report.quantization
    kind = "unquantized" if q is None else q["quant_method"] + (f" ({q['format']})" if "format" in q else "")
    console.print(f"wrote {output}: {kind}")
