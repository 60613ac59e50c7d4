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

from .. import NEW_WHALE
from ..errors import UserError

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
    truths: dict[str, str] | None = None  # image -> true identity (or new_whale), where known
    evaluation: Any = None  # metrics.Evaluation of the answers with a truth
    truth_source: str | None = None  # the truth CSV, or "folder names"


def list_query_images(target: str | Path) -> list[Path]:
    """One image; the images directly inside a folder (sorted: Kaggle's test/ layout); or, for a
    folder holding only sub-folders, every image below it (a folder per identity: see
    ``folder_truths``)."""
    from ..data import IMAGE_EXTENSIONS, is_image

    target = Path(target)
    if target.is_file():
        if not is_image(target):
            raise UserError(f"{target} is not an image (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return [target]
    if not target.exists():
        raise UserError(f"query {target} does not exist: pass an image file or a folder of images")
    images = sorted(p for p in target.iterdir() if is_image(p))
    if not images and is_labelled_tree(target):
        images = sorted(p for p in target.rglob("*") if is_image(p) and p.parent != target)
    if not images:
        raise UserError(f"no images inside {target} (extensions: "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}): pass an image or a folder of images")
    return images


def is_labelled_tree(target: Path) -> bool:
    """A folder with no images of its own but images in sub-folders: one folder per identity."""
    from ..data import is_image

    if not target.is_dir() or any(is_image(p) for p in target.iterdir()):
        return False
    return any(is_image(p) for p in target.rglob("*"))


def read_truths(target: str | Path, images: Sequence[Path], truth: str | Path | None
                ) -> tuple[dict[str, str] | None, str | None]:
    """{image: true identity} for the query images that have one, and where it came from: the
    ``truth`` CSV (``Image,Id`` by file name, ``new_whale`` allowed), or the sub-folder names of
    a folder-per-identity query tree (a ``new_whale`` folder holds unknown ones). None without."""
    target = Path(target)
    if truth is not None:
        from .submission import read_labels_csv

        rows = read_labels_csv(truth, "truth file")
        bad = [image for image, labels in rows.items() if len(labels) != 1]
        if bad:
            raise UserError(f"truth file {truth} gives {len(rows[bad[0]])} labels for {bad[0]}: "
                            "one true Id per image")
        truths = {str(image): rows[image.name][0] for image in images if image.name in rows}
        _report_unmatched(images, truths, len(rows), f"truth file {truth}")
        return truths, str(truth)
    if is_labelled_tree(target):
        return {str(image): image.parent.relative_to(target).as_posix() for image in images}, \
            "folder names"
    return None, None


def _report_unmatched(images: Sequence[Path], truths: dict[str, str], rows: int, where: str) -> None:
    if not truths:
        raise UserError(f"no query image is named in {where} ({rows} rows, e.g. column Image = "
                        f"{images[0].name!r} expected): check that it lists these images")
    if len(truths) < len(images):
        log.warning("%d of %d query image(s) have no row in %s: answered but not scored",
                    len(images) - len(truths), len(images), where)
    if len(truths) < rows:
        log.warning("%d row(s) of %s name no query image: not scored", rows - len(truths), where)


_NO_TRUTH = ("--metrics needs a truth: pass --truth CSV, or query a folder with one sub-folder "
             "per identity")


def check_output_options(target: str | Path, truth: str | Path | None, metrics: str | None,
                         heatmaps: bool = False, html: str | None = None) -> None:
    """Before any work: --metrics needs something to score against, --heatmaps a report."""
    if metrics and truth is None and not is_labelled_tree(Path(target)):
        raise UserError(_NO_TRUTH)
    if heatmaps and not html:
        raise UserError("--heatmaps draws into the HTML report: add --html FILE")


def evaluate(result: "QueryResult") -> Any:
    """``metrics.evaluate_answers`` over the answers that have a truth."""
    from ..metrics import evaluate_answers

    scored = [a for a in result.answers if a.image in result.truths]
    if not scored:
        raise UserError("no answered query has a truth (every one was unreadable?): nothing to score")
    return evaluate_answers([a.labels for a in scored], [result.truths[a.image] for a in scored])


