"""Drift metrics between a candidate's and a reference's next-token distributions (pure numpy, float64 math).

All functions take logits [..., V] (any float dtype) and, where needed, target ids [...]; they reduce over
every leading position. Log-softmax is computed in float64 so that identical inputs give exactly 0 / 1.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, float64. logits: [..., V] -> [..., V]."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target. logits: [..., V]; targets: [...] -> [...] float64."""
    lp = log_softmax(logits)
    return -np.take_along_axis(lp, np.asarray(targets)[..., None], axis=-1)[..., 0]


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean NLL) over all positions."""
    return float(np.exp(nll(logits, targets).mean()))


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_cand) per position, in nats. [..., V] x2 -> [...] float64 (>= 0 up to rounding)."""
    lp, lq = log_softmax(ref_logits), log_softmax(cand_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)


def top1_agreement(ref_logits: np.ndarray, cand_logits: np.ndarray) -> float:
    """Fraction of positions where both pick the same most likely token."""
    return float((np.argmax(ref_logits, -1) == np.argmax(cand_logits, -1)).mean())


def topk_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens, sorted by probability. logits: [..., V] -> (ids [..., k] int32, log p [..., k])."""
    lp = log_softmax(logits)
    ids = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
    return ids.astype(np.int32), np.take_along_axis(lp, ids, axis=-1)


def kl_divergence_topk(ref_ids: np.ndarray, ref_logprobs: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_cand) from the reference's top-k only, the other V - k tokens merged into one "rest" bucket.

    ref_ids, ref_logprobs: [..., k]; cand_logits: [..., V] -> [...] float64. Merging outcomes can only lower
    KL (log-sum inequality), so this is a lower bound that is tight when the rest mass is small.
    """
    lq = np.take_along_axis(log_softmax(cand_logits), np.asarray(ref_ids, dtype=np.int64), axis=-1)
    lp = np.asarray(ref_logprobs, dtype=np.float64)
    head = (np.exp(lp) * (lp - lq)).sum(-1)
    p_rest = np.clip(1.0 - np.exp(lp).sum(-1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(lq).sum(-1), 1e-300, 1.0)
    tail = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
    return np.maximum(head + tail, 0.0)


def percentile(x: np.ndarray, q: float) -> float:
    """The q-th percentile (linear interpolation, numpy's default); 0.0 for an empty array."""
    return float(np.percentile(x, q)) if np.size(x) else 0.0
