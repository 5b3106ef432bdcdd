"""Token generation over any backend: greedy or sampled (temperature, top-k, top-p, repetition and presence
penalties), streaming each token to a callback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; temperature 0 means greedy. Penalties follow the usual conventions:
    repetition_penalty divides positive (multiplies negative) logits of seen tokens (CTRL / transformers);
    presence_penalty subtracts a constant from seen tokens' logits (OpenAI)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def adjusted_logits(logits: np.ndarray, history: np.ndarray, s: Sampling) -> torch.Tensor:
    """The logits a token is picked from: [B, V] float after the penalties and, when sampling, temperature, top-k
    and top-p (dropped tokens at -inf). logits: [B, V]; history: [B, T] int64 ids seen so far."""
    x = torch.from_numpy(np.asarray(logits, dtype=np.float32)).clone()
    if s.repetition_penalty != 1.0 or s.presence_penalty:
        seen = torch.zeros_like(x, dtype=torch.bool)
        seen.scatter_(1, torch.from_numpy(history).long(), True)
        if s.repetition_penalty != 1.0:
            x = torch.where(seen, torch.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty), x)
        x = x - seen.float() * s.presence_penalty
    if s.temperature == 0:
        return x
    x = x / s.temperature
    if s.top_k:
        kth = torch.topk(x, min(s.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1:
        srt, idx = torch.sort(x, descending=True, dim=-1)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) >= s.top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.scatter(1, idx, srt.masked_fill(drop, float("-inf")))
    return x


def next_tokens(logits: np.ndarray, history: np.ndarray, s: Sampling, gen: torch.Generator) -> np.ndarray:
    """Pick the next token per row. logits: [B, V] float; history: [B, T] int64 ids seen so far -> [B] int64."""
    x = adjusted_logits(logits, history, s)
    if s.temperature == 0:
        return x.argmax(-1).numpy()
    return torch.multinomial(torch.softmax(x, -1), 1, generator=gen)[:, 0].numpy()


def generate(model, ids: np.ndarray, max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_ids: set[int] = frozenset(), on_token: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Continue ids [B, T] by up to `max_new_tokens` tokens through `model.prefill` / `model.decode`.

    Stops early when every row has produced a stop id. Returns the new tokens [B, N].
    """
    gen = torch.Generator()
    if sampling.seed is not None:
        gen.manual_seed(sampling.seed)
    history = np.asarray(ids, dtype=np.int64)
    logits = model.prefill(history)
    out: list[np.ndarray] = []
    done = np.zeros(history.shape[0], dtype=bool)
    for step in range(max_new_tokens):
        tok = next_tokens(logits, history, sampling, gen)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        done |= np.isin(tok, list(stop_ids))
        history = np.concatenate([history, tok[:, None]], axis=1)
        if done.all() or step == max_new_tokens - 1:
            break
        logits = model.decode(tok[:, None])
    return np.stack(out, axis=1) if out else np.zeros((history.shape[0], 0), dtype=np.int64)
