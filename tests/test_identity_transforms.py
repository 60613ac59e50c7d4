"""Transforms as new identities: identity counts, the pixels each one gets, and training on them."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval import distributed
from retrieval.config import NEW_IDENTITY_CHOICES, TrainConfig
from retrieval.data import load_image
from retrieval.errors import UserError
from retrieval.models import identity_transforms
from retrieval.training.train import Trainer, train

TINY = dict(image_size=32, embedding_dim=16, batch_size=8, num_workers=0, epochs=1,
            trainable_blocks=0)


@pytest.mark.parametrize("choice,factor", [("none", 1), ("mirror", 2), ("rotations", 4),
                                           ("mirror+rotations", 5)])
def test_each_transform_adds_one_copy_of_every_identity(orl_samples, choice, factor):
    samples = [s for s in orl_samples if s.identity in {"s1", "s2", "s3"}]
    items = identity_transforms.expand(samples, choice)
    assert len(items) == factor * len(samples)
    assert len({i.identity for i in items}) == factor * 3
    originals = [i for i in items if not i.op]
    assert [(i.path, i.identity) for i in originals] == [(s.path, s.identity) for s in samples]
    for item in items:  # a transformed image trains as its own identity, named after it
        assert item.identity == (item.identity.split("#")[0] + (f"#{item.op}" if item.op else ""))
    assert choice in NEW_IDENTITY_CHOICES


def test_the_transforms_are_the_mirror_and_the_rotations(orl_samples):
    image = load_image(orl_samples[0].path)  # 112 x 92: not square, so rotations show
    assert np.array_equal(identity_transforms.apply(image, ""), image)
    assert np.array_equal(identity_transforms.apply(image, "mirror"), image[:, ::-1])
    rot90 = identity_transforms.apply(image, "rot90")
    assert rot90.shape[:2] == image.shape[1::-1]
    assert np.array_equal(rot90[:, 0], image[0, ::-1])  # counter-clockwise: top row -> left column
    assert np.array_equal(identity_transforms.apply(image, "rot180"), image[::-1, ::-1])
    assert np.array_equal(identity_transforms.apply(rot90, "rot270"), image)


def test_the_trainer_learns_the_extra_identities(orl_samples):
    samples = [s for s in orl_samples if s.identity in {"s1", "s2", "s3", "s4"}]
    config = TrainConfig(new_identities="mirror", **TINY)
    trainer = Trainer(config, samples, 1, distributed.setup("cpu"))
    assert len(trainer.identities) == 8 and "s1#mirror" in trainer.identities
    assert len(trainer.loader.dataset) == 2 * len(samples)
    assert trainer.spec.loss.W.shape[1] == 8  # one ArcFace centre per identity, mirrored ones too
    dataset = trainer.loader.dataset
    mirrored = dataset.ops.index("mirror")
    _, label = dataset[mirrored]
    assert trainer.identities[label] == dataset.paths[mirrored].parent.name + "#mirror"


def test_flip_and_mirror_as_new_identity_contradict_each_other(orl_samples, tmp_path):
    config = TrainConfig(out=str(tmp_path), flip=True, new_identities="mirror", **TINY)
    with pytest.raises(UserError, match="drop one of them"):
        train(config, orl_samples[:20])
