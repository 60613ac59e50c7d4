"""Which product-quantiser codes shortlist a realistic gallery well: the share of held-out gallery
images whose exact nearest image falls within the first xN of the neighbours a query asks first,
for the codes as stored before (no rotation), a random rotation, OPQ's trained rotation and
twice the code bytes. A probe behind ``index.types._pq_params``, not a suite:

  python -m bench.codes_probe --size 1000000 [--variants pq128 rr128 opq128 pq256]

Same realistic gallery as ``python -m bench speed --parts scale --scale-gallery realistic``
(one thread; the gallery is generated in memory: ~2 GB at 1M).
"""
from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

FIRST_ASK = 49  # neighbours the realistic galleries' queries ask first (crowded count + 2 x 5)
FACTORS = (2, 4, 8, 16, 64)


def rotation_for(variant: str, sample: np.ndarray, m: int) -> np.ndarray | None:
    """The orthogonal matrix R (vectors become x @ R) a variant codes in, None for none."""
    d = sample.shape[1]
    if variant.startswith("rr"):
        return np.linalg.qr(np.random.default_rng(1).standard_normal((d, d)))[0].astype(np.float32)
    if variant.startswith("opq"):
        opq = faiss.OPQMatrix(d, m)
        opq.niter = 20
        opq.train(np.ascontiguousarray(sample[:65_536]))
        return faiss.vector_to_array(opq.A).reshape(d, d).T.astype(np.float32)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--variants", nargs="+", default=["pq128", "rr128", "opq128", "pq256"])
    p.add_argument("--nprobe", type=int, nargs="+", default=[32, 64, 128, 256])
    args = p.parse_args()
    from faiss.contrib.clustering import two_level_clustering

    from index.synthetic import sample_gallery
    from index.tuning import exact_blocked

    from .speed import realistic_model

    faiss.omp_set_num_threads(1)
    model, _ = realistic_model(argparse.Namespace(scale_fit_data="dogfacenet", dim=512))
    gallery = sample_gallery(model, args.size, 1)[0]
    n, d = gallery.shape
    rng = np.random.default_rng(0)
    rows = rng.choice(n, 500, replace=False)
    queries = np.ascontiguousarray(gallery[rows])
    _, exact = exact_blocked(queries, gallery, 2)
    nearest = np.where(exact[:, 0] == rows, exact[:, 1], exact[:, 0])
    nlist = int(4 * math.sqrt(n))
    sample = np.ascontiguousarray(gallery[rng.choice(n, min(n, nlist * 64), replace=False)])
    cells, _ = two_level_clustering(sample, math.isqrt(nlist), nlist, spherical=True, clustering_niter=10)
    longest = FIRST_ASK * max(FACTORS)
    print(f"{n} x {d}, {nlist} cells; share of 500 held-out images whose exact nearest image is "
          f"within the first xN of {FIRST_ASK} neighbours")
    for variant in args.variants:
        started = time.perf_counter()
        m = int(variant[-3:])
        rotation = rotation_for(variant, sample, m)
        turn = (lambda x: np.ascontiguousarray(x @ rotation)) if rotation is not None else (lambda x: x)
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(turn(cells))  # an orthogonal turn of the cells: the same cells
        index = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
        index.train(turn(sample))
        for start in range(0, n, 65_536):
            index.add(turn(gallery[start:start + 65_536]))
        build_s = time.perf_counter() - started
        for nprobe in args.nprobe:
            index.nprobe = nprobe
            found = index.search(turn(queries), longest)[1]
            found = np.where(found == rows[:, None], -2, found)  # the own image does not count
            place = np.array([np.flatnonzero(r == t)[0] if (r == t).any() else longest
                              for r, t in zip(found, nearest)])
            print(f"{variant:7s} build {build_s:5.0f} s  nprobe {nprobe:4d}: " + "  ".join(
                f"x{f} {np.mean(place < FIRST_ASK * f):.3f}" for f in FACTORS), flush=True)


if __name__ == "__main__":
    main()
