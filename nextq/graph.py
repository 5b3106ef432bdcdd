"""The canonical graph (IR): typed blocks, a frozen config, lazy tensors, and its on-disk form.

Canonical means mathematically explicit and family-neutral (readers translate a family's quirks into it):
- Gated DeltaNet: separate q/k/v/z/b/a projections in flat head order (value head j of key head g is flat head
  g * Hv/Hk + j), the depthwise conv weight squeezed to [C, kernel] over concat(q, k, v) channels.
- Gated attention: separate query and output-gate projections `q`, `gate` [Hq * D, H].
- Experts one by one: `layers.7.ffn.experts.311.down`.
- Norms keep their stored values; each norm tensor records its `norm_offset`: the effective scale is
  `offset + w` (1.0 for Qwen3-Next's zero-centred RMSNorms, 0.0 for the gated norm of the delta rule).

On disk an IR directory holds `graph.json` (config, blocks, tensor index, provenance) and safetensors shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import CheckpointError, OutputExistsError, UnsupportedModelError
from .storage import DTYPE_NAMES, DTYPES, StoredTensor, read_header
from .untrusted import (check_values, coerce_json_fields, need, need_fields, need_int, need_shape, read_json,
                        resolve_inside)

IR_FORMAT = "nextq-ir"
IR_VERSION = 1
LAYER_TYPES = ("linear_attention", "full_attention")
# ModelConfig integers that must be >= 1 (every other integer is >= 0, token ids aside)
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "max_position_embeddings", "linear_num_key_heads", "linear_num_value_heads",
                   "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "intermediate_size",
                   "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step")
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
MAX_EXPERTS_TOTAL = 1 << 18  # experts over all layers: the 80B model has 512 x 49; bounds the tensor index
# dtype names graph.json may give a dense tensor (torch's names) -> torch dtype; nothing else is looked up
IR_DTYPES: dict[str, torch.dtype] = {str(dt).removeprefix("torch."): dt for dt in DTYPES.values()}
IR_KEYS = ("format", "version", "config", "tensors")
IR_OPTIONAL_KEYS = ("blocks", "assets", "provenance")
IR_ENTRY_KEYS = ("shape", "shard")
IR_ENTRY_OPTIONAL_KEYS = ("dtype", "quant", "norm_offset")


ROPE_SCALING_TYPES = ("yarn",)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling for contexts past the trained length (Hugging Face `rope_parameters` / `rope_scaling` keys).

    Only YaRN today (runtime/rope.py has the math, transformers' `_compute_yarn_parameters`). Optional fields stay
    None when the source config does not set them: the defaults (beta_fast 32, beta_slow 1, attention factor
    0.1 ln(factor) + 1) are applied by the math, and exporters write only what the source stated, as llama.cpp's
    converter does.
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        check_values(self, "config: rope_scaling")
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise UnsupportedModelError(f"config: rope_type={self.rope_type!r}, supported: "
                                        f"['default', {', '.join(map(repr, ROPE_SCALING_TYPES))}]")
        if not self.factor >= 1.0:
            raise UnsupportedModelError(f"config: rope scaling factor={self.factor}, expected >= 1")
        if not self.original_max_position_embeddings > 0:
            raise UnsupportedModelError(f"config: original_max_position_embeddings="
                                        f"{self.original_max_position_embeddings}, expected > 0")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise UnsupportedModelError(f"config: attention_factor={self.attention_factor}, expected > 0")
        if (self.beta_fast or 32) < (self.beta_slow or 1):
            raise UnsupportedModelError(f"config: beta_fast={self.beta_fast} (default 32) must be >= "
                                        f"beta_slow={self.beta_slow} (default 1)")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Qwen3-Next-style hybrid model (Hugging Face field names)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    # gated attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    # M-RoPE rotary pairs per position axis (T, H, W), Qwen3.5; () for 1-D RoPE. Text positions are equal on
    # every axis, which makes M-RoPE exactly 1-D RoPE: only exporters whose target stores the sections read it.
    mrope_section: tuple[int, ...] = ()
    max_position_embeddings: int = 32768
    # gated delta net
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # feed-forward
    intermediate_size: int = 5632
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    # misc
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    mtp_num_hidden_layers: int = 0
    family: str = "qwen3_next"  # the checkpoint family read (convert/family.py); writers pick targets by it
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    rope_scaling: RopeScaling | None = None  # None: plain RoPE

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise UnsupportedModelError(f"config: {msg}")

        check_values(self, "config", positive=POSITIVE_FIELDS, signed=TOKEN_ID_FIELDS)
        need(self.num_experts * (self.num_hidden_layers + self.mtp_num_hidden_layers) <= MAX_EXPERTS_TOTAL,
             f"num_experts={self.num_experts} x {self.num_hidden_layers + self.mtp_num_hidden_layers} layers exceeds "
             f"{MAX_EXPERTS_TOTAL} experts in all")

        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries, expected num_hidden_layers={self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        need(not bad, f"layer_types {bad} unknown, supported: {list(LAYER_TYPES)}")
        need(self.linear_num_value_heads % self.linear_num_key_heads == 0,
             f"linear_num_value_heads={self.linear_num_value_heads} must be a multiple of "
             f"linear_num_key_heads={self.linear_num_key_heads}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} must be a multiple of "
             f"num_key_value_heads={self.num_key_value_heads}")
        need(self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
             f"rotary dim head_dim*partial_rotary_factor={self.rotary_dim} must be even and in (0, {self.head_dim}]")
        need(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r}, supported: ['silu']")
        need(self.num_experts_per_tok <= self.num_experts or not self.num_experts,
             f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sparse(self, i: int) -> bool:
        """Whether layer i uses the sparse MoE block (transformers' rule) rather than a dense MLP."""
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Any, where: str = "graph.json config") -> ModelConfig:
        """The config of a graph.json (untrusted): known fields only, required ones present, types checked."""
        d = coerce_json_fields(cls, d, where)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**coerce_json_fields(RopeScaling, d["rope_scaling"],
                                                                  f"{where}: rope_scaling"))
        return cls(**d)


