"""Synthetic galleries shaped like a whale gallery, for tests and benchmarks of the index.

Real embeddings need a model and images; the index's own behaviour (recall of approximate types,
speed at a million vectors, crash safety) is measured on these instead. Isotropic data is the hard
case for approximate search: every other identity is equally far away.
"""
from __future__ import annotations

from dataclasses import dataclass

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
                       chunk: int = 100_000, out: np.ndarray | None = None):
    """Like ``clustered_vectors`` (identity centres, 1-4 noisy images each, one
    noisy query per identity) but float32 and in chunks, so 1M x 512 needs ~2 GB, not ~16 GB.
    ``out``: a float32 ``(n_vectors, dim)`` array to fill (e.g. a memory map) instead of a new one;
    the gallery is its first rows (there can be a few fewer than ``n_vectors``)."""
    rng = np.random.default_rng(seed)
    n_identities = max(1, n_vectors * 2 // 5)
    counts = rng.integers(1, 5, size=n_identities)
    labels = np.repeat(np.arange(n_identities), counts)[:n_vectors]
    centres = rng.standard_normal((n_identities, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gallery = np.empty((len(labels), dim), dtype=np.float32) if out is None else out[:len(labels)]
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


# ----------------------------------------------------------------------------- realistic galleries

@dataclass
class GalleryModel:
    """A Gaussian model of real embeddings, before normalisation: identity centres spread around
    a mean along a few principal directions (the rest isotropic), and images spread around their
    centre the same way. Sampled and normalised, it gives galleries of any size whose spectrum and
    within / between identity similarities follow the real ones (``fit_gallery_model``)."""

    mean: np.ndarray  # (D,)
    between_basis: np.ndarray  # (r, D) principal directions of the identity centres
    between_scale: np.ndarray  # (r,) their standard deviations
    between_rest: float  # standard deviation per remaining dimension
    within_basis: np.ndarray  # (r, D) principal directions of images around their centre
    within_scale: np.ndarray
    within_rest: float
    counts: np.ndarray  # images per identity, as observed (sampled from)

    def _draw(self, rng, n: int, basis, scale, rest: float) -> np.ndarray:
        low = (rng.standard_normal((n, len(scale)), dtype=np.float32) * scale) @ basis
        return low + rest * rng.standard_normal((n, basis.shape[1]), dtype=np.float32)


def fit_gallery_model(vectors: np.ndarray, labels, rank: int = 64) -> GalleryModel:
    """Fit ``GalleryModel`` to real unit embeddings with identity labels. Within-identity spread
    comes from identities with 2+ images (residuals scaled by sqrt(n / (n - 1)), the unbiased
    estimate); the centres' spread has that within part removed per dimension."""
    vectors = np.asarray(vectors, dtype=np.float64)
    names, codes, counts = np.unique(np.asarray(labels).astype(str), return_inverse=True,
                                     return_counts=True)
    centres = np.zeros((len(names), vectors.shape[1]))
    np.add.at(centres, codes, vectors)
    centres /= counts[:, None]
    several = counts[codes] > 1
    residuals = (vectors - centres[codes])[several] * np.sqrt(
        counts[codes][several] / (counts[codes][several] - 1))[:, None]
    if len(residuals) < 2 or len(names) < 2:
        raise ValueError("fitting a gallery model needs 2+ identities and some with 2+ images")
    within_basis, within_scale, within_rest = _principal(residuals, rank, centred=True)
    mean = centres.mean(axis=0)
    # a centre averages n images: its spread includes 1/n of the within variance; take it out
    within_var = residuals.var(axis=0).sum() / vectors.shape[1]
    between_basis, between_scale, between_rest = _principal(
        centres - mean, rank, centred=True,
        remove=float(np.mean(1.0 / counts)) * within_var)
    return GalleryModel(mean.astype(np.float32), between_basis, between_scale, between_rest,
                        within_basis, within_scale, within_rest, counts)


def _principal(x: np.ndarray, rank: int, centred: bool, remove: float = 0.0):
    """Top-``rank`` directions of ``x``'s covariance with their standard deviations, and the
    standard deviation per remaining dimension (``remove``: variance per dimension to subtract)."""
    x = x if centred else x - x.mean(axis=0)
    rank = min(rank, min(x.shape) - 1)
    _, singular, basis = np.linalg.svd(x, full_matrices=False)
    variances = singular ** 2 / max(1, len(x) - 1)
    top = np.maximum(variances[:rank] - remove, 0.0)
    rest = max(float(variances[rank:].sum()) / max(1, x.shape[1] - rank) - remove, 0.0)
    return (basis[:rank].astype(np.float32), np.sqrt(top).astype(np.float32),
            float(np.sqrt(rest)))


def sample_gallery(model: GalleryModel, n_vectors: int, n_queries: int, seed: int = 0,
                   chunk: int = 100_000, out: np.ndarray | None = None):
    """A gallery of ``n_vectors`` unit vectors drawn from ``model`` (identities with the observed
    image counts), generated ``chunk`` identities' worth at a time into ``out`` (e.g. a
    ``np.memmap``, so 10M x 512 never sits in RAM) or a new array; plus ``n_queries`` queries, each
    a fresh image of a random gallery identity. Returns (gallery, labels, queries, query_labels)."""
    rng = np.random.default_rng(seed)
    counts = rng.choice(model.counts, size=n_vectors)  # more than enough identities
    ends = np.cumsum(counts)
    n_identities = int(np.searchsorted(ends, n_vectors) + 1)
    counts = counts[:n_identities]
    counts[-1] -= int(ends[n_identities - 1] - n_vectors)
    labels = np.repeat(np.arange(n_identities), counts)
    dim = len(model.mean)
    gallery = out if out is not None else np.empty((n_vectors, dim), dtype=np.float32)
    asked = np.sort(rng.choice(n_identities, size=min(n_queries, n_identities), replace=False))
    queries = np.empty((len(asked), dim), dtype=np.float32)
    first = np.concatenate([[0], ends[:n_identities - 1]])
    for start in range(0, n_identities, chunk):
        stop = min(start + chunk, n_identities)
        centres = model.mean + model._draw(rng, stop - start, model.between_basis,
                                           model.between_scale, model.between_rest)
        rows = labels[first[start]:first[start] + counts[start:stop].sum()]
        images = centres[rows - start] + model._draw(rng, len(rows), model.within_basis,
                                                     model.within_scale, model.within_rest)
        gallery[first[start]:first[start] + len(rows)] = _unit(images)
        chosen = asked[(asked >= start) & (asked < stop)]
        if len(chosen):
            fresh = centres[chosen - start] + model._draw(rng, len(chosen), model.within_basis,
                                                          model.within_scale, model.within_rest)
            queries[np.searchsorted(asked, chosen)] = _unit(fresh)
    names = np.array([f"id{i:08d}" for i in range(n_identities)], dtype=object)
    return gallery, names[labels], queries, names[asked]


def similarity_profile(vectors: np.ndarray, labels, pairs: int = 20_000, seed: int = 0) -> dict:
    """Mean cosine similarity of random same-identity and different-identity pairs: what a
    realistic gallery must reproduce (approximate search is hard exactly when they are close)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels).astype(str)
    a, b = rng.integers(0, len(vectors), size=(2, pairs * 4))
    same = (labels[a] == labels[b]) & (a != b)
    different = labels[a] != labels[b]
    sims = np.einsum("ij,ij->i", vectors[a], vectors[b])
    groups = {}
    for name, mask in (("within", same), ("between", different)):
        if not mask.any():  # same-identity pairs are rare at random: draw them per identity
            continue
        groups[name] = float(sims[mask][:pairs].mean())
    if "within" not in groups:
        order = np.argsort(labels, kind="stable")
        runs = order[:-1][labels[order[:-1]] == labels[order[1:]]]
        following = order[1:][labels[order[:-1]] == labels[order[1:]]]
        groups["within"] = float(np.einsum("ij,ij->i", vectors[runs], vectors[following]).mean())
    return groups
