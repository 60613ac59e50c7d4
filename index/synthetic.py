"""Synthetic galleries shaped like a whale gallery, for tests and benchmarks of the index.

Real embeddings need a model and images; the index's own behaviour (recall of approximate types,
speed at a million vectors, crash safety) is measured on these instead. Isotropic data is the hard
case for approximate search: every other identity is equally far away.
"""
from __future__ import annotations

import numpy as np


def clustered_vectors(n_identities: int, dim: int, seed: int = 0, spread: float = 0.35,
                      max_images: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic embeddings shaped like a whale gallery: each identity a random direction with
    1..max_images noisy unit vectors around it, plus one noisy query per identity.
    Returns (gallery, gallery_labels, queries, query_labels)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(n_identities, dim)))
    counts = rng.integers(1, max_images + 1, size=n_identities)
    labels = np.repeat(np.arange(n_identities), counts)
    gallery = _unit(centres[labels] + spread * rng.normal(size=(len(labels), dim)) / np.sqrt(dim) * 4)
    queries = _unit(centres + spread * rng.normal(size=(n_identities, dim)) / np.sqrt(dim) * 4)
    names = np.array([f"id{i:05d}" for i in range(n_identities)], dtype=object)
    return gallery.astype(np.float32), names[labels], queries.astype(np.float32), names


def clustered_float32(n_vectors: int, dim: int, n_queries: int, seed: int = 0, spread: float = 0.25,
                       chunk: int = 100_000):
    """Like ``clustered_vectors`` (identity centres, 1-4 noisy images each, one
    noisy query per identity) but float32 and in chunks, so 1M x 512 needs ~2 GB, not ~16 GB."""
    rng = np.random.default_rng(seed)
    n_identities = max(1, n_vectors * 2 // 5)
    counts = rng.integers(1, 5, size=n_identities)
    labels = np.repeat(np.arange(n_identities), counts)[:n_vectors]
    centres = rng.standard_normal((n_identities, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gallery = np.empty((len(labels), dim), dtype=np.float32)
    scale = np.float32(spread * 4 / np.sqrt(dim))
    for start in range(0, len(labels), chunk):
        block = centres[labels[start:start + chunk]] + scale * rng.standard_normal(
            (min(chunk, len(labels) - start), dim), dtype=np.float32)
        gallery[start:start + chunk] = block / np.linalg.norm(block, axis=1, keepdims=True)
    truth = rng.choice(labels, size=n_queries, replace=False)
    queries = centres[truth] + scale * rng.standard_normal((n_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    names = np.array([f"id{i:07d}" for i in range(n_identities)], dtype=object)
    return gallery, names[labels], queries, names[truth]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)
