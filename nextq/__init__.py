"""nextq: convert, quantize, export, run, validate and publish Qwen3-Next checkpoints.

Public API:
    nextq.load(path, backend=None, device="cpu") -> a model with .logits(ids), .prefill / .decode, .generate
    nextq.read(source) -> the canonical graph of a Hugging Face checkpoint or an IR directory
"""

__version__ = "0.1.0"


def load(path, backend: str | None = None, device: str = "cpu", **kwargs):
    """Open a model with the backend its path implies (IR dir -> torch, HF dir -> transformers, ...)."""
    from .runtime.backends import load as _load

    return _load(path, backend=backend, device=device, **kwargs)


def read(source, revision: str | None = None):
    """The canonical graph of an IR directory, a .gguf file or a Hugging Face checkpoint (local dir or Hub repo id)."""
    from pathlib import Path

    from .graph import Graph

    if (Path(source) / "graph.json").is_file():
        return Graph.load(source)
    if Path(source).suffix == ".gguf":
        from .convert.gguf_import import read_gguf

        return read_gguf(source)
    from .convert.hf import read_hf

    return read_hf(str(source), revision)


__all__ = ["__version__", "load", "read"]
