"""Answering queries against a gallery and scoring the answers: the glue between the model,
the index and the metrics, shared by training validation and the protocol evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from index import GalleryIndex, IdentityRanking

from .data import Sample
from .embed import embed_images
from .metrics import calibrate_threshold, insert_new_whale, map_at_k
from .model import EmbeddingModel, Preprocessing


@dataclass
class EvalResult:
    map5: float  # with ``threshold``
    map5_no_threshold: float
    threshold: float


def answers(ranking: IdentityRanking, threshold: float | None, k: int = 5) -> list[list[str]]:
    """Top-k labels per query with ``new_whale`` placed by ``threshold`` (None: never)."""
    return [insert_new_whale(ids, scores, threshold, k)
            for ids, scores in zip(ranking.identities, ranking.scores)]


def rank_queries(model: EmbeddingModel, preprocessing: Preprocessing, gallery: Sequence[Sample],
                 queries: Sequence[Sample], k: int = 5, device: torch.device | None = None,
                 progress: bool = True, tta_flip: bool = False) -> IdentityRanking:
    embed = dict(device=device, progress=progress, tta_flip=tta_flip)
    gallery_vectors = embed_images(model, [s.path for s in gallery], preprocessing,
                                   desc="embedding gallery", **embed)
    query_vectors = embed_images(model, [s.path for s in queries], preprocessing,
                                 desc="embedding queries", **embed)
    return GalleryIndex(gallery_vectors, [s.identity for s in gallery]).search(query_vectors, k)


def score(ranking: IdentityRanking, truths: Sequence[str], threshold: float | None,
          k: int = 5) -> float:
    return map_at_k(answers(ranking, threshold, k), truths, k)


def evaluate_queries(model: EmbeddingModel, preprocessing: Preprocessing,
                     gallery: Sequence[Sample], queries: Sequence[Sample], k: int = 5,
                     device: torch.device | None = None, progress: bool = True) -> EvalResult:
    """MAP@k of these queries, and the threshold calibrated on them (validation use only)."""
    ranking = rank_queries(model, preprocessing, gallery, queries, k, device, progress)
    truths = [q.identity for q in queries]
    threshold, best = calibrate_threshold(ranking.identities, ranking.scores, truths, k)
    return EvalResult(best, score(ranking, truths, None, k), threshold)
