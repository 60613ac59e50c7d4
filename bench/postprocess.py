"""Post-processing of batch queries, measured on a trained run (issue 16, lever 7).

``python -m bench ablation ... --postprocess`` calls ``scores`` after each seed: the selection
model (``best.pt``) embeds the validation carve-out (the numbers to choose by) and the refit model
(``model.pt``) the protocol's gallery and test queries; every variant is scored with a threshold
calibrated on its own validation scores. Variants (Radenović et al., TPAMI 2018):

* ``qe<k>``: alpha-query expansion, each query replaced by the normalised sum of itself and its
  ``k`` nearest gallery images weighted by similarity^alpha (alpha = 3);
* ``dba<k>``: database-side augmentation, each gallery image replaced by the same sum over its
  ``k`` nearest other gallery images;
* ``hub<w>``: the hubness correction (``index.hubness``) at weight ``w``, which the engine
  itself applies where training chose a weight (``--hubness``): here every weight is scored;
* ``white``: the within-identity whitening (``retrieval.models.whitening``) fitted on the
  labelled gallery being searched (the validation gallery for "val", the protocol's gallery for
  "test"), applied to it and to the queries; ``white+hub.5`` with the correction on top. On
  the untrained backbone this is what a blend of share 1 with ``--whiten-pretrained`` ships;
* ``whitef``, ``whitef+hub.25``, ``whitef+hub.5``: the same test as ``white`` (+ the correction),
  its validation fitted like the test's map: on the whole protocol gallery (the validation
  gallery, the carve-out's query images and the pseudo-new identities' images, all labelled)
  without the held-out fold of validation queries and the images of that fold's pseudo-new
  identities (``WHITENING_FOLDS`` folds). ``white``'s validation map sees only the validation
  gallery, a fraction of the images the test's map is fitted on;
* ``hub+centroid``: an identity scored by ``(1 - b)`` x its best image + ``b`` x its images'
  centroid, ``b`` in 0, 1/4, 1/2 chosen with the hubness weight (``centroid_rule``);
* ``gallery``, ``gallery+hub``, ``gallery+hub+white``: the index calibrated on its own gallery
  (leave-one-out), as a zero-shot index is, the last whitened where the gallery chooses it
  (``gallery_rows``); their "val" is that leave-one-out MAP@5, not the carve-out's.

Query expansion and database-side augmentation live here, not in the engine: with 1-3 gallery
images per identity neither was ever better than the plain search on the validation carve-outs,
on any of the three shared sets or any variant (bench/README.md, "Second screen"), so no
user-facing option carries them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ALPHA = 3.0
# name: (query expansion k, database-side augmentation k, hubness weight)
VARIANTS: dict[str, tuple[int, int, float]] = {
    "plain": (0, 0, 0.0), "qe1": (1, 0, 0.0), "qe2": (2, 0, 0.0), "dba1": (0, 1, 0.0),
    "dba2": (0, 2, 0.0), "qe1+dba1": (1, 1, 0.0), "hub.25": (0, 0, 0.25), "hub.5": (0, 0, 0.5)}
WHITENED: dict[str, float] = {"white": 0.0, "white+hub.5": 0.5}  # name: hubness weight
# the same whitening, its validation measured with maps fitted as the test's is (``_fold_spaces``)
FOLD_WHITENED: dict[str, float] = {"whitef": 0.0, "whitef+hub.25": 0.25, "whitef+hub.5": 0.5}


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _neighbour_sum(vectors: np.ndarray, base: np.ndarray, k: int, skip_self: bool) -> np.ndarray:
    """``vectors`` + the similarity^alpha-weighted sum of their ``k`` nearest rows of ``base``."""
    if k == 0:
        return vectors
    sims = vectors @ base.T
    if skip_self:
        np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :k]
    weights = np.clip(np.take_along_axis(sims, top, axis=1), 0, None) ** ALPHA
    return _normalise(vectors + (weights[..., None] * base[top]).sum(axis=1))


def expand(gallery: np.ndarray, queries: np.ndarray, qe: int, dba: int) -> tuple[np.ndarray, np.ndarray]:
    """The (gallery, queries) vectors after ``dba`` then ``qe`` (0: off)."""
    gallery = _neighbour_sum(gallery, gallery, dba, skip_self=True)
    return gallery, _neighbour_sum(queries, gallery, qe, skip_self=False)


def _map5(gallery, gallery_ids, queries, truths, threshold: float | None,
          hubness: float = 0.0) -> tuple[float, float]:
    from index import GalleryIndex
    from retrieval.training.evaluate import score
    from retrieval.metrics import calibrate_threshold

    ranking = GalleryIndex(gallery, list(gallery_ids), hubness=hubness).search(queries, 5)
    if threshold is None:
        return calibrate_threshold(ranking.identities, ranking.scores, truths)
    return threshold, score(ranking, truths, threshold)


def scores(run: Path, samples: Sequence, seed: int, val_new_fraction: float) -> dict[str, dict]:
    """``{variant: {"val": MAP@5, "test": MAP@5}}`` for the run folder of one protocol seed."""
    from retrieval.models.checkpoint import load_model

    models = {name: load_model(run / name)[:2] for name in ("best.pt", "model.pt")}
    return _scores(samples, seed, val_new_fraction, models["best.pt"], models["model.pt"])


def untrained_scores(samples: Sequence, seed: int, val_new_fraction: float, image_size: int,
                     backbone: str) -> dict[str, dict]:
    """``scores`` of the untrained backbone + GeM (no training at all: ``ablation --untrained``)."""
    from retrieval.models.model import preprocessing_for, zero_shot_model

    model = zero_shot_model(backbone)
    pair = (model, preprocessing_for(model, image_size))
    return {**_scores(samples, seed, val_new_fraction, pair, pair),
            **_gallery_calibrated(samples, seed, pair)}


def _gallery_calibrated(samples: Sequence, seed: int, pair: tuple) -> dict[str, dict]:
    """What ``build_index.py`` does without a checkpoint (``gallery_rows``) for the untrained
    model of ``pair`` on the protocol split of ``seed``."""
    from retrieval.data import whale_split
    from retrieval.models.embed import embed_images

    split = whale_split(samples, seed)
    model, preprocessing = pair
    gallery, queries = (embed_images(model, [s.path for s in part], preprocessing, progress=False)
                        for part in (split.gallery, split.queries))
    return gallery_rows(gallery, [s.identity for s in split.gallery], queries,
                        [s.identity for s in split.queries])


def gallery_rows(gallery: np.ndarray, gallery_ids: list, queries: np.ndarray,
                 query_ids: list) -> dict[str, dict]:
    """Threshold (and hubness weight, for ``gallery+hub``) calibrated on the gallery's own
    leave-one-out queries, as ``build_index.py`` does for a zero-shot index; "val" is that
    leave-one-out MAP@5, "test" the test queries' MAP@5 through that index.
    ``gallery+hub+white`` is today's zero-shot default: whitened within identities where the
    gallery's honest leave-one-out says so (``choose_gallery_space``)."""
    from index.hubness import WEIGHTS
    from index.whitening import whiten
    from retrieval.gallery_threshold import calibrate_on_gallery, choose_gallery_space

    result = {}
    for name, weights in (("gallery", (0.0,)), ("gallery+hub", WEIGHTS)):
        calibration = calibrate_on_gallery(gallery, gallery_ids, weights=weights)
        _, test = _map5(gallery, gallery_ids, queries, query_ids, calibration.threshold,
                        calibration.hubness)
        result[name] = {"val": round(calibration.map5, 5), "test": round(test, 5),
                        "hubness": calibration.hubness}
    # the gallery+hub calibration just made is the plain side of the choice
    calibration, whitening = choose_gallery_space(gallery, gallery_ids, weights=WEIGHTS,
                                                  plain=calibration)
    searched = (gallery, queries) if whitening is None else (whiten(gallery, *whitening),
                                                             whiten(queries, *whitening))
    _, test = _map5(searched[0], gallery_ids, searched[1], query_ids, calibration.threshold,
                    calibration.hubness)
    result["gallery+hub+white"] = {"val": round(calibration.map5, 5), "test": round(test, 5),
                                   "hubness": calibration.hubness, "whitened": whitening is not None}
    return result


