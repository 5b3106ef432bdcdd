"""One interface over the engines: `nextq.load(path, backend=None, device="cpu")`.

    torch         an IR directory (graph.json), executed by nextq's PyTorch runtime
    transformers  a Hugging Face checkpoint directory, run by transformers (the numerical reference)
    llama.cpp     a .gguf file (through llama-cpp-python)            -- registered by the GGUF exporter
    ort           an ONNX export directory (through ONNX Runtime)     -- registered by the ONNX exporter

Every backend returns float32 numpy logits and keeps its own decode state between `prefill` and `decode`.
"""

from __future__ import annotations

import json
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nextq.errors import BackendError
from nextq.targets import infer_backend  # the target registry recognises paths; re-exported for callers

from .generate import Sampling, generate

BACKENDS: dict[str, type[Model]] = {}


def register_backend(name: str):
    def deco(cls):
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return deco


# Backends living in their exporter's area, imported on first use (their engines are heavy imports).
BACKEND_MODULES = {"llama.cpp": "nextq.runtime.llama_cpp", "ort": "nextq.runtime.ort", "gpu": "nextq.runtime.gpu"}
# the metadata llama_cpp.trained_context reads (with gguf-py) before llama.cpp loads the file: key under the
# architecture -> kind (untrusted.GGUF_KINDS)
GGUF_ENGINE_KINDS = {"context_length": "int", "rope.scaling.type": "str", "rope.scaling.factor": "float",
                     "rope.scaling.original_context_length": "int"}
ONNX_FILES = ("model.onnx", "mtp.onnx")  # what the ort backend hands ONNX Runtime (it says itself when one is missing)


def check_gguf_input(path: Path) -> None:
    """A .gguf about to be handed to gguf-py and llama.cpp: the header checked against the file size (every ggml
    type gguf-py knows), general.architecture a string, the keys read before loading of their kinds."""
    from gguf.constants import GGML_QUANT_SIZES

    from nextq import untrusted

    h = untrusted.gguf_header(path, {int(t): s for t, s in GGML_QUANT_SIZES.items()},
                              {"general.architecture": "str"})
    untrusted.need("general.architecture" in h.fields, str(path), "no general.architecture")
    arch = h.fields["general.architecture"][1]
    untrusted.gguf_need_kinds(h, {f"{arch}.{k}": v for k, v in GGUF_ENGINE_KINDS.items()}, str(path))


def check_onnx_input(path: Path) -> None:
    """An ONNX export directory about to be handed to ONNX Runtime: its model files, and the external data they
    name, regular files inside it."""
    from nextq import untrusted

    untrusted.onnx_dir(path, (), ONNX_FILES)


# backend -> the check (nextq/untrusted.py) its engine's input passes before the engine reads a byte of it
INPUT_CHECKS: dict[str, Callable[[Path], None]] = {"llama.cpp": check_gguf_input, "ort": check_onnx_input}


def load(path: str | Path, backend: str | None = None, device: str = "cpu", **kwargs) -> Model:
    path = Path(path)
    if not path.exists():
        raise BackendError(f"{path}: no such file or directory")
    name = backend or infer_backend(path)
    if name not in BACKENDS and name in BACKEND_MODULES:
        import importlib

        try:
            importlib.import_module(BACKEND_MODULES[name])
        except ModuleNotFoundError as e:
            raise BackendError(f"backend {name!r} needs {e.name!r}, which is not installed") from None
    if name not in BACKENDS:
        raise BackendError(f"backend {name!r} is not available; available: {sorted(BACKENDS)}")
    if name in INPUT_CHECKS:
        INPUT_CHECKS[name](path)
    return BACKENDS[name](path, device=device, **kwargs)


