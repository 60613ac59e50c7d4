"""Why two images matched: where, in each, the backbone saw something of the other.

The embedding is a pooled summary of the backbone's feature map (one C-dimensional vector per
spatial cell, before GeM). For a query and a gallery image, each cell of one map is scored by its
best cosine similarity to any cell of the other map: the regions that found a counterpart light
up, the rest stays dark. It explains the match with the network's own features, needs no
gradients, and works for every model here (for a blended model, the trained backbone's map;
where the blend gives the untrained features the whole similarity, share 1, the untrained one's).
A whitened zero-shot index (``index.whitening``) ranks by whitened pooled vectors; the maps
still show the backbone's own cells, which the whitening does not change.

``explain_pair`` returns both maps; ``overlay_png`` paints a map over the image as the model saw
it (resized and padded to the square input), as PNG bytes for a report or the server's page.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class PairExplanation:
    query: np.ndarray  # (S, S) in [0, 1], over the model's square input
    gallery: np.ndarray
    query_input: np.ndarray  # (S, S, 3) uint8: the image as the model saw it
    gallery_input: np.ndarray


def explain_pair(model, preprocessing, query: np.ndarray, gallery: np.ndarray) -> PairExplanation:
    """Heat-maps of a query and a gallery image (RGB uint8 arrays) under ``model``."""
    import torch
    import torch.nn.functional as F

    from ..models.model import backbone_maps, final_map
    from ..models.transforms import eval_transform

    transform = eval_transform(preprocessing)
    batch = torch.stack([transform(image=query)["image"], transform(image=gallery)["image"]])
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        features = (backbone_maps(model.reference.backbone, batch.to(device), ())
                    if model.untrained_only else final_map(model.forward_features(batch.to(device))))
        features = features.float()  # (2, C, h, w)
    cells = F.normalize(features.flatten(2), dim=1)  # (2, C, h*w), unit vector per cell
    similarity = torch.einsum("ci,cj->ij", cells[0], cells[1])  # query cells x gallery cells
    height, width = features.shape[-2:]
    size = batch.shape[-1]
    maps = [similarity.max(dim=1).values, similarity.max(dim=0).values]
    query_map, gallery_map = (_upsampled(m.reshape(height, width), size) for m in maps)
    return PairExplanation(query_map, gallery_map, _as_seen(batch[0], preprocessing),
                           _as_seen(batch[1], preprocessing))


def _upsampled(cells, size: int) -> np.ndarray:
    """A cell map stretched over the input, scaled to [0, 1] (min to max of this map)."""
    import torch.nn.functional as F

    full = F.interpolate(cells[None, None], size=(size, size), mode="bilinear",
                         align_corners=False)[0, 0].cpu().numpy()
    low, high = float(full.min()), float(full.max())
    return (full - low) / (high - low) if high > low else np.zeros_like(full)


def _as_seen(tensor, preprocessing) -> np.ndarray:
    """The normalised input tensor back to an RGB image (resized, padded: what the model saw)."""
    mean = np.asarray(preprocessing.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(preprocessing.std, dtype=np.float32)[:, None, None]
    pixels = (tensor.cpu().numpy() * std + mean) * 255.0
    return np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def colour(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, dark blue (cold) through green and yellow to red (hot)."""
    stops = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]],
                     dtype=np.float32)
    position = np.clip(heat, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    fraction = (position - low)[..., None]
    return ((1 - fraction) * stops[low] + fraction * stops[low + 1]).astype(np.uint8)


def overlay_png(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> bytes:
    """The heat-map over the image, as PNG bytes."""
    from PIL import Image

    blended = (1 - alpha) * image.astype(np.float32) + alpha * colour(heat).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(blended.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def explain_files(model, preprocessing, query: str | Path, gallery: str | Path) -> PairExplanation:
    from ..data import load_image

    return explain_pair(model, preprocessing, load_image(query), load_image(gallery))


def index_explainer(index_dir: str | Path, model: str | None = None):
    """``explain(query_path, gallery_path) -> (query PNG, gallery PNG)`` with the full model of the
    index (checked by fingerprint), for the HTML report."""
    from index.store import read_manifest

    from .encoder import check_index_model
    from .query import _full_encoder

    manifest = read_manifest(index_dir)
    encoder = _full_encoder(manifest, model)
    check_index_model(manifest, Path(index_dir), encoder.fingerprint,
                      "pass --model with the checkpoint the index was built from")

    def explain(query: str, gallery: str) -> tuple[bytes, bytes]:
        e = explain_files(encoder.model, encoder.preprocessing, query, gallery)
        return overlay_png(e.query_input, e.query), overlay_png(e.gallery_input, e.gallery)

    return explain
