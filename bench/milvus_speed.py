"""The Milvus backend (milvus-lite here) beside FAISS on the scale part's synthetic galleries.

For each gallery size and index type (flat, ivf, hnsw, with the parameters ``index.types`` picks
for that size; for Milvus also tuned to the default target recall, as build_index.py ships it): the time to write the collection (create + upserts) or build the FAISS index,
batched queries/s and one-query latency through the product's search (``MilvusGallery.search`` /
``GalleryIndex.search``, k = 5 identities), recall@5 of the true identity, and the overlap of the
top-5 identities with exact FAISS search.

Each row is stored in ``results`` and ``saved()`` is called as soon as it is measured: at 1M a
Milvus type takes an hour or more here, and a run stopped part-way keeps what it measured.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

SINGLE_QUERIES = 20


def bench_milvus(args, results: dict | None = None, saved: Callable[[], None] = lambda: None) -> dict:
    from index import GalleryIndex, milvus, tuning
    from index.synthetic import clustered_float32

    results = {} if results is None else results
    faiss_types = args.milvus_types if args.milvus_faiss_types is None else args.milvus_faiss_types
    for n in args.milvus_sizes:
        gallery, labels, queries, truth = clustered_float32(n, args.dim, args.milvus_queries)
        paths = [f"/gallery/{i:08d}.jpg" for i in range(len(gallery))]
        exact = GalleryIndex(gallery, labels).search(queries, 5).identities
        rows = {}
        results[str(n)] = {"gallery": len(gallery), "dim": args.dim, "queries": len(queries),
                           "rows": rows}
        for kind in faiss_types:
            started = time.perf_counter()
            index = GalleryIndex(gallery, labels, kind)
            rows[f"faiss {kind}"] = _searched(index, time.perf_counter() - started, queries, truth,
                                              exact, index.spec.params)
            del index
            saved()
        folder = Path(tempfile.mkdtemp(prefix="bench-milvus-"))
        try:
            client = milvus.connect(str(folder / "bench.db"))
            for kind in args.milvus_types:
                spec = milvus.resolve(kind, len(gallery), args.dim)
                name = f"bench_{kind}"
                started = time.perf_counter()
                milvus.create_collection(client, name, args.dim, spec, "bench")
                milvus.upsert(client, name, gallery, paths, list(labels))
                write_s = time.perf_counter() - started
                index = milvus.MilvusGallery(client, name, args.dim, len(set(labels)), len(gallery), spec)
                started = time.perf_counter()
                if kind != "flat":  # measure once searches go through the index
                    milvus.settle(client, name)
                settle_s = time.perf_counter() - started
                rows[f"milvus-lite {kind}"] = _searched(index, write_s, queries, truth, exact,
                                                        spec.params)
                rows[f"milvus-lite {kind}"]["settle_s"] = round(settle_s, 2)  # waiting for the index
                saved()
                started = time.perf_counter()
                tuned = index.tune(gallery, paths, list(labels), tuning.DEFAULT_TARGET)
                if tuned is not None:  # what build_index.py --backend milvus ships
                    rows[f"milvus-lite {kind}, tuned"] = _searched(
                        index, 0.0, queries, truth, exact, {**spec.params, tuned.param: tuned.value})
                    rows[f"milvus-lite {kind}, tuned"].update(
                        build_s=None, tune_s=round(time.perf_counter() - started, 1),
                        tuning_recall=round(tuned.recall, 4))
                    saved()
                client.drop_collection(name)
            client.close()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        logging.getLogger(__name__).info("milvus part: %d vectors done", n)
    return results


def _searched(index, build_s: float, queries: np.ndarray, truth: np.ndarray,
              exact: list[list[str]], params: dict) -> dict:
    started = time.perf_counter()
    ranked = index.search(queries, 5).identities
    batch_s = time.perf_counter() - started
    started = time.perf_counter()
    for q in queries[:SINGLE_QUERIES]:
        index.search(q[None], 5)
    single_ms = (time.perf_counter() - started) / SINGLE_QUERIES * 1000
    return {"build_s": round(build_s, 2), "batch_queries_per_s": round(len(queries) / batch_s, 1),
            "single_query_ms": round(single_ms, 2),
            "recall_at_5": round(float(np.mean([t in ids for ids, t in zip(ranked, truth)])), 4),
            "top5_overlap_with_exact": round(float(np.mean(
                [len(set(a) & set(b)) / 5 for a, b in zip(ranked, exact)])), 4),
            "params": params}
