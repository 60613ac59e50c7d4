"""Answering queries against a gallery and scoring the answers: the glue between the model,
the index and the metrics, shared by training validation and the protocol evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from index import GalleryIndex, IdentityRanking

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
                 hubness: float = 0.0) -> IdentityRanking:
    """The queries' ranked identities, searched as an index built from ``gallery`` searches
    (``hubness``: the checkpoint's correction weight)."""
    gallery_vectors, query_vectors = _embed(model, preprocessing, gallery, queries,
                                            device=device, progress=progress, tta_flip=tta_flip)
    return GalleryIndex(gallery_vectors, [s.identity for s in gallery],
                        hubness=hubness).search(query_vectors, k)


def _embed(model: EmbeddingModel, preprocessing: Preprocessing, gallery: Sequence[Sample],
           queries: Sequence[Sample], **embed) -> tuple[np.ndarray, np.ndarray]:
    """The gallery's and the queries' vectors (``embed``: ``embed_images`` options)."""
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
