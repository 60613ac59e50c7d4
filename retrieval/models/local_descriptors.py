"""The untrained backbone's mid-level map as local descriptors (``index.local_match``), from the
same forward pass as the pooled vector.

The map is the earliest stage the untrained features pool (``model.stage_indices[0]``: stride
16 on EfficientNet-Lite0, 112 channels, 10 x 10 locations at 160 px, 14 x 14 at 224). It is
fine enough to keep a stroke or an eye apart from the rest of the image and coarse enough that
comparing two images costs (L x M x C) multiply-adds: 4.3 M at 224 px. ``embed_images(...,
maps=True)`` gives them with the vectors; the exported encoder gives them as a second output.
"""
from __future__ import annotations

import torch

from .model import EmbeddingModel


def gives_maps(model: EmbeddingModel) -> bool:
    """Whether ``model``'s forward pass holds the maps of a stage before the final one: its
    untrained reference's where it blends one in (the default recipe: ImageNet maps), else its
    own (meant for the untrained ``zero_shot_model``; a trained model without a reference is
    never asked: training offers local matching only with a reference, ``train._choose_local``)."""
    if model.reference is not None:
        return bool(model.reference.stage_indices)
    return bool(model.stage_indices)


class VectorsAndMaps(torch.nn.Module):
    """``model``'s forward that also returns its earliest pooled map, (B, L, C) locations by
    channels: what the exported encoder's second output is."""

    def __init__(self, model: EmbeddingModel):
        super().__init__()
        if not gives_maps(model):
            raise ValueError("local descriptors come from an untrained model that pools its "
                             "stages (zero_shot_model)")
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors, maps = self.model.forward_with_maps(images)
        return vectors, maps[0].flatten(2).transpose(1, 2)
