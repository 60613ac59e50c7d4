"""Answering queries against a gallery and scoring the answers: the glue between the model,
the index and the metrics, shared by training validation and the protocol evaluation."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from index import GalleryIndex, IdentityRanking
from index.local_match import local_gallery

from ..data import Sample
from ..metrics import calibrate_threshold, insert_new_whale, map_at_k
from ..models.embed import embed_images
from ..models.model import EmbeddingModel, Preprocessing, blend


@dataclass
class EvalResult:
    map5: float  # with ``threshold``
    map5_no_threshold: float
    threshold: float
    pretrained_share: float = 0.0  # of the untrained reference in the similarity (see ``blend``)


def answers(ranking: IdentityRanking, threshold: float | None, k: int = 5) -> list[list[str]]:
    """Top-k labels per query with ``new_whale`` placed by ``threshold`` (None: never)."""
    return [insert_new_whale(ids, scores, threshold, k)
            for ids, scores in zip(ranking.identities, ranking.scores)]


def rank_queries(model: EmbeddingModel, preprocessing: Preprocessing, gallery: Sequence[Sample],
                 queries: Sequence[Sample], k: int = 5, device: torch.device | None = None,
                 progress: bool = True, tta_flip: bool = False,
                 hubness: float = 0.0, whiten: bool = False, local: float = 0.0) -> IdentityRanking:
    """The queries' ranked identities, searched as an index built from ``gallery`` searches
    (``hubness``: the checkpoint's correction weight; ``whiten``: its choice to whiten within
    identities, a map fitted on ``gallery``; ``local``: its share of local matching, the
    descriptors centred on ``gallery``'s mean)."""
    maps = None
    if local:
        (gallery_vectors, gallery_maps), (query_vectors, query_maps) = _embed(
            model, preprocessing, gallery, queries, device=device, progress=progress,
            tta_flip=tta_flip, maps=True)
        maps = (gallery_maps, query_maps)
    else:
        gallery_vectors, query_vectors = _embed(model, preprocessing, gallery, queries,
                                                device=device, progress=progress, tta_flip=tta_flip)
    if whiten:
        from index.whitening import fit_on_gallery, whiten as apply

        fitted = fit_on_gallery(gallery_vectors, [s.identity for s in gallery])
        if fitted is not None:
            gallery_vectors, query_vectors = (apply(gallery_vectors, *fitted),
                                              apply(query_vectors, *fitted))
    identities = [s.identity for s in gallery]
    if maps is None:
        return GalleryIndex(gallery_vectors, identities, hubness=hubness).search(query_vectors, k)
    gallery_local = local_gallery(maps[0], local)
    return local_index(gallery_vectors, identities, gallery_local, hubness).search(
        query_vectors, k, gallery_local.queries(maps[1]))


def local_index(vectors: np.ndarray, identities: Sequence[str], local, hubness: float,
                chamfer=None) -> GalleryIndex:
    """An exact index of ``vectors`` that re-scores with ``local`` (``LocalGallery``), its
    hubness correction (weight ``hubness``) measured on blended scores, as ``save_index``
    builds one."""
    from index.hubness import K

    plain = GalleryIndex(np.ascontiguousarray(vectors, dtype=np.float32), identities)
    penalty = None if not hubness else \
        hubness * local.hubness(vectors, plain.neighbours, K, chamfer=chamfer)
    return GalleryIndex.from_faiss(plain.cpu_index, identities, plain.spec, None, penalty, local)


def _embed(model: EmbeddingModel, preprocessing: Preprocessing, gallery: Sequence[Sample],
           queries: Sequence[Sample], **embed) -> tuple:
    """The gallery's and the queries' vectors (``embed``: ``embed_images`` options; with
    ``maps=True``, a (vectors, maps) pair each)."""
    return (embed_images(model, [s.path for s in gallery], preprocessing,
                         desc="embedding gallery", **embed),
            embed_images(model, [s.path for s in queries], preprocessing,
                         desc="embedding queries", **embed))


def _calibrated(gallery_vectors: np.ndarray, identities: Sequence[str], query_vectors: np.ndarray,
                truths: Sequence[str], k: int, hubness: float = 0.0,
                share: float = 0.0) -> EvalResult:
    """Search, then MAP@k with the threshold calibrated on these queries and without one."""
    ranking = GalleryIndex(np.ascontiguousarray(gallery_vectors), identities,
                           hubness=hubness).search(np.ascontiguousarray(query_vectors), k)
    return _calibrated_result(ranking, truths, k, share)


def _calibrated_result(ranking: IdentityRanking, truths: Sequence[str], k: int,
                       share: float = 0.0) -> EvalResult:
    """MAP@k of ``ranking`` with the threshold calibrated on it, and without one."""
    threshold, map5 = calibrate_threshold(ranking.identities, ranking.scores, truths, k)
    return EvalResult(map5, score(ranking, truths, None, k), threshold, share)


def score(ranking: IdentityRanking, truths: Sequence[str], threshold: float | None,
          k: int = 5) -> float:
    return map_at_k(answers(ranking, threshold, k), truths, k)


def evaluate_queries(model: EmbeddingModel, preprocessing: Preprocessing,
                     gallery: Sequence[Sample], queries: Sequence[Sample], k: int = 5,
                     device: torch.device | None = None, progress: bool = True) -> EvalResult:
    """MAP@k of these queries, and the threshold calibrated on them (validation use only)."""
    return evaluate_blends(model, preprocessing, gallery, queries, k, device, progress)[0]


def evaluate_blends(model: EmbeddingModel, preprocessing: Preprocessing,
                    gallery: Sequence[Sample], queries: Sequence[Sample], k: int = 5,
                    device: torch.device | None = None, progress: bool = True,
                    reference: tuple[np.ndarray, np.ndarray] | None = None,
                    shares: Sequence[float] = (0.0,)) -> list[EvalResult]:
    """``evaluate_queries`` for ``model`` blended (``model.blend``) with the untrained
    reference's vectors of ``gallery`` and ``queries`` at each of ``shares``: one result per
    share, in order (only share 0 without ``reference``). Embeds the images once."""
    gallery_vectors, query_vectors = _embed(model, preprocessing, gallery, queries,
                                            device=device, progress=progress)
    identities, truths = [s.identity for s in gallery], [q.identity for q in queries]
    results = []
    for share in (shares if reference is not None else (0.0,)):
        g, q = gallery_vectors, query_vectors
        if share > 0:
            g, q = blend(g, reference[0], share), blend(q, reference[1], share)
        results.append(_calibrated(g, identities, q, truths, k, share=share))
    return results


def evaluate_hubness(model: EmbeddingModel, preprocessing: Preprocessing,
                     gallery: Sequence[Sample], queries: Sequence[Sample],
                     weights: Sequence[float], k: int = 5, device: torch.device | None = None,
                     progress: bool = True) -> list[EvalResult]:
    """``evaluate_queries`` searched with the hubness correction at each of ``weights``, one
    result per weight, in order (validation use only). Embeds the images once."""
    gallery_vectors, query_vectors = _embed(model, preprocessing, gallery, queries,
                                            device=device, progress=progress)
    identities, truths = [s.identity for s in gallery], [q.identity for q in queries]
    return [_calibrated(gallery_vectors, identities, query_vectors, truths, k, hubness=weight)
            for weight in weights]


WHITENING_FOLDS = 5


def evaluate_whitened(model: EmbeddingModel, preprocessing: Preprocessing,
                      gallery: Sequence[Sample], queries: Sequence[Sample],
                      fitted_on: Sequence[Sample], weights: Sequence[float], k: int = 5,
                      seed: int = 0, device: torch.device | None = None,
                      progress: bool = True) -> list[EvalResult]:
    """``evaluate_hubness`` with gallery and queries whitened within identities
    (``index.whitening``), one result per weight (validation use only).

    The map an index of this model fits is fitted on its whole labelled gallery; here that is
    ``fitted_on`` (the training images, true identities), and each of ``WHITENING_FOLDS`` folds
    of the queries is answered through a map fitted without the fold's query images and
    without every image of the fold's pseudo-new identities, so no query shaped the map that
    answers it (a leaky map flatters whitening; ``gallery_threshold`` does the same for a
    zero-shot gallery). Embeds the images once."""
    gallery_vectors, query_vectors = _embed(model, preprocessing, gallery, queries,
                                            device=device, progress=progress)
    spaces = _whitened_spaces(model, preprocessing, gallery_vectors, query_vectors, queries,
                              fitted_on, seed, device, progress)
    identities = [s.identity for s in gallery]
    results = []
    for weight in weights:
        ranking, rows = search_folds(spaces, identities, k, hubness=weight)
        results.append(_calibrated_result(ranking, [queries[r].identity for r in rows], k))
    return results


def _whitened_spaces(model: EmbeddingModel, preprocessing: Preprocessing,
                     gallery_vectors: np.ndarray, query_vectors: np.ndarray,
                     queries: Sequence[Sample], fitted_on: Sequence[Sample], seed: int,
                     device: torch.device | None, progress: bool) -> list:
    """``whitened_folds`` of these vectors, the maps fitted on ``fitted_on``'s embeddings."""
    fit_vectors = embed_images(model, [s.path for s in fitted_on], preprocessing,
                               desc="embedding the whitening's images", device=device,
                               progress=progress)
    return list(whitened_folds(gallery_vectors, query_vectors, [q.path for q in queries],
                               [q.identity for q in queries], fit_vectors,
                               [s.path for s in fitted_on], [s.identity for s in fitted_on], seed))


def evaluate_local(model: EmbeddingModel, preprocessing: Preprocessing,
                   gallery: Sequence[Sample], queries: Sequence[Sample],
                   weights: Sequence[float], fitted_on: Sequence[Sample] | None = None,
                   k: int = 5, seed: int = 0, device: torch.device | None = None,
                   progress: bool = True) -> list[tuple[float, float, EvalResult]]:
    """(share, weight, result) per share of local matching (``index.local_match.SHARES``) and
    hubness weight: the validation carve-out searched as an index of this model re-scoring
    with the untrained maps of its reference (``local_descriptors.gives_maps``) searches it,
    the descriptors centred on the validation gallery's mean; with ``fitted_on``, in the
    whitened folds of ``evaluate_whitened`` (validation use only)."""
    from index.local_match import SHARES, ChamferCache

    (gallery_vectors, gallery_maps), (query_vectors, query_maps) = _embed(
        model, preprocessing, gallery, queries, device=device, progress=progress, maps=True)
    if fitted_on is not None:
        spaces = _whitened_spaces(model, preprocessing, gallery_vectors, query_vectors, queries,
                                  fitted_on, seed, device, progress)
    else:
        spaces = [(np.arange(len(queries)), gallery_vectors, query_vectors)]
    identities = [s.identity for s in gallery]
    # the descriptors do not depend on the share: normalised, and each pair compared, once
    described = local_gallery(gallery_maps, 1.0)
    chamfer = ChamferCache(described.descriptors)
    query_descriptors = described.queries(query_maps)
    results = []
    for share in SHARES:
        local = replace(described, share=share)
        for weight in weights:
            ranking, rows = search_folds(spaces, identities, k, hubness=weight,
                                         local=(local, query_descriptors, chamfer))
            results.append((share, weight, _calibrated_result(
                ranking, [queries[r].identity for r in rows], k)))
    return results


def search_folds(spaces: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 identities: Sequence[str], k: int = 5, hubness: float = 0.0,
                 local: tuple | None = None) -> tuple[IdentityRanking, np.ndarray]:
    """Each fold's queries searched in its own gallery space (``whitened_folds``' triples):
    one ranking of every query, fold after fold, and the query rows in that order. ``local``:
    (``LocalGallery``, every query's normalised descriptors, a ``ChamferCache``): each fold's
    index re-scores with them (``local_index``)."""
    if local is None:
        rankings = [GalleryIndex(gallery, identities, hubness=hubness).search(queries, k)
                    for _, gallery, queries in spaces]
    else:
        gallery_local, descriptors, chamfer = local
        rankings = [local_index(gallery, identities, gallery_local, hubness, chamfer).search(
            queries, k, descriptors[rows]) for rows, gallery, queries in spaces]
    ranking = IdentityRanking([ids for part in rankings for ids in part.identities],
                              np.concatenate([part.scores for part in rankings]),
                              np.concatenate([part.best_rows for part in rankings]))
    return ranking, np.concatenate([rows for rows, _, _ in spaces])


def whitened_folds(gallery: np.ndarray, queries: np.ndarray, query_paths: Sequence,
                   query_truths: Sequence[str], fit: np.ndarray, fit_paths: Sequence, fit_identities: Sequence[str],
                   seed: int = 0, folds: int = WHITENING_FOLDS):
    """Per fold of the query rows: (its rows, the gallery and the fold's queries whitened by a
    map fitted on ``fit`` without the fold's query images (matched by path) and without every
    image of the identity of a ``new_whale`` query in the fold: a pseudo-new query's identity is
    gone from the map as it is from the gallery). Unwhitened where no map fits."""
    from .. import NEW_WHALE
    from index.whitening import fit_within_identity, whiten

    fit_paths = [str(p) for p in fit_paths]
    fit_identities = np.asarray(fit_identities, dtype=object)
    identity_of = dict(zip(fit_paths, fit_identities))
    fold_of = np.random.default_rng(seed).permutation(len(queries)) % folds
    for fold in range(folds):
        rows = np.flatnonzero(fold_of == fold)
        if not len(rows):
            continue
        held = {str(query_paths[r]) for r in rows}
        gone = {identity_of.get(str(query_paths[r])) for r in rows
                if query_truths[r] == NEW_WHALE} - {None}
        keep = np.asarray([p not in held and i not in gone for p, i in zip(fit_paths, fit_identities)])
        fitted = fit_within_identity(fit[keep], list(fit_identities[keep]))
        if fitted is None:
            yield rows, gallery, queries[rows]
        else:
            yield rows, whiten(gallery, *fitted), whiten(queries[rows], *fitted)
