"""Identity search over L2-normalised embeddings with FAISS.

The single search path of the project: validation during training, the protocol evaluation,
build_index.py and query.py all go through ``GalleryIndex.search``. Inner product on unit vectors
is cosine similarity. An identity's score is its best image's similarity; ``new_whale`` is placed
by ``retrieval.metrics.insert_new_whale`` from those scores. The FAISS structure underneath (exact
or approximate, CPU or GPU) is chosen in ``index.types`` and changes nothing in this API.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np

from . import types
from .hubness import hubness_penalty, penalised
from .local_match import SHORTLIST, LocalGallery
from .types import IndexSpec

log = logging.getLogger(__name__)

# An ivfpq index's similarities are estimates from compressed codes: it is asked for this many
# times the neighbours needed, and those are re-scored exactly from the raw vectors (memory-mapped
# when loaded from disk, so only the candidates' rows are read) before the fold into identities.
# The default; tuning raises it (the index's ``rerank`` parameter) where codes shortlist poorly.
RERANK_FACTOR = 4

# Below this many queries an exact CPU search is a NumPy matrix product instead of FAISS's: FAISS
# scans each of so few queries on one thread (its BLAS path starts at 20 queries), while the
# product uses every core. Measured on 2 cores, 100k x 1280: 21 ms vs 54 ms for one query, 97 vs
# 446 ms for 16 (bench/README.md, "serve").
FEW_QUERIES = 20


@dataclass
class IdentityRanking:
    """Per query: identities best first, their scores, and the gallery row of each one's best image."""

    identities: list[list[str]]
    scores: np.ndarray  # (Q, k) float32, -inf where fewer than k identities exist
    best_rows: np.ndarray  # (Q, k) int64 row in the gallery table, -1 where none
    # the best images' paths, from a backend that keeps the gallery table itself (Milvus);
    # None: look ``best_rows`` up in the index folder's table (``StoredIndex.best_images``)
    images: list[list[str]] | None = None


