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
                 tta_flip: bool = False, progress: bool = True, desc: str = "embedding") -> np.ndarray:
    """(N, D) float32 unit vectors. ``tta_flip`` averages an image's and its mirror's embeddings
    (re-normalised): only for data whose mirror image is the same identity."""
    device = device or default_device()
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(ImageDataset(paths, eval_transform(preprocessing)), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks = [_forward(model, images.to(device, non_blocking=True), tta_flip).cpu()
              for images in bar(loader, progress, desc=desc, unit="batch", leave=False)]
    if not chunks:
        return np.zeros((0, model.embedding_dim), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)


@torch.no_grad()
def embed_arrays(model: EmbeddingModel, images: Sequence[np.ndarray], preprocessing: Preprocessing,
                 device: torch.device | None = None, tta_flip: bool = False) -> np.ndarray:
    """``embed_images`` for images already decoded (RGB uint8 arrays, e.g. uploads to the server):
    the same transform and forward pass, in one batch, no DataLoader."""
    device = device or next(model.parameters()).device
    transform = eval_transform(preprocessing)
    batch = torch.stack([transform(image=image)["image"] for image in images]).to(device)
    return _forward(model.eval(), batch, tta_flip).cpu().numpy().astype(np.float32)


def _forward(model: EmbeddingModel, images: torch.Tensor, tta_flip: bool) -> torch.Tensor:
    with torch.autocast(images.device.type, enabled=images.device.type == "cuda"):
        vectors = model(images)
        if tta_flip:
            vectors = F.normalize(vectors + model(images.flip(-1)), dim=1)
    return vectors.float()
