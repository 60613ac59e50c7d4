"""Transforms whose result shows *another* identity: more identities to train on, for free.

A user states it about their domain (``--new-identities``), since it is a fact about the data, not
a tuning knob: a mirrored character is another character, a character turned by 90 degrees
another one (the standard Omniglot practice: Santoro et al. 2016, Vinyals et al. 2016), a
humpback's mirrored fluke is not one that was photographed (the Humpback 2019 winner trained on
flipped images as new whales). For faces or dogs a mirror image is the *same* identity: there
``--flip`` augments instead, and the two cannot be combined.

Only training uses the extra identities (selection and refit alike); validation and every
query are answered with the real ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import NEW_IDENTITY_CHOICES
from ..data import Sample

_OPS = {"none": ("",), "mirror": ("", "mirror"), "rotations": ("", "rot90", "rot180", "rot270"),
        "mirror+rotations": ("", "mirror", "rot90", "rot180", "rot270")}
SEPARATOR = "#"  # identity#op names a transformed identity


@dataclass(frozen=True)
class TrainItem:
    """One training image: a sample, the identity it trains as, and the transform it gets."""

    path: Path
    identity: str
    op: str = ""  # "" = the image as it is


def expand(samples: Sequence[Sample], choice: str) -> list[TrainItem]:
    """Every sample once per transform of ``choice``, the transformed ones as new identities
    (``s12#mirror``): with ``mirror``, twice the images and identities."""
    if choice not in _OPS:
        raise ValueError(f"unknown new-identity transform {choice!r}: one of {', '.join(NEW_IDENTITY_CHOICES)}")
    return [TrainItem(s.path, s.identity + (SEPARATOR + op if op else ""), op)
            for s in samples for op in _OPS[choice]]


def apply(image: np.ndarray, op: str) -> np.ndarray:
    """``image`` (H, W, C) mirrored left-right or rotated counter-clockwise by 90/180/270."""
    if not op:
        return image
    if op == "mirror":
        return np.ascontiguousarray(image[:, ::-1])
    if op.startswith("rot"):
        return np.ascontiguousarray(np.rot90(image, k=int(op[3:]) // 90))
    raise ValueError(f"unknown transform {op!r}")
