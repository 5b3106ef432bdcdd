"""Speculative decoding with the model's own MTP head: the head drafts k tokens, the model verifies k + 1 positions
in one call, the longest agreeing prefix is kept (see notes/mtp-speculative.md).

One cycle, with x the last emitted token (at position P) and h the target's final-normed hidden states:

    draft   MTP over the pairs not yet seen (h_t, x_{t+1}) -> d1; then (h'_prev, d_i) -> d_{i+1}, k - 1 times,
            reusing its one layer with its own KV cache (h' = the head's own normed output)
    verify  target over [x, d1 .. dk] at positions P .. P+k -> k + 1 next-token distributions
    accept  greedy: d_i while it equals the target's pick, then the target's pick (plain greedy, token for token);
            sampling: d_i with probability min(1, p(d_i) / q(d_i)), else a sample of norm(max(0, p - q)) ends
            the cycle; all k accepted -> a bonus token from p. p and q are the target's and the head's
            distributions after the same penalties, temperature, top-k and top-p (generate.adjusted_logits).
    rewind  target state = as if only [x, d1 .. dn] had been fed; the head's cache drops its draft steps and
            later sees the true pairs (h at x, d1 .. dn; next ids d1 .. dn, y).

A backend takes part through a `Drafter` (exact state rewinding is the backend's job). Batch 1 only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nextq.errors import BackendError

from .generate import Sampling, adjusted_logits, next_tokens

MAX_DRAFT_TOKENS = 8  # deeper chains of a one-layer head are rejected almost surely; verify cost grows with k


class Drafter(ABC):
    """A backend's target model with exact per-position rewinding plus its MTP head with its own KV cache.

    Logits are float32 numpy [B, T, V]; hidden states are the backend's own arrays [B, T, H] (only sliced on T).
    """

    @abstractmethod
    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        """Start a sequence from ids [B, T]: logits of the last position [B, V], final-normed hidden [B, T, H]."""

    @abstractmethod
    def verify(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
        """Feed ids [B, T] after what was kept: logits [B, T, V] and hidden [B, T, H] for each position."""

    @abstractmethod
    def keep(self, n: int) -> None:
        """Make the target state exactly that after feeding only the first n tokens of the last `verify`."""

    @abstractmethod
    def draft(self, hidden: Any, ids: np.ndarray, start: int) -> tuple[np.ndarray, Any]:
        """The MTP head over pairs (hidden [B, T, H], ids [B, T]) after the first `start` pairs of its cache
        (later entries dropped): logits [B, T, V] for the token after each id, its normed output [B, T, H]."""


@dataclass
class SpeculativeStats:
    """Counts of one speculative run; acceptance_rate = accepted / drafted, mean_accepted = accepted per verify."""

    draft_tokens: int
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"draft_tokens": self.draft_tokens, "acceptance_rate": self.acceptance_rate,
                "mean_accepted": self.mean_accepted, "drafted": self.drafted, "accepted": self.accepted,
                "verify_steps": self.verify_steps}


def check_draft_tokens(k: int) -> None:
    """ValueError unless 1 <= k <= MAX_DRAFT_TOKENS."""
    if not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"draft_tokens must be an integer in 1..{MAX_DRAFT_TOKENS}, got {k!r}")


def _probs(logits: np.ndarray, history: np.ndarray, s: Sampling) -> torch.Tensor:
    """The distribution a token is sampled from, [B, V] fp32 (temperature > 0)."""
    return torch.softmax(adjusted_logits(logits, history, s), -1)


def _sample(p: torch.Tensor, gen: torch.Generator) -> np.ndarray:
    return torch.multinomial(p, 1, generator=gen)[:, 0].numpy()


def accept_drafts(logits: np.ndarray, drafts: list[np.ndarray], q: list[torch.Tensor], history: np.ndarray,
                  s: Sampling, gen: torch.Generator) -> list[np.ndarray]:
    """The tokens one verify step emits: the accepted drafts, then the target's own token.

    logits: the target's [1, k+1, V] over [last token, d1 .. dk]; drafts: k ids [1]; q: the head's distributions
    [1, V] the drafts were sampled from (unused when greedy); history [1, T] ends with the last token.
    Returns n + 1 ids [1], n = number of accepted drafts.
    """
    out: list[np.ndarray] = []
    for i in range(len(drafts) + 1):
        hist = np.concatenate([history, *(d[:, None] for d in out)], axis=1)
        if s.temperature == 0:
            tok = next_tokens(logits[:, i], hist, s, gen)
            if i == len(drafts) or tok[0] != drafts[i][0]:
                return [*out, tok]
            out.append(drafts[i])
            continue
        p = _probs(logits[:, i], hist, s)
        if i == len(drafts):  # every draft accepted: the bonus token from p
            return [*out, _sample(p, gen)]
        d = int(drafts[i][0])
        u = torch.rand((), generator=gen).item()
        if u * q[i][0, d].item() < p[0, d].item():  # u < p(d) / q(d)
            out.append(drafts[i])
            continue
        residual = (p - q[i]).clamp_min(0)
        return [*out, _sample(residual / residual.sum() if residual.sum() > 0 else p, gen)]
    raise AssertionError("unreachable")


def generate_mtp(drafter: Drafter, ids: np.ndarray, max_new_tokens: int, sampling: Sampling = Sampling(),
                 draft_tokens: int = 2, stop_ids: set[int] = frozenset(),
                 on_token: Callable[[np.ndarray], None] | None = None,
                 stats: SpeculativeStats | None = None) -> np.ndarray:
    """Continue ids [1, T] by up to `max_new_tokens` tokens, drafting `draft_tokens` per step with the MTP head.

    Same output law as `generate.generate` (greedy: the same tokens). Counts go to `stats` when given.
    Returns the new tokens [1, N].
    """
    check_draft_tokens(draft_tokens)
    history = np.asarray(ids, dtype=np.int64)
    if history.ndim != 2 or history.shape[0] != 1:
        raise BackendError(f"speculative decoding runs one sequence at a time; got ids of shape {history.shape}")
    stats = stats if stats is not None else SpeculativeStats(draft_tokens)
    gen = torch.Generator()
    if sampling.seed is not None:
        gen.manual_seed(sampling.seed)
    logits, hidden = drafter.prefill(history)
    tok = next_tokens(logits, history, sampling, gen)
    out = [tok]
    if on_token is not None:
        on_token(tok)
    history = np.concatenate([history, tok[:, None]], axis=1)
    pend_h, pend_ids = hidden, history[:, 1:]  # pairs the head has not seen: (h_t, x_{t+1})
    mtp_len = 0  # pairs in the head's cache that belong to the sequence (draft steps after them are dropped)
    while len(out) < max_new_tokens and int(tok[0]) not in stop_ids:
        k = min(draft_tokens, max_new_tokens - len(out) - 1)
        drafts, q = [], []
        if k:
            mlog, mh = drafter.draft(pend_h, pend_ids, mtp_len)
            mtp_len += pend_ids.shape[1]
            for i in range(k):
                hist = np.concatenate([history, *(d[:, None] for d in drafts)], axis=1)
                if sampling.temperature == 0:
                    d = next_tokens(mlog[:, -1], hist, sampling, gen)
                else:
                    q.append(_probs(mlog[:, -1], hist, sampling))
                    d = _sample(q[-1], gen)
                drafts.append(d)
                if i + 1 < k:
                    mlog, mh = drafter.draft(mh[:, -1:], d[:, None], mtp_len + i)
        vlog, vh = drafter.verify(np.concatenate([tok[:, None], *(d[:, None] for d in drafts)], axis=1))
        new = accept_drafts(vlog, drafts, q, history, sampling, gen)
        n = len(new) - 1
        drafter.keep(n + 1)
        stats.drafted += k
        stats.accepted += n
        stats.verify_steps += 1
        for t in new:
            if len(out) == max_new_tokens:
                break
            out.append(t)
            history = np.concatenate([history, t[:, None]], axis=1)
            if on_token is not None:
                on_token(t)
            if int(t[0]) in stop_ids:
                break
        tok = out[-1]
        pend_h, pend_ids = vh[:, :n + 1], np.stack([t for t in new], axis=1)
    return np.stack(out, axis=1)


def _truncate_kv(st, length: int) -> None:
    """Drop KV cache entries (LayerState k/v [B, Hkv, S, D]) from `length` on."""
    if st.k is not None:
        st.k, st.v = st.k[:, :, :length], st.v[:, :, :length]


class TorchDrafter(Drafter):
    """The torch executor's drafter: verify keeps every DeltaNet layer's per-position conv and recurrent states
    (LayerState.keep_steps), `keep` selects one and truncates the KV caches: exact, no replay."""

    def __init__(self, model):
        from .model import TorchModel, few_threads

        self.model: TorchModel = model
        if model.mtp is None:
            raise BackendError("this model has no MTP head (speculative='mtp' needs one)")
        self.few_threads = few_threads
        self.state = model.new_state()
        self.mtp_state = model.new_mtp_state()
        self.verified = 0

    def _ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.model.device)

    def _run(self, ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        with torch.no_grad(), self.few_threads(ids.size, self.model.device):
            h = self.model.hidden(self._ids(ids), self.state)
            return self.model.head(h).float().cpu().numpy(), h

    def prefill(self, ids):
        self.state, self.mtp_state = self.model.new_state(), self.model.new_mtp_state()
        logits, h = self._run(ids)
        return logits[:, -1], h

    def verify(self, ids):
        for st in self.state.layers:
            st.keep_steps = True
        try:
            out = self._run(ids)
        finally:
            for st in self.state.layers:
                st.keep_steps = False
        self.verified = ids.shape[1]
        return out

    def keep(self, n):
        start = self.state.position - self.verified
        for st in self.state.layers:
            if st.recurrent_steps is not None:
                st.conv, st.recurrent = st.conv_steps[:, n - 1].contiguous(), st.recurrent_steps[:, n - 1].contiguous()
                st.conv_steps = st.recurrent_steps = None
            _truncate_kv(st, start + n)
        self.state.position = start + n

    def draft(self, hidden, ids, start):
        for st in self.mtp_state.layers:
            _truncate_kv(st, start)
        self.mtp_state.position = start
        logits, h = self.model.mtp_step(hidden, self._ids(ids), self.mtp_state)
        return logits.float().cpu().numpy(), h


# speculative method name -> generation loop over a backend's Drafter
METHODS: dict[str, Callable[..., np.ndarray]] = {"mtp": generate_mtp}
