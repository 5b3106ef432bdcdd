"""Hugging Face checkpoints: find the files (local directory or Hub repo id), list the stored tensors, and
hand them to the reader registered for the checkpoint's architecture."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nextq import __version__
from nextq.console import console
from nextq.errors import CheckpointError, NextqError, UnsupportedModelError
from nextq.graph import Graph
from nextq.storage import StoredTensor, read_header, sha256_file

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


def open_checkpoint(source: str, revision: str | None = None) -> HFCheckpoint:
    root, resolved = resolve_source(source, revision)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: no config.json")
    config = json.loads(cfg_path.read_text())
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = sorted({root / f for f in weight_map.values()})
    else:
        shards = sorted(root.glob("*.safetensors"))
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

    ckpt = open_checkpoint(source, revision)
    reader = READERS.get(ckpt.architecture)
    if reader is None:
        raise UnsupportedModelError(
            f"architecture {ckpt.architecture!r} is not supported; supported: {sorted(READERS)}"
        )
    graph = reader(ckpt)
    graph.check()
    graph.assets = {p: ckpt.root / p for p in ASSET_PATTERNS if (ckpt.root / p).is_file()}
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
