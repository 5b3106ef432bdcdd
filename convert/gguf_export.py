"""`nextq export gguf IR -o FILE.gguf`: the canonical graph as a GGUF file that llama.cpp loads, as the
architecture of the IR's family (`qwen3next`, `qwen35moe` or `qwen35`; gguf_names.ARCHS).

Written with gguf-py's GGUFWriter in its streaming order (header, key/values, tensor infos, then tensor data one
by one), so memory stays bounded by the largest tensor written whole: stacked experts are written expert by expert,
and a weight computed in row blocks (the direct path's embeddings and LM head) block by block. Layouts and names
come from `gguf_names`; this module decides types, encodes data and writes.

Types. `--type` applies to dense (float) weights: `auto` keeps each weight's IR dtype (f32/f16/bf16), or pick
f32|f16|bf16|q8_0|q6_k|q5_1|q5_k|q5_0|q4_1|q4_k|q4_0|q3_k. Quantized IR weights map onto the GGUF type with the same math
(the scheme registry's `gguf`), copied bit for bit (K-quants and Q5_0/Q5_1 are stored as GGUF blocks in the IR):
    int4_sym_g32 -> Q4_0    int4_asym_g32 -> Q4_1    int8_g32 -> Q8_0    (f32/f16/bf16 pass-through -> same)
Other schemes are re-quantized to the nearest GGUF type (int4 g64/g128 -> Q4_0/Q4_1, int8_channel -> Q8_0) with a
printed warning giving the measured extra error; fp8 has neither and is refused unless `--fallback q8_0|bf16` (only
the schemes without a GGUF type, what `nextq pipeline` writes) or `--requantize T` (every quantized weight without
an identical type, the nearest-type ones too) is given. Norms, the router, the shared-expert gate, the conv kernel and 1-D tensors are
always F32 (llama.cpp's converter rule).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from nextq.console import console, progress_iter
from nextq.errors import CheckpointError, UnsupportedModelError
from nextq.graph import Graph, ModelConfig, RopeScaling, atomic_output
from nextq.runtime.rope import YARN_BETA_FAST, YARN_BETA_SLOW, yarn_attention_factor, yarn_mscale

from nextq.quant.schemes import SCHEMES

from . import gguf_names as names

GGML_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0", "q3_k")
# the scheme registry says which GGUF type has a scheme's math (blocks copied without re-quantizing) and which
# nearest type the others are re-quantized to (with a warning); fp8 has neither
NATIVE = {name: s.gguf for name, s in SCHEMES.items() if s.gguf}
NEAREST = {name: s.gguf_nearest for name, s in SCHEMES.items() if not s.gguf and s.gguf_nearest}
# most precise first: a GGUF tensor built from sources of different types takes the most precise one
PRECISION = GGML_TYPES
# llama_ftype of a file whose largest weights are of that type (K-quants: the _M mixes llama.cpp names them by)
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q3_k": 12, "q4_k": 15,
              "q5_k": 17, "q6_k": 18, "bf16": 32}
QWEN2_PRETOKENIZER = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                      r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5's split: letters include combining marks (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN35, src/llama-vocab.cpp)
QWEN35_PRETOKENIZER = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
                       r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRETOKENIZERS = {"qwen2": QWEN2_PRETOKENIZER, "qwen35": QWEN35_PRETOKENIZER}  # llama.cpp name -> split regex


def ggml_type(t: str):
    import gguf

    return gguf.GGMLQuantizationType[t.upper()]


# ---- encoding: float32 rows -> GGUF rows of a type; quantized IR tensors -> their native blocks ---------------

def encode_float(x: torch.Tensor, t: str) -> np.ndarray:
    """float tensor `[..., K]` -> GGUF data: float32/float16 arrays, or uint8 rows for bf16 and block types."""
    from nextq.quant import quantize, to_gguf_q4_0_blocks, to_gguf_q4_1_blocks, to_gguf_q8_0_blocks

    if t == "f32":
        return x.to(torch.float32).contiguous().numpy()
    if t == "f16":
        return x.to(torch.float16).contiguous().numpy()
    if t == "bf16":  # round to nearest even, as ggml_fp32_to_bf16
        return x.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    scheme = next(name for name, s in NATIVE.items() if s == t)
    rows = x.reshape(-1, x.shape[-1])
    return encode_native(quantize(rows, scheme), t).reshape(*x.shape[:-1], -1)


def encode_native(qt: Any, t: str) -> np.ndarray:
    """A QuantizedTensor whose scheme is identical to GGUF type t -> its GGUF rows, no arithmetic on values."""
    from nextq.quant import to_gguf_q4_0_blocks, to_gguf_q4_1_blocks, to_gguf_q8_0_blocks

    if t in ("f32", "f16", "bf16"):
        return encode_float(qt.data, t)  # pass-through schemes hold the weight in that dtype already
    if SCHEMES[qt.scheme].data_shape is not None:  # K-quants, Q5_0/Q5_1: the IR holds the GGUF blocks
        return qt.data.numpy()
    return {"q8_0": to_gguf_q8_0_blocks, "q4_0": to_gguf_q4_0_blocks, "q4_1": to_gguf_q4_1_blocks}[t](qt)


def decode(data: np.ndarray, t: str) -> np.ndarray:
    """GGUF data of type t -> float32 (gguf-py's reference dequantizers)."""
    from gguf.quants import dequantize

    return dequantize(data, ggml_type(t)).astype(np.float32)


# ---- options and per-tensor type choice ----------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFOptions:
    """Export options (the click flags, one to one)."""

    type: str = "auto"  # dense weights: auto or one of GGML_TYPES
    # every quantized IR weight without an identical GGUF type (nearest-type ones included) -> this type
    requantize: str | None = None
    # quantized IR weights of a scheme with neither a GGUF type nor a nearest one (fp8) -> this type; others as usual
    fallback: str | None = None

    def __post_init__(self):
        if self.type not in ("auto", *GGML_TYPES):
            raise UnsupportedModelError(f"--type {self.type!r}: supported: auto, {', '.join(GGML_TYPES)}")
        for opt, v in (("--requantize", self.requantize), ("--fallback", self.fallback)):
            if v is not None and v not in GGML_TYPES:
                raise UnsupportedModelError(f"{opt} {v!r}: supported: {', '.join(GGML_TYPES)}")


def describe(t: Any) -> tuple[str, str]:
    """('dense', dtype) or ('quant', scheme) of a graph tensor without loading it."""
    if hasattr(t, "meta") and isinstance(getattr(t, "meta"), dict):  # QuantRef
        return "quant", t.meta["scheme"]
    if getattr(t, "scheme", None) is not None:  # QuantizedTensor, or a pending one (quant.apply.PendingTensor)
        return "quant", t.scheme
    return "dense", str(t.dtype).removeprefix("torch.")


DENSE_AUTO = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def source_type(name: str, kind: tuple[str, str], opts: GGUFOptions) -> str:
    """The GGUF type one canonical source asks for."""
    what, x = kind
    if what == "dense":
        if opts.type != "auto":
            return opts.type
        return DENSE_AUTO.get(x, "f32")
    if x in NATIVE:
        return NATIVE[x]
    if opts.requantize is not None:
        return opts.requantize
    if x in NEAREST:
        return NEAREST[x]
    if x in SCHEMES and opts.fallback is not None:
        return opts.fallback
    if x in SCHEMES:
        raise UnsupportedModelError(
            f"{name}: scheme {x}: {SCHEMES[x].why_not('gguf')}; re-export with --fallback q8_0 "
            "(8.5 bits/weight, the extra error is measured and printed) or --fallback bf16 (16 bits/weight): only "
            "the weights GGUF has no type for; --requantize T re-quantizes every weight without an identical type")
    raise UnsupportedModelError(f"{name}: quantization scheme {x!r} has no GGUF mapping; supported: "
                                f"{sorted(NATIVE) + sorted(NEAREST)}")


def choose_type(pt: names.PlannedTensor, graph: Graph, opts: GGUFOptions, k: int) -> str:
    if pt.rule.force_f32:
        return "f32"
    wanted = {source_type(s, describe(graph.tensors[s]), opts) for s in pt.sources}
    t = min(wanted, key=PRECISION.index)
    unit = k if pt.rule.col_group is None else math.gcd(k, pt.rule.col_group(graph.config))
    block = quant_block(t)
    if unit % block:  # as llama.cpp's converter: rows that do not fill blocks -> F16
        console.print(f"[yellow]warning:[/] {pt.name}: row length {k} (column groups of {unit}) is not a multiple "
                      f"of {block}; writing F16 instead of {t.upper()}", soft_wrap=True)
        return "f16"
    return t


def quant_block(t: str) -> int:
    """Elements per block along a row of GGUF type t (1 for float types)."""
    import gguf

    return gguf.GGML_QUANT_SIZES[ggml_type(t)][0]


# ---- the plan --------------------------------------------------------------------------------------------------

def check_representable(graph: Graph) -> None:
    problems = names.unsupported(graph.config)
    if problems:
        raise UnsupportedModelError("llama.cpp cannot represent this model: " + "; ".join(problems))


def layer_kinds(graph: Graph) -> list[tuple[str, str, str]]:
    return layer_kinds_of(graph.blocks)


def layer_kinds_of(blocks) -> list[tuple[str, str, str]]:
    """(canonical prefix, mixer kind, ffn kind) of every GGUF block of a model's blocks (MTP layers last)."""
    out = []
    for b in blocks:
        if b.kind == "Layer":
            out.append((b.prefix, b.mixer.kind, b.ffn.kind))
        elif b.kind == "MTP":
            out += [(layer.prefix, layer.mixer.kind, layer.ffn.kind) for layer in b.layers]
    return out


@dataclass
class Entry:
    pt: names.PlannedTensor
    type: str
    shape: tuple[int, ...]  # numpy order of the logical (float) tensor


def plan(graph: Graph, opts: GGUFOptions) -> list[Entry]:
    """Every GGUF tensor with its type and logical shape, computed without loading tensor data."""
    c = graph.config
    out = []
    for pt in names.plan_tensors(c, layer_kinds(graph)):
        shapes = [tuple(graph.tensors[s].shape) for s in pt.sources]
        if len(shapes[0]) == 1 or pt.rule.col_group is not None:  # 1-D, or one tensor's columns permuted
            shape = shapes[0]
        else:  # row layouts do not look at columns: run them on one column to get the row shape
            rows = pt.rule.pack(c, [np.zeros((s[0], 1), np.float32) for s in shapes])
            shape = (*rows.shape[:-1], shapes[0][-1])
        out.append(Entry(pt, choose_type(pt, graph, opts, shape[-1]), shape))
    return out


def consumption_order(graph: Graph) -> list[str]:
    """Canonical tensor names in the order export_gguf reads them (for a prefetcher running ahead of it)."""
    seen = dict.fromkeys(s for pt in names.plan_tensors(graph.config, layer_kinds(graph)) for s in pt.sources)
    return [*seen, *(n for n in graph.tensors if n not in seen)]


def byte_layout(e: Entry) -> tuple[tuple[int, ...], np.dtype, int]:
    """(array shape, numpy dtype, nbytes) of the data written for an entry."""
    import gguf

    if e.type in ("f32", "f16"):
        dt = np.dtype(np.float32 if e.type == "f32" else np.float16)
        return e.shape, dt, int(np.prod(e.shape)) * dt.itemsize
    shape = tuple(gguf.quant_shape_to_byte_shape(e.shape, ggml_type(e.type)))
    return shape, np.dtype(np.uint8), int(np.prod(shape))


# ---- tensor data ---------------------------------------------------------------------------------------------

@dataclass
class Requant:
    """Extra error of re-quantized tensors, per (scheme -> GGUF type) and tensor: [sum of squared errors, sum of
    squared reference values, count], added up over the pieces a tensor is written in."""

    sums: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=lambda: defaultdict(dict))

    def add(self, key: tuple[str, str], name: str, got: np.ndarray, ref: np.ndarray) -> None:
        s = self.sums[key].setdefault(name, [0.0, 0.0, 0])
        s[0] += float(np.sum((got.astype(np.float64) - ref) ** 2))
        s[1] += float(np.sum(ref.astype(np.float64) ** 2))
        s[2] += ref.size

    def report(self) -> None:
        for (scheme, t), by_name in sorted(self.sums.items()):
            # relative RMS ||got - ref|| / ||ref|| (the RMS error itself when ref is all zero)
            errs = [np.sqrt(e / r) if r else np.sqrt(e / max(n, 1)) for e, r, n in by_name.values()]
            errs = [x for x in errs if x > 0]
            if errs:
                console.print(f"[yellow]warning:[/] re-quantized {len(errs)} {scheme} tensors to {t.upper()} (no "
                              f"identical GGUF type); extra error relative RMS vs the IR's dequantized weights: "
                              f"mean {np.mean(errs):.3e}, max {np.max(errs):.3e}", soft_wrap=True)