class GalleryIndex:
    """Inner-product search over gallery embeddings, answering with identities.

    ``GalleryIndex(embeddings, identities)`` builds an exact (flat) index, as validation needs;
    ``index_type`` picks another structure (see ``index.types``). ``from_faiss`` wraps an index read
    from disk. Row ``i`` of the gallery is FAISS id ``i`` whatever the type.
    """

    def __init__(self, embeddings: np.ndarray, identities: Sequence[str],
                 index_type: str | IndexSpec = "flat", rerank: bool = True, hubness: float = 0.0):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(identities):
            raise ValueError(f"{len(identities)} identities for embeddings of shape {embeddings.shape}")
        if len(embeddings) == 0:
            raise ValueError("an index needs at least one gallery embedding")
        spec = index_type if isinstance(index_type, IndexSpec) else \
            types.resolve(index_type, len(embeddings), embeddings.shape[1])
        self._attach(types.build(embeddings, spec), identities, spec,
                     embeddings if rerank else None, hubness_penalty(embeddings, hubness))

    @classmethod
    def from_faiss(cls, cpu_index: faiss.Index, identities: Sequence[str],
                   spec: IndexSpec, raw_vectors: np.ndarray | None = None,
                   penalty: np.ndarray | None = None,
                   local: LocalGallery | None = None) -> "GalleryIndex":
        """Wrap an already filled CPU index (e.g. read from disk) without copying its vectors;
        ``raw_vectors`` (row for row, may be memory-mapped): exact re-ranking for ivfpq;
        ``penalty``: the hubness correction per row (``index.hubness``), None for none;
        ``local``: the gallery's local descriptors, each query's shortlist re-scored with them
        (``index.local_match``), None for the pooled cosine alone."""
        if cpu_index.ntotal != len(identities):
            raise ValueError(f"{len(identities)} identities for an index of {cpu_index.ntotal} vectors")
        if cpu_index.ntotal == 0:
            raise ValueError("an index needs at least one gallery embedding")
        if local is not None and len(local.descriptors) != cpu_index.ntotal:
            raise ValueError(f"{len(local.descriptors)} local descriptor sets for an index of "
                             f"{cpu_index.ntotal} vectors")
        self = cls.__new__(cls)
        self._attach(cpu_index, identities, spec, raw_vectors, penalty)
        self.local = local
        return self

    def _attach(self, cpu_index: faiss.Index, identities: Sequence[str], spec: IndexSpec,
                raw_vectors: np.ndarray | None = None, penalty: np.ndarray | None = None) -> None:
        if penalty is not None and penalty.shape != (cpu_index.ntotal,):
            raise ValueError(f"{penalty.shape} hubness penalties for {cpu_index.ntotal} vectors")
        self.penalty = None if penalty is None else np.asarray(penalty, dtype=np.float32)
        self.local: LocalGallery | None = None
        self.spec = spec
        self._rerank_rows = raw_vectors if spec.kind == "ivfpq" else None
        self.rerank_factor = int(spec.params.get("rerank", RERANK_FACTOR))
        self.identities = np.asarray(identities, dtype=object)
        self.dim = int(cpu_index.d)
        types.apply_search_params(cpu_index, spec)
        self.cpu_index = cpu_index  # what gets written to disk
        self.faiss_index = types.to_devices(cpu_index, spec)  # what gets searched
        # an exact CPU index's vectors, viewed in place (no copy), for the few-queries path
        self._flat_rows = None
        if isinstance(cpu_index, faiss.IndexFlat) and self.faiss_index is cpu_index:
            self._flat_rows = faiss.rev_swig_ptr(cpu_index.get_xb(), cpu_index.ntotal * cpu_index.d
                                                 ).reshape(cpu_index.ntotal, cpu_index.d)
        _, counts = np.unique(self.identities.astype(str), return_counts=True)
        self.max_images_per_identity = int(counts.max())
        self.num_identities = len(counts)
        self.crowded_identity_images = crowded_count(counts)

    def __len__(self) -> int:
        return int(self.cpu_index.ntotal)

    def search(self, queries: np.ndarray, k: int = 5,
               local_queries: np.ndarray | None = None) -> IdentityRanking:
        """The ``k`` best identities per query (fewer only if the gallery has fewer).

        ``k`` distinct identities are sure to be among ``k * max_images_per_identity``
        neighbours, but far fewer almost always hold them (``first_ask``): FAISS is asked for
        those, and only the queries they leave short of ``k`` identities are asked again for the
        sure number. The answer is the same (for approximate types: the same search, on a
        shortlist sized by the first ask).

        An index with ``local`` descriptors needs ``local_queries`` (Q, L, C), the queries'
        descriptors normalised as ``local.queries`` does: each query's ``SHORTLIST`` (at least)
        nearest images by the pooled cosine are re-scored with them, and identities are found
        among those (more are asked only where they hold fewer than ``k`` identities).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape} for an index of dimension {self.dim}")
        if self.local is None:
            return fold_asking_again(self._top, queries, self.identities, k, self.asks(k),
                                     penalty=self.penalty)
        if local_queries is None or len(local_queries) != len(queries):
            raise ValueError("this index re-scores with local descriptors: pass the queries' "
                             "descriptors (local_queries), one set per query")

        def top(positions: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            asked = positions[:, 0]  # fold_asking_again hands back the queries left short
            similarities, rows = self._top(queries[asked], n)
            return self.local.rescored(local_queries[asked], similarities, rows)

        asks = sorted({min(len(self), max(SHORTLIST, ask)) for ask in
                       (self.first_ask(k), self.sure_ask(k))})
        return fold_asking_again(top, np.arange(len(queries))[:, None], self.identities, k, asks,
                                 penalty=self.penalty)

    def scores_of(self, query: np.ndarray, rows: np.ndarray, raw_vectors: np.ndarray,
                  local_query: np.ndarray | None = None) -> np.ndarray:
        """(len(rows),) float32: the score ``search`` gives gallery ``rows`` for one ``query``
        (D,) in the gallery's space: the cosine to their ``raw_vectors`` (len(rows), D), blended
        with local matching where the index re-scores with it (``local_query``: the query's
        normalised descriptors (L, C)), less their hubness correction. What a service shows
        beside an identity's score, so an image's figure and its identity's agree."""
        rows = np.asarray(rows, dtype=np.int64)
        scores = (np.asarray(raw_vectors, dtype=np.float32)
                  @ np.asarray(query, dtype=np.float32))[None]
        if self.local is not None:
            if local_query is None:
                raise ValueError("this index re-scores with local descriptors: pass the query's "
                                 "descriptors (local_query)")
            scores = self.local.blended(local_query[None], scores, rows[None])
        if self.penalty is not None:
            scores = scores - self.penalty[rows]
        return scores[0].astype(np.float32)

    def first_ask(self, k: int) -> int:
        """Neighbours asked first: a query's own identity's images come first (at most the
        crowded count), then mostly one image per other identity; ``k`` more spare."""
        return min(self.sure_ask(k), self.crowded_identity_images + 2 * k)

    def sure_ask(self, k: int) -> int:
        """Neighbours that hold ``k`` distinct identities whatever the query."""
        return min(len(self), k * self.max_images_per_identity)

    def asks(self, k: int) -> list[int]:
        """Neighbours asked, then asked again for the queries left short. With a hubness
        penalty a row far down the plain ranking can still win, and most queries would be asked
        again (a second scan each): one wide ask instead, 8x the sure count. On a realistic
        20k x 512 flat gallery that answered 311 queries/s against 421 for plain search, where
        asking again answered 158, with the same answers; a wide ask re-ranks a long ivfpq
        shortlist, so the penalty is slow on ivfpq galleries."""
        if self.penalty is not None:
            return [min(len(self), 8 * self.sure_ask(k))]
        return sorted({self.first_ask(k), self.sure_ask(k)})

    def _top(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._flat_rows is not None and len(queries) < FEW_QUERIES:
            return exact_top(queries, self._flat_rows, n)
        return self.neighbours(queries, n)

    def neighbours(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's ``search``: the ``n`` nearest gallery rows and their similarities, re-scored
        exactly where the index holds compressed codes and the raw vectors are at hand."""
        wanted = min(len(self), n * self.rerank_factor) if self._rerank_rows is not None else n
        index = self._index_for(wanted)
        types.prepare_search(index, self.spec, wanted)
        similarities, rows = index.search(queries, wanted)
        if self._rerank_rows is None:
            return similarities, rows
        return rerank(queries, rows, self._rerank_rows, n)

    def _index_for(self, n_neighbours: int) -> faiss.Index:
        """The GPU copy, unless it cannot answer that many neighbours (then the CPU original)."""
        if self.faiss_index is not self.cpu_index and n_neighbours > types.GPU_MAX_K:
            log.warning("%d neighbours per query exceed the GPU limit of %d: searching on the CPU",
                        n_neighbours, types.GPU_MAX_K)
            return self.cpu_index
        return self.faiss_index


def rerank(queries: np.ndarray, rows: np.ndarray, raw: np.ndarray,
           n: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ``rows`` (-1: none) re-scored by their exact inner product with each query, the
    best ``n`` kept, best first. FAISS computes the products straight from the rows of ``raw``
    (float32, row-major, possibly memory-mapped: only the candidates' rows are read), with no
    gathered copy: 8x faster than NumPy's gather + product for 3,280 candidates a query."""
    if raw.dtype != np.float32 or not raw.flags["C_CONTIGUOUS"]:
        raise ValueError(f"re-ranking needs row-major float32 vectors, not {raw.dtype}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    exact = np.empty(rows.shape, dtype=np.float32)
    if rows.size:
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(exact), faiss.swig_ptr(queries),
                                         faiss.swig_ptr(raw), faiss.swig_ptr(rows),
                                         raw.shape[1], rows.shape[0], rows.shape[1])
    exact[rows < 0] = -np.inf  # FAISS's padding
    if n < rows.shape[1]:
        top = np.argpartition(-exact, n - 1, axis=1)[:, :n]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(exact, top, axis=1), axis=1,
                                                 kind="stable"), axis=1)
    else:
        top = np.argsort(-exact, axis=1, kind="stable")
    return np.take_along_axis(exact, top, axis=1), np.take_along_axis(rows, top, axis=1)


