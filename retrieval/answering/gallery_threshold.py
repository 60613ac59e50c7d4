"""A ``new_whale`` threshold for an index whose model has none, calibrated on the gallery itself.

A trained checkpoint brings a threshold calibrated on its validation carve-out. The zero-shot model
(ImageNet backbone + GeM) has none, so its index would never say "new". The gallery can stand in
for validation data, the way the whale competition's train.csv does:

* an image of an identity with at least two images is a **known** query: searched against the
  gallery without itself (leave-one-out), its truth is its identity;
* an image of an identity with one image is a **new** query: without itself its identity is gone,
  so its truth is ``new_whale``;
* a gallery with no single-image identity has no natural new queries; each known query is then
  also asked once with its whole identity left out (truth ``new_whale``), half known, half new.

The threshold is ``metrics.calibrate_threshold`` over these answers: the one MAP@5 calibration that
training uses. At most ``max_queries`` images are drawn (seeded), so a large gallery costs one
batched exact search of that many queries. Given several hubness correction ``weights``
(``index.hubness``), the answers are scored under each and the best weight is kept with its
threshold (the first among equals), as training's selection chooses it on validation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import NEW_WHALE
from ..metrics import calibrate_threshold

log = logging.getLogger(__name__)

MAX_QUERIES = 4000


@dataclass(frozen=True)
class GalleryCalibration:
    threshold: float
    map5: float  # leave-one-out MAP@5 on the gallery with that threshold
    known_queries: int
    new_queries: int
    hubness: float = 0.0  # the hubness correction weight chosen with it (index.hubness)


def calibrate_on_gallery(vectors: np.ndarray, identities: Sequence[str], k: int = 5,
                         max_queries: int = MAX_QUERIES, seed: int = 0,
                         weights: Sequence[float] = (0.0,)) -> GalleryCalibration | None:
    """The MAP@``k``-best ``new_whale`` threshold from leave-one-out queries over the gallery
    (and the best of the hubness correction ``weights``), or None when the gallery cannot show
    what a known identity looks like (no identity has 2 images)."""
    import faiss

    from index.hubness import gallery_hubness, penalised

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = np.asarray(identities, dtype=object)
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        return None
    rows = _query_rows(len(labels), max_queries, seed)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    n_neighbours = min(len(labels), (k + 1) * int(counts.max()) + 1)
    if any(weights):  # a penalised row far down the plain ranking can still win (GalleryIndex.asks)
        n_neighbours = min(len(labels), 8 * n_neighbours)
    similarities, neighbours = index.search(vectors[rows], n_neighbours)
    hubness = gallery_hubness(vectors, neighbours=index.search) if any(weights) else None
    best = None
    for weight in weights:
        sims, found = (penalised(similarities, neighbours, weight * hubness) if weight
                       else (similarities, neighbours))
        calibration = _calibrate(sims, found, rows, labels, codes, counts, k, weight)
        if best is None or calibration.map5 > best.map5:
            best = calibration
    return best


def _calibrate(similarities: np.ndarray, neighbours: np.ndarray, rows: np.ndarray,
               labels: np.ndarray, codes: np.ndarray, counts: np.ndarray, k: int,
               weight: float) -> GalleryCalibration:
    """The leave-one-out answers of ``rows`` from their (best-first) neighbours, calibrated."""
    from index.search import fold_into_identities

    leave_identity_out = counts.min() >= 2  # no single-image identity: make new queries by hand
    ranked, scores, truths = [], [], []

    def ask(sims: np.ndarray, found: np.ndarray, keep: np.ndarray, truth: str) -> None:
        ranking = fold_into_identities(sims[None, keep], found[None, keep], labels, k)
        ranked.append(ranking.identities[0])
        scores.append(ranking.scores[0])
        truths.append(truth)

    for query, sims, found in zip(rows, similarities, neighbours):
        single = counts[codes[query]] == 1
        ask(sims, found, found != query, NEW_WHALE if single else labels[query])
        if leave_identity_out:
            ask(sims, found, codes[found] != codes[query], NEW_WHALE)
    new = sum(t == NEW_WHALE for t in truths)
    threshold, map5 = calibrate_threshold(ranked, np.stack(scores), truths, k)
    return GalleryCalibration(threshold, map5, len(truths) - new, new, weight)


def _query_rows(n: int, max_queries: int, seed: int) -> np.ndarray:
    if n <= max_queries:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_queries, replace=False))
