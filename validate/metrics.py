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