def exact_top(queries: np.ndarray, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``n`` inner products of a few queries: one BLAS matrix product over all cores,
    then a partial sort; the same answer as FAISS's flat search (ties aside)."""
    similarities = queries @ rows.T
    if n < similarities.shape[1]:
        candidates = np.argpartition(-similarities, n - 1, axis=1)[:, :n]
    else:
        candidates = np.broadcast_to(np.arange(similarities.shape[1]), similarities.shape)
    scores = np.take_along_axis(similarities, candidates, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(candidates, order, axis=1)


def crowded_count(counts: np.ndarray, share: float = 0.99) -> int:
    """Images of a crowded identity: the count that ``share`` of the gallery's *images* belong to
    an identity with at most (a query's nearest images are mostly its own identity's, and an
    image drawn at random sits in a big identity more often than the identity count says)."""
    ordered = np.sort(np.asarray(counts))
    covered = np.cumsum(ordered) / ordered.sum()
    return int(ordered[min(len(ordered) - 1, int(np.searchsorted(covered, share)))])


def fold_asking_again(top, queries: np.ndarray, identities: np.ndarray, k: int,
                      asks: Sequence[int], own_rows: np.ndarray | None = None,
                      penalty: np.ndarray | None = None) -> IdentityRanking:
    """``fold_into_identities`` over ``top(queries, asks[0])`` (``top``: best-first similarities
    and rows, -1 padded); a query left short (fewer than ``k`` identities, or, with ``penalty``,
    a row it was not given could still outscore its ``k``-th) although ``top`` had more to give
    is asked again for the next of ``asks``. ``own_rows``: one gallery row per query left out of
    its answer (a gallery image asked as a query, as tuning does). ``penalty`` (one per gallery
    row) is subtracted from each row's similarity before the fold (``index.hubness``)."""
    extra = 0 if own_rows is None else 1
    lowest = 0.0 if penalty is None else float(penalty.min())
    ranking = _fold(top(queries, asks[0] + extra), identities, k, own_rows, penalty, lowest)
    short = np.flatnonzero(ranking.short)
    for ask in asks[1:]:
        if not len(short):
            break
        log.debug("%d of %d queries asked again for %d neighbours", len(short), len(queries), ask)
        again = _fold(top(queries[short], ask + extra), identities, k,
                      None if own_rows is None else own_rows[short], penalty, lowest)
        for position, q in enumerate(short):
            ranking.identities[q] = again.identities[position]
        ranking.scores[short] = again.scores
        ranking.best_rows[short] = again.best_rows
        short = short[again.short]
    return IdentityRanking(ranking.identities, ranking.scores, ranking.best_rows)


@dataclass
class _Folded:
    identities: list[list[str]]
    scores: np.ndarray
    best_rows: np.ndarray
    short: np.ndarray  # a longer neighbour list could change the answer


def _fold(found: tuple[np.ndarray, np.ndarray], identities: np.ndarray, k: int,
          own_rows: np.ndarray | None, penalty: np.ndarray | None, lowest: float) -> _Folded:
    similarities, rows = found
    if own_rows is not None:  # the own image out, the rest moved up, padding at the end
        rows = np.where(rows == own_rows[:, None], -1, rows)
        kept = np.argsort(rows < 0, axis=1, kind="stable")
        rows = np.take_along_axis(rows, kept, axis=1)
        similarities = np.take_along_axis(similarities, kept, axis=1)
        last = rows.shape[1] - 2
    else:
        last = rows.shape[1] - 1
    if last < 0:
        filled, unseen_best = np.zeros(len(rows), bool), np.full(len(rows), -np.inf)
    else:  # no padding: more rows could be asked, none better than this
        filled = rows[:, last] >= 0
        unseen_best = similarities[:, last] - lowest
    if penalty is not None:
        similarities, rows = penalised(similarities, rows, penalty)
    ranking = fold_into_identities(similarities, rows, identities, k)
    short = filled & (ranking.scores[:, k - 1] < unseen_best)  # -inf when fewer than k found
    return _Folded(ranking.identities, ranking.scores, ranking.best_rows, short)


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
