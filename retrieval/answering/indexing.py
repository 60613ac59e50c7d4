"""Building and editing a gallery index: what build_index.py does, as functions.

* a fresh build embeds every readable gallery image and writes a new index folder;
* ``append`` embeds only images whose path the index does not hold yet, with the index's own
  model / preprocessing / TTA (another model is refused: its vectors would not be comparable);
* ``remove`` drops identities. Neither re-embeds anything: the index keeps its raw vectors and
  the FAISS structure is rebuilt from them, which is exact (append == fresh build of the same
  images) and lets ``auto`` move to a bigger-gallery type.

Under ``torchrun --nproc_per_node=N`` rank 0 plans (reads the index and the gallery), every rank
embeds a contiguous shard, and rank 0 gathers the vectors in order and writes the one index.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import numpy as np

from index.errors import GalleryIndexError

from ..config import COMPANION_BACKBONE
from ..data import Sample
from ..errors import UserError, as_user_error
from .encoder import (
    Encoder,
    EncoderSpec,
    check_index_model,
    default_workers,
    load_encoder,
)

if TYPE_CHECKING:
    from index.rows import GalleryRows

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class BuildOptions:
    """Everything build_index.py accepts (``None`` where the existing index decides)."""

    out: str
    gallery: str | None = None
    labels: str | None = None
    model: str | None = None
    tta: str | None = None
    index_type: str | None = None
    target_recall: float | None = None  # approximate types: tuned to this (None: the index's own / 0.95)
    gpu_float16: bool | None = None  # float16 vectors on GPUs (None: the index's own / off)
    append: bool = False
    remove: list[str] = field(default_factory=list)
    batch_size: int = 64
    workers: int | None = None  # None: encoder.default_workers()
    image_size: int | None = None
    threshold: float | None = None  # new_whale threshold to record instead of the model's/gallery's
    hubness: bool = True  # zero-shot: choose the hubness correction weight with the threshold
    whiten: bool = True  # zero-shot: whiten gallery and queries where the gallery calibrates better
    local: bool = True  # zero-shot: re-score with local descriptors where the gallery calibrates better
    # zero-shot: a second network beside, where the gallery prefers it; None: COMPANION_BACKBONE
    # (where the build is a fresh zero-shot one), "": none; a name given explicitly is refused
    # where it cannot apply (--model, --append, --threshold)
    companion: str | None = None
    strict: bool = False
    allow_outside: bool = False  # CSV rows may name images outside --gallery
    device: str | None = None
    progress: bool = True
    backend: str | None = None  # faiss (default) or milvus; an edit keeps the index's own
    milvus_uri: str | None = None  # a file path (milvus-lite) or http://host:19530
    milvus_collection: str | None = None


@dataclass
class Plan:
    """What rank 0 decided, sent to every rank: which model, which images are new."""

    encoder: EncoderSpec
    new: list[Sample]
    index_type: str
    maps: bool = False  # embed the local descriptors too (index.local_match)


@dataclass
class SampleVectors:
    """A gallery choice's sample (readable whole identities, ``image_size.readable_sample``),
    its vectors by the chosen encoder and their (calibration, whitening): what the next choice
    starts from, and, where the sample is the whole gallery, the index's own vectors."""

    sample: list[Sample]
    vectors: np.ndarray
    calibrated: tuple[Any, Any] | None = None

    def covers(self, samples: Sequence[Sample]) -> bool:
        return self.sample == list(samples)


@dataclass
class Loaded:
    """What rank 0 keeps from planning: the model, and the gallery's (readable samples,
    vectors) where choosing the zero-shot image size already embedded all of it at that size."""

    encoder: Encoder
    embedded: tuple[list[Sample], np.ndarray] | None = None
    # and the (calibration, whitening) those vectors got while the size was chosen
    calibrated: tuple[Any, Any] | None = None


@dataclass
class Current:
    """The existing index's content that survives this edit (rank 0 only)."""

    manifest: Any = None
    paths: list[str] = field(default_factory=list)
    identities: list[str] = field(default_factory=list)
    # the stored vectors (memory-mapped) and which of their rows stay
    vectors: tuple[np.ndarray, np.ndarray] | None = None
    attachments: dict[str, Path] = field(default_factory=dict)  # the exported encoder, if any
    whitening: tuple[np.ndarray, np.ndarray] | None = None  # what the stored vectors went through
    # the stored local descriptors (index.local_match.LocalGallery) and which of their rows stay
    local: tuple[Any, np.ndarray] | None = None
    milvus: Any = None  # a Milvus-backed index: the client (paths, identities, vectors stay there)


def run(opts: BuildOptions) -> Any:
    """Build or edit the index at ``opts.out``; the manifest on rank 0, None on other ranks."""
    from index.store import writer_lock

    from .. import distributed

    _check_options(opts)
    ctx = distributed.setup(opts.device)
    try:
        lock = writer_lock(opts.out) if ctx.is_main else contextlib.nullcontext()
        with lock:
            return _run_locked(opts, ctx)
    finally:
        distributed.teardown()


