"""Within-identity whitening: the untrained ImageNet features adapted to a gallery in closed form.

Fine-tuning a backbone on a few hundred photos can destroy what ImageNet taught it; a linear map
fitted on the labelled gallery cannot. The map damps the directions in which photos of *one*
identity differ from each other (pose, light, background: the within-identity scatter), so the
directions that tell identities apart dominate the cosine similarity. It is within-class
covariance normalisation (WCCN; Hatch, Kajarekar & Stolcke, ICSLP 2006), regularised because a
gallery has a few hundred images in 1280 dimensions:

    x  ->  normalise( M (x - mean) ),   M = I - sum_i (1 - base / (lambda_i + base)) v_i v_i'

with ``lambda_i, v_i`` the eigenvalues / vectors of the within-identity scatter and ``base`` =
``SHRINK`` x their mean: a direction of large within-identity spread is damped almost to zero, one
of little spread barely, and every direction the gallery never varied in is kept as it is.

On the untrained backbone at 160 px (seeds 0-4, threshold calibrated on validation) it lifted
test MAP@5 on ORL 0.839 -> 0.903, Omniglot 0.506 -> 0.565, dogs 0.705 -> 0.720
(bench/README.md, "Within-identity whitening"). Training can apply it to the untrained reference
it blends in (``TrainConfig.whiten_pretrained``, off by default: in the trained recipe it gained
on ORL and lost on Omniglot and dogs), fitted on the selection's training images only, and then
ships exactly the map it validated.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SHRINK = 1.0  # base = SHRINK x the mean within-identity eigenvalue (chosen on validation, 3 sets)
MIN_IDENTITIES = 2  # identities with 2+ images needed to measure a within-identity spread


def within_identity_deviations(vectors: np.ndarray, identities: Sequence[str]) -> np.ndarray:
    """Each image of an identity with 2+ images minus its identity's mean; (0, D) when none."""
    identities = np.asarray(identities)
    parts = [vectors[identities == name] for name in np.unique(identities)]
    parts = [part - part.mean(axis=0) for part in parts if len(part) > 1]
    if not parts:
        return np.zeros((0, vectors.shape[1]), dtype=vectors.dtype)
    return np.concatenate(parts)


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


def whiten(vectors: np.ndarray, mean: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Unit vectors ``normalise(matrix @ (x - mean))`` of each row (NumPy twin of ``Whitening``)."""
    moved = (np.asarray(vectors, dtype=np.float32) - mean) @ matrix.T
    return (moved / np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class Whitening(nn.Module):
    """The fitted map as a layer (buffers, never trained): stored in the checkpoint with the
    model, so the index and every query apply exactly the map selection validated."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))

    @classmethod
    def from_fit(cls, mean: np.ndarray, matrix: np.ndarray) -> "Whitening":
        layer = cls(len(mean))
        layer.mean.copy_(torch.from_numpy(mean))
        layer.matrix.copy_(torch.from_numpy(matrix))
        return layer

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize((vectors - self.mean) @ self.matrix.T, dim=1)
