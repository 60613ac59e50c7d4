"""Within-identity whitening of gallery vectors, in NumPy (no torch: the cold query path reads it).

A linear map fitted on a labelled gallery damps the directions in which photos of *one* identity
differ from each other (pose, light, background: the within-identity scatter), so the directions
that tell identities apart dominate the cosine similarity. It is within-class covariance
normalisation (WCCN; Hatch, Kajarekar & Stolcke, ICSLP 2006), regularised because a gallery has a
few hundred images in 1,712 dimensions (the untrained features of Lite0):

    x  ->  normalise( M (x - mean) ),   M = I - sum_i (1 - base / (lambda_i + base)) v_i v_i'

with ``lambda_i, v_i`` the eigenvalues / vectors of the within-identity scatter and ``base`` =
``SHRINK`` x their mean: a direction of large within-identity spread is damped almost to zero, one
of little spread barely, and every direction the gallery never varied in is kept as it is.

Two users: training can whiten the untrained reference it blends in (``retrieval.models.whitening``
holds the map as a layer), and a zero-shot index can whiten its gallery and queries
(``retrieval.gallery_threshold.choose_gallery_space``; the map is stored with the index).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SHRINK = 1.0  # base = SHRINK x the mean within-identity eigenvalue (chosen on validation, 3 sets)
MIN_IDENTITIES = 2  # identities with 2+ images needed to measure a within-identity spread
# a gallery larger than this is fitted on whole identities drawn at random up to it (rows_to_fit)
MAX_FIT_IMAGES = 20_000


def within_identity_deviations(vectors: np.ndarray, identities: Sequence[str]) -> np.ndarray:
    """Each image of an identity with 2+ images minus its identity's mean (rows in the gallery's
    order); (0, D) when none. One pass over the rows, not one per identity."""
    vectors = np.asarray(vectors)
    _, codes, counts = np.unique(np.asarray(identities, dtype=object), return_inverse=True,
                                 return_counts=True)
    codes = codes.reshape(-1)
    sums = np.zeros((len(counts), vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, vectors)
    means = (sums / counts[:, None]).astype(vectors.dtype)
    kept = counts[codes] > 1
    return vectors[kept] - means[codes[kept]]


def fit_within_identity(vectors: np.ndarray, identities: Sequence[str],
                        shrink: float = SHRINK) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean (D,), matrix (D, D))`` float32 of the whitening fitted on these labelled vectors,
    or None where fewer than ``MIN_IDENTITIES`` identities have two images (no spread to damp)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if len(identities) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(identities)} identities")
    counts = np.unique(np.asarray(identities), return_counts=True)[1]
    if (counts > 1).sum() < MIN_IDENTITIES:
        return None
    deviations = within_identity_deviations(vectors, identities)
    _, singular, directions = np.linalg.svd(deviations, full_matrices=False)
    eigenvalues = singular ** 2 / len(vectors)
    keep = eigenvalues > 1e-9 * eigenvalues.max()
    eigenvalues, directions = eigenvalues[keep], directions[keep]
    base = shrink * eigenvalues.mean()
    damping = base / (eigenvalues + base)  # 1: kept as it is, -> 0: removed
    matrix = np.eye(vectors.shape[1]) - (directions.T * (1.0 - damping)) @ directions
    return vectors.mean(axis=0).astype(np.float32), matrix.astype(np.float32)


def fit_on_gallery(vectors: np.ndarray, identities: Sequence[str],
                   max_images: int = MAX_FIT_IMAGES) -> tuple[np.ndarray, np.ndarray] | None:
    """``fit_within_identity`` of a whole labelled gallery, or, above ``max_images`` images, of
    whole identities drawn at random (seeded) up to about that many (``rows_to_fit``)."""
    if len(identities) <= max_images:
        return fit_within_identity(vectors, identities)
    rows = rows_to_fit(identities, max_images)
    return fit_within_identity(np.asarray(vectors)[rows], [identities[i] for i in rows])


def rows_to_fit(identities: Sequence[str], max_images: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of whole identities with 2+ images, drawn at random (seeded) until about
    ``max_images`` rows: what a map is fitted on for a gallery too large to fit on whole (the
    within-identity scatter of a random share of identities estimates the whole one's)."""
    _, codes, counts = np.unique(np.asarray(identities, dtype=object), return_inverse=True,
                                 return_counts=True)
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen, total = [], 0
    for code in np.random.default_rng(seed).permutation(np.flatnonzero(counts > 1)):
        if total >= max_images:
            break
        chosen.append(order[starts[code]:starts[code] + counts[code]])
        total += counts[code]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def unwhiten(whitened: np.ndarray, mean: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The unit vectors ``x`` that ``whiten`` turned into ``whitened``: ``x - mean`` points along
    ``matrix^-1 w`` (the map is invertible: every direction keeps a share ``base / (lambda +
    base)`` > 0), and its length is the one root that puts ``x`` on the unit sphere."""
    inverse = np.linalg.inv(np.asarray(matrix, dtype=np.float64))
    mean = np.asarray(mean, dtype=np.float64)
    direction = np.asarray(whitened, dtype=np.float64) @ inverse.T
    # |mean + c d| = 1:  c^2 |d|^2 + 2 c (mean . d) + |mean|^2 - 1 = 0, |mean| < 1: one root > 0
    a = np.einsum("ij,ij->i", direction, direction)
    b = direction @ mean
    c = float(mean @ mean) - 1.0
    length = (-b + np.sqrt(np.maximum(b * b - a * c, 0.0))) / np.maximum(a, 1e-30)
    vectors = mean + length[:, None] * direction
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def whiten(vectors: np.ndarray, mean: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Unit vectors ``normalise(matrix @ (x - mean))`` of each row (NumPy twin of ``Whitening``)."""
    moved = (np.asarray(vectors, dtype=np.float32) - mean) @ matrix.T
    return (moved / np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12)).astype(np.float32)
