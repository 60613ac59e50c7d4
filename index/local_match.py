"""Local matching: a query and a gallery image compared location by location, not only as two
pooled vectors.

A pooled (GeM) vector keeps *what* is in an image and loses *where*; two drawings of one
character, or two photos of one face, share many local patterns that pooling blurs together
with everything else. Each image here is a set of local descriptors (one per location of a
mid-level feature map, e.g. 10 x 10 x 112 for EfficientNet-Lite0's stride-16 stage at 160 px),
centred on the gallery's mean descriptor and normalised to unit length, and two images are
compared by the symmetric *chamfer* similarity: each location's best match in the other image,
averaged over locations, both ways. It is the "max-sim" of late-interaction retrieval (ColBERT,
Khattab & Zaharia, SIGIR 2020) and the chamfer similarity of Jégou et al.'s aggregated local
descriptors, without any training.

Pure NumPy, so the index floor can use it; the descriptors come from
``retrieval.models.local_descriptors``.
"""
from __future__ import annotations

import numpy as np


def normalised_descriptors(maps: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(N, L, C) float32: ``maps`` (N images x L locations x C channels) minus the gallery's
    ``mean`` descriptor (C,), each location scaled to unit length. Post-ReLU maps are all
    non-negative, so without the centring every pair of locations looks alike."""
    centred = np.asarray(maps, dtype=np.float32) - np.asarray(mean, dtype=np.float32)
    norms = np.linalg.norm(centred, axis=2, keepdims=True)
    return centred / np.maximum(norms, 1e-12)


def mean_descriptor(maps: np.ndarray) -> np.ndarray:
    """(C,) float32: the mean over every image and location of ``maps`` (N, L, C)."""
    maps = np.asarray(maps)
    return maps.reshape(-1, maps.shape[-1]).astype(np.float64).mean(axis=0).astype(np.float32)


def chamfer_similarity(queries: np.ndarray, gallery: np.ndarray, block: int = 128) -> np.ndarray:
    """(Q, G) float32 symmetric chamfer similarity of normalised descriptor sets (Q, L, C) and
    (G, M, C): ``(mean_l max_m s_lm + mean_m max_l s_lm) / 2`` with ``s`` the cosine of two
    locations; 1 for identical images. ``block`` gallery images are compared at a time, so
    memory stays at ``L x block x M`` floats per query."""
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    n_gallery, locations, channels = gallery.shape
    out = np.empty((len(queries), n_gallery), dtype=np.float32)
    for start in range(0, n_gallery, block):
        part = gallery[start:start + block]
        flat = part.reshape(-1, channels).T  # (C, b*M)
        for q, query in enumerate(queries):
            s = (query @ flat).reshape(len(query), len(part), locations)  # (L, b, M)
            forward = s.max(axis=2).mean(axis=0)   # each query location's best match
            backward = s.max(axis=0).mean(axis=1)  # each gallery location's best match
            out[q, start:start + len(part)] = 0.5 * (forward + backward)
    return out
