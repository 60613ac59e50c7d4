"""Search parameters chosen by measured recall, not by a table: what ``--target-recall`` does.

An approximate index answers faster by looking at less: IVF scans ``nprobe`` of its cells, HNSW
keeps ``efSearch`` candidates. How much is enough depends on the gallery (real embeddings cluster;
isotropic synthetic ones are the worst case), so after building, a sample of the gallery's own
vectors is asked against the index, each with its own image left out of both answers. The
measure is recall@5 against exact search: how often the identity exact search answers first is
among the index's top 5 (FAISS's "1-recall@5"; with real labels that identity is usually the true
one, which is what a user scores). The smallest setting meeting the target is kept, with what it
measured, in the manifest; ``query.py`` reads it back. A target no setting reaches is reported,
with the best that was measured. The agreement of the whole top 5 is logged too: its tail ranks
are near-ties on isotropic data, so it is a poor thing to tune on.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import faiss
import numpy as np

from .search import crowded_count, exact_top, fold_asking_again
from .types import IndexSpec

log = logging.getLogger(__name__)

DEFAULT_TARGET = 0.95
SAMPLE = 500  # held-out queries: the recall estimate's standard error is below 0.01 near 0.95
K = 5  # identities per answer, as query.py gives by default
TUNED = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}
RERANK_FACTORS = (4, 8, 16, 32, 64)  # ivfpq shortlists tried, shortest first: x4 missed 0.95
# on isotropic 1M x 512 even scanning every cell (0.942); on a realistic 200k gallery x4 met it at
# nprobe 64 and x8 at nprobe 32 (bench/README.md, "Re-ranking by FAISS")


@dataclass(frozen=True)
class Tuning:
    """The chosen search parameter and what it measured."""

    param: str
    value: int
    recall: float  # share of queries whose exact first identity is in the index's top K
    reached: bool
    top_k_agreement: float  # share of the exact top-K identities the index also answered
    extra: dict[str, int] = field(default_factory=dict)  # other parameters tuning set (rerank)


def tune(index: faiss.Index, spec: IndexSpec, vectors: np.ndarray, identities: np.ndarray,
         target: float = DEFAULT_TARGET, seed: int = 0,
         search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
         set_rerank: Callable[[int], None] | None = None) -> Tuning | None:
    """The smallest search parameter of ``index`` (a built CPU index over ``vectors``) meeting
    ``target`` recall@K against exact search; the largest candidate (and ``reached=False``) when
    none does. None for an exact index. ``search``: how answers are found (default
    ``index.search``; ``GalleryIndex.neighbours`` to include its exact re-ranking).
    ``set_rerank``: for ivfpq, sets the re-ranked shortlist's factor; the shortest of
    ``RERANK_FACTORS`` with which some nprobe meets the target is kept (``Tuning.extra``)."""
    search = search or index.search
    if spec.kind not in TUNED:
        return None
    param = TUNED[spec.kind]
    rows = held_out(len(vectors), seed)
    queries = np.ascontiguousarray(vectors[rows])
    identities = np.asarray(identities, dtype=object)
    counts = np.unique(identities.astype(str), return_counts=True)[1]
    sure = min(len(vectors), K * int(counts.max()))
    first = min(sure, crowded_count(counts) + 2 * K)  # as GalleryIndex.search asks
    wanted = sure + 1  # +1: the query's own image, dropped from both answers

    def answers(value: int) -> list[list[str]]:
        _set(index, spec, param, max(value, wanted) if param == "efSearch" else value)
        return fold_asking_again(search, queries, identities, K, [first, sure], own_rows=rows).identities

    exact = exact_answers(vectors, identities, rows, sure)
    if spec.kind != "ivfpq" or set_rerank is None:
        best = choose(spec, param, candidates(spec), answers, exact, target)
    else:
        for factor in RERANK_FACTORS:
            set_rerank(factor)
            best = choose(spec, param, candidates(spec), answers, exact, target)
            best = replace(best, extra={"rerank": factor})
            if best.reached:
                break
    _set(index, spec, param, best.value)
    return best


def tuned_spec(spec: IndexSpec, found: Tuning | None, target: float, n_vectors: int,
               backend: str = "") -> IndexSpec:
    """``spec`` with the chosen value and what it measured (as stored in the manifest), the
    outcome logged: a target not reached is a warning naming the best value measured."""
    if found is None:
        return spec
    kind = f"{backend} {spec.kind}".strip()
    if found.reached:
        log.info("%s %s=%d%s: recall@%d %.3f against exact search on %d held-out gallery "
                 "images (target %.2f; whole top-%d agreement %.3f)", kind, found.param,
                 found.value, "".join(f", {k}={v}" for k, v in found.extra.items()), K,
                 found.recall, min(SAMPLE, n_vectors), target, K, found.top_k_agreement)
    elif spec.requested == "auto":  # store.save_index indexes exactly instead where it can
        log.info("%s %s=%d: recall@%d %.3f, below the target %.2f", kind, found.param,
                 found.value, K, found.recall, target)
    else:
        log.warning("a %s index cannot reach the target recall %.2f on this gallery: the best "
                    "measured is %.3f at %s=%d; use --index-type flat (exact) or ivf, or a lower "
                    "--target-recall", kind, target, found.recall, found.param, found.value)
    return IndexSpec(spec.kind, {**spec.params, found.param: found.value, **found.extra},
                     spec.requested, target, round(found.recall, 4))


def held_out(n_vectors: int, seed: int = 0) -> np.ndarray:
    """The gallery rows asked as queries (each answered without its own image)."""
    return np.random.default_rng(seed).choice(n_vectors, size=min(SAMPLE, n_vectors), replace=False)


def exact_answers(vectors: np.ndarray, identities: np.ndarray, rows: np.ndarray,
                  sure: int) -> list[list[str]]:
    """Exact search's top-``K`` identities for the gallery rows ``rows``, own image left out
    (``sure``: neighbours that hold ``K`` identities besides the own image)."""
    exact = lambda queries, n: exact_blocked(queries, vectors, n)  # noqa: E731
    return fold_asking_again(exact, np.ascontiguousarray(vectors[rows]),
                             np.asarray(identities, dtype=object), K, [sure], own_rows=rows).identities


def choose(spec: IndexSpec, param: str, values: Sequence[int],
           answers: Callable[[int], list[list[str]]], exact: list[list[str]],
           target: float) -> Tuning:
    """The first of ``values`` (cheapest first) whose ``answers`` meet ``target`` recall@K
    against ``exact``; the last tried, unmet, when none does."""
    best = None
    for value in values:
        answered = answers(value)
        recall = float(np.mean([e[0] in a for a, e in zip(answered, exact) if e]))
        agreement = float(np.mean([len(set(a) & set(e)) / max(1, len(e))
                                   for a, e in zip(answered, exact)]))
        best = Tuning(param, value, recall, recall >= target, agreement)
        log.debug("%s %s=%d: recall@%d %.4f, top-%d agreement %.4f", spec.kind, param, value, K,
                  recall, K, agreement)
        if best.reached:
            break
    return best


def candidates(spec: IndexSpec) -> list[int]:
    """Settings tried, cheapest first: powers of two up to every cell (IVF, where the last is
    exact) or up to 4096 candidates (HNSW)."""
    if spec.kind == "hnsw":
        return [16 * 2 ** i for i in range(9)]  # 16 .. 4096
    nlist = int(spec.params["nlist"])
    values = [2 ** i for i in range(nlist.bit_length()) if 2 ** i < nlist]
    return values + [nlist]


def _set(index: faiss.Index, spec: IndexSpec, param: str, value: int) -> None:
    if param == "nprobe":
        faiss.extract_index_ivf(index).nprobe = int(value)
    else:
        index.hnsw.efSearch = int(value)


def exact_blocked(queries: np.ndarray, vectors: np.ndarray, n: int, block: int = 65_536):
    """Exact top-``n`` inner products: ``search.exact_top`` on the gallery block by block (500
    queries against a whole 1M gallery would be a 2 GB matrix), the blocks' bests merged."""
    starts = range(0, len(vectors), block)
    parts = [exact_top(queries, vectors[start:start + block], n) for start in starts]
    scores = np.concatenate([part_scores for part_scores, _ in parts], axis=1)
    rows = np.concatenate([part_rows + start for (_, part_rows), start in zip(parts, starts)], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