def _run_locked(opts: BuildOptions, ctx) -> Any:
    current = Current()
    if opts.append or opts.remove:
        current = _on_main(ctx, lambda: _read_current(opts), share=False) or Current()
    if opts.gallery is None:  # --remove-identity alone: nothing to embed
        return _on_main(ctx, lambda: _write(opts, current, None, [], None, opts.index_type),
                        share=False)
    loaded: list[Loaded] = []
    plan = _on_main(ctx, lambda: _plan(opts, current, loaded, ctx.device))
    encoder = loaded[0].encoder if loaded else load_encoder(plan.encoder)
    if encoder.hubness and (opts.backend == "milvus" or current.milvus is not None):
        raise UserError(f"{encoder.checkpoint} searches with a hubness correction (weight "
                        f"{encoder.hubness}), which the Milvus backend does not apply: build with "
                        "--backend faiss, or train with --no-hubness")
    if encoder.local and (opts.backend == "milvus" or current.milvus is not None):
        raise UserError(f"{encoder.checkpoint} re-scores with local matching (share "
                        f"{encoder.local}, chosen on validation), which the Milvus backend does "
                        "not do: build with --backend faiss, or train with --no-local-match")
    if encoder.whiten and opts.whiten and (opts.backend == "milvus" or current.milvus is not None):
        raise UserError(f"{encoder.checkpoint} searches whitened within identities (chosen on "
                        "validation), which the Milvus backend does not do: build with "
                        "--backend faiss, or pass --no-whiten")
    calibrated, maps = None, None
    if loaded and loaded[0].embedded is not None and not ctx.distributed and not plan.maps:
        (kept, vectors), calibrated = loaded[0].embedded, loaded[0].calibrated
    else:
        if loaded and loaded[0].embedded is not None and not ctx.distributed:
            calibrated = loaded[0].calibrated  # the same images, embedded again with their maps
        kept, vectors, maps = _embed_sharded(ctx, encoder, plan.new, opts, plan.maps)
    if not ctx.is_main:
        return None
    return _write(opts, current, encoder, kept, vectors, plan.index_type, calibrated, maps)


def _check_options(opts: BuildOptions) -> None:
    if opts.gallery is None and not opts.remove:
        raise UserError("nothing to do: pass --gallery DIR to build (or --append to) an index, "
                        "or --remove-identity ID to edit one")
    if opts.remove and opts.gallery is not None and not opts.append:
        raise UserError("--remove-identity edits an existing index: use it alone, or with "
                        "--append to add images in the same run (a fresh build takes no removals)")
    if opts.target_recall is not None and not 0 < opts.target_recall <= 1:
        raise UserError(f"--target-recall is a share of queries, above 0 and at most 1, got "
                        f"{opts.target_recall}")
    if opts.threshold is not None and not math.isfinite(opts.threshold):
        raise UserError(f"--threshold must be a finite number (a cosine similarity, -1 to 1), "
                        f"got {opts.threshold}")
    if opts.gallery is None and (opts.model or opts.tta or opts.image_size):
        raise UserError("--model / --tta / --image-size only apply when embedding images: "
                        "--remove-identity alone re-embeds nothing; drop them")
    if opts.companion and (opts.model or opts.append or opts.threshold is not None):
        raise UserError("--companion adds a second network to a fresh zero-shot index, its share "
                        "chosen on the gallery: drop it with --model (a checkpoint is one "
                        "network), --append (the index keeps its own model) or --threshold")
    if (opts.milvus_uri or opts.milvus_collection) and opts.backend != "milvus":
        raise UserError("--milvus-uri / --milvus-collection go with --backend milvus (an existing "
                        "Milvus index needs neither: its folder names them)")
    if opts.backend == "milvus" and not opts.milvus_uri and not (opts.append or opts.remove):
        raise UserError("--backend milvus needs --milvus-uri: a file path for milvus-lite (e.g. "
                        "runs/gallery.db) or a server, http://host:19530")


def _on_main(ctx, work: Callable[[], T], share: bool = True) -> T | None:
    """Run ``work`` on rank 0 only. Its UserError reaches every rank (so a bad input stops all of
    them with the same one-line message instead of leaving them waiting); its result too when
    ``share``, else the other ranks get None (big results, like the index's vectors, stay put)."""
    from .. import distributed

    result: Any = None
    if ctx.is_main:
        try:
            result = work()
        except (UserError, GalleryIndexError) as err:
            result = as_user_error(err)
    shared = distributed.broadcast(ctx, result if share or isinstance(result, UserError) else None)
    if isinstance(shared, UserError):
        raise shared
    return result if ctx.is_main else shared