def run_query(target: str | Path, index_dir: str | Path, k: int = 5, threshold: float | None = None,
              model: str | None = None, batch_size: int = 64, workers: int | None = None,
              device: str | None = None, progress: bool = True, strict: bool = False,
              truth: str | Path | None = None) -> QueryResult:
    """Embed the query image(s) with the index's own model and rank the gallery's identities.

    ``threshold`` overrides the index's ``new_whale`` threshold; ``model`` replaces the
    checkpoint path recorded in the index (same weights required: checked by fingerprint).
    In a folder, unreadable images are left out with a warning (``strict``: an error instead).
    With ``truth`` (a CSV ``Image,Id``), or for a folder-per-identity query tree, the answers are
    also scored (``QueryResult.evaluation``).
    """
    from index.store import load_index

    from .encoder import check_index_model, default_workers

    if k < 1:
        raise UserError(f"-k must be at least 1, got {k}")
    images = list_query_images(target)
    truths, truth_source = read_truths(target, images, truth)
    stored = load_index(index_dir)  # cheap checks first: all of them before any model loads
    images = _readable_queries(images, folder=Path(target).is_dir(), strict=strict)
    stored, encoder = _with_encoder(stored, index_dir, model, device)
    k = _clamp_k(k, stored.gallery.num_identities)
    check_index_model(stored.manifest, Path(index_dir), encoder.fingerprint,
                      "pass --model with the checkpoint the index was built from, or rebuild the "
                      "index with build_index.py --model for this one")
    if workers is None:
        workers = default_workers(len(images), batch_size)
    local = stored.local is not None
    embedded = encoder.encode(images, batch_size=batch_size, num_workers=workers,
                              device=_device(device), progress=progress and len(images) > batch_size,
                              desc="embedding queries", maps=local)
    vectors, maps = embedded if local else (embedded, None)
    ranking = stored.search(vectors, k, maps)
    if threshold is None:
        threshold = stored.manifest.threshold
    answers = [QueryAnswer(str(image), hits_for(ids, scores, best, threshold, k))
               for image, ids, scores, best in zip(images, ranking.identities, ranking.scores,
                                                   stored.best_images(ranking))]
    result = QueryResult(answers, threshold, str(index_dir), k, truths, None, truth_source)
    if truths is not None:
        result.evaluation = evaluate(result)
    return result


def _with_encoder(stored, index_dir: str | Path, model: str | None, device: str | None):
    """(index, its encoder). The encoder's file is read only now, after the queries were checked:
    where an append replaced the index meanwhile (deleting the files ``stored`` came from), the
    new index and its encoder instead of a false "missing file" error."""
    from index.errors import IndexCorrupt
    from index.store import load_index, read_manifest, read_while_unchanged

    try:
        return stored, encoder_for(stored, model, device)
    except IndexCorrupt:
        if read_manifest(index_dir) == stored.manifest:
            raise
    log.info("index %s changed since it was loaded: loading it again", index_dir)

    def load_both():
        fresh = load_index(index_dir)
        return fresh, encoder_for(fresh, model, device)

    return read_while_unchanged(index_dir, load_both)


def encoder_for(stored, model: str | None = None, device: str | None = None):
    """The index's exported ONNX encoder where it has one (starts in a fraction of the time, no
    torch); the full model for ``--model``, ``--device cuda``, an index without one (or one
    without the local descriptors the index re-scores with), or where onnxruntime is missing."""
    from .onnx_encoder import ENCODER_FILE

    if model is None and device != "cuda" and stored.attachment(ENCODER_FILE) is not None:
        try:
            from .onnx_encoder import OnnxEncoder
        except ImportError:  # pragma: no cover - onnxruntime is a dependency
            log.info("onnxruntime is not installed: loading the full model")
        else:
            manifest = stored.manifest
            encoder = OnnxEncoder(stored.attachment(ENCODER_FILE), manifest.model["preprocessing"],
                                  manifest.fingerprint, manifest.tta)
            if stored.local is None or encoder.gives_maps:
                return encoder
            log.info("the index's exported encoder gives no local descriptors: loading the full "
                     "model")
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

    from ..distributed import check_device

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
    from ..data import find_unreadable, load_image

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


def hits_for(identities: Sequence[str], scores: np.ndarray, best_images: Sequence[str],
             threshold: float | None, k: int) -> list[Hit]:
    """The top-``k`` answer with ``new_whale`` placed by ``threshold`` (as Kaggle scores it);
    ``best_images``: each identity's nearest gallery image, in the order of ``identities``."""
    from ..metrics import insert_new_whale

    labels = insert_new_whale(identities, scores, threshold, k)
    position = {identity: i for i, identity in enumerate(identities)}
    hits = []
    for label in labels:
        if label == NEW_WHALE and label not in position:
            hits.append(Hit(NEW_WHALE, None, None))
            continue
        i = position[label]
        hits.append(Hit(label, float(scores[i]), best_images[i]))
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
    if result.evaluation is not None:
        from ..metrics import format_evaluation

        lines.append(format_evaluation(result.evaluation, result.truth_source))
    return "\n".join(lines)


def to_json(result: QueryResult) -> dict[str, Any]:
    out = {"index": result.index_dir, "k": result.k, "threshold": result.threshold,
           "results": [{"image": a.image, "answers": [_hit_json(h) for h in a.hits],
                        **({"truth": result.truths.get(a.image)} if result.truths else {})}
                       for a in result.answers]}
    if result.evaluation is not None:
        out["evaluation"] = {"truth": result.truth_source, **result.evaluation.to_json()}
    return out


def write_metrics(path: str | Path, result: QueryResult) -> None:
    """The evaluation as JSON, written atomically."""
    import json

    from ..files import atomic_write

    if result.evaluation is None:
        raise UserError(_NO_TRUTH)
    text = json.dumps({"truth": result.truth_source, "index": result.index_dir,
                       **result.evaluation.to_json()}, indent=2) + "\n"
    atomic_write(path, lambda temp: temp.write_text(text))


def _hit_json(hit: Hit) -> dict[str, Any]:
    similarity = None if hit.similarity is None else round(hit.similarity, 6)
    return {**asdict(hit), "similarity": similarity}
