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

``choose_gallery_space`` also decides whether the index whitens its gallery and queries
(``index.whitening``): the map is fitted on the gallery itself, so the plain leave-one-out would
flatter it (each query's own deviation from its identity shaped the map that brings it closer).
The whitened calibration therefore answers each query in a space whitened by a map fitted
without it (``WHITENING_FOLDS`` folds of the query images), and the whitened gallery is kept only
where that honest MAP@5 beats the plain one. On the shared sets at 160 px (seeds 0-4, test
queries) it lifted the zero-shot index from 0.872 to 0.906 on ORL, 0.513 to 0.596 on Omniglot
and 0.724 to 0.756 on dogs (bench/README.md, "Whitened zero-shot index").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from . import NEW_WHALE
from .metrics import calibrate_threshold

log = logging.getLogger(__name__)

MAX_QUERIES = 4000
WHITENING_FOLDS = 5
# the whitened calibration measures hubness once per fold over the whole gallery (N^2 each):
# above this many images the gallery stays unwhitened (~1 min at this size on 2 cores)
WHITENING_MAX_IMAGES = 20_000


@dataclass(frozen=True)
class GalleryCalibration:
    threshold: float
    map5: float  # leave-one-out MAP@5 on the gallery with that threshold
    known_queries: int
    new_queries: int
    hubness: float = 0.0  # the hubness correction weight chosen with it (index.hubness)


def calibrate_on_gallery(vectors: np.ndarray, identities: Sequence[str], k: int = 5,
                         max_queries: int = MAX_QUERIES, seed: int = 0,
                         weights: Sequence[float] = (0.0,),
                         whitened: bool = False, local=None, chamfer=None
                         ) -> GalleryCalibration | None:
    """The MAP@``k``-best ``new_whale`` threshold from leave-one-out queries over the gallery
    (and the best of the hubness correction ``weights``), or None when the gallery cannot show
    what a known identity looks like (no identity has 2 images). ``whitened``: each query is
    answered in the gallery whitened by a map fitted without that query (``index.whitening``,
    ``WHITENING_FOLDS`` folds): what a whitened index does for photos it never saw. ``local``
    (an ``index.local_match.LocalGallery`` of these images, ``chamfer`` its cache): each
    query's ``SHORTLIST`` pooled neighbours re-scored with the local descriptors, as the index
    searches, and the hubness measured on those scores."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = np.asarray(identities, dtype=object)
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        return None
    rows = _query_rows(len(labels), max_queries, seed)
    n_neighbours = min(len(labels), (k + 1) * int(counts.max()) + 1)
    if local is not None:  # the shortlist the index re-scores (GalleryIndex.search)
        from index.local_match import SHORTLIST

        n_neighbours = min(len(labels), max(n_neighbours, SHORTLIST + 1))
    elif any(weights):  # a penalised row far down the plain ranking can still win (GalleryIndex.asks)
        n_neighbours = min(len(labels), 8 * n_neighbours)
    from index.hubness import penalised

    spaces = _folds(vectors, labels, rows, seed) if whitened else [(vectors, rows)]
    # one whitened copy of the gallery at a time: only each fold's answers are kept
    parts = [(fold_rows, *_answers(space, fold_rows, n_neighbours, any(weights), local, chamfer))
             for space, fold_rows in spaces]
    order = np.argsort(np.concatenate([fold_rows for fold_rows, *_ in parts]), kind="stable")
    best = None
    for weight in weights:
        answered = [penalised(sims, found, weight * hubness) if weight else (sims, found)
                    for _, sims, found, hubness in parts]
        similarities = np.concatenate([sims for sims, _ in answered])[order]
        neighbours = np.concatenate([found for _, found in answered])[order]
        calibration = _calibrate(similarities, neighbours, np.sort(rows), labels, codes, counts,
                                 k, weight)
        if best is None or calibration.map5 > best.map5:
            best = calibration
    return best


def choose_gallery_space(vectors: np.ndarray, identities: Sequence[str],
                         weights: Sequence[float] = (0.0,), whiten: bool = True,
                         plain: GalleryCalibration | None = None
                         ) -> tuple[GalleryCalibration | None, tuple[np.ndarray, np.ndarray] | None]:
    """The gallery calibration, and the within-identity whitening (mean, matrix) to apply to the
    gallery and every query, or None where the plain gallery calibrates as well or better (or
    ``whiten`` is off, or the gallery is too small to fit a map or larger than
    ``WHITENING_MAX_IMAGES``). Whitened and plain are compared on honest leave-one-out MAP@5.
    ``plain``: ``calibrate_on_gallery`` of the same vectors and weights, where the caller has it
    already (it is not computed again)."""
    from index.whitening import fit_within_identity

    if plain is None:
        plain = calibrate_on_gallery(vectors, identities, weights=weights)
    if plain is None or not whiten:
        return plain, None
    if len(vectors) > WHITENING_MAX_IMAGES:
        log.info("gallery of %d images: not whitened (the choice is measured up to %d)",
                 len(vectors), WHITENING_MAX_IMAGES)
        return plain, None
    fitted = fit_within_identity(vectors, identities)
    if fitted is None:
        return plain, None
    white = calibrate_on_gallery(vectors, identities, weights=weights, whitened=True)
    log.info("leave-one-out MAP@5 on the gallery: %.3f plain, %.3f whitened within identities "
             "(each query's own image left out of the map's fit)", plain.map5, white.map5)
    if white.map5 > plain.map5:
        return white, fitted
    return plain, None


def choose_local_share(vectors: np.ndarray, identities: Sequence[str], maps: np.ndarray,
                       calibration: GalleryCalibration | None, whitened: bool,
                       weights: Sequence[float] = (0.0,)):
    """(calibration, ``index.local_match.LocalGallery`` or None): whether the gallery's local
    descriptors (``maps``, raw (N, L, C), row for row with ``vectors``) re-scoring each query's
    shortlist answer the leave-one-out better than the pooled search ``calibration`` (already
    chosen, in the space ``whitened`` says: answered fold by fold as it was), and with which
    share of the score (``index.local_match.SHARES``; the pooled search wins ties). The
    descriptors are the untrained backbone's, which never saw these labels: the leave-one-out
    is as honest as the pooled one. On Omniglot at 160 px it lifted the zero-shot index from
    0.616 to 0.668 test MAP@5 (seeds 0-4) and kept faces and dogs level (bench/README.md,
    "Local matching")."""
    from index.local_match import MAX_IMAGES, SHARES, SHORTLIST, ChamferCache, local_gallery

    if calibration is None or len(vectors) > MAX_IMAGES:
        return calibration, None
    log.info("local matching: comparing each of the %d gallery images with its %d nearest, "
             "location by location (%d locations x %d channels; about 4,000 pairs a second at "
             "224 px on one core)", len(vectors), SHORTLIST, maps.shape[1], maps.shape[2])
    described = local_gallery(maps, 1.0)
    chamfer = ChamferCache(described.descriptors)
    best, chosen = calibration, None
    for share in SHARES:
        local = replace(described, share=share)
        found = calibrate_on_gallery(vectors, identities, weights=weights, whitened=whitened,
                                     local=local, chamfer=chamfer)
        log.debug("local share %.2f: leave-one-out MAP@5 %.3f", share, found.map5)
        if found.map5 > best.map5:
            best, chosen = found, local
    log.info("leave-one-out MAP@5 on the gallery: %.3f pooled, %.3f with local descriptors "
             "(share %s)", calibration.map5, best.map5, "none" if chosen is None else
             f"{chosen.share:g}")
    return best, chosen


def calibrate_gallery(vectors: np.ndarray, identities: Sequence[str],
                      maps: np.ndarray | None = None, weights: Sequence[float] = (0.0,),
                      whiten: bool = True, chosen: tuple | None = None):
    """(calibration, whitening, local): the whole calibration of a gallery searched with
    features that never learnt its labels, by honest leave-one-out. The new_whale threshold and
    hubness weight, the within-identity whitening where it wins (``choose_gallery_space``;
    ``chosen``: its result for these very rows, where the caller has it), then the local
    matching share where ``maps`` are given (``choose_local_share``; local None otherwise).
    The one recipe for a zero-shot index calibrating itself and for a training run whose model
    ships the ImageNet features alone, so the two always calibrate alike."""
    calibration, whitening = chosen or choose_gallery_space(vectors, identities, weights=weights,
                                                            whiten=whiten)
    local = None
    if maps is not None:
        calibration, local = choose_local_share(vectors, identities, maps, calibration,
                                                whitened=whitening is not None, weights=weights)
    return calibration, whitening, local


def _folds(vectors: np.ndarray, labels: np.ndarray, rows: np.ndarray, seed: int):
    """(gallery whitened without the fold's queries, the fold's query rows) per fold."""
    from index.whitening import fit_within_identity, whiten

    fold_of = np.random.default_rng(seed).permutation(len(rows)) % WHITENING_FOLDS
    for fold in range(WHITENING_FOLDS):
        fold_rows = np.sort(rows[fold_of == fold])
        if not len(fold_rows):
            continue
        fitted_on = np.ones(len(vectors), dtype=bool)
        fitted_on[fold_rows] = False
        fitted = fit_within_identity(vectors[fitted_on], labels[fitted_on])
        yield (whiten(vectors, *fitted) if fitted is not None else vectors), fold_rows


def _answers(space: np.ndarray, rows: np.ndarray, n_neighbours: int, with_hubness: bool,
             local=None, chamfer=None):
    """(similarities, neighbours) of the gallery rows ``rows`` in ``space`` (their own image
    among them), and each gallery row's hubness there (None when not needed); with ``local``,
    re-scored with the local descriptors."""
    import faiss

    from index.hubness import K, gallery_hubness

    index = faiss.IndexFlatIP(space.shape[1])
    index.add(np.ascontiguousarray(space, dtype=np.float32))
    similarities, neighbours = index.search(np.ascontiguousarray(space[rows]), n_neighbours)
    if local is None:
        hubness = gallery_hubness(space, neighbours=index.search) if with_hubness else None
        return similarities, neighbours, hubness
    similarities, neighbours = local.rescored(rows, similarities, neighbours, chamfer)
    hubness = local.hubness(space, index.search, K, chamfer=chamfer) if with_hubness else None
    return similarities, neighbours, hubness


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
