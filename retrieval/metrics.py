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

from dataclasses import asdict, dataclass, field
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


@dataclass
class Evaluation:
    """How a set of answers scores against one true label per query (``new_whale`` included)."""

    queries: int
    map5: float  # Kaggle's MAP@5
    top1: float  # first answer is the truth
    top5: float  # the truth is among the first five
    macro_f1: float  # of the first answers, over every label in the truths or the first answers
    per_identity: list[dict] = field(default_factory=list)  # identity, queries, top1, top5, map5, f1

    def to_json(self) -> dict:
        return asdict(self)


def evaluate_answers(predictions: Sequence[Sequence[str]], truths: Sequence[str],
                     k: int = 5) -> Evaluation:
    """Every number a labelled query set gets: what ``query.py --truth`` prints and what the
    submission scorer prints, from this one implementation."""
    map5 = map_at_k(predictions, truths, k)
    first = [p[0] if len(p) else "" for p in predictions]
    hit1 = np.array([f == t for f, t in zip(first, truths)])
    hit5 = np.array([t in list(p[:k]) for p, t in zip(predictions, truths)])
    ap = np.array([average_precision_at_k(p, t, k) for p, t in zip(predictions, truths)])
    f1 = f1_per_label(first, truths)
    truth_array = np.asarray(truths, dtype=object)
    per_identity = []
    for identity in sorted(set(truths)):
        rows = truth_array == identity
        per_identity.append({"identity": identity, "queries": int(rows.sum()),
                             "top1": float(hit1[rows].mean()), "top5": float(hit5[rows].mean()),
                             "map5": float(ap[rows].mean()), "f1": f1[identity]})
    return Evaluation(len(truths), map5, float(hit1.mean()), float(hit5.mean()),
                      float(np.mean(list(f1.values()))), per_identity)


def f1_per_label(predicted: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """F1 of each label (as scikit-learn's ``f1_score(average=None)``: every label that occurs in
    the truths or the predictions; 0 where a label has no true positive)."""
    from collections import Counter

    true_positives = Counter(t for p, t in zip(predicted, truths) if p == t)
    predicted_count, true_count = Counter(predicted), Counter(truths)
    return {label: 2 * true_positives[label] / (predicted_count[label] + true_count[label])
            for label in sorted(set(truths) | set(predicted))}


def format_evaluation(evaluation: Evaluation, source: str, per_identity: bool = True) -> str:
    """The summary lines (and the per-identity table) as query.py and the scorer print them."""
    e = evaluation
    lines = [f"evaluation against {source}: {e.queries} queries",
             f"  MAP@5 {e.map5:.4f}   top-1 {e.top1:.4f}   top-5 {e.top5:.4f}   macro-F1 {e.macro_f1:.4f}"]
    if per_identity and e.per_identity:
        width = max(8, *(len(row["identity"]) for row in e.per_identity))
        lines.append(f"  {'identity':<{width}s}  queries   top-1   top-5   MAP@5      F1")
        for row in e.per_identity:
            lines.append(f"  {row['identity']:<{width}s}  {row['queries']:7d}  {row['top1']:6.3f}  "
                         f"{row['top5']:6.3f}  {row['map5']:6.3f}  {row['f1']:6.3f}")
    return "\n".join(lines)
