"""The gallery index on disk: one folder, written atomically, checked when read.

Layout of an index folder::

    manifest.json         what built it (model fingerprint + spec, tta, new_whale threshold), the
                          FAISS type and parameters, counts, times, and which data folder holds
                          the current files, with the size + sha256 of each
    data-<id>/index.faiss      the FAISS index (CPU form; moved to GPUs when loaded on a machine with some)
    data-<id>/gallery.parquet  one row per vector: path, identity, vector_id (= FAISS id = row number)
    data-<id>/vectors.npy      the float32 gallery vectors as searched (the model's embeddings,
                               whitened where whitening.npz says so), so --append /
                               --remove-identity / a change of index type rebuild exactly without
                               re-embedding a single image
    data-<id>/whitening.npz    the within-identity whitening map (mean, matrix) the stored vectors
                               went through and every query goes through, only where the model
                               entry records ``whitening`` (zero-shot indexes that chose it)
    data-<id>/hubness.npy      each row's hubness (``index.hubness``), only where the model's
                               manifest entry records a hubness correction; measured again on
                               every write, so an append gives what a fresh build gives
    data-<id>/local.npy        each row's local descriptors (N, L, C) float16, centred on
    data-<id>/local_mean.npy   the mean descriptor and normalised (``index.local_match``), only
                               where the model entry records a ``local`` share: each query's
                               shortlist is re-scored with them; an edit keeps the mean

Rows are kept sorted by image path: any sequence of appends and removals then writes the same
files as one fresh build of the same images.

How a write stays safe (``save_index``):

* the new files go into a fresh ``data-<id>`` folder, flushed to disk;
* ``manifest.json`` is replaced by one atomic file rename (POSIX ``rename``; no folder is ever
  renamed, so nothing depends on Linux's ``renameat2``): before it readers see the old index,
  after it the new one, and a crash at any point leaves one of the two whole;
* then the superseded data folder is deleted. Only files the index owns are ever deleted: a
  README or report a user keeps in the folder survives every rebuild and append.

With ``backend: milvus`` (``index.milvus``) the vectors and the gallery table live in a Milvus
collection; the folder keeps the manifest (naming the URI and the collection, never a password) and
the attachments, written the same atomic way.

A folder counts as an index only if its manifest validates completely (format tag, schema, field
types and bounds): a project folder that happens to hold some other ``manifest.json`` is never
written into. ``--out`` given as a symlink is resolved once; the lock, the writes and the clean-up
all use the real path, so two spellings of one index are serialised by one lock.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Literal, Sequence, TypeVar

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import types
from .errors import (IndexCorrupt, IndexNotFound, InvalidGallery, NotAnIndex, NotReplaceable,
                     WrongBackend)
from .hubness import K as HUBNESS_K
from .hubness import gallery_hubness
from .local_match import LocalGallery, write_descriptors
from .rows import GalleryRows, non_finite_rows, write_rows
from .search import GalleryIndex
from .types import IndexSpec

if TYPE_CHECKING:
    from .milvus import MilvusGallery

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT = "whale-gallery-index/2"
FORMAT_V1 = "whale-gallery-index/1"  # files beside the manifest; read, and upgraded on write
METRIC = "inner_product"  # on L2-normalised vectors: cosine similarity
DEFAULT_INDEX_DIR = "runs/index"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
TABLE_FILE = "gallery.parquet"
VECTORS_FILE = "vectors.npy"
DATA_FILES = (INDEX_FILE, TABLE_FILE, VECTORS_FILE)
# each row's hubness (index.hubness), written where the model searches with the correction
HUBNESS_FILE = "hubness.npy"
# the within-identity whitening the gallery vectors went through (index.whitening), where the
# model entry records ``whitening``: queries go through it too (``StoredIndex.to_gallery_space``)
WHITENING_FILE = "whitening.npz"
# the local descriptors and their mean (index.local_match), where the model entry records a
# ``local`` share
LOCAL_FILE = "local.npy"
LOCAL_MEAN_FILE = "local_mean.npy"
# files the model side may keep with an index (opaque here: listed, checksummed, carried along)
ATTACHMENTS = ("encoder.onnx",)
OPTIONAL_FILES = (HUBNESS_FILE, WHITENING_FILE, LOCAL_FILE, LOCAL_MEAN_FILE)
DATA_DIR_PATTERN = re.compile(r"^data-[0-9a-f]{12}$")
MANIFEST_TEMP_PATTERN = re.compile(r"^\.manifest\.json\.[0-9a-f]{12}\.tmp$")
MAX_DIM = 65_536
MAX_COUNT = 10**10


# ----------------------------------------------------------------------------- the manifest

class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    bytes: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ModelEntry(BaseModel):
    """Which model embedded the gallery. The index checks only the fingerprint; the rest
    (checkpoint path, model config, preprocessing) belongs to ``retrieval``, which validates it."""

    model_config = ConfigDict(extra="allow", strict=True)

    fingerprint: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    source: Literal["checkpoint", "pretrained"]
    checkpoint: str | None = None

    @model_validator(mode="after")
    def _hubness_is_a_weight(self) -> "ModelEntry":
        """``hubness`` (kept only where a model has one): the correction weight, 0 to 1."""
        value = (self.model_extra or {}).get("hubness", 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"hubness must be a weight from 0 to 1, not {value!r}")
        if not isinstance((self.model_extra or {}).get("whitening", False), bool):
            raise ValueError("whitening must be true or false")
        share = (self.model_extra or {}).get("local", 0.0)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"local must be a share from 0 to 1, not {share!r}")
        return self


class IndexEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal[types.INDEX_TYPES]  # type: ignore[valid-type]
    params: dict[str, Annotated[int, Field(ge=1, le=MAX_COUNT)]] = {}
    requested: Literal[types.CHOICES]  # type: ignore[valid-type]
    target_recall: Annotated[float, Field(gt=0, le=1)] | None = None
    recall: Annotated[float, Field(ge=0, le=1)] | None = None

    @model_validator(mode="after")
    def _has_its_params(self) -> "IndexEntry":
        missing = sorted(set(types.REQUIRED_PARAMS[self.kind]) - set(self.params))
        if missing:
            raise ValueError(f"a {self.kind} index needs parameters {', '.join(missing)}")
        return self


class MilvusEntry(BaseModel):
    """Where a Milvus-backed index's vectors live (``index.milvus``); never a credential."""

    model_config = ConfigDict(extra="forbid", strict=True)

    uri: Annotated[str, Field(min_length=1, max_length=4096)]
    collection: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")]


