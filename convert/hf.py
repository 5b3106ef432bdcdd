"""Hugging Face checkpoints: find the files (local directory or Hub repo id), list the stored tensors, and
hand them to the reader registered for the checkpoint's architecture."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nextq import __version__
from nextq.console import console
from nextq.errors import CheckpointError, NextqError, UnsupportedModelError
from nextq.graph import POSITIVE_FIELDS, TOKEN_ID_FIELDS, Graph, ModelConfig
from nextq.storage import StoredTensor, read_header, sha256_file
from nextq.untrusted import check_json_fields, need, read_json, resolve_inside

# Files carried into the IR directory next to the weights (tokenizer, chat template, generation defaults).
ASSET_PATTERNS = [
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json", "LICENSE",
]
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", *ASSET_PATTERNS]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint on local disk: its config and an index of stored tensors (headers only)."""

    root: Path
    config: dict
    tensors: dict[str, StoredTensor]
    shards: list[Path]
    source: str
    revision: str | None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]


def resolve_source(source: str, revision: str | None = None) -> tuple[Path, str | None]:
    """A local directory as is, or a Hub repo id downloaded (only the files a conversion needs)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source}: expected a checkpoint directory, got a file")
        return path, revision
    if not REPO_ID.match(source):
        raise CheckpointError(f"{source}: no such directory, and not a Hub repo id (expected owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(source, revision=revision, allow_patterns=HUB_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(f"{source}: could not download from the Hub ({type(e).__name__}: {e})") from None
    return Path(local), Path(local).name  # snapshot folders are named by commit hash


ROPE_NUMBERS = ("rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings", "beta_fast",
                "beta_slow", "attention_factor", "mscale", "mscale_all_dim")
ROPE_REQUIRED_NUMBERS = ("rope_theta", "partial_rotary_factor")  # read with float(): null is not a default
DERIVED_FIELDS = ("layer_types", "head_dim")  # the family readers compute these when config.json omits them
REQUIRED_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING and f.name not in DERIVED_FIELDS)


def check_config_json(cfg: dict, where: str) -> None:
    """The config.json values readers compute with (untrusted): ModelConfig's fields of their annotated types and
    ranges, the rope objects' numbers, a positive full_attention_interval; Qwen3.5's text_config likewise."""
    archs = cfg.get("architectures")
    need(archs is None or isinstance(archs, list) and all(isinstance(a, str) for a in archs), f"{where}: "
         "architectures", f"expected a list of strings, got {archs!r:.60}")
    text = cfg.get("text_config")
    need(text is None or isinstance(text, dict), f"{where}: text_config", "expected a JSON object")
    for d, w in ((cfg, where), *([(text, f"{where}: text_config")] if text is not None else [])):
        check_json_fields(ModelConfig, d, w, POSITIVE_FIELDS, TOKEN_ID_FIELDS, skip=("rope_scaling",))
        ropes = [(w, d)]
        for key in ("rope_parameters", "rope_scaling"):
            rope = d.get(key) or {}
            need(isinstance(rope, dict), f"{w}: {key}", f"expected a JSON object, got {rope!r:.60}")
            ropes.append((f"{w}: {key}", rope))
        for rw, rope in ropes:
            for k in ROPE_NUMBERS:
                v = rope.get(k)
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 2 ** 63
                need(ok or v is None and (k not in rope or k not in ROPE_REQUIRED_NUMBERS), f"{rw}: {k}",
                     f"expected a number, got {v!r:.60}")
        interval = d.get("full_attention_interval", 1)
        need(isinstance(interval, int) and interval >= 1, f"{w}: full_attention_interval",
             f"expected an integer >= 1, got {interval!r:.60}")
    model = text if text is not None else cfg
    missing = [k for k in REQUIRED_FIELDS if model.get(k) is None]
    need(not missing, where, f"missing field(s) {missing}")


def open_checkpoint(source: str, revision: str | None = None) -> HFCheckpoint:
    root, resolved = resolve_source(source, revision)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: no config.json")
    config = read_json(resolve_inside(root, cfg_path.name, "config"))
    check_config_json(config, str(cfg_path))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(resolve_inside(root, index.name, "index")).get("weight_map")
        need(isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values()),
             f"{index}: weight_map", "expected an object of tensor name -> shard file name")
        shards = sorted({resolve_inside(root, f, "shard") for f in weight_map.values()})
    else:
        shards = sorted(resolve_inside(root, p.name, "shard") for p in root.glob("*.safetensors"))
        weight_map = {}
    if not shards:
        raise CheckpointError(f"{root}: no *.safetensors files")
    tensors: dict[str, StoredTensor] = {}
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard}: listed in model.safetensors.index.json but missing")
        for key, st in read_header(shard).items():
            if key in tensors:
                raise CheckpointError(f"{key}: stored twice ({tensors[key].path} and {shard})")
            tensors[key] = st
    for key, fname in weight_map.items():
        if key not in tensors:
            raise CheckpointError(f"{key}: listed in the index (in {fname}) but not stored in any shard")
    return HFCheckpoint(root, config, tensors, shards, source, resolved)


Reader = Callable[[HFCheckpoint], Graph]
READERS: dict[str, Reader] = {}


def register_reader(architecture: str):
    def deco(fn: Reader) -> Reader:
        READERS[architecture] = fn
        return fn

    return deco


def read_hf(source: str, revision: str | None = None, hash_shards: bool = True) -> Graph:
    """Read a Hugging Face checkpoint into the canonical graph (lazy: no tensor data is loaded)."""
    from . import qwen3_5, qwen3_next  # noqa: F401  (register their families' readers)
    from .quant_source import pair_quantized

    ckpt = open_checkpoint(source, revision)
    ckpt.tensors = pair_quantized(ckpt.config, ckpt.tensors)  # quantized modules (FP8, compressed-tensors) -> one entry
    reader = READERS.get(ckpt.architecture)
    if reader is None:
        raise UnsupportedModelError(
            f"architecture {ckpt.architecture!r} is not supported; supported: {sorted(READERS)}"
        )
    graph = reader(ckpt)
    graph.check()
    graph.assets = {p: resolve_inside(ckpt.root, p, "asset") for p in ASSET_PATTERNS if (ckpt.root / p).is_file()}
    graph.assets["source_config.json"] = ckpt.root / "config.json"
    for why, n in graph.provenance.get("dropped", {}).items():
        console.print(f"note: dropped {n} stored tensors: {why}", soft_wrap=True)
    graph.provenance = {
        "source": ckpt.source,
        "revision": ckpt.revision,
        "architecture": ckpt.architecture,
        "shards": {p.name: (sha256_file(p) if hash_shards else None) for p in ckpt.shards},
        "tool": f"nextq {__version__}",
        **graph.provenance,  # the reader's own entries (dropped tensors and why)
    }
    return graph


__all__ = ["HFCheckpoint", "NextqError", "open_checkpoint", "read_hf", "register_reader"]