def source_data(name: str, t: Any, target: str, requant: Requant) -> np.ndarray:
    """One canonical tensor (or row block of one) as GGUF rows of `target` (quantized ones copied when identical)."""
    if not hasattr(t, "scheme"):
        return encode_float(t, target)
    if NATIVE.get(t.scheme) == target:
        return encode_native(t, target)
    ref = t.dequantize()  # float32 [N, K]
    data = encode_float(ref, target)
    requant.add((t.scheme, target), name, decode(data, target), ref.numpy())
    return data


def tensor_data(graph: Graph, e: Entry, requant: Requant) -> np.ndarray:
    rule, c = e.pt.rule, graph.config
    parts = []
    for s in e.pt.sources:
        t = graph.get(s)
        if rule.norm:
            t = t.to(torch.float32) + graph.norm_offset(s)  # llama.cpp multiplies by the stored weight
        parts.append(source_data(s, t, e.type, requant))
    data = rule.pack(c, parts)
    if rule.value is not None:
        data = rule.value[0](data)
    return np.ascontiguousarray(data)


# ---- metadata & tokenizer ------------------------------------------------------------------------------------

# RoPE scaling keys (`{arch}.rope.scaling.*`) as llama.cpp's converter writes them (TextModel.set_gguf_parameters):
# RopeScaling field -> (key, kind); optional fields only when the source config set them, as the converter does.
ROPE_SCALING_TYPE_KEY = "rope.scaling.type"
ROPE_SCALING_KEYS = {
    "factor": ("rope.scaling.factor", names.F32),
    "original_max_position_embeddings": ("rope.scaling.original_context_length", names.U32),
    "attention_factor": ("rope.scaling.yarn_attn_factor", names.F32),
    "beta_fast": ("rope.scaling.yarn_beta_fast", names.F32),
    "beta_slow": ("rope.scaling.yarn_beta_slow", names.F32),
}


