"""Search speed and recall of the gallery index types on a synthetic gallery.

  .venv/bin/python bench/index_speed.py                      # 100k x 512-d: flat, hnsw, ivf
  .venv/bin/python bench/index_speed.py --n 20000 --types flat hnsw ivf ivfpq

Builds each type through ``GalleryIndex`` (the product's search path, identity folding included),
then times (a) one batched search of all queries and (b) queries one at a time, and measures
recall@5 of the true identity relative to exact (flat) search and the overlap of the top-5
identities with flat's. Prints a table; writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index import GalleryIndex  # noqa: E402
from index.types import CHOICES  # noqa: E402
from index.synthetic import clustered_vectors  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="approximate gallery size (default %(default)s)")
    p.add_argument("--dim", type=int, default=512, help="embedding size (default %(default)s)")
    p.add_argument("--queries", type=int, default=1000, help="batched queries (default %(default)s)")
    p.add_argument("--single", type=int, default=200, help="queries timed one by one (default %(default)s)")
    p.add_argument("--k", type=int, default=5, help="identities per answer (default %(default)s)")
    p.add_argument("--spread", type=float, default=0.25,
                   help="noise around each identity (default %(default)s; 0.3 is hard for ivf)")
    p.add_argument("--types", nargs="+", default=["flat", "hnsw", "ivf"],
                   choices=[c for c in CHOICES if c != "auto"], help="index types (default flat hnsw ivf)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON")
    return p.parse_args()


def recall(identities: list[list[str]], truth: np.ndarray) -> float:
    return float(np.mean([t in ids for ids, t in zip(identities, truth)]))


def measure(kind: str, gallery, labels, queries, truth, k: int, n_single: int) -> dict:
    started = time.perf_counter()
    index = GalleryIndex(gallery, labels, kind)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    ranking = index.search(queries, k)
    batch_s = time.perf_counter() - started
    started = time.perf_counter()
    for q in queries[:n_single]:
        index.search(q[None], k)
    single_s = (time.perf_counter() - started) / n_single
    return {"type": kind, "params": index.spec.params, "build_s": round(build_s, 2),
            "batch_queries_per_s": round(len(queries) / batch_s, 1),
            "single_query_ms": round(single_s * 1000, 3),
            "recall_at_k": recall(ranking.identities, truth), "identities": ranking.identities}


def main() -> None:
    args = parse_args()
    import faiss

    gallery, labels, queries, truth = clustered_vectors(max(1, args.n * 2 // 5), args.dim, args.seed,
                                                        spread=args.spread)
    rng = np.random.default_rng(args.seed + 1)
    pick = rng.choice(len(queries), size=min(args.queries, len(queries)), replace=False)
    queries, truth = queries[pick], truth[pick]
    print(f"gallery {len(gallery)} x {args.dim}, {len(set(labels))} identities, {len(queries)} queries, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = [measure(kind, gallery, labels, queries, truth, args.k, args.single) for kind in args.types]
    answers = {row["type"]: row.pop("identities") for row in rows}
    exact = next((r for r in rows if r["type"] == "flat"), None)
    for row in rows if exact is not None else []:
        row["recall_vs_exact"] = round(row["recall_at_k"] / max(exact["recall_at_k"], 1e-9), 4)
        row["top_k_overlap_with_exact"] = round(float(np.mean(
            [len(set(a) & set(b)) / args.k for a, b in zip(answers[row["type"]], answers["flat"])])), 4)
    print_table(rows)
    write_json(args, rows, len(gallery))


def print_table(rows: list[dict]) -> None:
    header = f"{'type':6s} {'build s':>8s} {'batch q/s':>10s} {'1-query ms':>11s} {'recall@5':>9s} " \
             f"{'vs exact':>9s} {'top5 overlap':>13s}  params"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['type']:6s} {r['build_s']:8.2f} {r['batch_queries_per_s']:10.1f} "
              f"{r['single_query_ms']:11.3f} {r['recall_at_k']:9.4f} "
              f"{r.get('recall_vs_exact', float('nan')):9.4f} "
              f"{r.get('top_k_overlap_with_exact', float('nan')):13.4f}  {r['params']}")


def write_json(args: argparse.Namespace, rows: list[dict], n_gallery: int) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"index_speed_{n_gallery}x{args.dim}.json"
    report = {"gallery": n_gallery, "dim": args.dim, "queries": args.queries, "k": args.k,
              "spread": args.spread, "seed": args.seed, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "results": rows}
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temp, path)
    print(f"(written to {path})")


if __name__ == "__main__":
    main()
