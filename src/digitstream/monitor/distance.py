"""The Jensen-Shannon distance between histograms, row by row, vectorised."""

from __future__ import annotations

import numpy as np


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The Jensen-Shannon distance (base 2: 0 for equal distributions, 1 for disjoint ones)
    between the histograms in the last axis of ``p`` and ``q`` (counts or probabilities,
    broadcast against each other). A histogram with nothing in it is at distance 0.

    It is defined when one histogram has mass in a bin the other leaves empty (a pixel
    inked where the reference never is), where the chi-squared statistic, KL divergence
    and PSI are not; and it is bounded, so the distances of different features can be
    averaged.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p_total = p.sum(axis=-1, keepdims=True)
    q_total = q.sum(axis=-1, keepdims=True)
    p = p / np.where(p_total > 0, p_total, 1.0)
    q = q / np.where(q_total > 0, q_total, 1.0)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        from_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=-1)
        from_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=-1)
    divergence = np.maximum(0.5 * (from_p + from_q), 0.0)
    empty = (p_total[..., 0] <= 0) | (q_total[..., 0] <= 0)
    return np.where(empty, 0.0, np.sqrt(divergence))
