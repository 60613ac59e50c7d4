"""Identity search over L2-normalised embeddings with FAISS.

The single search path of the project: validation during training, the protocol evaluation,
build_index.py and query.py all go through ``GalleryIndex.search``. Inner product on unit vectors
is cosine similarity. An identity's score is its best image's similarity; ``new_whale`` is placed
by ``retrieval.metrics.insert_new_whale`` from those scores.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np

log = logging.getLogger(__name__)


@dataclass
class IdentityRanking:
    """Per query: identities best first, their scores, and the gallery row of each one's best image."""

    identities: list[list[str]]
    scores: np.ndarray  # (Q, k) float32, -inf where fewer than k identities exist
    best_rows: np.ndarray  # (Q, k) int64 row in the gallery table, -1 where none


def _to_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """Move a flat index to every GPU faiss sees (sharded over several); CPU otherwise."""
    if faiss.get_num_gpus() == 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


class GalleryIndex:
    """Exact inner-product search over gallery embeddings, answering with identities."""

    def __init__(self, embeddings: np.ndarray, identities: Sequence[str]):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(identities):
            raise ValueError(f"{len(identities)} identities for embeddings of shape {embeddings.shape}")
        if len(embeddings) == 0:
            raise ValueError("an index needs at least one gallery embedding")
        self.identities = np.asarray(identities, dtype=object)
        self.dim = embeddings.shape[1]
        cpu_index = faiss.IndexFlatIP(self.dim)
        cpu_index.add(embeddings)
        self.faiss_index = _to_gpu_if_available(cpu_index)
        _, counts = np.unique(self.identities.astype(str), return_counts=True)
        self.max_images_per_identity = int(counts.max())
        self.num_identities = len(counts)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def search(self, queries: np.ndarray, k: int = 5) -> IdentityRanking:
        """The ``k`` best identities per query (fewer only if the gallery has fewer).

        Asking FAISS for ``k * max_images_per_identity`` neighbours guarantees ``k`` distinct
        identities among them whenever the gallery has that many.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape} for an index of dimension {self.dim}")
        n_neighbours = min(len(self), k * self.max_images_per_identity)
        similarities, rows = self.faiss_index.search(queries, n_neighbours)
        return fold_into_identities(similarities, rows, self.identities, k)


def fold_into_identities(similarities: np.ndarray, rows: np.ndarray, identities: np.ndarray,
                         k: int) -> IdentityRanking:
    """Keep each identity's first (best) neighbour, in order, up to ``k`` identities per query."""
    n_queries = len(rows)
    scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
    best_rows = np.full((n_queries, k), -1, dtype=np.int64)
    ranked: list[list[str]] = []
    for q in range(n_queries):
        seen: list[str] = []
        for similarity, row in zip(similarities[q], rows[q]):
            if row < 0:  # FAISS pads with -1 when it has fewer results
                break
            identity = identities[row]
            if identity in seen:
                continue
            scores[q, len(seen)] = similarity
            best_rows[q, len(seen)] = row
            seen.append(identity)
            if len(seen) == k:
                break
        ranked.append(seen)
    return IdentityRanking(ranked, scores, best_rows)