def _read_current(opts: BuildOptions) -> Current:
    """The index being edited, minus the identities to remove."""
    from index.store import load_index

    out = Path(opts.out)
    if not out.exists() and opts.append and not opts.remove:
        log.info("no index at %s yet: --append builds a new one", out)
        return Current()
    stored = load_index(out)
    backend = stored.manifest.backend
    if opts.backend not in (None, backend):
        raise UserError(f"index {out} keeps its vectors in {backend}: an edit keeps the backend; "
                        f"drop --backend, or build a new index without --append")
    if backend == "milvus":
        return _read_current_milvus(opts, stored)
    vectors = stored.vectors(mmap=True)  # read a chunk at a time when the new index is written
    keep = np.ones(len(stored.paths), dtype=bool)
    present = set(stored.identities)
    for identity in opts.remove:
        if identity not in present:
            examples = ", ".join(sorted(present)[:3])
            raise UserError(f"identity {identity!r} is not in index {out} ({len(present)} identities, "
                            f"e.g. {examples}): check the name (identities are case-sensitive)")
        keep &= np.asarray(stored.identities) != identity
    log.info("removing %d image(s) of %d identit(y/ies)", int((~keep).sum()), len(opts.remove))
    return Current(stored.manifest, [p for p, k in zip(stored.paths, keep) if k],
                   [i for i, k in zip(stored.identities, keep) if k], (vectors, np.flatnonzero(keep)),
                   {name: stored.attachment(name) for name in stored.manifest.attachments},
                   stored.whitening,
                   None if stored.local is None else (stored.local, np.flatnonzero(keep)))


def _read_current_milvus(opts: BuildOptions, stored) -> Current:
    """A Milvus-backed index being edited: only the manifest is read here; which images are new
    is asked of the collection by key (``_plan``), removals are checked there too."""
    from index import milvus

    collection = stored.manifest.milvus["collection"]
    client = stored.gallery.client
    for identity in opts.remove:
        if not milvus.has_identity(client, collection, identity):
            raise UserError(f"identity {identity!r} is not in index {opts.out} (Milvus collection "
                            f"{collection!r}): check the name (identities are case-sensitive)")
    return Current(stored.manifest,
                   attachments={name: stored.attachment(name) for name in stored.manifest.attachments},
                   milvus=client)


def _plan(opts: BuildOptions, current: Current, loaded: list[Loaded], device=None) -> Plan:
    """Rank 0: list the images to embed (cheap checks first), load the model (the index's own
    when appending; the zero-shot one at the size the gallery chooses, ``_zero_shot_size``) and
    keep it in ``loaded``: only the picklable plan goes to other ranks."""
    from ..data import read_gallery

    listed = read_gallery(opts.gallery, opts.labels, opts.allow_outside)
    if current.milvus is not None:
        from index import milvus

        indexed = milvus.indexed_among(current.milvus, current.manifest.milvus["collection"],
                                       [os.path.abspath(s.path) for s in listed])
    else:
        indexed = dict(zip(current.paths, current.identities))
    samples = _new_samples(listed, indexed)
    spec = _encoder_spec(opts, current)
    encoder, chosen = load_encoder(spec), None
    if _chooses_size(opts, current):
        encoder, chosen = _zero_shot_size(opts, samples, spec, encoder, device)
        spec = replace(spec, image_size=encoder.preprocessing.image_size)
    if _chooses_companion(opts, current):
        encoder, chosen = _zero_shot_companion(opts, samples, encoder, chosen, device)
        config = encoder.model.config
        spec = replace(spec, companion=config.companion or None,
                       companion_share=config.companion_share)
    if current.manifest is not None:
        check_index_model(current.manifest, Path(opts.out), encoder.fingerprint,
                          "append with the model the index was built with (drop --model, or pass "
                          "that checkpoint), or rebuild the index without --append")
    if chosen is not None and chosen.covers(samples):  # the gallery is embedded already
        loaded.append(Loaded(encoder, (chosen.sample, chosen.vectors), chosen.calibrated))
    else:
        loaded.append(Loaded(encoder))
    index_type = opts.index_type or (current.manifest.index["requested"] if current.manifest else "flat")
    return Plan(spec, samples, index_type, _wants_maps(opts, current, encoder, len(samples)))


def _wants_maps(opts: BuildOptions, current: Current, encoder: Encoder, n_images: int) -> bool:
    """Whether the gallery is embedded with its local descriptors: for an index that keeps
    them (an edit), or for a fresh zero-shot FAISS gallery calibrated on itself, which then
    chooses whether to re-score with them (``--no-local``: never)."""
    from index.local_match import MAX_IMAGES

    if current.local is not None:
        return True
    if current.manifest is None and encoder.checkpoint is not None:  # the model's own choice
        return bool(encoder.local) and opts.threshold is None and encoder.gives_maps
    return (current.manifest is None and opts.local and opts.backend != "milvus"
            and opts.threshold is None and encoder.threshold is None and encoder.gives_maps
            and n_images <= MAX_IMAGES)