def llama_cpp_rope_losses(s: RopeScaling) -> list[str]:
    """What llama.cpp's qwen3next / qwen35 loaders drop of a YaRN setting: they read only the type, factor and
    original context (llama_model_qwen3next::load_arch_hparams reads no yarn_* key), so betas stay 32 / 1, the
    attention factor is 0.1 ln(factor) + 1 and the correction range is always truncated."""
    defaults = {"beta_fast": YARN_BETA_FAST, "beta_slow": YARN_BETA_SLOW}
    lost = [f"{f}={getattr(s, f)} (runs {d:g})" for f, d in defaults.items() if getattr(s, f) not in (None, 0, d)]
    ours, theirs = yarn_attention_factor(s), yarn_mscale(s.factor)
    if abs(ours - theirs) > 1e-7 * theirs:
        lost.append(f"attention factor {ours:.7g} from attention_factor / mscale / mscale_all_dim (runs {theirs:.7g})")
    if not s.truncate:
        lost.append("truncate=false (runs a truncated correction range)")
    return lost


def write_rope_scaling(w, c: ModelConfig, arch: str) -> None:
    """The YaRN keys of `c.rope_scaling` (none for plain RoPE), and a warning naming what llama.cpp will drop."""
    s = c.rope_scaling
    if s is None:
        return
    w.add_string(f"{arch}.{ROPE_SCALING_TYPE_KEY}", s.rope_type)
    for f, (key, kind) in ROPE_SCALING_KEYS.items():
        if (v := getattr(s, f)) is not None:
            (w.add_uint32 if kind == names.U32 else w.add_float32)(f"{arch}.{key}", v)
    if lost := llama_cpp_rope_losses(s):
        console.print(f"[yellow]warning:[/] llama.cpp's {arch} ignores part of this YaRN setting: "
                      f"{'; '.join(lost)}; its logits will differ from transformers' past the original context",
                      soft_wrap=True)


