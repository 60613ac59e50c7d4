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


def _ink(image: np.ndarray) -> float:
    """Share of dark pixels: the strokes of a black-on-white drawing."""
    return float((np.asarray(image).mean(axis=-1) < 128).mean())


def test_stroke_augmentation_thickens_and_thins_real_strokes(omniglot_samples):
    """--stroke-augment on a real Omniglot character: some draws carry clearly more ink
    (thicker strokes), some clearly less (thinner), some move strokes without changing their
    width (the elastic warp); without the flag the pipeline has none of these steps."""
    import albumentations as A

    from retrieval.models.transforms import _stroke_augmentation

    image = load_image(omniglot_samples[0].path)
    before = _ink(image)
    strokes = A.Compose(_stroke_augmentation(1.0), seed=0)
    inks = [_ink(strokes(image=image)["image"]) for _ in range(60)]
    assert max(inks) > 1.15 * before and min(inks) < 0.85 * before, (before, min(inks), max(inks))
    _, warp = _stroke_augmentation(1.0)
    warp.p = 1.0
    warped = A.Compose([warp], seed=0)(image=image)["image"]
    moved = (np.abs(warped.astype(int) - image).max(axis=-1) > 128).mean()
    assert moved > 0.005 and abs(_ink(warped) - before) < 0.1 * before, (moved, _ink(warped))

    def steps(transform) -> set[str]:
        return {type(t).__name__ for t in transform.transforms}

    assert {"OneOf", "ElasticTransform"} <= steps(train_transform(PRE, seed=0, strokes=True))
    assert not {"OneOf", "ElasticTransform"} & steps(train_transform(PRE, seed=0))
    plain = eval_transform(PRE)(image=image)["image"]
    for output in _outputs(train_transform(PRE, seed=0, strength=0.0, strokes=True), image):
        assert torch.equal(output, plain)  # strength 0 is still no augmentation
