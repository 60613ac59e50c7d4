"""Within-identity whitening: the untrained ImageNet features adapted to a gallery in closed form.

Fine-tuning a backbone on a few hundred photos can destroy what ImageNet taught it; a linear map
fitted on the labelled gallery cannot. The map (WCCN) and its NumPy fit live in
``index.whitening``; here it is a layer of the model.

On the untrained backbone at 160 px (seeds 0-4, threshold calibrated on validation) it lifted
test MAP@5 on ORL 0.839 -> 0.903, Omniglot 0.506 -> 0.565, dogs 0.705 -> 0.720
(bench/README.md, "Within-identity whitening"). Training can apply it to the untrained reference
it blends in (``TrainConfig.whiten_pretrained``, off by default: in the trained recipe it gained
on ORL and lost on Omniglot and dogs), fitted on the selection's training images only, and then
ships exactly the map it validated.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from index.whitening import (  # noqa: F401  (the NumPy half, re-exported for training)
    MIN_IDENTITIES,
    SHRINK,
    fit_within_identity,
    whiten,
    within_identity_deviations,
)


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