class Model(ABC):
    """A loaded model. ids are int64 arrays [B, T]; logits are float32 arrays."""

    name = "?"

    def __init__(self, path: Path, device: str = "cpu"):
        self.path = path
        self.device = device
        self.tokenizer = load_tokenizer(path if path.is_dir() else path.parent)

    @abstractmethod
    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Whole-sequence logits [B, T, V] float32 (no state kept)."""

    @abstractmethod
    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Start a new sequence; returns the last position's logits [B, V]."""

    @abstractmethod
    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Feed ids [B, t] (usually t = 1) after what was seen; returns the last position's logits [B, V]."""

    @property
    def stop_ids(self) -> set[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok is not None and tok.eos_token_id is not None else set()
        return ids

    def drafter(self, method: str):
        """The speculative-decoding view of this model (runtime/speculative.Drafter) for `method`."""
        raise BackendError(f"the {self.name} backend has no speculative decoding ({method!r}); "
                           f"use the torch, ort or gpu backend")

    def generate(self, prompt: str | np.ndarray, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 on_text: Callable[[str], None] | None = None, speculative: str | None = None,
                 draft_tokens: int = 2, stats=None) -> np.ndarray:
        """Generate from a text prompt (needs a tokenizer) or ids [B, T]; streams decoded text to `on_text`.

        speculative="mtp" drafts `draft_tokens` tokens per step with the model's MTP head (batch 1; same output law,
        greedy: the same tokens); its counts go to `stats` (a speculative.SpeculativeStats) when given.
        """
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise BackendError(f"{self.path}: no tokenizer files; pass token ids instead of text")
            ids = np.array([self.tokenizer(prompt)["input_ids"]], dtype=np.int64)
        else:
            ids = np.asarray(prompt, dtype=np.int64)
        emitted: list[int] = []
        shown = ""

        def stream(tok: np.ndarray):
            nonlocal shown
            if on_text is None or self.tokenizer is None:
                return
            emitted.append(int(tok[0]))
            text = self.tokenizer.decode(emitted, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for complete UTF-8 sequences
                on_text(text[len(shown):])
                shown = text

        return self.generate_ids(ids, max_new_tokens, sampling, stream, speculative, draft_tokens, stats)

    def generate_ids(self, ids: np.ndarray, max_new_tokens: int, sampling: Sampling,
                     on_token: Callable[[np.ndarray], None] | None = None, speculative: str | None = None,
                     draft_tokens: int = 2, stats=None) -> np.ndarray:
        """New tokens [B, N] after ids [B, T] (see `generate`), each streamed to `on_token` as ids [B]."""
        if speculative is None:
            return generate(self, ids, max_new_tokens, sampling, self.stop_ids, on_token)
        from .speculative import METHODS, check_draft_tokens

        if speculative not in METHODS:
            raise BackendError(f"speculative method {speculative!r} is not known; known: {sorted(METHODS)}")
        check_draft_tokens(draft_tokens)
        return METHODS[speculative](self.drafter(speculative), ids, max_new_tokens, sampling, draft_tokens,
                                    self.stop_ids, on_token, stats)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "path": str(self.path), "device": self.device}


def load_tokenizer(directory: Path):
    """transformers' fast tokenizer from the files in `directory`, or None when there are none."""
    if not (directory / "tokenizer.json").is_file() and not (directory / "vocab.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _torch_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise BackendError(f"dtype {dtype!r} is not supported; supported: {sorted(table)}")
    return table[dtype]


@register_backend("torch")
class TorchBackend(Model):
    """nextq's own PyTorch executor over an IR directory."""

    def __init__(self, path: Path, device: str = "cpu", dtype: str = "float32"):
        super().__init__(path, device)
        from nextq.graph import Graph

        from .model import TorchModel

        self.graph = Graph.load(path)
        self.model = TorchModel(self.graph, device=device, dtype=_torch_dtype(dtype))
        self.state = None

    def _ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.model.device)

    def logits(self, ids):
        return self.model.forward(self._ids(ids)).float().cpu().numpy()

    def prefill(self, ids):
        self.state = self.model.new_state()
        return self.model.forward(self._ids(ids), self.state)[:, -1].float().cpu().numpy()

    def decode(self, ids):
        if self.state is None:
            raise BackendError("decode before prefill")
        return self.model.forward(self._ids(ids), self.state)[:, -1].float().cpu().numpy()

    def drafter(self, method):
        from .speculative import TorchDrafter

        if self.model.mtp is None:
            raise BackendError(f"{self.path}: the model has no MTP head; --speculative {method} needs one")
        return TorchDrafter(self.model)


@register_backend("transformers")
class TransformersBackend(Model):
    """The original checkpoint run by transformers (fp32, eager attention): the numerical reference.

    `logits` is one whole-sequence forward without cache (transformers' pure-torch path can drift between
    prefill and cached decode, see notes/qwen3-next.md); `prefill`/`decode` use its cache.
    """

    def __init__(self, path: Path, device: str = "cpu", dtype: str = "float32"):
        super().__init__(path, device)
        from transformers import AutoModelForCausalLM

        from nextq.convert.fp8_source import check_fp8_config, write_dequantized_checkpoint

        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
        if qc.get("quant_method") == "fp8" and check_fp8_config({"quantization_config": qc}):  # exactly dequantized
            # (other methods, e.g. compressed-tensors, are transformers' own to load)
            self._dequantized = tempfile.TemporaryDirectory(prefix="nextq-fp8-reference-")
            path = write_dequantized_checkpoint(path, Path(self._dequantized.name))
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_torch_dtype(dtype), attn_implementation="eager"
        ).to(device).eval()
        self.cache = None

    @torch.no_grad()
    def _forward(self, ids, cache):
        out = self.model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device),
                         past_key_values=cache, use_cache=cache is not None)
        return out.logits.float().cpu().numpy()

    def logits(self, ids):
        return self._forward(ids, None)

    def prefill(self, ids):
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        return self._forward(ids, self.cache)[:, -1]

    def decode(self, ids):
        if self.cache is None:
            raise BackendError("decode before prefill")
        return self._forward(ids, self.cache)[:, -1]
