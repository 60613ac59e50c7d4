"""Retrieval metrics and the ``new_whale`` threshold.

* MAP@5 exactly as Kaggle's whale competition scored it: one truth per query; the score of a query
  is 1/rank of the first occurrence of the truth among the 5 answers, else 0; ``new_whale`` is a
  label like any other.
* Open-set Recall@1 and MAP@R (bench/) come from pytorch-metric-learning's AccuracyCalculator
  (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020), not from here.
* The threshold: ``new_whale`` is inserted before the first identity whose score falls under it.
  ``calibrate_threshold`` picks the value that maximises MAP@5 on validation queries.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import NEW_WHALE


def average_precision_at_k(predictions: Sequence[str], truth: str, k: int = 5) -> float:
    """1/rank of the first occurrence of ``truth`` within the first ``k`` predictions, else 0."""
    for rank, label in enumerate(predictions[:k], start=1):
        if label == truth:
            return 1.0 / rank
    return 0.0


def map_at_k(predictions: Sequence[Sequence[str]], truths: Sequence[str], k: int = 5) -> float:
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} prediction lists for {len(truths)} truths")
    if not truths:
        raise ValueError("MAP@k of zero queries is undefined")
    return float(np.mean([average_precision_at_k(p, t, k) for p, t in zip(predictions, truths)]))


def insert_new_whale(identities: Sequence[str], scores: Sequence[float], threshold: float | None,
                     k: int = 5) -> list[str]:
    """Top-``k`` answer: ``new_whale`` goes before the first identity scoring under ``threshold``.

    ``None`` means no threshold (``new_whale`` never inserted). If every identity scores at or
    above it, ``new_whale`` is not among the answers.
    """
    answer = list(identities[:k])
    if threshold is None:
        return answer
    for position, score in enumerate(scores[:k]):
        if score < threshold:
            return (answer[:position] + [NEW_WHALE] + answer[position:])[:k]
    return answer


def _ap_per_threshold(scores: np.ndarray, truth_rank: np.ndarray, is_new: np.ndarray,
                      thresholds: np.ndarray, k: int) -> np.ndarray:
    """(T,) MAP@k for each threshold, vectorised over queries (Q) and thresholds (T).

    ``scores`` (Q, k) descending identity scores; ``truth_rank`` (Q,) 1-based rank of the truth
    among the identities (a large number when absent); ``is_new`` (Q,) truth is new_whale.
    """
    # position (0-based) where new_whale lands = number of identities scoring >= threshold
    position = (scores[:, None, :] >= thresholds[None, :, None]).sum(axis=2)  # (Q, T)
    new_ap = np.where(position < k, 1.0 / (position + 1), 0.0)
    rank = truth_rank[:, None].astype(np.float64)
    shifted = np.where(rank <= position, rank, rank + 1)  # new_whale inserted before it
    known_ap = np.where(shifted <= k, 1.0 / shifted, 0.0)
    return np.where(is_new[:, None], new_ap, known_ap).mean(axis=0)


def calibrate_threshold(ranked_identities: Sequence[Sequence[str]], scores: np.ndarray,
                        truths: Sequence[str], k: int = 5,
                        max_candidates: int = 2000) -> tuple[float, float]:
    """The ``new_whale`` threshold that maximises MAP@k on these queries, and that MAP@k.

    Candidates are the midpoints between observed scores (plus one below and one above all of
    them); among equally good ones the median is taken, which sits furthest from the edges.
    """
    scores = np.asarray(scores, dtype=np.float64)[:, :k]
    if scores.shape[1] < k:  # fewer identities than k: pad with scores nothing can reach
        scores = np.pad(scores, ((0, 0), (0, k - scores.shape[1])), constant_values=-np.inf)
    is_new = np.array([t == NEW_WHALE for t in truths])
    truth_rank = np.array([
        (list(ids[:k]).index(t) + 1) if t in list(ids[:k]) else k + 10
        for ids, t in zip(ranked_identities, truths)])
    observed = np.unique(scores[np.isfinite(scores)])
    if len(observed) > max_candidates:
        observed = np.unique(np.quantile(observed, np.linspace(0, 1, max_candidates)))
    midpoints = (observed[:-1] + observed[1:]) / 2
    candidates = np.concatenate([[observed[0] - 1e-6], midpoints, [observed[-1] + 1e-6]])
    ap = _ap_per_threshold(scores, truth_rank, is_new, candidates, k)
    best = np.flatnonzero(ap >= ap.max() - 1e-12)
    chosen = best[len(best) // 2]
    return float(candidates[chosen]), float(ap[chosen])
