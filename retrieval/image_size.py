"""The image size the untrained features prefer, chosen on a gallery's own leave-one-out queries
(the zero-shot index's, and training's without --image-size).

Which input size suits the untrained ImageNet features depends on the images: faces and dog
photos gain from the backbone's native 224 px, line drawings (Omniglot) from a smaller one,
where the strokes are thicker relative to the receptive fields. Nothing in the images says which
in advance, but the gallery can, the way it already chooses the new_whale threshold, the hubness
weight and the whitening (``gallery_threshold``): a sample of whole identities is embedded at each
candidate size (``candidate_sizes``: the native size and 5/7 of it, 224 -> 160 px) and scored by
leave-one-out MAP@5 as the index would calibrate it; the best size is kept, the native one among
equals. On the shared sets (seeds 0-4, test MAP@5 of the zero-shot index; bench/README.md,
"The zero-shot index chooses its size"): Omniglot 0.592 at 224 px -> 0.616 (160 chosen on
every seed), dogs (300) 0.782 (224 on every seed), ORL 0.943 -> 0.942 (160 on one seed of five).
The cost: the sample embedded once per candidate size; where the sample is the whole gallery
(up to ``SAMPLE_IMAGES`` images), the chosen size's vectors are the index's, not embedded again.
Training without ``--image-size`` makes the same choice on its training images
(``training.train.choose_training_size``) and trains at that size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import NEW_WHALE
from .data import Sample, find_unreadable, group_by_identity

log = logging.getLogger(__name__)

SAMPLE_IMAGES = 2000  # whole identities, drawn at random, up to about this many images
SIZE_STEP = 32  # candidate sizes are multiples of this (the backbones' total stride)


def candidate_sizes(native: int) -> list[int]:
    """The native size first (it wins ties), then 5/7 of it rounded to a multiple of 32."""
    smaller = max(SIZE_STEP, SIZE_STEP * round(native * 5 / 7 / SIZE_STEP))
    return [native] if smaller >= native else [native, smaller]


def identity_sample(samples: Sequence[Sample], max_images: int = SAMPLE_IMAGES,
                    seed: int = 0) -> list[Sample]:
    """Whole identities (``new_whale`` images left out), drawn in a seeded random order while the
    sample stays within ``max_images``, returned in the gallery's own order: every identity keeps
    all its images, so the sample has known and new leave-one-out queries in the gallery's own
    proportion, and a sample that is the whole gallery is the gallery, image for image."""
    groups = [(identity, len(group)) for identity, group in group_by_identity(samples).items()
              if identity != NEW_WHALE]
    chosen, size = set(), 0
    for i in np.random.default_rng(seed).permutation(len(groups)):
        identity, count = groups[i]
        if size + count <= max_images:
            chosen.add(identity)
            size += count
    return [s for s in samples if s.identity in chosen]


def readable_sample(samples: Sequence[Sample]) -> list[Sample]:
    """``identity_sample`` of ``samples`` less the images that cannot be read (without a
    warning: the gallery's own pass warns about them): what a gallery choice is made on."""
    sample = identity_sample(samples)
    unreadable = find_unreadable([s.path for s in sample], False)
    return [s for i, s in enumerate(sample) if i not in unreadable]


@dataclass
class SizeChoice:
    size: int  # the chosen image size
    sample: list[Sample]  # the readable gallery sample it was chosen on
    vectors: np.ndarray | None  # the sample's vectors at ``size`` (None: not embedded)
    scored: Any = None  # what ``score`` found besides the number (the calibration it made)


def choose_image_size(samples: Sequence[Sample], native: int,
                      score: Callable[[np.ndarray, list[str]], tuple[float, Any] | None],
                      embed: Callable[[int, list[Sample]], np.ndarray | None]) -> SizeChoice:
    """The candidate size (``candidate_sizes(native)``) whose vectors of a sample of whole
    identities ``score`` best. ``embed(size, sample)``: the untrained features of ``sample`` at
    ``size``, None where the backbone cannot take that size (a fixed-size transformer).
    ``score``: (leave-one-out MAP@5, the calibration behind it), None where the sample cannot
    be calibrated: then ``native``. The chosen size keeps its vectors and calibration, so a
    sample that is the whole gallery is neither embedded nor calibrated twice. Used by the
    zero-shot index (``indexing``) and by training without ``--image-size``."""
    sizes = candidate_sizes(native)
    sample = readable_sample(samples)
    unchosen = SizeChoice(native, sample, None)
    if len(sizes) < 2 or not sample:
        return unchosen
    choices, scores = [], []
    for size in sizes:
        vectors = embed(size, sample)
        if vectors is None:
            break
        scored = score(vectors, [s.identity for s in sample])
        if scored is None:
            return unchosen
        choices.append(SizeChoice(size, sample, vectors, scored[1]))
        scores.append(scored[0])
    if len(choices) < 2:
        return unchosen
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    log.info("image size: leave-one-out MAP@5 of the untrained features on %d gallery images "
             "%s; %d px chosen (--image-size sets one)", len(sample),
             ", ".join(f"{c.size} px {s:.3f}" for c, s in zip(choices, scores)), choices[best].size)
    return choices[best]
