"""Probe (issue 16, not part of the engine): `bench local-match` with the chamfer similarity of
``index.local_match`` restricted to a spatial window, a location matching only locations within
R cells of its own on the square map (R < 0: the plain, unrestricted similarity).

usage, from the project root:
  PYTHONPATH=. python bench/results/probes_s11/probe_windowed_chamfer.py R --data omniglot --seeds 0 1 --image-size 160
"""
import sys
import numpy as np
import index.local_match as lm

R = int(sys.argv[1])
sys.argv = [sys.argv[0]] + sys.argv[2:]


def windowed(queries, gallery, block=128):
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    n_gallery, locations, channels = gallery.shape
    side = int(round(locations ** 0.5))
    assert side * side == locations == queries.shape[1]
    r, c = np.divmod(np.arange(locations), side)
    allowed = (np.abs(r[:, None] - r[None, :]) <= R) & (np.abs(c[:, None] - c[None, :]) <= R)
    penalty = np.where(allowed, 0.0, -4.0).astype(np.float32)[:, None, :]  # (L, 1, M)
    out = np.empty((len(queries), n_gallery), dtype=np.float32)
    for start in range(0, n_gallery, block):
        part = gallery[start:start + block]
        flat = part.reshape(-1, channels).T
        for q, query in enumerate(queries):
            s = (query @ flat).reshape(len(query), len(part), locations) + penalty
            forward = s.max(axis=2).mean(axis=0)
            backward = s.max(axis=0).mean(axis=1)
            out[q, start:start + len(part)] = 0.5 * (forward + backward)
    return out


if R >= 0:
    lm.chamfer_similarity = windowed
from bench.__main__ import main  # noqa: E402
sys.argv = ["bench", "local-match"] + sys.argv[1:]
main()