def _chooses_size(opts: BuildOptions, current: Current) -> bool:
    """A fresh zero-shot build without ``--image-size`` (nor ``--threshold``, which was set for
    one size) lets the gallery choose the image size."""
    return (current.manifest is None and opts.model is None and opts.image_size is None
            and opts.threshold is None)


def _zero_shot_size(opts: BuildOptions, samples: Sequence[Sample], spec: EncoderSpec,
                    native: Encoder, device) -> tuple[Encoder, SampleVectors | None]:
    """The zero-shot encoder at the size whose leave-one-out MAP@5 on a sample of the gallery,
    calibrated as the index will be (hubness weight, whitening), is best (``zero_shot_size``);
    and that sample's vectors at that size with their calibration (None where no choice was
    made): where the sample is all of the gallery, the index records them as they are."""
    from ..gallery_threshold import choose_gallery_space
    from ..image_size import choose_image_size

    weights, whiten = _gallery_choices(opts)

    def score(vectors: np.ndarray, identities: list[str]) -> tuple[float, tuple] | None:
        calibration, whitening = choose_gallery_space(vectors, identities, weights=weights,
                                                      whiten=whiten)
        return None if calibration is None else (calibration.map5, (calibration, whitening))

    encoders = {native.preprocessing.image_size: native}

    def embed(size: int, sample: list[Sample]) -> np.ndarray | None:
        if size not in encoders:
            try:
                encoders[size] = load_encoder(replace(spec, image_size=size))
            except UserError:  # a fixed-size transformer takes its own size only
                return None
        workers = default_workers(len(sample), opts.batch_size) if opts.workers is None else opts.workers
        return encoders[size].encode([s.path for s in sample], batch_size=opts.batch_size,
                                     num_workers=workers, device=device, progress=opts.progress,
                                     desc=f"choosing the image size ({size} px)")

    choice = choose_image_size(samples, native.preprocessing.image_size, score, embed)
    if choice.vectors is None:
        return encoders[choice.size], None
    return encoders[choice.size], SampleVectors(choice.sample, choice.vectors, choice.scored)


def _chooses_companion(opts: BuildOptions, current: Current) -> bool:
    """A fresh zero-shot build (without ``--no-companion``, and without ``--threshold``, which
    was set for one model) lets the gallery choose how much of a second network to add."""
    return (opts.companion != "" and current.manifest is None and opts.model is None
            and opts.threshold is None)


def _companion_name(opts: BuildOptions) -> str:
    """The second network of a zero-shot build: the one named, else ``COMPANION_BACKBONE``."""
    return opts.companion or COMPANION_BACKBONE


def _zero_shot_companion(opts: BuildOptions, samples: Sequence[Sample], own: Encoder,
                         chosen: SampleVectors | None, device
                         ) -> tuple[Encoder, SampleVectors | None]:
    """The zero-shot encoder with the share of ``opts.companion``'s untrained features
    (``COMPANION_SHARES``) whose leave-one-out MAP@5 on a sample of the gallery, calibrated as
    the index will be (hubness weight, whitening), is best, the encoder alone (share 0) among
    equals; the companion embeds the sample at the size already chosen (``chosen``: that
    choice's sample, vectors and calibration, reused; None: a sample embedded here). Returns
    the encoder and the sample's vectors by it with their calibration."""
    from ..gallery_threshold import choose_gallery_space
    from ..image_size import readable_sample
    from ..models.checkpoint import state_fingerprint
    from ..models.embed import embed_images
    from ..models.model import choose_companion_share, with_companion, zero_shot_model

    if chosen is None:
        sample = readable_sample(samples)
        if not sample:
            return own, None
        chosen = SampleVectors(sample, own.encode(
            [s.path for s in sample], batch_size=opts.batch_size, device=device,
            progress=opts.progress, desc="choosing the companion (own features)"))
    name = _companion_name(opts)
    companion = zero_shot_model(name).eval()
    other = embed_images(companion, [s.path for s in chosen.sample], own.preprocessing,
                         batch_size=opts.batch_size, device=device, tta_flip=own.tta == "flip",
                         progress=opts.progress, desc=f"choosing the companion ({name})")
    weights, whiten = _gallery_choices(opts)

    def score(vectors: np.ndarray, identities: list[str]) -> tuple[float, tuple] | None:
        calibration, whitening = choose_gallery_space(vectors, identities, weights=weights,
                                                      whiten=whiten)
        return None if calibration is None else (calibration.map5, (calibration, whitening))

    known = None if chosen.calibrated is None else (chosen.calibrated[0].map5, chosen.calibrated)
    choice = choose_companion_share(chosen.vectors, other, [s.identity for s in chosen.sample],
                                    score, known)  # the size choice calibrated own already
    if choice is None:  # the sample cannot be calibrated: keep the model as it is
        return own, chosen
    share = choice.share
    log.info("companion %s: leave-one-out MAP@5 on %d gallery images %s; share %g chosen",
             name, len(chosen.sample),
             ", ".join(f"share {s:g} {m:.3f}" for s, m in choice.map5.items()), share)
    scored = SampleVectors(chosen.sample, choice.vectors, choice.scored)
    if share == 0:
        return own, scored
    model = with_companion(own.model, share, companion.backbone, name).eval()
    encoder = Encoder(model, own.preprocessing, state_fingerprint(model.state_dict()), None, None,
                      own.tta)
    return encoder, scored