class Counts(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    images: Annotated[int, Field(ge=1, le=MAX_COUNT)]
    identities: Annotated[int, Field(ge=1, le=MAX_COUNT)]


class ManifestSchema(BaseModel):
    """The manifest's JSON, checked field by field when read and before it is written: a
    manifest is a file people share and edit by hand."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal[FORMAT, FORMAT_V1]
    dim: Annotated[int, Field(ge=1, le=MAX_DIM)]
    model: ModelEntry
    tta: Annotated[str, Field(pattern=r"^[a-z]{1,16}$")]
    threshold: float | None
    threshold_source: Literal["checkpoint", "gallery", "user"] | None = None
    index: IndexEntry
    counts: Counts
    created: Annotated[str, Field(max_length=64)]
    updated: Annotated[str, Field(max_length=64)]
    files: dict[str, FileEntry]
    metric: Literal[METRIC]
    data_dir: Annotated[str, Field(pattern=r"^(data-[0-9a-f]{12})?$")] = ""  # "" in format 1
    backend: Literal["faiss", "milvus"] = "faiss"
    milvus: MilvusEntry | None = None

    @field_validator("threshold")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number or null")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ManifestSchema":
        if self.backend == "milvus":
            if self.milvus is None or self.format != FORMAT or not set(self.files) <= set(ATTACHMENTS):
                raise ValueError(f"a Milvus-backed index names its collection, is of format "
                                 f"{FORMAT} and may list only {', '.join(ATTACHMENTS)}")
        elif self.milvus is not None:
            raise ValueError("a FAISS index names no Milvus collection")
        elif not set(DATA_FILES) <= set(self.files) <= set(DATA_FILES + OPTIONAL_FILES + ATTACHMENTS):
            raise ValueError(f"files must list {', '.join(DATA_FILES)}, and may list "
                             f"{', '.join(OPTIONAL_FILES + ATTACHMENTS)}")
        if self.model.model_dump().get("whitening") and (self.backend == "milvus"
                                                         or WHITENING_FILE not in self.files):
            raise ValueError(f"a whitened gallery needs the FAISS backend and its {WHITENING_FILE}")
        if hubness_weight(self.model.model_dump()) and (self.backend == "milvus"
                                                        or HUBNESS_FILE not in self.files):
            raise ValueError(f"a model with a hubness correction needs the FAISS backend and "
                             f"its {HUBNESS_FILE}")
        if local_share(self.model.model_dump()) and (self.backend == "milvus" or not {
                LOCAL_FILE, LOCAL_MEAN_FILE} <= set(self.files)):
            raise ValueError(f"a gallery searched with local descriptors needs the FAISS backend, "
                             f"its {LOCAL_FILE} and {LOCAL_MEAN_FILE}")
        if self.counts.identities > self.counts.images:
            raise ValueError("more identities than images")
        if self.format == FORMAT and not self.data_dir:
            raise ValueError(f"format {FORMAT} names its data folder")
        return self


@dataclass
class Manifest:
    """Everything needed to trust and use an index without opening its other files
    (plain values, as validated by ``ManifestSchema``)."""

    dim: int
    model: dict[str, Any]  # fingerprint, source, checkpoint, model_config, preprocessing
    tta: str  # "none" or "flip": applied to queries exactly as to the gallery
    threshold: float | None  # new_whale threshold (None: never insert new_whale)
    index: dict[str, Any]  # IndexSpec.to_dict()
    counts: dict[str, int]
    created: str
    updated: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = METRIC
    format: str = FORMAT
    data_dir: str = ""  # the data-<id> folder holding the files ("" for format 1: beside it)
    # where the threshold came from: the checkpoint's validation, the gallery itself
    # (retrieval.gallery_threshold, for the zero-shot model), or the user (build_index --threshold)
    threshold_source: str | None = None
    backend: str = "faiss"  # where the vectors live: this folder (faiss) or a Milvus collection
    milvus: dict[str, str] | None = None  # {"uri", "collection"} for the milvus backend

    @classmethod
    def validated(cls, values: Any) -> "Manifest":
        """Checked against ``ManifestSchema`` (raises pydantic's ValidationError)."""
        return cls(**ManifestSchema.model_validate(values).model_dump())

    @property
    def fingerprint(self) -> str:
        return self.model["fingerprint"]

    @property
    def attachments(self) -> list[str]:
        return [name for name in ATTACHMENTS if name in self.files]

    @property
    def spec(self) -> IndexSpec:
        return IndexSpec.from_dict(self.index)

    def to_json(self) -> str:
        values = asdict(self)
        if self.backend == "faiss":  # as before the Milvus backend: older versions still read it
            del values["backend"], values["milvus"]
        values["index"] = IndexSpec.from_dict(self.index).to_dict()  # untuned: no recall fields
        return json.dumps(values, indent=2, sort_keys=True) + "\n"


@dataclass
class StoredIndex:
    """An index read back from disk: its manifest, its gallery table and the searchable index."""

    directory: Path
    manifest: Manifest
    paths: list[str]
    identities: list[str]
    gallery: GalleryIndex | MilvusGallery  # what ``search`` goes through
    # (mean, matrix) of the within-identity whitening the gallery went through (None: none)
    whitening: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def local(self) -> LocalGallery | None:
        """The gallery's local descriptors where its search re-scores with them (queries then
        need their maps: ``search``), else None."""
        return getattr(self.gallery, "local", None)

    def search(self, vectors: np.ndarray, k: int, maps: np.ndarray | None = None):
        """The ``IdentityRanking`` of query embeddings (the model's own: brought into the
        gallery's space here) and, for an index with local descriptors, their raw maps
        (Q, L, C)."""
        local = self.local
        if local is not None and maps is None:
            raise ValueError("this index re-scores with local descriptors: the queries' maps "
                             "are needed (Encoder.encode(..., maps=True))")
        if local is None:
            return self.gallery.search(self.to_gallery_space(vectors), k)
        return self.gallery.search(self.to_gallery_space(vectors), k, local.queries(maps))

    def embeddings(self) -> np.ndarray:
        """The model's own embeddings of the gallery: ``vectors()`` with the gallery's whitening
        undone (``index.whitening.unwhiten``). What the gallery audit judges labels on: a map
        fitted on the gallery's labels absorbs part of a wrong label's deviation."""
        vectors = self.vectors()
        if self.whitening is None:
            return vectors
        from .whitening import unwhiten

        return unwhiten(vectors, *self.whitening)

    def to_gallery_space(self, vectors: np.ndarray) -> np.ndarray:
        """Query embeddings as the gallery vectors were stored: whitened where the gallery was
        (``index.whitening``), else as they are. Every search of this index goes through it."""
        if self.whitening is None:
            return vectors
        from .whitening import whiten

        return whiten(vectors, *self.whitening)

    def attachment(self, name: str) -> Path | None:
        """The path of an attached file (checked against the manifest), or None if it has none."""
        if name not in self.manifest.files:
            return None
        return _verified(self.directory, name, self.manifest)

    def best_images(self, ranking) -> list[list[str]]:
        """The path of each ranked identity's best image, per query (``IdentityRanking``)."""
        if ranking.images is not None:
            return ranking.images
        return [[self.paths[int(row)] for row in rows[:len(ids)]]
                for ids, rows in zip(ranking.identities, ranking.best_rows)]

    def vectors(self, mmap: bool = False) -> np.ndarray:
        """The gallery vectors as searched (checked against the manifest), row for row with
        ``paths``: the model's embeddings, whitened where the index is (``embeddings``);
        ``mmap``: memory-mapped read-only instead of read into memory (a long-running reader that
        already holds FAISS's copy)."""
        if self.manifest.backend != "faiss":
            raise _wrong_backend(self.directory, self.manifest)
        path = _verified(self.directory, VECTORS_FILE, self.manifest)
        try:
            vectors = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise _corrupt(path, f"{type(err).__name__}: {err}") from None
        if vectors.dtype != np.float32 or vectors.shape != (len(self.paths), self.manifest.dim):
            raise _corrupt(path, f"{vectors.dtype} array of shape {vectors.shape}, expected float32 "
                                 f"({len(self.paths)}, {self.manifest.dim})")
        if len(non_finite_rows(vectors)):
            raise _corrupt(path, "it holds NaN or infinite values")
        return vectors


# ----------------------------------------------------------------------------- writing

def hubness_weight(model: dict[str, Any]) -> float:
    """The hubness correction weight a manifest's ``model`` entry records (0: none)."""
    return float(model.get("hubness") or 0.0)


def local_share(model: dict[str, Any]) -> float:
    """The local descriptors' share in a gallery image's score that a manifest's ``model``
    entry records (0: the pooled cosine alone)."""
    return float(model.get("local") or 0.0)


def save_index(directory: str | Path, vectors: "np.ndarray | GalleryRows", paths: Sequence[str],
               identities: Sequence[str], *, model: dict[str, Any], tta: str,
               threshold: float | None, index_type: str | IndexSpec = "flat",
               created: str | None = None, threshold_source: str | None = None,
               attachments: dict[str, Path] | None = None,
               target_recall: float | None = None, gpu_float16: bool = False,
               whitening: tuple[np.ndarray, np.ndarray] | None = None,
               local: tuple[float, np.ndarray, list] | None = None) -> Manifest:
    """Build the FAISS index over ``vectors`` and write it into ``directory`` atomically.

    ``vectors`` may be memory-mapped, or a ``GalleryRows`` over several parts (what stays of a
    stored index and the new embeddings): they are checked and written into the new
    ``vectors.npy`` a chunk at a time, sorted by path, and the index is built from that file,
    memory-mapped, so a gallery larger than half the RAM is never held twice.
    ``index_type`` is a name (``auto`` resolves by gallery size) or an already resolved spec.
    An approximate type's search parameter is tuned to ``target_recall`` (default
    ``index.tuning.DEFAULT_TARGET``; or the spec's own) on the gallery's own vectors.
    ``gpu_float16``: flat / ivf vectors are stored in float16 where the index is searched on
    GPUs (a search-time parameter, ``float16`` in the manifest; ``types.to_devices``).
    ``whitening``: the (mean, matrix) the ``vectors`` already went through, stored for the queries
    (``StoredIndex.to_gallery_space``) and recorded in the model entry.
    ``local``: (share, mean descriptor, parts of the normalised descriptors row for row with
    ``vectors``: arrays or (array, selected rows) pairs), stored and recorded in the model entry
    for a search that re-scores each query's shortlist with them (``index.local_match``).
    ``attachments`` ({name in ATTACHMENTS: file}) are copied into the new data folder with it.
    A caller editing an existing index (read, change, write) holds ``writer_lock`` around it.
    """
    source = GalleryRows.of(vectors)
    if not len(source) == len(paths) == len(identities):
        raise ValueError(f"{len(paths)} paths, {len(identities)} identities, vectors {source.shape}")
    if len(source) == 0:
        raise InvalidGallery("the gallery index would be empty: it needs at least one image")
    broken = non_finite_rows(source)
    if len(broken):
        raise InvalidGallery(f"the model gave NaN or infinite embeddings for {len(broken)} image(s), "
                             f"e.g. {paths[broken[0]]}: the model is damaged")
    order = np.argsort(np.asarray(paths, dtype=str), kind="stable")
    paths = [str(paths[i]) for i in order]
    identities = [str(identities[i]) for i in order]
    requested = index_type.requested if isinstance(index_type, IndexSpec) else index_type
    if target_recall is None and isinstance(index_type, IndexSpec):
        target_recall = index_type.target_recall
    spec = types.resolve(requested, len(source), source.dim, float16=gpu_float16)
    target = real_path(directory)
    previous = check_replaceable(target)
    attachments = dict(attachments or {})
    _check_attachments(attachments)
    writers = {VECTORS_FILE: lambda path: write_rows(path, source, order),
               TABLE_FILE: lambda path: _write_table(path, paths, identities)}
    model = {key: value for key, value in model.items() if key not in ("whitening", "local")}
    if local is not None:
        share, mean, parts = local
        writers[LOCAL_FILE] = lambda path: write_descriptors(path, parts, order)
        writers[LOCAL_MEAN_FILE] = lambda path: np.save(path, np.asarray(mean, dtype=np.float32))
        model["local"] = float(share)
    data_dir = _write_data_dir(target, writers, attachments)
    try:
        stored = np.load(data_dir / VECTORS_FILE, mmap_mode="r", allow_pickle=False)
        log.info("building a %s index of %d vectors", spec.kind, len(stored))
        faiss_index = types.build(stored, spec)
        built = GalleryIndex.from_faiss(faiss_index, identities, spec, stored)
        spec = _tuned(built, stored, identities, target_recall)
        if _auto_missed_its_target(spec, len(stored), source.dim):
            faiss_index = types.build(stored, spec := _exact_instead(spec))
            built = GalleryIndex.from_faiss(faiss_index, identities, spec, stored)
        faiss.write_index(faiss_index, str(data_dir / INDEX_FILE))
        names = [INDEX_FILE, *writers]
        if whitening is not None:
            _write_whitening(data_dir / WHITENING_FILE, whitening, source.dim)
            names.append(WHITENING_FILE)
            model["whitening"] = True
        if hubness_weight(model):
            log.info("measuring the hubness of %d gallery images", len(stored))
            np.save(data_dir / HUBNESS_FILE, _hubness(data_dir, stored, built, model))
            _fsync(data_dir / HUBNESS_FILE)
            names.append(HUBNESS_FILE)
        del faiss_index, stored, built
        _fsync(data_dir / INDEX_FILE)
        _fsync(data_dir)
        values = _manifest_values(source.dim, model, tta, threshold, threshold_source, spec,
                                  {"images": len(paths), "identities": len(set(identities))},
                                  created)
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return _publish(target, data_dir, values, [*names, *attachments], previous)


def _hubness(data_dir: Path, vectors: np.ndarray, built: GalleryIndex,
             model: dict[str, Any]) -> np.ndarray:
    """Each row's hubness on the scores the index searches with: the pooled cosine, or, with
    local descriptors, the blended score (``LocalGallery.hubness``)."""
    if not local_share(model):
        return gallery_hubness(vectors, neighbours=built.neighbours)
    local = LocalGallery(local_share(model), np.load(data_dir / LOCAL_MEAN_FILE),
                         np.load(data_dir / LOCAL_FILE, mmap_mode="r"))
    return local.hubness(vectors, built.neighbours, HUBNESS_K).astype(np.float32)


def _tuned(gallery: GalleryIndex, vectors: np.ndarray, identities: list[str],
           target: float | None) -> IndexSpec:
    """The gallery's spec with its search parameter set by measured recall (``index.tuning``),
    measured through the gallery's own search (re-ranking included)."""
    from . import tuning

    spec = gallery.spec
    target = tuning.DEFAULT_TARGET if target is None else float(target)
    found = tuning.tune(gallery.cpu_index, spec, vectors, np.asarray(identities, dtype=object),
                        target, search=gallery.neighbours,
                        set_rerank=lambda factor: setattr(gallery, "rerank_factor", factor))
    return tuning.tuned_spec(spec, found, target, len(vectors))


def _write_whitening(path: Path, whitening: tuple[np.ndarray, np.ndarray], dim: int) -> None:
    mean, matrix = (np.asarray(part, dtype=np.float32) for part in whitening)
    if mean.shape != (dim,) or matrix.shape != (dim, dim):
        raise ValueError(f"a whitening of shapes {mean.shape}, {matrix.shape} for {dim}-d vectors")
    with open(path, "wb") as handle:
        np.savez(handle, mean=mean, matrix=matrix)
    _fsync(path)


def _auto_missed_its_target(spec: IndexSpec, n_vectors: int, dim: int) -> bool:
    """``auto`` picked an approximate type and tuning could not bring it to its target recall:
    the exact index replaces it where it fits in memory (``types.exact_fits_in_memory``)."""
    if spec.requested != "auto" or spec.recall is None or spec.recall >= spec.target_recall:
        return False
    if not types.exact_fits_in_memory(n_vectors, dim):
        log.warning("auto keeps its %s index below the target recall (%.3f < %.2f): an exact "
                    "index of %d x %d vectors would not fit in half this machine's memory",
                    spec.kind, spec.recall, spec.target_recall, n_vectors, dim)
        return False
    return True


def _exact_instead(spec: IndexSpec) -> IndexSpec:
    log.warning("auto: the %s index reached recall %.3f < the target %.2f after tuning; indexing "
                "the gallery exactly (flat) instead", spec.kind, spec.recall, spec.target_recall)
    kept = {"float16": 1} if spec.params.get("float16") else {}
    return IndexSpec("flat", kept, "auto", spec.target_recall, 1.0)


def save_milvus_manifest(directory: str | Path, *, dim: int, model: dict[str, Any], tta: str,
                         threshold: float | None, threshold_source: str | None, spec: IndexSpec,
                         counts: dict[str, int], uri: str, collection: str,
                         created: str | None = None,
                         attachments: dict[str, Path] | None = None) -> Manifest:
    """Point the index folder at a Milvus collection (already written by ``index.milvus``):
    the manifest and the attachments, committed the same atomic way as ``save_index``."""
    target = real_path(directory)
    previous = check_replaceable(target)
    values = {**_manifest_values(dim, model, tta, threshold, threshold_source, spec, counts, created),
              "backend": "milvus", "milvus": {"uri": uri, "collection": collection}}
    return _commit(target, values, {}, dict(attachments or {}), previous)


def _manifest_values(dim: int, model: dict[str, Any], tta: str, threshold: float | None,
                     threshold_source: str | None, spec: IndexSpec, counts: dict[str, int],
                     created: str | None) -> dict[str, Any]:
    """The manifest's fields common to both backends (``updated`` is now; ``created`` too for a
    new index)."""
    now = _now()
    return {"dim": int(dim), "model": dict(model), "tta": tta,
            "threshold": None if threshold is None else float(threshold),
            "threshold_source": None if threshold is None else threshold_source,
            "index": spec.to_dict(), "counts": dict(counts), "created": created or now,
            "updated": now, "metric": METRIC, "format": FORMAT}


def _commit(target: Path, values: dict[str, Any], writers: dict[str, Any],
            attachments: dict[str, Path], previous: Manifest | None) -> Manifest:
    """Write a new data folder, swap the manifest to it, then delete the superseded files."""
    _check_attachments(attachments)
    data_dir = _write_data_dir(target, writers, attachments)
    return _publish(target, data_dir, values, [*writers, *attachments], previous)


def _check_attachments(attachments: dict[str, Path]) -> None:
    unknown = sorted(set(attachments) - set(ATTACHMENTS))
    if unknown:
        raise ValueError(f"unknown attachment(s) {unknown}: an index carries only {ATTACHMENTS}")


def _publish(target: Path, data_dir: Path, values: dict[str, Any], names: Sequence[str],
             previous: Manifest | None) -> Manifest:
    """The commit point: the manifest naming ``data_dir``'s files (flushed already) replaces the
    old one; then the superseded data folder is deleted. On failure ``data_dir`` goes."""
    try:
        manifest = Manifest.validated({**values, "data_dir": data_dir.name, "files": {
            name: _describe(data_dir / name) for name in names}})
        _replace_manifest(target, manifest)
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    if previous is not None:
        _remove_data(target, previous)
    return manifest


def _write_data_dir(target: Path, writers: dict[str, Any], attachments: dict[str, Path]) -> Path:
    """A new ``data-<id>`` folder with the data files (``writers``: name -> function writing it
    to a path) and the attachments, flushed."""
    target.mkdir(parents=True, exist_ok=True)
    folder = target / f"data-{secrets.token_hex(6)}"
    folder.mkdir()
    try:
        for name, write in writers.items():
            write(folder / name)
        for name, source in attachments.items():
            shutil.copyfile(source, folder / name)
        for name in (*writers, *attachments):
            _fsync(folder / name)
        _fsync(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _write_table(path: Path, paths: list[str], identities: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"path": pa.array(paths, pa.string()),
                      "identity": pa.array(identities, pa.string()),
                      "vector_id": pa.array(np.arange(len(paths), dtype=np.int64))})
    pq.write_table(table, path)


def _replace_manifest(target: Path, manifest: Manifest) -> None:
    """The commit point: a temp file, flushed, renamed over ``manifest.json``, folder flushed."""
    temp = target / f".{MANIFEST}.{secrets.token_hex(6)}.tmp"
    try:
        temp.write_text(manifest.to_json())
        os.chmod(temp, 0o666 & ~_umask())
        _fsync(temp)
        os.replace(temp, target / MANIFEST)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync(target)


def _remove_data(target: Path, superseded: Manifest) -> None:
    """Delete the files of a superseded manifest: its data folder, or (format 1) the data
    files beside the manifest. Nothing else in the folder is touched."""
    if superseded.data_dir:
        _remove_data_dir(target / superseded.data_dir)
        return
    for name in DATA_FILES:
        (target / name).unlink(missing_ok=True)


def _remove_data_dir(folder: Path) -> None:
    """A data folder's own files, then the folder if that leaves it empty (a user's file put
    inside it is kept, with a warning); a symlink is unlinked, never followed."""
    if folder.is_symlink() or not folder.is_dir():
        folder.unlink(missing_ok=True)
        return
    for name in DATA_FILES + OPTIONAL_FILES + ATTACHMENTS:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        log.warning("kept %s: it holds files the index did not write", folder)


def real_path(directory: str | Path) -> Path:
    """``directory`` with every symlink resolved, once: the lock, the writes and the clean-up
    then act on the real folder however the user spelled it."""
    return Path(directory).expanduser().resolve()


def check_replaceable(target: Path) -> Manifest | None:
    """Only write into a new or empty folder, or one holding a valid index manifest: a typo in
    --out must never mix an index into a folder of photos or overwrite another manifest.json.
    Returns the manifest being replaced (None for a new or empty folder)."""
    if not target.exists():
        return None
    if not target.is_dir():
        raise NotReplaceable(f"{target} exists and is not a folder", target)
    manifest = target / MANIFEST
    if manifest.is_file() or manifest.is_symlink():
        try:
            return _parse_manifest(target)
        except IndexCorrupt as err:
            raise NotReplaceable(f"{target} holds a {MANIFEST} that is not a valid gallery index "
                                 f"manifest ({err.detail}); if it is a damaged index, delete that "
                                 "folder yourself first", target) from None
    if any(not _is_leftover(entry) for entry in target.iterdir()):
        raise NotReplaceable(f"{target} exists and is not a gallery index", target)
    return None


def _is_leftover(entry: Path) -> bool:
    """What a crashed writer of this index may leave behind."""
    return bool(DATA_DIR_PATTERN.match(entry.name) or MANIFEST_TEMP_PATTERN.match(entry.name))


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a power cut after the rename cannot leave empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def writer_lock(directory: str | Path) -> Iterator[Path]:
    """Serialise writers of one index (a read-modify-write like --append must not interleave);
    readers need no lock since the manifest swap is atomic. Yields the real path of the index.

    Under the lock, an index left half-moved by an older version's two-rename swap is put
    back, and data folders of crashed writers are cleared."""
    target = real_path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic manifest swap still protects readers
        yield target
        return
    with open(target.with_name(f".{target.name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process writing %s", target)
            fcntl.flock(handle, fcntl.LOCK_EX)
        _recover_legacy_backup(target)
        _clear_leftovers(target)
        yield target


def _recover_legacy_backup(target: Path) -> None:
    """Format 1 replaced the whole folder with two renames where ``renameat2`` was missing; a
    crash between them left the index only in ``.NAME.old-PID``. Put the newest such backup
    back instead of starting a fresh index over it."""
    if target.exists() or target.is_symlink():
        return
    backups = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    for backup in reversed(backups):
        if (backup / MANIFEST).is_file():
            os.rename(backup, target)
            log.warning("recovered index %s from %s, left by an interrupted write", target, backup.name)
            return


def _clear_leftovers(target: Path) -> None:
    """Data folders no manifest points at and manifest temp files: what crashed writers left."""
    if not target.is_dir():
        return
    current = _read_valid_manifest(target)
    keep = current.data_dir if current is not None else None
    for entry in target.iterdir():
        if MANIFEST_TEMP_PATTERN.match(entry.name):
            entry.unlink(missing_ok=True)
        elif DATA_DIR_PATTERN.match(entry.name) and entry.name != keep and current is not None:
            _remove_data_dir(entry)


# ----------------------------------------------------------------------------- reading

def read_manifest(directory: str | Path) -> Manifest:
    """The manifest alone (cheap): fails with a clear message if ``directory`` is not an index."""
    return _parse_manifest(Path(directory))


def _parse_manifest(directory: Path) -> Manifest:
    if not directory.is_dir():
        raise _not_found(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise NotAnIndex(f"{directory} is not a gallery index (no {MANIFEST})", directory)
    try:
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise _corrupt(path, str(err)) from None
    found = values.get("format") if isinstance(values, dict) else None
    if found not in (FORMAT, FORMAT_V1):
        raise IndexCorrupt(f"{directory} holds an index of format {found!r}, this version reads "
                           f"{FORMAT!r}", directory)
    try:
        return Manifest.validated(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"])) or "manifest"
        raise _corrupt(path, f"{where}: {first['msg']}") from None


def _read_valid_manifest(directory: Path) -> Manifest | None:
    try:
        return _parse_manifest(directory)
    except (IndexCorrupt, NotAnIndex, IndexNotFound):
        return None


def load_index(directory: str | Path, attempts: int = 3,
               backends: Sequence[str] = ("faiss", "milvus")) -> StoredIndex:
    """Read and check an index folder (``backends``: those the caller can use; another is
    refused before any connection is made). A writer swapping the manifest meanwhile makes it
    read again (``read_while_unchanged``)."""
    directory = Path(directory)
    return read_while_unchanged(directory, lambda: _load_once(directory, backends), attempts)


def read_while_unchanged(directory: str | Path, read: Callable[[], T], attempts: int = 3) -> T:
    """``read()``, which reads files of the index in ``directory``, run again when it fails on a
    missing or different file and the manifest has changed meanwhile.

    Readers take no lock: a writer may swap the manifest while they read, after which the old
    data folder goes away. A file of the old folder then turns out missing, which says "the
    index moved on", not "the index is damaged": the read starts again from the new manifest.
    A long-lived reader (the server's snapshot reading its vectors on first use) needs this as
    much as ``load_index`` does."""
    directory = Path(directory)
    for attempt in range(attempts):
        before = _manifest_bytes(directory)
        try:
            return read()
        except (IndexCorrupt, IndexNotFound, NotAnIndex):
            if attempt + 1 == attempts or _manifest_bytes(directory) == before:
                raise
            log.info("index %s changed while being read: reading it again", directory)
    raise AssertionError("unreachable")


def _manifest_bytes(directory: Path) -> bytes | None:
    try:
        return (directory / MANIFEST).read_bytes()
    except OSError:
        return None


def _load_once(directory: Path, backends: Sequence[str]) -> StoredIndex:
    manifest = _parse_manifest(directory)
    if manifest.backend not in backends:
        raise _wrong_backend(directory, manifest)
    if manifest.backend == "milvus":
        return _load_milvus(directory, manifest)
    faiss_index = _read_faiss(_verified(directory, INDEX_FILE, manifest))
    paths, identities = _read_table(_verified(directory, TABLE_FILE, manifest))
    counts = manifest.counts
    if not faiss_index.ntotal == len(paths) == counts["images"] or faiss_index.d != manifest.dim:
        raise _corrupt(directory / INDEX_FILE, f"{faiss_index.ntotal} vectors of dimension "
                       f"{faiss_index.d}, {len(paths)} table rows, manifest says "
                       f"{counts['images']} of dimension {manifest.dim}")
    if len(set(identities)) != counts["identities"]:
        raise _corrupt(directory / TABLE_FILE, f"{len(set(identities))} identities, manifest "
                                               f"says {counts['identities']}")
    stored = StoredIndex(directory, manifest, paths, identities, None)
    raw = stored.vectors(mmap=True) if manifest.spec.kind == "ivfpq" else None  # re-ranking
    stored.gallery = GalleryIndex.from_faiss(faiss_index, identities, manifest.spec, raw,
                                             _penalty(directory, manifest),
                                             _local(directory, manifest))
    stored.whitening = _whitening(directory, manifest)
    return stored


def _whitening(directory: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """The (mean, matrix) the gallery went through, None where the model entry records none."""
    if not manifest.model.get("whitening"):
        return None
    path = _verified(directory, WHITENING_FILE, manifest)
    dim = manifest.dim
    try:
        with np.load(path, allow_pickle=False) as parts:
            mean, matrix = parts["mean"], parts["matrix"]
    except (OSError, ValueError, KeyError) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    if mean.shape != (dim,) or matrix.shape != (dim, dim) or mean.dtype != np.float32 \
            or matrix.dtype != np.float32 or not (np.isfinite(mean).all() and np.isfinite(matrix).all()):
        raise _corrupt(path, f"a mean {mean.shape} {mean.dtype} and matrix {matrix.shape} "
                             f"{matrix.dtype}, expected finite float32 ({dim},) and ({dim}, {dim})")
    return mean, matrix


def _local(directory: Path, manifest: Manifest) -> LocalGallery | None:
    """The gallery's local descriptors (memory-mapped) and their mean, None where the model
    entry records no ``local`` share."""
    share = local_share(manifest.model)
    if not share:
        return None
    mean_path = _verified(directory, LOCAL_MEAN_FILE, manifest)
    path = _verified(directory, LOCAL_FILE, manifest)
    try:
        mean = np.load(mean_path, allow_pickle=False)
        descriptors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    if mean.ndim != 1 or mean.dtype != np.float32 or not np.isfinite(mean).all():
        raise _corrupt(mean_path, f"a {mean.shape} {mean.dtype} array, expected finite float32 (C,)")
    if descriptors.dtype != np.float16 or descriptors.ndim != 3 or \
            descriptors.shape[0] != manifest.counts["images"] or descriptors.shape[2] != len(mean):
        raise _corrupt(path, f"a {descriptors.shape} {descriptors.dtype} array, expected float16 "
                             f"({manifest.counts['images']}, locations, {len(mean)})")
    return LocalGallery(share, mean, descriptors)


def _penalty(directory: Path, manifest: Manifest) -> np.ndarray | None:
    """The hubness correction per row (weight x ``hubness.npy``), None where the model has none."""
    weight = hubness_weight(manifest.model)
    if not weight:
        return None
    path = _verified(directory, HUBNESS_FILE, manifest)
    try:
        hubness = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    if hubness.shape != (manifest.counts["images"],) or hubness.dtype != np.float32 \
            or not np.isfinite(hubness).all():
        raise _corrupt(path, f"{hubness.shape} {hubness.dtype} values, expected "
                             f"{manifest.counts['images']} finite float32")
    return weight * hubness


def _load_milvus(directory: Path, manifest: Manifest) -> StoredIndex:
    """A Milvus-backed index: the collection checked as this index's own (the gallery table lives
    there, so ``paths`` and ``identities`` stay empty; answers carry their image paths)."""
    from . import milvus

    for name in manifest.attachments:
        _verified(directory, name, manifest)
    entry = manifest.milvus
    client = milvus.connect(entry["uri"])
    milvus.check_ours(client, entry["collection"], manifest.fingerprint, manifest.dim)
    gallery = milvus.MilvusGallery(client, entry["collection"], manifest.dim,
                                   manifest.counts["identities"], manifest.counts["images"],
                                   manifest.spec)
    return StoredIndex(directory, manifest, [], [], gallery)


def _read_faiss(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise _corrupt(path, str(err).splitlines()[-1][:200]) from None


def _read_table(path: Path) -> tuple[list[str], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # ParquetFile, not read_table: the latter goes through pyarrow.dataset, which imports
        # pandas (0.25 s and ~100 MB for query.py's cold start)
        table = pq.ParquetFile(path).read(columns=["path", "identity", "vector_id"])
    except Exception as err:  # pyarrow raises several types for damaged files
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    for name in ("path", "identity"):
        column = table.column(name)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            raise _corrupt(path, f"column {name} holds {column.type}, not text")
        if column.null_count:
            raise _corrupt(path, f"{column.null_count} row(s) have no {name}")
    ids = _int64_values(path, table.column("vector_id").combine_chunks())
    if not np.array_equal(ids, np.arange(len(ids))):
        raise _corrupt(path, "vector ids are not 0..N-1")
    return table.column("path").to_pylist(), table.column("identity").to_pylist()


def _int64_values(path: Path, column) -> np.ndarray:
    """An int64 column as NumPy, read from its buffer: pyarrow's own ``to_numpy`` imports pandas
    (a quarter of a second of query.py's cold start)."""
    import pyarrow as pa

    if not pa.types.is_int64(column.type) or column.null_count:
        raise _corrupt(path, f"column vector_id holds {column.type} with {column.null_count} null(s)")
    if len(column) == 0:
        return np.zeros(0, dtype=np.int64)
    values = np.frombuffer(column.buffers()[1], dtype=np.int64)
    return values[column.offset:column.offset + len(column)]


def _verified(directory: Path, name: str, manifest: Manifest) -> Path:
    """The data file ``name`` if its size and sha256 match the manifest; else ``IndexCorrupt``."""
    path = directory / manifest.data_dir / name
    expected = manifest.files[name]  # the schema guarantees every data file has an entry
    if not path.is_file():
        raise IndexCorrupt(f"{path} is missing", path)
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise IndexCorrupt(f"{path} is truncated or damaged ({size} bytes, expected "
                           f"{expected['bytes']})", path)
    if _sha256(path) != expected["sha256"]:
        raise IndexCorrupt(f"{path} is corrupt (checksum mismatch)", path)
    return path


def _wrong_backend(directory: Path, manifest: Manifest) -> WrongBackend:
    return WrongBackend(f"index {directory} keeps its vectors in Milvus collection "
                        f"{manifest.milvus['collection']!r}, not in the folder: this needs an index "
                        "built with the default FAISS backend (build_index.py without --backend)",
                        directory)


def _corrupt(path: Path, detail: str) -> IndexCorrupt:
    return IndexCorrupt(f"{path} is corrupt ({detail})", path, detail)


def _not_found(directory: Path) -> IndexNotFound:
    backups = sorted(directory.parent.glob(f".{directory.name}.old-*")) if directory.parent.is_dir() else []
    if backups:
        return IndexNotFound(f"index folder {directory} does not exist, but an interrupted write "
                             f"left the previous index in {backups[-1]}", directory, backups[-1])
    return IndexNotFound(f"index folder {directory} does not exist", directory)


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
