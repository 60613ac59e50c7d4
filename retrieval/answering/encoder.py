"""The model that turns images into gallery vectors, named by its fingerprint.

A gallery and its queries must go through the same weights, preprocessing and test-time
augmentation, or their similarities mean nothing. ``EncoderSpec`` says which model (a checkpoint,
or the zero-shot pretrained backbone + GeM), ``Encoder`` is that model loaded; both build_index.py
and query.py get theirs here, and an index's own spec is read back from its manifest, so no image
size, normalisation or TTA choice is ever repeated by hand.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:  # torch / timm load only when a model is really built
    import torch

    from index.store import Manifest

    from ..models.model import EmbeddingModel, Preprocessing

log = logging.getLogger(__name__)

TTA_CHOICES = ("none", "flip")


@dataclass(frozen=True)
class EncoderSpec:
    """Which model embeds the images. Small and picklable: torchrun ranks receive it from rank 0."""

    checkpoint: str | None = None  # None: the zero-shot model (pretrained backbone + GeM, no neck)
    image_size: int | None = None  # zero-shot only; None: the backbone's native size
    preprocessing: dict[str, Any] | None = None  # zero-shot, read from an index: what it used
    model_config: dict[str, Any] | None = None  # zero-shot, read from an index
    tta: str = "none"
    companion: str | None = None  # zero-shot: a second network's features beside (ModelConfig)
    companion_share: float = 0.0

    @classmethod
    def of_index(cls, manifest: "Manifest", checkpoint: str | Path | None = None) -> "EncoderSpec":
        """The spec an index was built with; ``checkpoint`` replaces a moved checkpoint file."""
        model = manifest.model
        if model["source"] == "checkpoint" or checkpoint is not None:
            return cls(checkpoint=str(checkpoint or model["checkpoint"]), tta=manifest.tta)
        return cls(preprocessing=model["preprocessing"], model_config=model["model_config"],
                   tta=manifest.tta)


@dataclass
class Encoder:
    """A loaded model with everything an index manifest records about it."""

    model: "EmbeddingModel"
    preprocessing: "Preprocessing"
    fingerprint: str
    threshold: float | None  # the checkpoint's calibrated new_whale threshold
    checkpoint: str | None
    tta: str = "none"
    hubness: float = 0.0  # the checkpoint's hubness correction weight (index.hubness)
    whiten: bool = False  # the checkpoint's threshold was calibrated whitened (index.whitening)
    local: float = 0.0  # the checkpoint's share of local matching (index.local_match)

    def model_info(self) -> dict[str, Any]:
        """The manifest's ``model`` entry: enough to rebuild this encoder for queries, and the
        hubness correction its threshold was calibrated with (only where there is one)."""
        from ..models.model import model_spec

        return {"fingerprint": self.fingerprint,
                "source": "checkpoint" if self.checkpoint else "pretrained",
                "checkpoint": self.checkpoint, **model_spec(self.model, self.preprocessing),
                **({"hubness": float(self.hubness)} if self.hubness else {})}

    def encode(self, paths: Sequence[str | Path], batch_size: int = 64, num_workers: int = 0,
               device: "torch.device | None" = None, progress: bool = True,
               desc: str = "embedding", maps: bool = False):
        """(N, D) float32 unit vectors, with this encoder's TTA; ``maps``: and the (N, L, C)
        float16 local descriptors (``gives_maps``), as a pair."""
        from ..models.embed import embed_images

        return embed_images(self.model, paths, self.preprocessing, batch_size=batch_size,
                            num_workers=num_workers, device=device, tta_flip=self.tta == "flip",
                            progress=progress, desc=desc, maps=maps)

    def encode_arrays(self, images: Sequence[np.ndarray],
                      device: "torch.device | None" = None, maps: bool = False):
        """(N, D) float32 unit vectors of decoded RGB images, with this encoder's TTA (and
        their local descriptors with ``maps``)."""
        from ..models.embed import embed_arrays

        return embed_arrays(self.model, images, self.preprocessing, device=device,
                            tta_flip=self.tta == "flip", maps=maps)

    @property
    def gives_maps(self) -> bool:
        """Whether this model gives local descriptors (``local_descriptors.gives_maps``)."""
        from ..models.local_descriptors import gives_maps

        return gives_maps(self.model)


def check_index_model(manifest: "Manifest", directory: Path, fingerprint: str, fix: str = "") -> None:
    """Refuse to mix models: an index answers only queries embedded by the model it was built with."""
    if manifest.fingerprint != fingerprint:
        built_with = manifest.model.get("checkpoint") or "the pretrained backbone (no --model)"
        raise UserError(f"index {directory} was built by another model (fingerprint "
                        f"{manifest.fingerprint}, from {built_with}) than this one ({fingerprint}): "
                        + (fix or "use the model it was built with, or rebuild it with build_index.py"))


def default_workers(n_images: int | None = None, batch_size: int = 64) -> int:
    """DataLoader workers worth starting: none for a single batch (start-up costs more than it
    saves) or on a machine of 2 cores or fewer (measured on one: 73 images/s with none, 22 with
    one worker competing with the model's threads), else up to 4."""
    cores = os.cpu_count() or 1
    if cores <= 2 or (n_images is not None and n_images <= batch_size):
        return 0
    return min(4, cores // 2)


def load_encoder(spec: EncoderSpec) -> Encoder:
    """Build the model ``spec`` names (checkpoint: its weights, preprocessing and threshold)."""
    if spec.tta not in TTA_CHOICES:
        raise UserError(f"unknown test-time augmentation {spec.tta!r}: use one of {', '.join(TTA_CHOICES)}")
    if spec.checkpoint is not None:
        return _checkpoint_encoder(spec)
    return _zero_shot_encoder(spec)


def _checkpoint_encoder(spec: EncoderSpec) -> Encoder:
    from ..models.checkpoint import load_model

    if spec.image_size is not None:
        raise UserError("--image-size only applies to the zero-shot model: a checkpoint's image "
                        "size comes from its own preprocessing; drop --image-size")
    path = Path(spec.checkpoint).resolve()
    model, preprocessing, payload = load_model(path)
    return Encoder(model, preprocessing, payload["fingerprint"], payload.get("threshold"),
                   str(path), spec.tta, float(payload.get("hubness") or 0.0),
                   bool(payload.get("whiten", False)), float(payload.get("local") or 0.0))


def _zero_shot_encoder(spec: EncoderSpec) -> Encoder:
    """The untrained reference model: ImageNet backbone + GeM of three of its maps
    (``zero_shot_model``), no neck, no threshold."""
    from ..models.checkpoint import state_fingerprint
    from ..models.model import (
        create_model,
        preprocessing_for,
        pretrained_backbone,
        spec_from_dict,
        with_companion,
        zero_shot_model,
    )

    if spec.preprocessing is not None:
        config, preprocessing = spec_from_dict({"model_config": spec.model_config,
                                                "preprocessing": spec.preprocessing},
                                               "the index manifest's model")
        model = create_model(config, pretrained=True)
    else:
        model = zero_shot_model()
        preprocessing = preprocessing_for(model, spec.image_size)
        if spec.companion and spec.companion_share > 0:
            model = with_companion(model, spec.companion_share,
                                   pretrained_backbone(spec.companion), spec.companion)
    fingerprint = state_fingerprint(model.state_dict())
    return Encoder(model.eval(), preprocessing, fingerprint, None, None, spec.tta)
