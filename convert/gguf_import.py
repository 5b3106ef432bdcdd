"""GGUF `qwen3next` / `qwen35moe` / `qwen35` -> the canonical graph (ours, or one made by llama.cpp's
convert_hf_to_gguf.py); the architecture gives the IR's family.

The inverse of `gguf_export`, driven by the same declarative map (`gguf_names`): metadata -> ModelConfig, each GGUF
tensor dequantized to float32 (gguf-py's reference dequantizers) and split back into canonical tensors by the
inverse row layouts; norms get their offset removed, `ssm_a` becomes `A_log = log(-ssm_a)`.

Exactness (F32 files): every tensor comes back bit for bit except two element-wise maps that the GGUF convention
rounds at export: zero-centred norms are stored as fl(1 + w), so the imported w' = fl(1 + w) - 1 (exact
subtraction) differs from w by at most half an ulp of 1.0 (6e-8) while 1 + w' equals the stored scale exactly;
A_log = log(-fl(-exp(A_log))) is within a few float32 ulps. GGUF -> IR -> GGUF is bit-exact.
Quantized GGUF tensors (Q4_0, Q8_0, ...) are imported dequantized to float32.
The tokenizer is rebuilt as a byte-level BPE tokenizer.json with the file's pre-tokenizer split (qwen2 or qwen35),
+ tokenizer_config.json and the chat template.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from nextq.errors import CheckpointError, UnsupportedModelError
from nextq.untrusted import GGUFHeader, gguf_header, need
from nextq.graph import Graph, ModelConfig, RopeScaling, expected_tensors

from . import gguf_names as names
from .gguf_export import PRETOKENIZERS, ROPE_SCALING_KEYS, ROPE_SCALING_TYPE_KEY, layer_kinds


def _f32(v: float) -> float:
    """The shortest decimal that rounds to the same float32 (1e-06 stored as 9.99999997e-07 comes back as 1e-06)."""
    return float(str(np.float32(v)))


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_config(reader, tensor_names: set[str]) -> ModelConfig:
    """ModelConfig from the `{arch}.*` keys (the inverse of the architecture's metadata in gguf_names)."""
    arch = _field(reader, "general.architecture")
    family = names.family_of(arch)
    keys = {m.key for m in names.ARCHS[family].metadata}

    def key(k: str, default: Any = None) -> Any:
        v = _field(reader, f"{arch}.{k}", default)
        if v is None:
            raise CheckpointError(f"GGUF: missing metadata key {arch}.{k}")
        return v

    n_mtp = int(key("nextn_predict_layers", 0))
    n_layers = int(key("block_count")) - n_mtp
    recurrent = _field(reader, f"{arch}.attention.recurrent_layers")
    if recurrent is None:  # older files: a full-attention period
        interval = int(key("full_attention_interval", 4))
        recurrent = [(i + 1) % interval != 0 for i in range(n_layers)]
    head_dim = int(key("attention.key_length"))
    hv = int(key("ssm.time_step_rank"))
    token_id = {t: _field(reader, f"tokenizer.ggml.{t}_token_id") for t in ("bos", "eos", "padding")}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    sections = [int(x) for x in _field(reader, f"{arch}.rope.dimension_sections", [])]
    while sections and sections[-1] == 0:  # written padded to 4
        sections.pop()

    # sizes an architecture does not write (qwen35: experts, qwen35moe: the dense FFN) keep ModelConfig's defaults
    sizes = {field: int(key(k)) for k, field in (
        ("feed_forward_length", "intermediate_size"), ("expert_feed_forward_length", "moe_intermediate_size"),
        ("expert_shared_feed_forward_length", "shared_expert_intermediate_size")) if k in keys}
    experts = {field: int(key(k)) if k in keys else 0 for k, field in (
        ("expert_count", "num_experts"), ("expert_used_count", "num_experts_per_tok"))}
    return ModelConfig(
        family=family,
        mrope_section=tuple(sections),
        vocab_size=int(embd.shape[1]),
        hidden_size=int(key("embedding_length")),
        num_hidden_layers=n_layers,
        layer_types=tuple("linear_attention" if r else "full_attention" for r in list(recurrent)[:n_layers]),
        num_attention_heads=int(key("attention.head_count")),
        num_key_value_heads=int(key("attention.head_count_kv")),
        head_dim=head_dim,
        rope_theta=_f32(key("rope.freq_base")),
        partial_rotary_factor=int(key("rope.dimension_count")) / head_dim,
        max_position_embeddings=int(key("context_length")),
        linear_num_key_heads=int(key("ssm.group_count")),
        linear_num_value_heads=hv,
        linear_key_head_dim=int(key("ssm.state_size")),
        linear_value_head_dim=int(key("ssm.inner_size")) // hv,
        linear_conv_kernel_dim=int(key("ssm.conv_kernel")),
        **sizes,
        **experts,
        norm_topk_prob=True,  # llama.cpp's qwen3next / qwen35moe always renormalise
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names,
        mtp_num_hidden_layers=n_mtp,
        bos_token_id=token_id["bos"],
        eos_token_id=token_id["eos"],
        pad_token_id=token_id["padding"],
        rope_scaling=read_rope_scaling(reader, arch),
    )


def read_rope_scaling(reader, arch: str) -> RopeScaling | None:
    """RopeScaling from the `{arch}.rope.scaling.*` keys (gguf_export.ROPE_SCALING_KEYS); None without a type."""
    kind = _field(reader, f"{arch}.{ROPE_SCALING_TYPE_KEY}")
    if kind in (None, "none"):
        return None
    values = {f: _field(reader, f"{arch}.{key}") for f, (key, _) in ROPE_SCALING_KEYS.items()}
    missing = [f"{arch}.{ROPE_SCALING_KEYS[f][0]}" for f in ("factor", "original_max_position_embeddings")
               if values[f] is None]
    if missing:
        raise CheckpointError(f"GGUF: rope scaling type {kind!r} without {', '.join(missing)}")
    return RopeScaling(kind, **{f: _f32(v) if ROPE_SCALING_KEYS[f][1] == names.F32 else int(v)
                                for f, v in values.items() if v is not None})


def _dequantized(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (reversed ggml ne)."""
    from gguf.quants import dequantize

    shape = tuple(int(x) for x in reversed(t.shape))
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


class AssetPath(type(Path())):
    """A path into a temporary directory that stays on disk while some AssetPath into it is alive: the graph's
    assets outlive `read_gguf` (save, export and quantize read them later, also through copies of the graph), and
    the directory is removed when the last path to it is garbage-collected, or at interpreter exit."""

    __slots__ = ("owner",)

    @classmethod
    def owned(cls, owner: tempfile.TemporaryDirectory, name: str) -> AssetPath:
        p = cls(owner.name, name)
        p.owner = owner
        return p


def tokenizer_assets(reader) -> dict[str, Path]:
    """The GGUF's tokenizer files in a fresh temporary directory (see AssetPath); nothing is left behind when the
    GGUF has no tokenizer or its tokenizer is refused."""
    tmp = tempfile.TemporaryDirectory(prefix="nextq-gguf-tok-")
    try:
        files = write_tokenizer_files(reader, Path(tmp.name))
    except BaseException:
        tmp.cleanup()
        raise
    if not files:
        tmp.cleanup()
    return {name: AssetPath.owned(tmp, p.name) for name, p in files.items()}


def write_tokenizer_files(reader, out: Path) -> dict[str, Path]:
    """tokenizer.json (Qwen2-style byte-level BPE), tokenizer_config.json and chat_template.jinja from the GGUF."""
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        return {}
    if model != "gpt2":
        raise UnsupportedModelError(f"GGUF tokenizer.ggml.model={model!r}, supported: ['gpt2']")
    pre_name = _field(reader, "tokenizer.ggml.pre", "qwen2")
    if pre_name not in PRETOKENIZERS:
        raise UnsupportedModelError(f"GGUF tokenizer.ggml.pre={pre_name!r}, supported: {sorted(PRETOKENIZERS)}")
    pre = PRETOKENIZERS[pre_name]
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [m.split(" ", 1) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab, added = {}, []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ in (3, 4):  # CONTROL, USER_DEFINED
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": typ == 3})
        elif typ != 5:  # UNUSED padding rows are not tokens
            vocab[tok] = i
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pre}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for typ, field in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
        tid = _field(reader, f"tokenizer.ggml.{field}_token_id")
        cfg[typ] = tokens[tid] if tid is not None else None
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    files = {"tokenizer.json": out / "tokenizer.json", "tokenizer_config.json": out / "tokenizer_config.json"}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        files["chat_template.jinja"] = out / "chat_template.jinja"
    return files


# ggml tensor types the import can dequantize (gguf-py's reference dequantizers) -> (block elements, block bytes)
GGML_TYPES = {int(t): GGML_QUANT_SIZES[t] for t in (
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K)}
KINDS = {names.U32: "int", names.F32: "float", names.BOOLS: "bools", names.INTS: "ints", names.STR: "str"}
# keys read outside an architecture's metadata table, with the kind read_config / write_tokenizer_files expect
GENERAL_KINDS = {
    "general.architecture": "str", "tokenizer.ggml.model": "str", "tokenizer.ggml.pre": "str",
    "tokenizer.ggml.tokens": "strs", "tokenizer.ggml.token_type": "ints", "tokenizer.ggml.merges": "strs",
    "tokenizer.chat_template": "str", **{f"tokenizer.ggml.{t}_token_id": "int" for t in ("bos", "eos", "padding")},
}
TOKENIZER_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")
DIVISORS = ("attention.key_length", "ssm.time_step_rank", "full_attention_interval")  # read_config divides by them


def metadata_kinds() -> dict[str, str]:
    """Every key the import reads -> the kind its value must have (`untrusted.GGUF_KINDS`), all architectures."""
    kinds = dict(GENERAL_KINDS)
    for arch in names.ARCHS.values():
        keyed = [(m.key, m.kind) for m in arch.metadata] + list(ROPE_SCALING_KEYS.values())
        keyed += [(ROPE_SCALING_TYPE_KEY, names.STR), ("rope.dimension_sections", names.INTS)]
        kinds.update({f"{arch.name}.{k}": KINDS[kind] for k, kind in keyed})
    return kinds


def check_metadata(h: GGUFHeader, where: str) -> None:
    """Values read_config and write_tokenizer_files compute with, beyond their kinds: divisors >= 1, no more blocks
    than tensors, a 2-D token_embd.weight, a vocabulary with its token types, token ids inside the vocabulary."""
    arch = h.fields.get("general.architecture", (None, None))[1]
    for k in DIVISORS:
        v = h.fields.get(f"{arch}.{k}", (None, 1))[1]
        need(v >= 1, where, f"{arch}.{k} = {v}, expected >= 1")
    blocks = h.fields.get(f"{arch}.block_count", (None, 0))[1]
    need(blocks <= len(h.tensors), where, f"{arch}.block_count = {blocks} exceeds the {len(h.tensors)} tensors")
    embd = h.tensors.get("token_embd.weight")
    need(embd is not None and len(embd.dims) == 2, where, "token_embd.weight: expected a 2-D tensor")
    if "tokenizer.ggml.model" in h.fields:  # write_tokenizer_files needs the vocabulary and its token types
        absent = [k for k in TOKENIZER_KEYS if k not in h.fields]
        need(not absent, where, f"tokenizer.ggml.model is set but {absent} are missing")
    n_tokens = len(h.fields.get("tokenizer.ggml.tokens", (None, (None, [])))[1][1])
    for t in ("bos", "eos", "padding"):
        tid = h.fields.get(f"tokenizer.ggml.{t}_token_id", (None, None))[1]
        need(tid is None or not n_tokens or 0 <= tid < n_tokens, where,
             f"tokenizer.ggml.{t}_token_id = {tid}, the vocabulary has {n_tokens} tokens")


def read_gguf(path: str | Path) -> Graph:
    """Read a qwen3next / qwen35moe / qwen35 GGUF into the canonical graph (tensors held in memory as float32)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    check_metadata(gguf_header(path, GGML_TYPES, metadata_kinds()), str(path))  # before gguf-py touches the file
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    config = read_config(reader, set(by_name))
    graph = Graph(config, {})
    plan = names.plan_tensors(config, layer_kinds(graph))
    missing = sorted({pt.name for pt in plan} - set(by_name))
    extra = sorted(set(by_name) - {pt.name for pt in plan})
    if missing or extra:
        raise CheckpointError(f"{path}: GGUF tensors missing {missing[:8]} / unexpected {extra[:8]} for the "
                              f"{names.arch_of(config).name} layout of its metadata")
    tensors: dict[str, torch.Tensor] = {}
    specs = expected_tensors(config)
    for pt in plan:
        stored = by_name[pt.name]
        dims = [int(x) for x in stored.shape]
        want = sum(math.prod(specs[name].shape) for name in pt.sources)
        if int(stored.n_elements) != want:
            raise CheckpointError(f"{path}: tensor {pt.name}: dims {dims} hold {stored.n_elements} elements, its "
                                  f"metadata's layout needs {want}")
        data = _dequantized(stored)
        if pt.rule.value is not None:
            data = pt.rule.value[1](data)
        try:
            parts = pt.rule.unpack(config, data)
        except ValueError as e:  # numpy reshape: the dims do not split into the layout's tensors
            raise CheckpointError(f"{path}: tensor {pt.name}: dims {dims} do not split into "
                                  f"{pt.sources[:2]}... ({e})") from None
        for name, part in zip(pt.sources, parts):
            t = torch.from_numpy(np.array(part, dtype=np.float32))  # a copy: reader memory is read-only
            if pt.rule.norm:
                t = t - specs[name].norm_offset  # exact: fl(1 + w) - 1 (Sterbenz)
            tensors[name] = t
    graph.tensors = tensors
    graph.check()
    graph.assets = tokenizer_assets(reader)
    graph.provenance = {"source": str(path), "format": "gguf", "architecture": names.arch_of(config).name}
    return graph