def _scores(samples: Sequence, seed: int, val_new_fraction: float, selection_model: tuple,
            shipped_model: tuple) -> dict[str, dict]:
    """Every variant's validation MAP@5 (``selection_model`` embeds the carve-out, threshold
    calibrated there) and test MAP@5 (``shipped_model`` embeds the protocol's gallery and
    queries, that threshold applied)."""
    from retrieval.data import validation_split, whale_split
    from retrieval.models.embed import embed_images

    split = whale_split(samples, seed)
    validation = validation_split(split.gallery, seed=seed, new_fraction=val_new_fraction)
    embedded: dict[str, np.ndarray] = {}
    for name, (model, preprocessing), part in (("val_g", selection_model, validation.gallery),
                                               ("val_q", selection_model, validation.queries),
                                               ("fit", selection_model, split.gallery),
                                               ("test_g", shipped_model, split.gallery),
                                               ("test_q", shipped_model, split.queries)):
        embedded[name] = embed_images(model, [s.path for s in part], preprocessing, progress=False)
    ids: Callable = lambda part: [s.identity for s in part]  # noqa: E731
    result = {}
    for variant, (qe, dba, hubness) in VARIANTS.items():
        gallery, queries = expand(embedded["val_g"], embedded["val_q"], qe, dba)
        threshold, val = _map5(gallery, ids(validation.gallery), queries, ids(validation.queries),
                               None, hubness)
        gallery, queries = expand(embedded["test_g"], embedded["test_q"], qe, dba)
        _, test = _map5(gallery, ids(split.gallery), queries, ids(split.queries), threshold,
                        hubness)
        result[variant] = {"val": round(val, 5), "test": round(test, 5)}
    for variant, hubness in WHITENED.items():
        threshold, val = _map5(*_whitened(embedded["val_g"], ids(validation.gallery),
                                          embedded["val_q"]), ids(validation.queries), None,
                               hubness)
        _, test = _map5(*_whitened(embedded["test_g"], ids(split.gallery), embedded["test_q"]),
                        ids(split.queries), threshold, hubness)
        result[variant] = {"val": round(val, 5), "test": round(test, 5)}
    spaces = _fold_spaces(embedded, validation, split.gallery, seed)
    for variant, hubness in FOLD_WHITENED.items():
        threshold, val = _fold_whitened(spaces, validation, hubness)
        _, test = _map5(*_whitened(embedded["test_g"], ids(split.gallery), embedded["test_q"]),
                        ids(split.queries), threshold, hubness)
        result[variant] = {"val": round(val, 5), "test": round(test, 5)}
    # identity = (1 - b) x best image + b x centroid of its images, (b, hubness) chosen on val
    parts = [{"g": embedded[f"{side}_g"], "q": embedded[f"{side}_q"], "g_ids": ids(gallery),
              "q_ids": ids(queries)}
             for side, gallery, queries in (("val", validation.gallery, validation.queries),
                                            ("test", split.gallery, split.queries))]
    result["hub+centroid"] = centroid_rule(*parts)
    # the shipped model's index calibrated on its own gallery, whitened where that chooses it
    # (what the zero-shot index does; "val" here is the gallery's leave-one-out MAP@5)
    result.update(gallery_rows(embedded["test_g"], ids(split.gallery), embedded["test_q"],
                               ids(split.queries)))
    return result


