"""Images -> L2-normalised embeddings, in batches, with a DataLoader and a progress bar."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data import load_image
from ..progress import bar
from .model import EmbeddingModel, Preprocessing
from .transforms import eval_transform


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ImageDataset(Dataset):
    """Decodes and transforms one image per item; ``labels`` (ints) are optional; ``ops`` are
    per-item ``identity_transforms`` applied to the decoded image first ("" = none)."""

    def __init__(self, paths: Sequence[str | Path], transform, labels: Sequence[int] | None = None,
                 ops: Sequence[str] | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.labels = labels
        self.ops = ops

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = load_image(self.paths[i])
        if self.ops is not None and self.ops[i]:
            from .identity_transforms import apply

            image = apply(image, self.ops[i])
        image = self.transform(image=image)["image"]
        return image if self.labels is None else (image, self.labels[i])


@torch.no_grad()
def embed_images(model: EmbeddingModel, paths: Sequence[str | Path], preprocessing: Preprocessing,
                 batch_size: int = 64, num_workers: int = 0, device: torch.device | None = None,
                 tta_flip: bool = False, progress: bool = True, desc: str = "embedding",
                 maps: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 unit vectors. ``tta_flip`` averages an image's and its mirror's embeddings
    (re-normalised): only for data whose mirror image is the same identity. ``maps``: also the
    (N, L, C) float16 local descriptors of an untrained model (``local_descriptors``; of the
    image as it is, not its mirror), from the same forward pass."""
    device = device or default_device()
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(ImageDataset(paths, eval_transform(preprocessing)), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    forward = _with_maps(model) if maps else None
    chunks = [_forward(model, images.to(device, non_blocking=True), tta_flip, forward)
              for images in bar(loader, progress, desc=desc, unit="batch", leave=False)]
    return _joined(chunks, model, maps)


@torch.no_grad()
def embed_arrays(model: EmbeddingModel, images: Sequence[np.ndarray], preprocessing: Preprocessing,
                 device: torch.device | None = None, tta_flip: bool = False,
                 maps: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``embed_images`` for images already decoded (RGB uint8 arrays, e.g. uploads to the server):
    the same transform and forward pass, in one batch, no DataLoader."""
    device = device or next(model.parameters()).device
    transform = eval_transform(preprocessing)
    batch = torch.stack([transform(image=image)["image"] for image in images]).to(device)
    model = model.eval()
    return _joined([_forward(model, batch, tta_flip, _with_maps(model) if maps else None)],
                   model, maps)


def _with_maps(model: EmbeddingModel):
    from .local_descriptors import VectorsAndMaps

    return VectorsAndMaps(model)


def _forward(model: EmbeddingModel, images: torch.Tensor, tta_flip: bool,
             forward=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(vectors, maps or None) on the CPU; ``forward``: ``VectorsAndMaps`` for the maps too."""
    maps = None
    with torch.autocast(images.device.type, enabled=images.device.type == "cuda"):
        if forward is None:
            vectors = model(images)
        else:
            vectors, maps = forward(images)
            maps = maps.to(torch.float16).cpu()
        if tta_flip:
            vectors = F.normalize(vectors + model(images.flip(-1)), dim=1)
    return vectors.float().cpu(), maps


def _joined(chunks: list, model: EmbeddingModel, maps: bool):
    if not chunks:
        empty = np.zeros((0, model.embedding_dim), dtype=np.float32)
        return (empty, np.zeros((0, 0, 0), dtype=np.float16)) if maps else empty
    vectors = torch.cat([v for v, _ in chunks]).numpy().astype(np.float32)
    if not maps:
        return vectors
    return vectors, torch.cat([m for _, m in chunks]).numpy()
