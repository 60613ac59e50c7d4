"""albumentations pipelines, built only from a model's stored ``Preprocessing``.

They keep the whole object in view (resize the longer side, pad to square; mild affine, no
heavy random crops): a whale's fluke edge or a character's stroke is the identity.
"""
from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from .model import Preprocessing

_INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR,
                  "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}


def _resize_and_pad(pre: Preprocessing) -> list[A.BasicTransform]:
    interpolation = _INTERPOLATION.get(pre.interpolation, cv2.INTER_CUBIC)
    return [A.LongestMaxSize(max_size=pre.image_size, interpolation=interpolation),
            A.PadIfNeeded(min_height=pre.image_size, min_width=pre.image_size,
                          border_mode=cv2.BORDER_REPLICATE)]


def _normalise(pre: Preprocessing) -> list[A.BasicTransform]:
    return [A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0), ToTensorV2()]


def eval_transform(pre: Preprocessing) -> A.Compose:
    return A.Compose(_resize_and_pad(pre) + _normalise(pre))


def train_transform(pre: Preprocessing, flip: bool = False, seed: int | None = None,
                    strength: float = 1.0, strokes: bool = False) -> A.Compose:
    """Mild augmentation; ``flip`` only where a mirror image shows the same identity;
    ``strokes`` for line drawings and handwriting (``stroke_augment``): the pen's width varies
    and the hand wobbles between two drawings of one character, so strokes also thicken or thin
    (erosion / dilation, either polarity) and warp elastically. Meaningless for photos, hence a
    flag the user sets about the domain, not a default.

    ``strength`` scales every range (scale, shift, rotation, brightness, contrast, warp) and,
    capped at 1, every probability: 0 is no augmentation, 2 twice the default ranges.

    albumentations keeps its own random state, untouched by ``torch.manual_seed``: ``seed`` fixes
    it (DataLoader workers re-seed their copy with ``seed_worker_transform``), so a training run
    can be repeated exactly.
    """
    s = strength
    augment = [] if s <= 0 else [
        A.Affine(scale=(1 - 0.1 * s, 1 + 0.1 * s), translate_percent=(-0.05 * s, 0.05 * s),
                 rotate=(-10 * s, 10 * s), border_mode=cv2.BORDER_REPLICATE, p=min(1.0, 0.7 * s)),
        A.RandomBrightnessContrast(brightness_limit=0.2 * s, contrast_limit=0.2 * s,
                                   p=min(1.0, 0.5 * s)),
    ]
    if strokes and s > 0:
        augment += _stroke_augmentation(s)
    if flip:
        augment.append(A.HorizontalFlip(p=0.5))
    return A.Compose(_resize_and_pad(pre) + augment + _normalise(pre), seed=seed)


def _stroke_augmentation(s: float) -> list:
    """Stroke width (a 2-3 px kernel either way: about 1 px thicker or thinner at 160 px) and a
    smooth elastic warp (displacements of a few pixels), each on half the images at strength 1."""
    return [
        A.OneOf([A.Morphological(scale=(2, 3), operation="erosion"),
                 A.Morphological(scale=(2, 3), operation="dilation")], p=min(1.0, 0.5 * s)),
        A.ElasticTransform(alpha=60 * s, sigma=7, border_mode=cv2.BORDER_REPLICATE,
                           p=min(1.0, 0.5 * s)),
    ]


def seed_worker_transform(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's copy of the augmentation its own seed,
    derived from torch's per-worker seed (itself drawn from the seeded main process), so workers
    neither repeat each other's augmentations nor differ between two runs of one seed."""
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if isinstance(transform, A.Compose):
        transform.set_random_seed(info.seed % 2**32)