# ---- typed blocks -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    norm_offset: float | None = None  # set for norm weights: effective scale = offset + w


def _norm(dim: int, offset: float = 1.0) -> TensorSpec:
    return TensorSpec((dim,), offset)


@dataclass(frozen=True)
class Block:
    """A typed block; `specs` lists its tensors by canonical name relative to `prefix`."""

    prefix: str

    kind = "Block"

    def specs(self, c: ModelConfig) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def tensor_specs(self, c: ModelConfig) -> dict[str, TensorSpec]:
        return {f"{self.prefix}.{k}": v for k, v in self.specs(c).items()}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "prefix": self.prefix}


@dataclass(frozen=True)
class Embedding(Block):
    kind = "Embedding"

    def specs(self, c):
        return {"weight": TensorSpec((c.vocab_size, c.hidden_size))}


@dataclass(frozen=True)
class GatedDeltaNet(Block):
    kind = "GatedDeltaNet"

    def specs(self, c):
        h, hk, hv, dk, dv = (c.hidden_size, c.linear_num_key_heads, c.linear_num_value_heads,
                             c.linear_key_head_dim, c.linear_value_head_dim)
        return {
            "q.weight": TensorSpec((hk * dk, h)),
            "k.weight": TensorSpec((hk * dk, h)),
            "v.weight": TensorSpec((hv * dv, h)),
            "z.weight": TensorSpec((hv * dv, h)),
            "b.weight": TensorSpec((hv, h)),
            "a.weight": TensorSpec((hv, h)),
            "conv.weight": TensorSpec((2 * hk * dk + hv * dv, c.linear_conv_kernel_dim)),
            "A_log": TensorSpec((hv,)),
            "dt_bias": TensorSpec((hv,)),
            "norm.weight": _norm(dv, 0.0),
            "out.weight": TensorSpec((h, hv * dv)),
        }


@dataclass(frozen=True)
class GatedAttention(Block):
    kind = "GatedAttention"

    def specs(self, c):
        h, hq, hkv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        return {
            "q.weight": TensorSpec((hq * d, h)),
            "gate.weight": TensorSpec((hq * d, h)),
            "k.weight": TensorSpec((hkv * d, h)),
            "v.weight": TensorSpec((hkv * d, h)),
            "o.weight": TensorSpec((h, hq * d)),
            "q_norm.weight": _norm(d),
            "k_norm.weight": _norm(d),
        }


def _mlp_specs(prefix: str, h: int, i: int) -> dict[str, TensorSpec]:
    return {
        f"{prefix}gate.weight": TensorSpec((i, h)),
        f"{prefix}up.weight": TensorSpec((i, h)),
        f"{prefix}down.weight": TensorSpec((h, i)),
    }


