"""The untrained backbone's mid-level map as local descriptors (``index.local_match``), from the
same forward pass as the pooled vector.

The map is the earliest stage the untrained features pool (``model.stage_indices[0]``: stride
16 on EfficientNet-Lite0, 112 channels, 10 x 10 locations at 160 px, 14 x 14 at 224). It is
fine enough to keep a stroke or an eye apart from the rest of the image and coarse enough that
comparing two images costs (L x M x C) multiply-adds: 4.3 M at 224 px.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .embed import ImageDataset, default_device
from .model import EmbeddingModel, Preprocessing
from .transforms import eval_transform


@torch.no_grad()
def embed_with_descriptors(model: EmbeddingModel, paths: Sequence[str], preprocessing: Preprocessing,
                           batch_size: int = 32, device: torch.device | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """((N, D) float32 unit vectors, exactly ``embed_images``'s; (N, L, C) float16 raw local
    descriptors of the earliest pooled stage) of an untrained model (no neck, no blend:
    ``zero_shot_model``), which must pool at least one stage before its final map."""
    if model.reference is not None or not model.stage_indices:
        raise ValueError("local descriptors come from an untrained model that pools its stages "
                         "(zero_shot_model)")
    device = device or default_device()
    model = model.to(device).eval()
    loader = DataLoader(ImageDataset(list(paths), eval_transform(preprocessing)),
                        batch_size=batch_size)
    vectors, descriptors = [], []
    for images in loader:
        maps = model.forward_features(images.to(device))
        vectors.append(model.forward_head(maps).float().cpu())
        descriptors.append(maps[0].flatten(2).transpose(1, 2).to(torch.float16).cpu())
    return torch.cat(vectors).numpy(), torch.cat(descriptors).numpy()
