"""A backbone's mid-level map as local descriptors (``index.local_match``), from the same
forward pass as the pooled vector: the untrained ImageNet backbone's where the model has one
(the zero-shot model, a trained model blending in its untrained reference), else the trained
backbone's own. On characters the reference's map re-scores a blended model better than its
fine-tuned one, and a model without a reference gains from its own (bench/README.md, "Local
matching for every trained model").

The map is the earliest stage pooled (``stage_indices[0]``: stride
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
    untrained reference's where it blends one in (ImageNet maps), else its own backbone's (the
    untrained ``zero_shot_model``'s, or a trained model's fine-tuned ones)."""
    if model.reference is not None:
        return bool(model.reference.stage_indices)
    return bool(model.stage_indices)


class VectorsAndMaps(torch.nn.Module):
    """``model``'s forward that also returns its earliest pooled map, (B, L, C) locations by
    channels: what the exported encoder's second output is."""

    def __init__(self, model: EmbeddingModel):
        super().__init__()
        if not gives_maps(model):
            raise ValueError("local descriptors come from a model that pools a stage before "
                             "its final map (pool_stages > 0)")
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors, maps = self.model.forward_with_maps(images)
        return vectors, maps[0].flatten(2).transpose(1, 2)