@dataclass(frozen=True)
class DenseMLP(Block):
    kind = "DenseMLP"

    def specs(self, c):
        return _mlp_specs("", c.hidden_size, c.intermediate_size)


@dataclass(frozen=True)
class SparseMoE(Block):
    kind = "SparseMoE"

    def specs(self, c):
        h = c.hidden_size
        out = {"router.weight": TensorSpec((c.num_experts, h))}
        for e in range(c.num_experts):
            out.update(_mlp_specs(f"experts.{e}.", h, c.moe_intermediate_size))
        out.update(_mlp_specs("shared.", h, c.shared_expert_intermediate_size))
        out["shared_gate.weight"] = TensorSpec((1, h))
        return out


@dataclass(frozen=True)
class Layer(Block):
    """One decoder layer: pre-norm -> mixer -> residual -> pre-norm -> ffn -> residual."""

    index: int = 0
    mixer: Block = field(default=None)  # GatedDeltaNet | GatedAttention
    ffn: Block = field(default=None)  # SparseMoE | DenseMLP

    kind = "Layer"

    def specs(self, c):
        out = {"input_norm.weight": _norm(c.hidden_size), "post_norm.weight": _norm(c.hidden_size)}
        for sub in (self.mixer, self.ffn):
            out.update({k[len(self.prefix) + 1:]: v for k, v in sub.tensor_specs(c).items()})
        return out

    def to_json(self):
        return {**super().to_json(), "index": self.index, "mixer": self.mixer.kind, "ffn": self.ffn.kind}


@dataclass(frozen=True)
class FinalNorm(Block):
    kind = "FinalNorm"

    def specs(self, c):
        return {"weight": _norm(c.hidden_size)}


@dataclass(frozen=True)
class LMHead(Block):
    kind = "LMHead"

    def specs(self, c):
        return {} if c.tie_word_embeddings else {"weight": TensorSpec((c.vocab_size, c.hidden_size))}


@dataclass(frozen=True)
class MTP(Block):
    """Multi-token prediction: h' = fc(concat(embed_norm(embed(t+1)), hidden_norm(h_t))) -> layers -> norm."""

    layers: tuple[Layer, ...] = ()

    kind = "MTP"

    def specs(self, c):
        h = c.hidden_size
        out = {"fc.weight": TensorSpec((h, 2 * h)), "embed_norm.weight": _norm(h),
               "hidden_norm.weight": _norm(h), "norm.weight": _norm(h)}
        for layer in self.layers:
            out.update({k[len(self.prefix) + 1:]: v for k, v in layer.tensor_specs(c).items()})
        return out

    def to_json(self):
        return {**super().to_json(), "layers": len(self.layers)}


def make_layer(c: ModelConfig, i: int, prefix: str, layer_type: str, sparse: bool) -> Layer:
    mixer = (GatedDeltaNet if layer_type == "linear_attention" else GatedAttention)(f"{prefix}.mixer")
    ffn = (SparseMoE if sparse else DenseMLP)(f"{prefix}.ffn")
    return Layer(prefix, index=i, mixer=mixer, ffn=ffn)


def build_blocks(c: ModelConfig) -> list[Block]:
    """The model as an ordered list of typed blocks."""
    blocks: list[Block] = [Embedding("embed")]
    blocks += [make_layer(c, i, f"layers.{i}", t, c.is_sparse(i)) for i, t in enumerate(c.layer_types)]
    blocks += [FinalNorm("norm"), LMHead("lm_head")]
    if c.mtp_num_hidden_layers:
        mtp_layers = tuple(
            make_layer(c, j, f"mtp.layers.{j}", "full_attention", c.num_experts > 0)
            for j in range(c.mtp_num_hidden_layers)
        )
        blocks.append(MTP("mtp", layers=mtp_layers))
    return blocks


def expected_tensors(c: ModelConfig) -> dict[str, TensorSpec]:
    out: dict[str, TensorSpec] = {}
    for b in build_blocks(c):
        out.update(b.tensor_specs(c))
    return out


# ---- tensors ------------------------------------------------------------------------------------------------