def _encoder_spec(opts: BuildOptions, current: Current) -> EncoderSpec:
    if current.manifest is None:
        return EncoderSpec(opts.model, opts.image_size, tta=opts.tta or "none")
    manifest = current.manifest
    if opts.tta is not None and opts.tta != manifest.tta:
        raise UserError(f"index {opts.out} was built with --tta {manifest.tta}: appending with "
                        f"--tta {opts.tta} would mix incomparable vectors; drop --tta")
    size = manifest.model["preprocessing"]["image_size"]
    if opts.image_size is not None and opts.image_size != size:
        raise UserError(f"index {opts.out} was built at --image-size {size}: appending at "
                        f"{opts.image_size} would mix incomparable vectors; drop --image-size")
    return EncoderSpec.of_index(manifest, opts.model)


def _new_samples(samples: Sequence[Sample], indexed: dict[str, str]) -> list[Sample]:
    """Gallery samples whose (absolute) path is not indexed yet, each path once. An indexed image
    now listed under another identity keeps its old label, with a warning saying how to relabel."""
    new, seen, already, relabelled = [], set(indexed), 0, 0
    for sample in samples:
        path = os.path.abspath(sample.path)  # absolute, but symlinks kept as the user named them
        if path in indexed:
            already += 1
            relabelled += indexed[path] != sample.identity
        if path in seen:
            continue
        seen.add(path)
        new.append(Sample(Path(path), sample.identity))
    if already:
        log.info("%d image(s) already in the index are kept as they are (not re-embedded)", already)
    if relabelled:
        log.warning("%d indexed image(s) now carry another identity and keep their old one: "
                    "--remove-identity the old identity, then --append, to relabel", relabelled)
    return new


