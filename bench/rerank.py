"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017; issue 16, lever 7) on runs kept by ``ablation --keep``, training nothing.

  python -m bench ablation --data orl --seeds 0 1 2 3 4 --image-size 160 --keep runs/ --variants base
  python -m bench rerank --data orl --seeds 0 1 2 3 4 --keep runs/

The batch of queries and the gallery form one neighbour graph. Each point's k1-reciprocal
neighbours (j among i's k1 nearest and i among j's), widened by the k1/2-reciprocal sets of its
members that overlap them by more than 2/3, become a weight vector (``exp(-distance)``,
summing to 1), averaged over the point's k2 nearest (local query expansion). A query's distance
to a gallery image is ``(1 - lambda)`` x the Jaccard distance of their vectors + ``lambda`` x the
original distance, and its similarity 1 minus that. Rows, each threshold calibrated on
validation (the queries of the validation carve-out re-ranked in the validation gallery):

* ``shipped``: the kept run's embedding blended at the share training's rule picks (ties to 1/2),
  searched with the hubness weight validation picks, as the engine ships it (less whitening);
* ``re-ranked, chosen``: (k1, k2, lambda) from ``GRID`` chosen on validation;
* ``re-ranked or shipped``: the re-ranking only where validation scores it strictly higher.

Reads the ``ties.npz`` caches of ``blend-ties`` (embedding them first where missing).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from .common import Report, format_table
from .kept import add_kept_arguments

GRID = [(k1, k2, lam) for k1 in (3, 5, 8) for k2 in (1, 2) for lam in (0.3, 0.6)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_kept_arguments(p)
    p.add_argument("--variant", default="base", help="the kept variant to re-score (default base)")


def _reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """The k-reciprocal neighbours of ``i`` (itself included): j in i's k+1 nearest, i in j's."""
    forward = rank[i, :k + 1]
    return forward[np.any(rank[forward, :k + 1] == i, axis=1)]


def k_reciprocal_similarity(queries: np.ndarray, gallery: np.ndarray, k1: int, k2: int,
                            lam: float) -> np.ndarray:
    """(Q, G) similarities ``1 - re-ranked distance`` of unit vectors (Zhong et al. 2017)."""
    x = np.concatenate([queries, gallery]).astype(np.float64)
    n, nq = len(x), len(queries)
    dist = np.clip(2.0 - 2.0 * x @ x.T, 0.0, None)
    dist /= np.maximum(dist.max(axis=0, keepdims=True), 1e-12)  # per column, as the paper's code
    rank = np.argsort(dist, axis=1, kind="stable")
    weights = np.zeros((n, n))
    for i in range(n):
        core = _reciprocal(rank, i, k1)
        members = [core]
        for j in core:
            around = _reciprocal(rank, int(j), int(round(k1 / 2)))
            if len(np.intersect1d(around, core)) > 2 / 3 * len(around):
                members.append(around)
        support = np.unique(np.concatenate(members))
        w = np.exp(-dist[i, support])
        weights[i, support] = w / w.sum()
    if k2 > 1:
        weights = weights[rank[:, :k2]].mean(axis=1)
    jaccard = np.empty((nq, len(gallery)))
    for q in range(nq):  # rows sum to 1, so sum(max) = 2 - sum(min)
        overlap = np.minimum(weights[q][None], weights[nq:]).sum(axis=1)
        jaccard[q] = 1.0 - overlap / (2.0 - overlap)
    return 1.0 - ((1.0 - lam) * jaccard + lam * dist[:nq, nq:])


def ranking_from_similarity(similarity: np.ndarray, gallery_ids: Sequence, k: int = 5):
    """Identities ranked by their best image's similarity, as ``GalleryIndex.search`` answers."""
    from index import IdentityRanking

    names, column = np.unique(np.asarray([str(i) for i in gallery_ids]), return_inverse=True)
    per_identity = np.full((similarity.shape[0], len(names)), -np.inf)
    for j in range(similarity.shape[1]):
        per_identity[:, column[j]] = np.maximum(per_identity[:, column[j]], similarity[:, j])
    order = np.argsort(-per_identity, axis=1, kind="stable")[:, :k]
    return IdentityRanking([[str(names[c]) for c in row] for row in order],
                           np.take_along_axis(per_identity, order, 1).astype(np.float32),
                           np.full(order.shape, -1, dtype=np.int64))


def _rerank_rule(val: dict, test: dict) -> dict:
    """(k1, k2, lambda) and threshold chosen on validation; test MAP@5 with them."""
    from retrieval.metrics import calibrate_threshold
    from retrieval.training.evaluate import score

    best = None
    for params in GRID:
        ranked = ranking_from_similarity(k_reciprocal_similarity(val["q"], val["g"], *params),
                                         val["g_ids"])
        threshold, chosen_by = calibrate_threshold(ranked.identities, ranked.scores,
                                                   [str(t) for t in val["q_ids"]])
        if best is None or chosen_by > best["val"]:
            best = {"val": chosen_by, "threshold": threshold, "params": params}
    tested = ranking_from_similarity(k_reciprocal_similarity(test["q"], test["g"], *best["params"]),
                                     test["g_ids"])
    return {**best, "test": score(tested, [str(t) for t in test["q_ids"]], best["threshold"])}


def seed_rows(vectors: dict) -> dict[str, dict]:
    from retrieval.training.train import _best_share

    from .blend_ties import blends
    from .kept import _shift_rule

    parts, plain = blends(vectors)
    share = _best_share(plain).pretrained_share
    shipped = {**_shift_rule(*parts[share], lambda part, _: np.zeros(len(part["q"])), (0.0,)),
               "share": share}
    reranked = {**_rerank_rule(*parts[share]), "share": share}
    return {"shipped": shipped, "re-ranked, chosen": reranked,
            "re-ranked or shipped": reranked if reranked["val"] > shipped["val"] else shipped}


def run(args) -> dict:
    from .blend_ties import kept_vectors
    from .kept import rule_rows

    report = Report("rerank", args, args.seeds)
    per_seed = []
    for seed, vectors in kept_vectors(args):
        rows = seed_rows(vectors)
        per_seed.append({"seed": seed, **rows})
        print(f"seed {seed}: " + ", ".join(f"{k} {v['val']:.3f}/{v['test']:.3f}"
                                           + (f" {v['params']}" if "params" in v else "")
                                           for k, v in rows.items()), flush=True)
    names = [k for k in per_seed[0] if k != "seed"]
    table_rows = rule_rows(per_seed, names, "shipped")
    title = (f"{args.data}: kept runs {args.variant}, seeds {' '.join(map(str, args.seeds))}; "
             "k-reciprocal re-ranking, choose by the validation column")
    table = format_table(["rule", "val MAP@5", "test MAP@5 (threshold from val)",
                          "seeds above shipped", "below"], table_rows, title)
    print(table)
    tag = f"_{args.max_identities}ids" if args.max_identities else ""
    report.write(f"rerank_{Path(str(args.data)).name}{tag}", getattr(args, "out", None),
                 rows=per_seed, table=table)
    return {"rerank": per_seed}