class LazyTensor(Protocol):
    """Anything that can produce a tensor on demand and states its shape and dtype without loading."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class SourceTensor:
    """A tensor read on demand from a source file, with pending transforms (a reader's translation)."""

    read: Callable[[], torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    origin: str = ""  # "file:key" for error messages
    read_rows: Callable[[int, int], torch.Tensor] | None = None  # rows [start, stop) alone; None: whole reads only

    def load(self) -> torch.Tensor:
        t = self.read()
        if self.transform is not None:
            t = self.transform(t)
        return self._checked(t, self.shape)

    def load_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) `[stop - start, ...]`, reading only their bytes (sources with `read_rows`)."""
        if self.read_rows is None:
            raise CheckpointError(f"{self.origin}: this source is read whole, not by rows")
        return self._checked(self.read_rows(start, stop), (stop - start, *self.shape[1:]))

    def _checked(self, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{self.origin}: produced shape {tuple(t.shape)}, expected {shape}")
        return t


@dataclass(frozen=True)
class IRTensor:
    """A dense tensor in an IR shard, read with one positioned read of its byte range (checked at Graph.load)."""

    path: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stored: StoredTensor

    def load(self) -> torch.Tensor:
        return self.stored.read()


@dataclass
class Graph:
    """The canonical graph: config + typed blocks + a name -> tensor map (lazy, dense or quantized)."""

    config: ModelConfig
    tensors: dict[str, Any]  # LazyTensor | torch.Tensor | QuantizedTensor
    provenance: dict[str, Any] = field(default_factory=dict)
    assets: dict[str, Path] = field(default_factory=dict)  # tokenizer & template files carried along

    @property
    def blocks(self) -> list[Block]:
        return build_blocks(self.config)

    def check(self) -> None:
        """Every expected tensor present with its shape, nothing extra; else one error listing them all."""
        expected = expected_tensors(self.config)
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        wrong = [f"{k}: expected {list(expected[k].shape)}, got {list(shape_of(self.tensors[k]))}"
                 for k in expected if k in self.tensors and tuple(shape_of(self.tensors[k])) != expected[k].shape]
        problems = []
        if missing:
            problems.append(f"missing tensors ({len(missing)}): {_abbrev(missing)}")
        if extra:
            problems.append(f"unexpected tensors ({len(extra)}): {_abbrev(extra)}")
        if wrong:
            problems.append(f"wrong shapes ({len(wrong)}): {_abbrev(wrong)}")
        if problems:
            raise CheckpointError("; ".join(problems))

    def get(self, name: str) -> Any:
        """The tensor `name` materialised: a torch.Tensor, or a QuantizedTensor for quantized weights."""
        t = self.tensors[name]
        return t.load() if hasattr(t, "load") else t

    def norm_offset(self, name: str) -> float | None:
        return expected_tensors(self.config)[name].norm_offset

    def save(self, out: str | Path, *, force: bool = False, progress: Callable[[Iterator], Iterator] | None = None,
             cast: Callable[[str, torch.Tensor], Any] | None = None) -> Path:
        """Write the IR directory atomically (temporary sibling, renamed at the end).

        `cast(name, tensor)` may turn each dense tensor into another dtype or a QuantizedTensor on the way out.
        """
        from .storage import ShardWriter

        self.check()
        out = Path(out)
        with atomic_output_dir(out, force) as tmp:
            writer = ShardWriter(tmp)
            index: dict[str, dict[str, Any]] = {}
            specs = expected_tensors(self.config)
            names = list(self.tensors)
            for name in (progress(names) if progress else names):
                t = self.get(name)
                if cast is not None and isinstance(t, torch.Tensor):
                    t = cast(name, t)
                entry: dict[str, Any] = {"shape": list(shape_of(t))}
                if isinstance(t, torch.Tensor):
                    writer.add(name, {name: t})
                    entry["dtype"] = str(t.dtype).removeprefix("torch.")
                else:  # quantized
                    writer.add(name, t.to_tensors(name))
                    entry["quant"] = t.meta()
                if specs[name].norm_offset is not None:
                    entry["norm_offset"] = specs[name].norm_offset
                index[name] = entry
            writer.flush()
            for name, entry in index.items():
                entry["shard"] = writer.index[name]
            for fname, src in self.assets.items():
                shutil.copyfile(src, tmp / fname)
            doc = {
                "format": IR_FORMAT,
                "version": IR_VERSION,
                "config": self.config.to_json(),
                "blocks": [b.to_json() for b in self.blocks],
                "tensors": index,
                "assets": sorted(self.assets),
                "provenance": self.provenance,
            }
            (tmp / "graph.json").write_text(json.dumps(doc, indent=1))
        return out

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        """Open an IR directory lazily: graph.json and every shard header checked (nextq.untrusted: schema, dtype and
        scheme names from allow-lists, shapes against the headers, names inside the directory); tensors are read
        when first used."""
        path = Path(path)
        gj = path / "graph.json"
        if not gj.is_file():
            raise CheckpointError(f"{path}: not an IR directory (no graph.json)")
        doc = read_json(resolve_inside(path, "graph.json", "graph.json"))
        need_fields(doc, str(gj), IR_KEYS, IR_OPTIONAL_KEYS)
        if doc["format"] != IR_FORMAT or doc["version"] != IR_VERSION:
            raise CheckpointError(f"{gj}: format {doc['format']!r:.40} v{doc['version']!r:.20}, "
                                  f"expected {IR_FORMAT} v{IR_VERSION}")
        config = ModelConfig.from_json(doc["config"], f"{gj}: config")
        for key, kind in (("tensors", dict), ("blocks", list), ("assets", list), ("provenance", dict)):
            need(isinstance(doc.get(key, kind()), kind), f"{gj}: {key}", f"expected a JSON {kind.__name__}")
        shards: dict[Path, ShardIndex] = {}
        tensors = {name: _index_entry(path, name, e, shards, str(gj)) for name, e in doc["tensors"].items()}
        assets = {}
        for a in doc.get("assets", []):
            assets[a] = resolve_inside(path, a, "asset")
            need(assets[a].is_file(), f"{gj}: assets", f"{a!r} is listed but is not a file in {path}")
        g = cls(config, tensors, doc.get("provenance", {}), assets)
        g.check()
        return g


@dataclass(frozen=True)
class ShardIndex:
    """A shard's checked header, and its stored keys grouped by the tensor they belong to (`name.qdata` -> name)."""

    tensors: dict[str, StoredTensor]
    parts: dict[str, dict[str, StoredTensor]]

    @classmethod
    def read(cls, shard: Path) -> ShardIndex:
        tensors = read_header(shard)
        parts: dict[str, dict[str, StoredTensor]] = {}
        for key, st in tensors.items():
            parts.setdefault(key.rsplit(".", 1)[0], {})[key] = st
        return cls(tensors, parts)


def _index_entry(path: Path, name: str, e: Any, shards: dict[Path, ShardIndex], where: str) -> IRTensor | QuantRef:
    """One tensor entry of graph.json (untrusted), checked against its shard's header (read once per shard)."""
    w = f"{where}: tensor {name!r}"
    need(isinstance(e, dict), w, f"expected a JSON object, got {type(e).__name__}")
    need_fields(e, w, IR_ENTRY_KEYS, IR_ENTRY_OPTIONAL_KEYS)
    need(("dtype" in e) != ("quant" in e), w, "expected exactly one of dtype (dense) and quant (quantized)")
    offset = e.get("norm_offset", 0.0)
    need(isinstance(offset, (int, float)) and not isinstance(offset, bool), w, f"norm_offset: expected a number, "
                                                                                f"got {offset!r:.40}")
    shape = need_shape(e["shape"], f"{w} shape")
    shard = resolve_inside(path, e["shard"], f"tensor {name!r} shard")
    if shard not in shards:
        shards[shard] = ShardIndex.read(shard)
    index = shards[shard]
    if "dtype" in e:
        need(isinstance(e["dtype"], str) and e["dtype"] in IR_DTYPES, w,
             f"dtype {e['dtype']!r:.40}, supported: {', '.join(IR_DTYPES)}")
        st, dtype = index.tensors.get(name), IR_DTYPES[e["dtype"]]
        need(st is not None, w, f"not stored in {shard.name}")
        need((st.dtype, st.shape) == (DTYPE_NAMES[dtype], shape), w,
             f"graph.json says {e['dtype']} {list(shape)}, {shard.name} stores {st.dtype} {list(st.shape)}")
        return IRTensor(str(shard), name, shape, dtype, st)
    parts = index.parts.get(name, {})
    meta = _quant_meta(e["quant"], shape, w)
    _check_layout(name, meta, parts, f"{w} ({shard.name})")
    return QuantRef(str(shard), name, shape, meta, tuple(parts.values()))


def _quant_meta(m: Any, shape: tuple[int, ...], where: str) -> dict[str, Any]:
    """The `quant` object of a tensor entry: scheme from the registry, shape equal to the entry's, block size an
    integer, a pair or null, nibble order known or null."""
    from .quant.schemes import SCHEMES
    from .quant.tensor import NIBBLE_ORDERS

    w = f"{where} quant"
    need(isinstance(m, dict), w, f"expected a JSON object, got {type(m).__name__}")
    need_fields(m, w, ("scheme", "shape", "block_size", "nibble_order"))
    need(isinstance(m["scheme"], str) and m["scheme"] in SCHEMES, w,
         f"scheme {m['scheme']!r:.40}, supported: {', '.join(SCHEMES)}")
    need(len(shape) == 2 and need_shape(m["shape"], f"{w} shape") == shape, w,
         f"shape {m['shape']!r:.40}, expected the entry's 2-D shape {list(shape)}")
    block = m["block_size"]
    if isinstance(block, list):
        need(len(block) == 2, w, f"block_size {block!r:.40}: expected an integer, a pair or null")
        for b in block:  # 2-D tiles may be larger than the weight (fp8_block128 of a 64-row expert)
            need_int(b, f"{w} block_size", 1, MAX_TILE)
    elif block is not None:
        need_int(block, f"{w} block_size", 1, max(shape[1], 1))
    need(m["nibble_order"] is None or m["nibble_order"] in NIBBLE_ORDERS, w,
         f"nibble_order {m['nibble_order']!r:.40}, expected one of {list(NIBBLE_ORDERS)} or null")
    return m


MAX_TILE = 1 << 16
_LAYOUTS_SEEN: set[tuple] = set()  # layouts already probed (every expert of a model shares a handful)


def _check_layout(name: str, meta: dict[str, Any], parts: dict[str, StoredTensor], where: str) -> None:
    """The stored parts form the scheme's layout of shape `meta["shape"]`: built and dequantized on the meta device
    (shapes and dtypes only, no data). A dequantizer that cannot run there (numpy-based) is not probed."""
    from .quant.tensor import QuantizedTensor

    sig = (repr(meta), tuple((k[len(name):], st.dtype, st.shape) for k, st in sorted(parts.items())))
    if sig in _LAYOUTS_SEEN:
        return
    fake = {k: torch.empty(st.shape, dtype=DTYPES[st.dtype], device="meta") for k, st in parts.items()}
    stored = ", ".join(f"{k} {st.dtype} {list(st.shape)}" for k, st in parts.items()) or "nothing"
    try:
        out = QuantizedTensor.from_tensors(name, fake, meta).dequantize()
    except (TypeError, NotImplementedError) as e:
        if "meta" in str(e):  # "can't convert meta device type tensor to numpy" and the like: not probed
            return
        raise CheckpointError(f"{where}: stored {stored}: not a {meta['scheme']} layout of shape {meta['shape']} "
                              f"({str(e).splitlines()[0]})") from None
    except (ValueError, RuntimeError, IndexError, AttributeError, KeyError) as e:  # e.g. a part missing: None
        raise CheckpointError(f"{where}: stored {stored}: not a {meta['scheme']} layout of shape "
                              f"{meta['shape']} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    need(tuple(out.shape) == tuple(meta["shape"]), where,
         f"stored {stored} dequantize to {list(out.shape)}, expected {meta['shape']}")
    _LAYOUTS_SEEN.add(sig)


@dataclass(frozen=True)
class QuantRef:
    """A quantized tensor in an IR shard (its stored parts `key.qdata`, ...); loads as a QuantizedTensor."""

    path: str
    key: str
    shape: tuple[int, ...]
    meta: dict[str, Any]
    parts: tuple[StoredTensor, ...]  # `key.qdata`, ...: byte ranges checked against the shard header at Graph.load

    def load(self):
        from .quant import QuantizedTensor

        return QuantizedTensor.from_tensors(self.key, {st.key: st.read() for st in self.parts}, self.meta)


def shape_of(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


def _abbrev(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


class atomic_output:
    """Context manager: yields a temporary sibling path, renamed to `out` only on success.

    Refuses an existing `out` unless `force`; on any error the temporary file or directory is removed. With
    `directory=True` the temporary path is created as an empty directory (writers fill it); otherwise the writer
    creates the file.
    """

    def __init__(self, out: Path, force: bool, directory: bool = True):
        self.out, self.force, self.directory = Path(out), force, directory

    def __enter__(self) -> Path:
        if self.out.exists() and not self.force:
            raise OutputExistsError(f"{self.out}: output exists (pass --force to overwrite)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        _remove(self.tmp)
        if self.directory:
            self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            _remove(self.tmp)
            return False
        _remove(self.out)
        os.replace(self.tmp, self.out)
        return False


def atomic_output_dir(out: Path, force: bool) -> atomic_output:
    return atomic_output(out, force, directory=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