def _embed_sharded(ctx, encoder: Encoder, samples: list[Sample], opts: BuildOptions,
                   maps: bool = False) -> tuple[list[Sample], np.ndarray | None, np.ndarray | None]:
    """Each rank checks and embeds its contiguous shard; rank 0 gets them all, in order (with
    their local descriptors where ``maps``, else None).
    A rank's UserError is raised on that rank and on rank 0 (after the gather, so none hangs)."""
    n = len(samples)
    shard = samples[ctx.rank * n // ctx.world_size:(ctx.rank + 1) * n // ctx.world_size]
    started = time.perf_counter()
    try:
        part: Any = _embed_shard(ctx, encoder, shard, opts, maps)
    except UserError as err:
        part = err
    parts = _gather_on_main(ctx, part)
    for failed in [part] + (parts or []):
        if isinstance(failed, UserError):
            raise failed
    if parts is None:
        return [], None, None
    kept = [s for shard_samples, _, _ in parts for s in shard_samples]
    seconds = time.perf_counter() - started
    log.info("embedded %d image(s) in %.1f s (%.1f images/s, %d process(es))", len(kept), seconds,
             len(kept) / max(seconds, 1e-9), ctx.world_size)
    if not kept:
        return kept, None, None
    return kept, np.concatenate([v for _, v, _ in parts]), \
        np.concatenate([m for _, _, m in parts if len(m)]) if maps else None


def _embed_shard(ctx, encoder: Encoder, shard: list[Sample], opts: BuildOptions,
                 maps: bool = False) -> tuple[list[Sample], np.ndarray, np.ndarray | None]:
    from ..data import drop_unreadable

    kept = drop_unreadable(shard, strict=opts.strict)
    workers = default_workers(len(kept), opts.batch_size) if opts.workers is None else opts.workers
    embedded = encoder.encode([s.path for s in kept], batch_size=opts.batch_size,
                              num_workers=workers, device=ctx.device,
                              progress=opts.progress and ctx.is_main, desc="embedding gallery",
                              maps=maps)
    return (kept, *embedded) if maps else (kept, embedded, None)


def _gather_on_main(ctx, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def _write(opts: BuildOptions, current: Current, encoder: Encoder | None, new: list[Sample],
           vectors: np.ndarray | None, index_type: str | None = None,
           calibrated: tuple | None = None, maps: np.ndarray | None = None) -> Any:
    """Rank 0: merge what stays with what is new and write the folder (atomically);
    ``calibrated``: the gallery calibration of exactly these vectors, already made; ``maps``:
    the new images' local descriptors (raw), where the index keeps or may choose them."""
    from index import types
    from index.rows import GalleryRows
    from index.store import save_index
    from index.whitening import whiten

    if opts.backend == "milvus" or (current.manifest is not None and current.milvus is not None):
        return _write_milvus(opts, current, encoder, new, vectors, index_type, calibrated)
    paths = current.paths + [str(s.path) for s in new]
    identities = current.identities + [s.identity for s in new]
    whitening = current.whitening  # an edit keeps the index's map: new images go through it
    if whitening is not None and vectors is not None:
        vectors = whiten(vectors, *whitening)
    rows = GalleryRows([v for v in (current.vectors, vectors) if v is not None])
    if not paths:
        raise UserError(_empty_message(opts, current))
    manifest = current.manifest
    if opts.append and not new and not opts.remove and manifest is not None and \
            (index_type or manifest.index["requested"]) == manifest.index["requested"] and \
            (opts.threshold is None or opts.threshold == manifest.threshold) and \
            (opts.target_recall is None or opts.target_recall == manifest.index.get("target_recall")) and \
            (opts.gpu_float16 is None or opts.gpu_float16 == types.gpu_float16(manifest.index)):
        log.info("nothing new to add: %s left unchanged", opts.out)
        return manifest
    threshold, source, hubness, fitted, chosen = _threshold(
        opts, manifest, encoder, rows, identities, calibrated=calibrated,
        maps=maps if manifest is None else None)
    if fitted is not None:  # a fresh zero-shot gallery that calibrates better whitened
        rows, whitening = GalleryRows.of(whiten(rows.array(), *fitted)), fitted
    local = _local_parts(current, chosen, maps)
    model = {key: value for key, value in (encoder.model_info() if encoder else manifest.model).items()
             if key != "hubness"}
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        attachments = current.attachments or _export(encoder, Path(scratch), local is not None)
        written = save_index(
            opts.out, rows, paths, identities,
            model={**model, **({"hubness": hubness} if hubness else {})},
            tta=encoder.tta if encoder else manifest.tta,
            threshold=threshold, threshold_source=source,
            index_type=index_type or (manifest.index["requested"] if manifest else "flat"),
            created=manifest.created if manifest else None, attachments=attachments,
            target_recall=opts.target_recall or (manifest.index.get("target_recall")
                                                 if manifest else None),
            gpu_float16=opts.gpu_float16 if opts.gpu_float16 is not None else
            bool(manifest and types.gpu_float16(manifest.index)), whitening=whitening, local=local)
    log.info("index %s: %d images of %d identities (%s); %d new", opts.out,
             written.counts["images"], written.counts["identities"], written.index["kind"], len(new))
    return written


def _write_milvus(opts: BuildOptions, current: Current, encoder: Encoder | None,
                  new: list[Sample], vectors: np.ndarray | None, index_type: str | None,
                  calibrated: tuple | None = None) -> Any:
    """The Milvus backend: rows go to the collection (upserts keyed by path), then the index
    folder's manifest is committed atomically with the counts, threshold and encoder."""
    from index import milvus
    from index.store import save_milvus_manifest

    manifest = current.manifest
    paths = [str(s.path) for s in new]
    identities = [s.identity for s in new]
    if manifest is None:  # a fresh build
        if not new:
            raise UserError(_empty_message(opts, current))
        if not opts.milvus_uri:
            raise UserError(f"there is no index at {opts.out} yet: building one with --backend milvus "
                            "needs --milvus-uri (a file path for milvus-lite, or http://host:19530)")
        uri = milvus.normalise_uri(opts.milvus_uri)
        collection = milvus.check_collection_name(opts.milvus_collection or milvus.DEFAULT_COLLECTION)
        spec = milvus.resolve(index_type or "flat", len(new), vectors.shape[1])
        client = milvus.connect(uri)
        model = encoder.model_info()
        milvus.create_collection(client, collection, vectors.shape[1], spec, model["fingerprint"],
                                 replace=_rebuilds(opts.out, uri, collection))
        milvus.upsert(client, collection, vectors, paths, identities, progress=opts.progress)
        spec = _tuned_milvus(client, collection, spec, vectors, paths, identities, opts.target_recall)
        threshold, source, _, _, _ = _threshold(opts, None, encoder, vectors, identities,
                                             weights=(0.0,),  # Milvus has no hubness correction
                                             calibrated=calibrated)
        counts = {"images": len(new), "identities": len(set(identities))}
        values = {"dim": int(vectors.shape[1]), "model": model, "tta": encoder.tta, "spec": spec,
                  "uri": uri, "collection": collection}
    else:
        if index_type not in (None, manifest.index["requested"]):
            raise UserError(f"--index-type {index_type} on an existing Milvus index: the "
                            "collection keeps its type; build a new index to change it")
        client, collection = current.milvus, manifest.milvus["collection"]
        if opts.append and not new and not opts.remove and \
                (opts.threshold is None or opts.threshold == manifest.threshold):
            log.info("nothing new to add: %s left unchanged", opts.out)
            return manifest
        if opts.remove:
            milvus.delete_identities(client, collection, opts.remove)
        if new:
            milvus.upsert(client, collection, vectors, paths, identities, progress=opts.progress)
        # counted in the collection, not from the manifest: right even after a failed earlier
        # write or another writer's (costs a pass over the identity column)
        counts = milvus.counts(client, collection)
        if counts["images"] == 0:
            raise UserError(f"index {opts.out} is now empty (its Milvus collection {collection!r} "
                            "holds no rows): append images, or delete the folder and the collection")
        threshold = opts.threshold if opts.threshold is not None else manifest.threshold
        source = "user" if opts.threshold is not None else manifest.threshold_source
        values = {"dim": manifest.dim, "model": manifest.model, "tta": manifest.tta,
                  "spec": manifest.spec, "uri": manifest.milvus["uri"], "collection": collection}
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        attachments = current.attachments or _export(encoder, Path(scratch))
        written = save_milvus_manifest(opts.out, **values, threshold=threshold,
                                       threshold_source=source, counts=counts,
                                       created=manifest.created if manifest else None,
                                       attachments=attachments)
    log.info("index %s: %d images of %d identities in Milvus collection %r (%s); %d new", opts.out,
             written.counts["images"], written.counts["identities"], values["collection"],
             written.index["kind"], len(new))
    return written


def _tuned_milvus(client, collection: str, spec, vectors: np.ndarray, paths: list[str],
                  identities: list[str], target: float | None):
    """The collection's search parameter tuned to the target recall, as FAISS indexes are (an
    exact collection has none: it is not reloaded for nothing)."""
    from index import milvus, tuning

    if spec.kind not in milvus.SEARCH_PARAMS:
        return spec
    target = tuning.DEFAULT_TARGET if target is None else target
    milvus.settle(client, collection)
    gallery = milvus.MilvusGallery(client, collection, vectors.shape[1], len(set(identities)),
                                   len(vectors), spec)
    found = gallery.tune(vectors, paths, identities, target)
    return tuning.tuned_spec(spec, found, target, len(vectors), backend="Milvus")


def _rebuilds(out: str, uri: str, collection: str) -> bool:
    """A fresh build may replace a collection only where ``--out`` is already that collection's
    index folder (a rebuild); any other existing collection is refused, never dropped."""
    from index.errors import GalleryIndexError
    from index.store import read_manifest

    try:
        previous = read_manifest(out)
    except GalleryIndexError:
        return False
    return previous.backend == "milvus" and previous.milvus == {"uri": uri, "collection": collection}


def _local_parts(current: Current, chosen: Any, maps: np.ndarray | None) -> tuple | None:
    """``save_index``'s ``local``: an edit keeps the index's share and mean descriptor, the new
    images' descriptors centred on that mean; a fresh build the gallery's choice (``chosen``:
    an ``index.local_match.LocalGallery`` of exactly these images, or None)."""
    if current.local is not None:
        stored, keep = current.local
        parts: list = [(stored.descriptors, keep)]
        if maps is not None and len(maps):
            parts.append(stored.queries(maps).astype(np.float16))
        return stored.share, stored.mean, parts
    if chosen is None:
        return None
    return chosen.share, chosen.mean, [chosen.descriptors]


def _export(encoder: Encoder | None, scratch: Path, maps: bool = False) -> dict[str, Path]:
    """The encoder exported to ONNX for the fast cold query path ({} where it cannot be);
    ``maps``: with the local descriptors as a second output."""
    from .onnx_encoder import ENCODER_FILE, export_onnx

    if encoder is None:
        return {}
    started = time.perf_counter()
    path = scratch / ENCODER_FILE
    if not export_onnx(encoder.model, encoder.preprocessing.image_size, path, maps=maps):
        return {}
    log.info("exported the encoder to ONNX for query.py (%.1f s, %.1f MB)",
             time.perf_counter() - started, path.stat().st_size / 2**20)
    return {ENCODER_FILE: path}


def _threshold(opts: BuildOptions, manifest: Any, encoder: Encoder | None,
               rows: np.ndarray | GalleryRows, identities: list[str],
               weights: Sequence[float] | None = None, calibrated: tuple | None = None,
               maps: np.ndarray | None = None
               ) -> tuple[float | None, str | None, float, tuple[np.ndarray, np.ndarray] | None, Any]:
    """The new_whale threshold to record, where it came from, the hubness correction weight
    it goes with, a within-identity whitening for the gallery (or None), and the local
    descriptors to re-score with (an ``index.local_match.LocalGallery``, chosen among ``maps``'
    shares by ``gallery_threshold.choose_local_share`` where the gallery calibrates itself;
    or None): ``--threshold``
    (with the model's own weight); else the index's own (an edit keeps all three); else the
    checkpoint's; else all calibrated on the gallery itself (the zero-shot model has none:
    without a threshold the index would never answer new_whale), the weight among ``weights``
    (default ``index.hubness.WEIGHTS``), the whitening where it calibrates better (``--whiten``;
    ``gallery_threshold.choose_gallery_space``; ``calibrated``: its result for these very rows,
    made while the zero-shot image size was chosen)."""
    from index.local_match import SHORTLIST
    from index.rows import GalleryRows
    from index.store import hubness_weight

    from ..gallery_threshold import calibrate_gallery

    own = encoder.hubness if encoder is not None else \
        hubness_weight(manifest.model) if manifest is not None else 0.0
    if opts.threshold is not None:
        log.info("new_whale threshold %.4f, as given by --threshold", opts.threshold)
        return opts.threshold, "user", own, _checkpoint_whitening(opts, manifest, encoder, rows,
                                                                  identities), None
    if manifest is not None and manifest.threshold is not None:
        return manifest.threshold, manifest.threshold_source, hubness_weight(manifest.model), \
            None, None
    if encoder is not None and encoder.threshold is not None:
        return encoder.threshold, "checkpoint", encoder.hubness, \
            _checkpoint_whitening(opts, manifest, encoder, rows, identities), \
            _checkpoint_local(encoder, maps)
    default_weights, whiten = _gallery_choices(opts)
    weights = default_weights if weights is None else weights
    vectors = GalleryRows.of(rows).array()
    calibration, whitening, local = calibrate_gallery(
        vectors, identities, maps, weights=weights, whiten=whiten and manifest is None,
        chosen=calibrated)
    if calibration is None:
        log.warning("no new_whale threshold: no identity in the gallery has two images to calibrate "
                    "one on, so queries never get new_whale (pass --threshold to set one)")
        return None, None, own, None, None
    log.info("new_whale threshold %.4f calibrated on the gallery itself (%d leave-one-out queries "
             "of known identities, %d standing in for new ones; MAP@5 %.3f, hubness correction "
             "%s); --threshold overrides", calibration.threshold, calibration.known_queries,
             calibration.new_queries, calibration.map5, calibration.hubness)
    if whitening is not None:
        log.info("the gallery and every query are whitened within identities (a map fitted on "
                 "the gallery, stored with the index; --no-whiten searches plain cosine)")
    if local is not None:
        log.info("each query's %d nearest gallery images are re-scored with the untrained "
                 "backbone's local descriptors (share %g of the score; --no-local searches the "
                 "pooled vectors alone)", SHORTLIST, local.share)
    return calibration.threshold, "gallery", calibration.hubness, whitening, local


def _checkpoint_local(encoder: Encoder, maps: np.ndarray | None):
    """The local descriptors a checkpoint's index re-scores with, where training chose local
    matching on validation: its share, centred on this gallery's mean (None otherwise)."""
    if maps is None or not encoder.local:
        return None
    from index.local_match import SHORTLIST, local_gallery

    log.info("each query's %d nearest gallery images are re-scored by local matching (share %g, "
             "as the model's validation chose)", SHORTLIST, encoder.local)
    return local_gallery(maps, encoder.local)


def _gallery_choices(opts: BuildOptions) -> tuple[Sequence[float], bool]:
    """The hubness weights and whether to try whitening when calibrating on the gallery (the
    zero-shot index, and the choice of its image size): the Milvus backend applies neither."""
    from index.hubness import WEIGHTS

    milvus = opts.backend == "milvus"
    return (WEIGHTS if opts.hubness and not milvus else (0.0,)), opts.whiten and not milvus


def _checkpoint_whitening(opts: BuildOptions, manifest: Any, encoder: Encoder | None,
                          rows: np.ndarray | GalleryRows, identities: list[str]
                          ) -> tuple[np.ndarray, np.ndarray] | None:
    """The within-identity whitening a checkpoint's index searches in, fitted on this gallery,
    where training chose it on validation (``whiten_output``) and the index is a fresh FAISS
    one (an edit keeps its map); None otherwise."""
    from index.rows import GalleryRows
    from index.whitening import MAX_FIT_IMAGES, fit_on_gallery

    if encoder is None or not encoder.whiten or manifest is not None or opts.backend == "milvus":
        return None  # a Milvus build of such a model is refused before embedding
    if not opts.whiten:
        log.warning("--no-whiten: searching plain cosine, though the model's threshold was "
                    "calibrated whitened within identities (its validation chose that)")
        return None
    if len(identities) > MAX_FIT_IMAGES:
        log.info("fitting the whitening on about %d images of whole identities drawn at random",
                 MAX_FIT_IMAGES)
    fitted = fit_on_gallery(GalleryRows.of(rows).array(), identities)
    if fitted is None:
        log.warning("the model searches whitened within identities, but no two identities of "
                    "this gallery have two images to fit the map on: searching plain cosine")
        return None
    log.info("the gallery and every query are whitened within identities, as the model's "
             "validation chose (a map fitted on this gallery, stored with the index)")
    return fitted


def _empty_message(opts: BuildOptions, current: Current) -> str:
    if current.manifest is not None:
        return (f"removing {', '.join(opts.remove)} would leave index {opts.out} empty: delete the "
                "folder instead, or append other images in the same run")
    return (f"no readable images in gallery {opts.gallery}: every image was skipped as unreadable "
            "(see the warning above); fix or replace them")
