"""Answering photos against a stored gallery index: what query.py does, as functions.

The index folder decides everything about the query side: its manifest names the model (checked by
fingerprint), the preprocessing and TTA, and the ``new_whale`` threshold (overridable). Heavy
libraries (torch, timm, albumentations) load only once a model is really needed, after the cheap
checks on the inputs have passed.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import NEW_WHALE
from .errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Hit:
    """One answer: an identity with its best gallery image's similarity, or ``new_whale``."""

    identity: str
    similarity: float | None  # None for new_whale
    gallery_image: str | None  # the identity's nearest gallery image; None for new_whale


@dataclass
class QueryAnswer:
    image: str
    hits: list[Hit]

    @property
    def labels(self) -> list[str]:
        return [hit.identity for hit in self.hits]


@dataclass
class QueryResult:
    answers: list[QueryAnswer]
    threshold: float | None
    index_dir: str
    k: int


def list_query_images(target: str | Path) -> list[Path]:
    """One image, or the images directly inside a folder (sorted): Kaggle's test/ layout."""
    from .data import IMAGE_EXTENSIONS, is_image

    target = Path(target)
    if target.is_file():
        if not is_image(target):
            raise UserError(f"{target} is not an image (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return [target]
    if not target.exists():
        raise UserError(f"query {target} does not exist: pass an image file or a folder of images")
    images = sorted(p for p in target.iterdir() if is_image(p))
    if not images:
        raise UserError(f"no images directly inside {target} (extensions: "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}): pass an image or a folder of images")
    return images


def run_query(target: str | Path, index_dir: str | Path, k: int = 5, threshold: float | None = None,
              model: str | None = None, batch_size: int = 64, workers: int | None = None,
              device: str | None = None, progress: bool = True, strict: bool = False) -> QueryResult:
    """Embed the query image(s) with the index's own model and rank the gallery's identities.

    ``threshold`` overrides the index's ``new_whale`` threshold; ``model`` replaces the
    checkpoint path recorded in the index (same weights required: checked by fingerprint).
    In a folder, unreadable images are left out with a warning (``strict``: an error instead).
    """
    from index.store import load_index

    from .encoder import check_index_model, default_workers

    if k < 1:
        raise UserError(f"-k must be at least 1, got {k}")
    images = list_query_images(target)
    stored = load_index(index_dir)  # cheap checks first: all of them before any model loads
    k = _clamp_k(k, stored.gallery.num_identities)
    images = _readable_queries(images, folder=Path(target).is_dir(), strict=strict)
    encoder = encoder_for(stored, model, device)
    check_index_model(stored.manifest, Path(index_dir), encoder.fingerprint,
                      "pass --model with the checkpoint the index was built from, or rebuild the "
                      "index with build_index.py --model for this one")
    if workers is None:
        workers = default_workers(len(images), batch_size)
    vectors = encoder.encode(images, batch_size=batch_size, num_workers=workers,
                             device=_device(device), progress=progress and len(images) > batch_size,
                             desc="embedding queries")
    ranking = stored.gallery.search(vectors, k)
    if threshold is None:
        threshold = stored.manifest.threshold
    answers = [QueryAnswer(str(image), hits_for(ids, scores, rows, stored.paths, threshold, k))
               for image, ids, scores, rows in zip(images, ranking.identities, ranking.scores,
                                                   ranking.best_rows)]
    return QueryResult(answers, threshold, str(index_dir), k)


def encoder_for(stored, model: str | None = None, device: str | None = None):
    """The index's exported ONNX encoder where it has one (starts in a fraction of the time, no
    torch); the full model for ``--model``, ``--device cuda``, an index without one, or where
    onnxruntime is missing."""
    from .onnx_encoder import ENCODER_FILE

    if model is None and device != "cuda" and stored.attachment(ENCODER_FILE) is not None:
        try:
            from .onnx_encoder import OnnxEncoder
        except ImportError:  # pragma: no cover - onnxruntime is a dependency
            log.info("onnxruntime is not installed: loading the full model")
        else:
            manifest = stored.manifest
            return OnnxEncoder(stored.attachment(ENCODER_FILE), manifest.model["preprocessing"],
                               manifest.fingerprint, manifest.tta)
    return _full_encoder(stored.manifest, model)