def _fold_spaces(embedded: dict[str, np.ndarray], validation, protocol_gallery: Sequence,
                 seed: int) -> list:
    """The validation gallery and each fold of validation queries whitened by a map fitted on
    the protocol gallery (``embedded["fit"]``, true identities) without that fold's query
    images and its pseudo-new identities: what training's ``whiten_output`` choice scores
    (``evaluate.whitened_folds``)."""
    from retrieval.training.evaluate import whitened_folds

    queries = validation.queries
    return list(whitened_folds(embedded["val_g"], embedded["val_q"], [q.path for q in queries],
                               [q.identity for q in queries], embedded["fit"],
                               [s.path for s in protocol_gallery],
                               [s.identity for s in protocol_gallery], seed))


def _fold_whitened(spaces: list, validation, hubness: float) -> tuple[float, float]:
    """(threshold, validation MAP@5) of the validation queries answered in ``spaces``."""
    from retrieval.metrics import calibrate_threshold
    from retrieval.training.evaluate import search_folds

    ranking, rows = search_folds(spaces, [s.identity for s in validation.gallery], 5, hubness)
    return calibrate_threshold(ranking.identities, ranking.scores,
                               [validation.queries[r].identity for r in rows])


def _whitened(gallery: np.ndarray, gallery_ids: list, queries: np.ndarray) -> tuple:
    """(gallery, its ids, queries) after the whitening fitted on the labelled gallery."""
    from retrieval.models.whitening import fit_within_identity, whiten

    fitted = fit_within_identity(gallery, gallery_ids)
    if fitted is None:
        return gallery, gallery_ids, queries
    return whiten(gallery, *fitted), gallery_ids, whiten(queries, *fitted)


