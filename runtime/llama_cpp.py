"""The `llama.cpp` backend: a .gguf file run by llama.cpp through llama-cpp-python.

Numerics: llama.cpp keeps its KV cache in f16 by default, which alone moves logits by 4e-5..2e-4 relative on tiny
models; this backend asks for an f32 cache (type_k = type_v = GGML_TYPE_F32) so that an F32 GGUF can be compared
with transformers at ~1e-6. `n_batch = n_ubatch = n_ctx`, so `logits(ids)` is one llama_decode call (one ubatch)
for a whole row; the hybrid model's recurrent state is cleared between rows.

The tokenizer is the GGUF's own (llama.cpp's), wrapped in the small interface nextq's generation uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nextq.errors import BackendError

from .backends import Model, register_backend

GGML_TYPE_F32 = 0  # ggml.h enum ggml_type


def trained_context(path: Path) -> int | None:
    """`{arch}.context_length` of a GGUF (header only); with YaRN, factor x original context when larger (the
    converter keeps context_length = max_position_embeddings, e.g. 262144 for the 1M-token recipe)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()

    def field(key: str):
        f = r.fields.get(f"{arch}.{key}")
        return f.contents() if f is not None else None

    n = field("context_length")
    if field("rope.scaling.type") == "yarn" and None not in (field("rope.scaling.factor"),
                                                               field("rope.scaling.original_context_length")):
        n = max(n or 0, int(field("rope.scaling.factor") * field("rope.scaling.original_context_length")))
    return int(n) if n is not None else None


class GGUFTokenizer:
    """llama.cpp's tokenizer for a GGUF, with the slice of transformers' API that nextq uses."""

    def __init__(self, llm):
        import llama_cpp

        self.llm = llm
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.eos_token_id = int(llm.token_eos()) if llm.token_eos() >= 0 else None
        self.chat_template = llm.metadata.get("tokenizer.chat_template")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens in the text (<|im_start|>...) are parsed as such, as transformers does."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        data = self.llm.detokenize([int(i) for i in ids], special=not skip_special_tokens)
        return data.decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, int(token)))

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False, **kw):
        """Render the GGUF's chat template (Jinja, as transformers renders it)."""
        if not self.chat_template:
            raise BackendError("the GGUF has no tokenizer.chat_template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(self.chat_template).render(messages=messages,
                                                          add_generation_prompt=add_generation_prompt, **kw)
        return self.encode(text, add_special_tokens=False) if tokenize else text


@register_backend("llama.cpp")
class LlamaCppBackend(Model):
    """A GGUF run by llama.cpp. ids [B, T] int64 -> float32 logits; prefill/decode keep one sequence (B = 1)."""

    def __init__(self, path: Path, device: str = "cpu", n_ctx: int = 2048, n_threads: int | None = None,
                 f32_cache: bool = True):
        from llama_cpp import Llama

        self.path, self.device = Path(path), device
        n_ctx = min(n_ctx, trained_context(self.path) or n_ctx)  # past it llama.cpp only warns
        if device not in ("cpu", "cuda"):
            raise BackendError(f"device {device!r} is not supported by the llama.cpp backend; supported: cpu, cuda")
        cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
        # use_mmap=False: the file is read into llama.cpp's own buffers once. With mmap, the CPU backend's repacking
        # of Q4_0 / IQ4_NL weights copies them while their mapped pages stay resident: measured on a 4.82 GiB GGUF
        # (80B dimensions, 4 layers), 8.3 GiB resident after load with mmap, 4.9 GiB without.
        try:
            self.llm = Llama(str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                             n_gpu_layers=-1 if device == "cuda" else 0, n_threads=n_threads, verbose=False,
                             use_mmap=False, **cache)
        except (ValueError, RuntimeError) as e:
            raise BackendError(f"{self.path}: llama.cpp could not load the model ({e})") from None
        self.n_ctx = n_ctx
        self.tokenizer = GGUFTokenizer(self.llm)

    @property
    def stop_ids(self) -> set[int]:
        """llama.cpp's end-of-generation tokens (eos, eot, <|im_end|>, ...)."""
        if not hasattr(self, "_stop"):
            self._stop = {i for i in range(self.llm.n_vocab()) if self.tokenizer.is_eog(i)} or super().stop_ids
        return self._stop

    def _eval(self, row: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Feed ids [t] after what the context holds; returns their logits [t, V] float32, written into `out` when
        given. The loop is llama-cpp-python's `Llama.eval`, except that llama.cpp's output buffer is copied straight
        into `out` instead of through its [n_ctx, V] `scores` and a copy of those rows (two fewer [t, V] float32
        arrays resident: 311 MB each for a window of 512 at Qwen3-Next's vocabulary)."""
        llm = self.llm
        if llm.n_tokens + len(row) > self.n_ctx:
            raise BackendError(f"sequence length {llm.n_tokens + len(row)} exceeds n_ctx={self.n_ctx} "
                               "(pass n_ctx= to nextq.load)")
        out = np.empty((len(row), llm.n_vocab()), dtype=np.float32) if out is None else out
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        for i in range(0, len(row), llm.n_batch):
            piece = [int(t) for t in row[i:i + llm.n_batch]]
            llm._batch.set_batch(batch=piece, n_past=llm.n_tokens, logits_all=True)
            llm._ctx.decode(llm._batch)
            out[i:i + len(piece)] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(piece), out.shape[1]))
            llm.input_ids[llm.n_tokens:llm.n_tokens + len(piece)] = piece
            llm.n_tokens += len(piece)
        return out

    def logits(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((*ids.shape, self.llm.n_vocab()), dtype=np.float32)
        for row, dst in zip(ids, out):
            self.llm.reset()
            self._eval(row, dst)
        self.llm.reset()
        return out

    def _one(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise BackendError(f"llama.cpp backend decodes one sequence at a time: ids expected [1, T], got "
                               f"{list(ids.shape)}")
        return ids[0]

    def prefill(self, ids):
        row = self._one(ids)
        self.llm.reset()
        return self._eval(row)[-1:]

    def decode(self, ids):
        row = self._one(ids)
        if self.llm.n_tokens == 0:
            raise BackendError("decode before prefill")
        return self._eval(row)[-1:]

    def describe(self):
        return {**super().describe(), "n_ctx": self.n_ctx}
