"""The training augmentation's strength knob, on a real photo."""
from __future__ import annotations

import numpy as np
import torch

from retrieval.data import load_image
from retrieval.models.model import Preprocessing
from retrieval.models.transforms import eval_transform, train_transform

PRE = Preprocessing(image_size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _outputs(transform, image: np.ndarray, n: int = 12) -> list[torch.Tensor]:
    return [transform(image=image)["image"] for _ in range(n)]


def test_strength_zero_is_no_augmentation(orl_samples):
    image = load_image(orl_samples[0].path)
    plain = eval_transform(PRE)(image=image)["image"]
    for output in _outputs(train_transform(PRE, seed=0, strength=0.0), image):
        assert torch.equal(output, plain)


def test_stronger_augmentation_moves_images_further(orl_samples):
    """Mean distance to the unaugmented image grows with the strength (same seed, same draws)."""
    image = load_image(orl_samples[0].path)
    plain = eval_transform(PRE)(image=image)["image"]

    def spread(strength: float) -> float:
        outputs = _outputs(train_transform(PRE, seed=0, strength=strength), image, n=40)
        return float(np.mean([(o - plain).abs().mean() for o in outputs]))

    mild, default, strong = spread(0.5), spread(1.0), spread(2.0)
    assert 0 < mild < default < strong, (mild, default, strong)