def write_metadata(w, graph: Graph, entries: list[Entry], name: str) -> None:
    import gguf

    c = graph.config
    arch = names.arch_of(c)
    w.add_type("model")
    w.add_name(name)
    for m in arch.metadata:
        v = m.value(c)
        if m.key in names.OPTIONAL_KEYS and not v:
            continue
        key = f"{arch.name}.{m.key}"
        if m.kind == names.U32:
            w.add_uint32(key, int(v))
        elif m.kind == names.F32:
            w.add_float32(key, float(v))
        elif m.kind == names.INTS:
            w.add_array(key, [int(x) for x in v])
        else:
            w.add_key_value(key, list(v), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
    weights = defaultdict(int)
    for e in entries:
        if not e.pt.rule.force_f32 and len(e.shape) >= 2:
            weights[e.type] += int(np.prod(e.shape))
    write_rope_scaling(w, c, arch.name)
    w.add_file_type(FILE_TYPES[max(weights, key=weights.get)] if weights else 0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def looks_special(token: str) -> bool:
    """llama.cpp's converter marks `<|...|>` added tokens as control tokens even when not flagged special."""
    return token.startswith("<|") and token.endswith("|>")


def byte_level_post_processor(tj: dict) -> bool:
    """Whether tokenizer.json's post-processor is ByteLevel alone (Qwen's tokenizers), or a sequence of processors
    with a ByteLevel one and none that adds special tokens."""
    pp = tj.get("post_processor") or {}
    kinds = {p.get("type") for p in pp.get("processors", [pp])}
    return "ByteLevel" in kinds and not kinds & {"TemplateProcessing", "RobertaProcessing"}


def write_tokenizer(w, graph: Graph) -> None:
    """gpt2 (byte-level BPE) vocabulary with its pre-tokenizer (qwen2 or qwen35), merges, special ids and chat
    template."""
    import gguf

    c = graph.config
    if "tokenizer.json" not in graph.assets:
        raise CheckpointError("IR has no tokenizer.json; llama.cpp needs the vocabulary inside the GGUF")
    tok_path = Path(graph.assets["tokenizer.json"])
    tj = json.loads(tok_path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"tokenizer.json model.type={model.get('type')!r}, supported: ['BPE']")
    regexes = [p.get("pattern", {}).get("Regex") for p in (tj.get("pre_tokenizer") or {}).get("pretokenizers", [])]
    pre = next((name for name, rx in PRETOKENIZERS.items() if rx in regexes), None)
    if pre is None:
        raise UnsupportedModelError(
            f"tokenizer.json pre_tokenizer split regex {regexes} is none of {sorted(PRETOKENIZERS)} "
            f"({list(PRETOKENIZERS.values())}); llama.cpp would tokenize differently")
    by_id: dict[int, tuple[str, int]] = {i: (s, gguf.TokenType.NORMAL) for s, i in model["vocab"].items()}
    for t in tj.get("added_tokens", []):
        special = t.get("special") or looks_special(t["content"])
        by_id[t["id"]] = (t["content"], gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= c.vocab_size:
        raise CheckpointError(f"tokenizer.json: token id {max(by_id)} >= vocab_size={c.vocab_size} (embedding rows)")
    tokens = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(c.vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([s for s, _ in tokens])
    w.add_token_types([int(t) for _, t in tokens])
    special = gguf.SpecialVocab(tok_path.parent, load_merges=True, n_vocab=c.vocab_size)
    if "chat_template.jinja" in graph.assets and special.chat_template is None:
        special.chat_template = Path(graph.assets["chat_template.jinja"]).read_text(encoding="utf-8")
    for typ, tid in (("bos", c.bos_token_id), ("eos", c.eos_token_id), ("pad", c.pad_token_id)):
        tid = tid[0] if isinstance(tid, tuple) else tid  # config.json fallback, as SpecialVocab reads it
        if typ not in special.special_token_ids and tid is not None and 0 <= tid < c.vocab_size:
            special.special_token_ids[typ] = tid
    if byte_level_post_processor(tj):
        # llama.cpp's converter (its vendored gguf-py, newer than the gguf package) writes add_bos / add_eos false
        # for a ByteLevel post-processor whatever tokenizer_config.json says (vocab.py `_try_load_from_tokenizer_json`)
        special.add_special_token.update(bos=False, eos=False)
    special.add_to_gguf(w, quiet=True)


# ---- the writer ----------------------------------------------------------------------------------------------

def pieces(graph: Graph, e: Entry, requant: Requant) -> Iterator[np.ndarray] | None:
    """An entry's data in pieces, for entries that need not be held whole: stacked experts expert by expert
    (`[N, X]` each), a large weight computed in row blocks block by block (`[r, X]`); None for the rest."""
    rule = e.pt.rule
    if rule.pack is names._stack and rule.value is None:
        return (source_data(s, graph.get(s), e.type, requant) for s in e.pt.sources)
    t = graph.tensors[e.pt.sources[0]]
    if (rule.pack is names._same and rule.value is None and not rule.norm and hasattr(t, "row_blocks")
            and len(t.parts) > 1):  # a PendingTensor computed in row blocks (QuantRef.parts are its stored fields)
        return (source_data(e.pt.sources[0], b, e.type, requant) for b in t.row_blocks())
    return None


def write_pieces(w, e: Entry, data: Iterator[np.ndarray]) -> None:
    """Write one tensor's data given as consecutive pieces along its first dimension (memory: one piece).

    Mirrors GGUFWriter.write_tensor_data (pop the tensor info, align, write, pad) for data given in pieces.
    """
    from gguf.gguf_writer import WriterState

    want, dt, nbytes = byte_layout(e)
    fout = w.fout[0]
    ti = w.tensors[0].pop(next(iter(w.tensors[0])))
    if ti.nbytes != nbytes:
        raise CheckpointError(f"{e.pt.name}: tensor info says {ti.nbytes} bytes, planned {nbytes}")
    w.write_padding(fout, fout.tell())
    written = 0
    for piece in data:
        piece = np.ascontiguousarray(piece)
        if piece.shape[-len(want) + 1:] != want[1:] or piece.dtype != dt:
            raise CheckpointError(f"{e.pt.name}: a piece is {piece.dtype} {list(piece.shape)}, planned {dt} "
                                  f"[..., {', '.join(map(str, want[1:]))}]")
        piece.tofile(fout)
        written += piece.nbytes
    if written != nbytes:
        raise CheckpointError(f"{e.pt.name}: wrote {written} bytes, planned {nbytes}")
    w.write_padding(fout, nbytes)
    w.state = WriterState.WEIGHTS


MTP_ONLY_TRUNK = ("token_embd.weight", "output_norm.weight", "output.weight")  # the trunk tensors the head shares


def mtp_only_entries(graph: Graph, entries: list[Entry]) -> list[Entry]:
    """The tensors of llama.cpp's MTP-only GGUF (`convert_hf_to_gguf.py --mtp`, the draft model of
    `--spec-type draft-mtp`): token embeddings, output norm, LM head and the nextn blocks; same metadata as the
    full file. Its loader tells it from a full file by the missing `blk.0.attn_norm.weight`."""
    c = graph.config
    if not c.mtp_num_hidden_layers:
        raise UnsupportedModelError("--mtp-only: this IR has no MTP head (mtp_num_hidden_layers = 0)")
    mtp_blocks = tuple(f"blk.{c.num_hidden_layers + j}." for j in range(c.mtp_num_hidden_layers))
    return [e for e in entries if e.pt.name in MTP_ONLY_TRUNK or e.pt.name.startswith(mtp_blocks)]


def export_gguf(graph: Graph, out: str | Path, opts: GGUFOptions = GGUFOptions(), force: bool = False,
                name: str | None = None, progress: bool = False, vocab_only: bool = False,
                mtp_only: bool = False) -> dict[str, int]:
    """Write `graph` as a GGUF of its family's architecture at `out` (atomic). Returns tensor counts per GGUF type.

    The full file carries the MTP head's nextn blocks as llama.cpp's converter writes them by default.
    vocab_only: metadata and tokenizer without tensors (llama.cpp opens such files with vocab_only=True).
    mtp_only: only the MTP draft model (`mtp_only_entries`), as llama.cpp's converter writes with `--mtp`.
    """
    import gguf

    check_representable(graph)
    if not vocab_only:
        graph.check()
    entries = [] if vocab_only else plan(graph, opts)
    if mtp_only:
        entries = mtp_only_entries(graph, entries)
    out = Path(out)
    requant = Requant()
    name = name or Path(str(graph.provenance.get("source") or out.stem)).name
    with atomic_output(out, force, directory=False) as tmp:
        w = gguf.GGUFWriter(tmp, names.arch_of(graph.config).name)
        write_metadata(w, graph, entries, name)
        write_tokenizer(w, graph)
        for e in entries:
            shape, dt, nbytes = byte_layout(e)
            w.add_tensor_info(e.pt.name, shape, dt, nbytes, raw_dtype=None if e.type in ("f32", "f16")
                              else ggml_type(e.type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for e in (progress_iter(entries, "writing gguf") if progress else entries):
            data = pieces(graph, e, requant)
            if data is not None:  # stacked experts one at a time, large weights one row block at a time
                write_pieces(w, e, data)
                continue
            data = tensor_data(graph, e, requant)
            want, dt, _ = byte_layout(e)
            if data.shape != want or data.dtype != dt:
                raise CheckpointError(f"{e.pt.name}: produced {data.dtype} {list(data.shape)}, "
                                      f"planned {dt} {list(want)}")
            w.write_tensor_data(data)
        w.close()
    requant.report()
    counts: dict[str, int] = defaultdict(int)
    for e in entries:
        counts[e.type] += 1
    return dict(counts)


@click.command("gguf")
@click.argument("ir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="GGUF file to write.")
@click.option("--type", "type_", type=click.Choice(["auto", *GGML_TYPES]), default="auto", show_default=True,
              help="GGUF type of dense weights; auto keeps each weight's IR dtype.")
@click.option("--requantize", type=click.Choice(GGML_TYPES),
              help="Re-quantize every quantized IR weight without an identical GGUF type to this type, those with a "
                   "nearest type (int4 g64/g128, int8 per channel) included (the extra error is measured and "
                   "printed).")
@click.option("--fallback", type=click.Choice(GGML_TYPES),
              help="Type of the quantized IR weights GGUF has no type for (fp8); every other weight is copied or "
                   "goes to its nearest type as without the flag (what `nextq pipeline` does with q8_0).")
@click.option("--mtp-only", is_flag=True,
              help="Write only the MTP draft model (embeddings, output norm, LM head, nextn block), as llama.cpp's "
                   "converter does with --mtp: the draft for llama.cpp's --spec-type draft-mtp.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def gguf_cmd(ir, output, type_, requantize, fallback, mtp_only, force):
    """Export an IR directory as a GGUF file for llama.cpp (architecture qwen3next, qwen35moe or qwen35, from the
    IR's family). The file includes the MTP head's nextn block, as llama.cpp's converter writes by default."""
    graph = Graph.load(ir)
    counts = export_gguf(graph, output, GGUFOptions(type_, requantize, fallback), force=force, progress=True,
                         mtp_only=mtp_only)
    summary = ", ".join(f"{n} {t.upper()}" for t, n in sorted(counts.items()))
    console.print(f"[green]wrote[/] {output}: {sum(counts.values())} tensors ({summary}), "
                  f"{output.stat().st_size / 2**20:.1f} MiB")