def _centroid_ranking(gallery: np.ndarray, gallery_ids, queries: np.ndarray, b: float,
                      hubness: float):
    """Top-5 identities (an ``IdentityRanking``, no best rows): ``(1 - b)`` x best image +
    ``b`` x the identity's centroid."""
    from index.hubness import gallery_hubness
    from index.search import IdentityRanking

    names, column = np.unique([str(i) for i in gallery_ids], return_inverse=True)
    penalty = hubness * gallery_hubness(gallery) if hubness else np.zeros(len(gallery))
    similarities = queries @ gallery.T - penalty[None]
    best = np.full((len(queries), len(names)), -np.inf)
    np.maximum.at(best.T, column, similarities.T)
    centroids = np.zeros((len(names), gallery.shape[1]))
    np.add.at(centroids, column, gallery)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    mean_penalty = np.bincount(column, penalty) / np.bincount(column)
    scores = (1 - b) * best + b * (queries @ centroids.T - mean_penalty[None])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    return IdentityRanking([[str(names[j]) for j in row] for row in order],
                           np.take_along_axis(scores, order, axis=1), np.full(order.shape, -1))


def centroid_rule(val: dict, test: dict) -> dict:
    """``hub+centroid``: (b, hubness weight) chosen on ``val``'s MAP@5, scored on ``test``
    (each a dict of gallery ``g`` / queries ``q`` vectors and their ``g_ids`` / ``q_ids``)."""
    from index.hubness import WEIGHTS
    from retrieval.metrics import calibrate_threshold
    from retrieval.training.evaluate import score

    best = None
    for b in (0.0, 0.25, 0.5):
        for hubness in WEIGHTS:
            ranking = _centroid_ranking(val["g"], val["g_ids"], val["q"], b, hubness)
            threshold, chosen_by = calibrate_threshold(ranking.identities, ranking.scores,
                                                       [str(t) for t in val["q_ids"]])
            if best is None or chosen_by > best["val"]:
                tested = _centroid_ranking(test["g"], test["g_ids"], test["q"], b, hubness)
                best = {"val": chosen_by, "centroid": b, "hubness": hubness,
                        "test": score(tested, [str(t) for t in test["q_ids"]], threshold)}
    return best