def _full_encoder(manifest, model: str | None):
    from .encoder import EncoderSpec, load_encoder

    spec = EncoderSpec.of_index(manifest, model)
    if spec.checkpoint is not None and not Path(spec.checkpoint).is_file():
        raise UserError(f"the index's model {spec.checkpoint} does not exist (moved?): pass --model "
                        "with the checkpoint the index was built from")
    return load_encoder(spec)


def _device(name: str | None):
    if name is None:
        return None
    import torch

    from .distributed import check_device

    check_device(name)
    return torch.device(name)


def _clamp_k(k: int, identities: int) -> int:
    """At most every identity plus ``new_whale``: a larger ``k`` answers nothing more, and the
    search allocates per requested answer (``-k 100000000000`` asked for hundreds of GiB)."""
    if k <= identities + 1:
        return k
    log.info("-k %d is more than the index's %d identities + new_whale: answering with -k %d",
             k, identities, identities + 1)
    return identities + 1


def _readable_queries(images: Sequence[Path], folder: bool, strict: bool) -> list[Path]:
    """Decode each query once up front, so a bad file is named in one line, not a worker traceback.

    A single image must be readable. In a folder the bad ones are left out with a warning (one
    corrupt photo should not cost the whole batch), unless ``strict``; none left is an error.
    """
    from .data import find_unreadable, load_image

    if not folder:
        for image in images:
            load_image(image)
        return list(images)
    bad = find_unreadable(images, strict=strict)
    if len(bad) == len(images):
        raise UserError(f"no readable image in {images[0].parent}: all {len(images)} image(s) "
                        f"failed to decode, e.g. {next(iter(bad.values()))}")
    if bad:
        log.warning("skipped %d of %d query image(s) that cannot be used: they are in no output "
                    "(a --submission lacks their rows); e.g. %s (use --strict to fail instead)",
                    len(bad), len(images), next(iter(bad.values())))
    return [image for i, image in enumerate(images) if i not in bad]


def hits_for(identities: Sequence[str], scores: np.ndarray, rows: np.ndarray,
             gallery_paths: Sequence[str], threshold: float | None, k: int) -> list[Hit]:
    """The top-``k`` answer with ``new_whale`` placed by ``threshold`` (as Kaggle scores it)."""
    from .metrics import insert_new_whale

    labels = insert_new_whale(identities, scores, threshold, k)
    position = {identity: i for i, identity in enumerate(identities)}
    hits = []
    for label in labels:
        if label == NEW_WHALE and label not in position:
            hits.append(Hit(NEW_WHALE, None, None))
            continue
        i = position[label]
        hits.append(Hit(label, float(scores[i]), gallery_paths[int(rows[i])]))
    return hits


def format_text(result: QueryResult) -> str:
    """Human-readable: per query, the ranked identities, similarity, nearest gallery image."""
    lines = []
    for answer in result.answers:
        lines.append(answer.image)
        for rank, hit in enumerate(answer.hits, start=1):
            if hit.similarity is None:
                lines.append(f"  {rank}. {hit.identity:<24s} {'':>7s}  (every identity below "
                             f"scores under the threshold {result.threshold:.4f})")
            else:
                lines.append(f"  {rank}. {hit.identity:<24s} {hit.similarity:7.4f}  {hit.gallery_image}")
    if result.threshold is None:
        lines.append("(no new_whale threshold: the index's model has none; pass --threshold)")
    return "\n".join(lines)


def to_json(result: QueryResult) -> dict[str, Any]:
    return {"index": result.index_dir, "k": result.k, "threshold": result.threshold,
            "results": [{"image": a.image, "answers": [_hit_json(h) for h in a.hits]}
                        for a in result.answers]}


def _hit_json(hit: Hit) -> dict[str, Any]:
    similarity = None if hit.similarity is None else round(hit.similarity, 6)
    return {**asdict(hit), "similarity": similarity}
