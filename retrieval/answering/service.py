"""The engine kept warm: one loaded model and index that answer photos and learn new ones.

``GalleryService`` is what serve.py puts behind HTTP, free of any web framework, so it can be used
and tested on its own. It is safe to call from many threads at once:

* **queries** read an immutable snapshot of the index (swapped in by one reference assignment), so
  they keep being answered while a photo is appended; a snapshot reads its vectors on first use,
  and should an append have deleted them by then, the query is answered again from the new
  snapshot (``index.store.read_while_unchanged``);
* **edits** (append a photo, remove an identity) are read-modify-write under a thread lock and the
  index folder's writer lock (``index.store.writer_lock``, which also serialises other processes
  such as ``build_index.py --append``). They read the index from disk, not from memory, so nothing
  another writer committed is lost, and they commit with ``save_index``'s atomic manifest swap: a
  crash leaves the index as before or as after. An edit returns only after that commit, so an
  acknowledged photo survives a restart;
* an uploaded photo is stored in the index folder under ``uploads/``, named by the SHA-256 of its
  bytes (never by anything the client sends, so no upload can write elsewhere): the same photo
  sent twice is the same gallery image, never a duplicate.

The index is re-read when its manifest changes on disk (another process appended), checked by one
``stat`` per request.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import NEW_WHALE
from ..errors import UserError

log = logging.getLogger(__name__)

UPLOADS_DIR = "uploads"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a 48-Mpixel phone JPEG is ~15 MB
MAX_IDENTITY_LENGTH = 100
IMAGES_PER_CANDIDATE = 3  # gallery images shown per answered identity
_FORMAT_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
                      "WEBP": ".webp", "PPM": ".ppm"}


class NotFound(UserError):
    """An identity or image the gallery does not hold (HTTP 404)."""


class Conflict(UserError):
    """The request contradicts the gallery's state, e.g. a new identity that exists (HTTP 409)."""


class TooLarge(UserError):
    """An upload over ``MAX_UPLOAD_BYTES`` (HTTP 413)."""


@dataclass(frozen=True)
class GalleryImage:
    id: str  # stable name of a gallery image for URLs: a hash of its path
    identity: str
    similarity: float | None = None  # to the query, where there is one


@dataclass
class Candidate:
    identity: str  # or new_whale
    similarity: float | None  # best image's similarity; None for new_whale
    images: list[GalleryImage] = field(default_factory=list)  # its best-matching gallery images


@dataclass
class Answer:
    candidates: list[Candidate]
    threshold: float | None

    @property
    def probably_new(self) -> bool:
        return bool(self.candidates) and self.candidates[0].identity == NEW_WHALE


@dataclass
class Added:
    identity: str
    image: GalleryImage
    added: bool  # False: this exact photo was already in the gallery under this identity
    images: int  # gallery size after the edit


class _Snapshot:
    """One committed state of the index, never changed once built: safe to share between threads."""

    def __init__(self, stored, stamp: tuple[int, ...]):
        self.stored = stored
        self.stamp = stamp
        self.paths: list[str] = stored.paths
        self.identities: list[str] = stored.identities
        self.image_ids = [image_id(path) for path in self.paths]
        self.row_of_id = {iid: row for row, iid in enumerate(self.image_ids)}
        self.rows_of: dict[str, list[int]] = {}
        for row, identity in enumerate(self.identities):
            self.rows_of.setdefault(identity, []).append(row)
        self._vectors: np.ndarray | None = None
        self._vectors_lock = threading.Lock()

    @property
    def vectors(self) -> np.ndarray:
        """The raw vectors, checked once, memory-mapped (not held twice beside FAISS's copy)."""
        with self._vectors_lock:
            if self._vectors is None:
                self._vectors = self.stored.vectors(mmap=True)
            return self._vectors


class _Batcher:
    """Dynamic batching without a waiting window: one thread runs the model; each pass takes every
    photo queued while the previous pass ran (up to ``max_batch``). A lone client's photo is
    embedded at once, as without batching; under load, concurrent photos share a forward pass."""

    def __init__(self, encode, max_batch: int = 16):
        import queue

        self._encode = encode
        self._max_batch = max_batch
        self._queue: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._run, name="embed-batcher", daemon=True).start()

    def submit(self, image: np.ndarray) -> np.ndarray:
        from concurrent.futures import Future

        future: Future = Future()
        self._queue.put((image, future))
        return future.result()

    def _run(self) -> None:
        import queue

        while True:
            items = [self._queue.get()]
            while len(items) < self._max_batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                vectors = self._encode([image for image, _ in items])
            except BaseException as err:  # every waiting request gets the error, not a hang
                for _, future in items:
                    future.set_exception(err)
                continue
            for (_, future), vector in zip(items, vectors):
                future.set_result(vector)


def image_id(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:20]


class GalleryService:
    """A loaded index and its model, answering and editing from any number of threads."""

    def __init__(self, index_dir: str | Path, model: str | None = None, device: str | None = None,
                 batching: bool = True):
        from index.store import load_index, read_manifest, real_path

        from .encoder import check_index_model
        from .query import _device, _with_encoder

        self.index_dir = real_path(index_dir)
        self._model_path = model
        if read_manifest(self.index_dir).backend != "faiss":
            raise UserError(f"index {self.index_dir} keeps its gallery in Milvus: serve.py serves "
                            "FAISS index folders for now; query it with query.py, or build a FAISS "
                            "index for the server")
        stamp = self._stamp()  # taken first: a change meanwhile only makes the next request re-read
        stored, self.encoder = _with_encoder(load_index(self.index_dir), self.index_dir, model, device)
        snapshot = _Snapshot(stored, stamp)
        check_index_model(snapshot.stored.manifest, self.index_dir, self.encoder.fingerprint,
                          "pass --model with the checkpoint the index was built from")
        self.device = _device(device)
        if self.device is not None and hasattr(self.encoder, "model"):
            self.encoder.model.to(self.device)
        self._snapshot = snapshot
        self._model_lock = threading.Lock()  # one forward pass at a time: the CPU has few cores
        self._batcher = _Batcher(self._encode_many) if batching else None
        self._edit_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._eager_lock = threading.Lock()
        self._eager = None  # (model, preprocessing) for heat-maps, loaded on first use
        self.started = time.time()

    # ------------------------------------------------------------------ reading

    def current(self) -> _Snapshot:
        """The latest committed index (re-read if another process changed it on disk)."""
        snapshot = self._snapshot
        if self._stamp() == snapshot.stamp:
            return snapshot
        with self._reload_lock:
            if self._stamp() != self._snapshot.stamp:
                self._reload()
            return self._snapshot

    def query(self, data: bytes, k: int = 5, name: str = "upload") -> Answer:
        """The top-``k`` identities for one photo, ``new_whale`` placed by the index's threshold."""
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        vector, maps = self.embed(decode_upload(data, name))
        from index.store import read_while_unchanged

        # the snapshot reads its vectors on first use: an append committed meanwhile (this
        # process or another) may have deleted them, and the answer then comes from the new one
        return read_while_unchanged(self.index_dir,
                                    lambda: self._answer(self.current(), vector, maps, k))

    def _answer(self, snapshot: _Snapshot, vector: np.ndarray, maps: np.ndarray | None,
                k: int) -> Answer:
        k = min(k, len(snapshot.rows_of) + 1)
        ranking = snapshot.stored.search(vector, k, maps)
        in_gallery = snapshot.stored.to_gallery_space(vector)
        threshold = snapshot.stored.manifest.threshold
        from .query import hits_for

        hits = hits_for(ranking.identities[0], ranking.scores[0],
                        snapshot.stored.best_images(ranking)[0], threshold, k)
        local_query = None if maps is None or snapshot.stored.local is None else \
            snapshot.stored.local.queries(maps)[0]
        candidates = [Candidate(hit.identity, None) if hit.similarity is None else
                      Candidate(hit.identity, hit.similarity,
                                self._matches(snapshot, hit.identity, in_gallery[0], local_query))
                      for hit in hits]
        return Answer(candidates, threshold)

    def embed(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(1, D) embedding (the model's own: ``StoredIndex.search`` brings it into the
        gallery's space) and, for an index that re-scores with local descriptors, the (1, L, C)
        raw maps (else None), through the batcher (photos that arrive together share one
        forward pass)."""
        if self._batcher is not None:
            vector, maps = self._batcher.submit(image)
        else:
            vector, maps = self._encode_many([image])[0]
        return vector[None], None if maps is None else maps[None]

    def _encode_many(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per image: (vector, maps or None)."""
        with self._model_lock:
            if self.current().stored.local is None:
                return [(v, None) for v in self.encoder.encode_arrays(images, device=self.device)]
            vectors, maps = self.encoder.encode_arrays(images, device=self.device, maps=True)
            return list(zip(vectors, maps))

    def _matches(self, snapshot: _Snapshot, identity: str, vector: np.ndarray,
                 local_query: np.ndarray | None) -> list[GalleryImage]:
        """The identity's best images for the query, each with the score the search gives it
        (local matching and hubness correction included, as the identity's own score)."""
        rows = snapshot.rows_of[identity]
        raw = np.asarray(snapshot.vectors[rows])
        gallery = snapshot.stored.gallery
        similarity = gallery.scores_of(vector, np.asarray(rows), raw, local_query) \
            if hasattr(gallery, "scores_of") else raw @ vector
        order = np.argsort(-similarity, kind="stable")[:IMAGES_PER_CANDIDATE]
        return [GalleryImage(snapshot.image_ids[rows[i]], identity, float(similarity[i]))
                for i in order]

    def explain(self, data: bytes, image: str, name: str = "upload") -> tuple[bytes, bytes]:
        """PNG heat-maps (query, gallery image ``image``): where each found the other
        (``retrieval.answering.heatmap``). Loads the full model once, on first use."""
        from ..data import load_image
        from .heatmap import explain_pair, overlay_png

        query = decode_upload(data, name)
        gallery = load_image(self.image_path(image))
        model, preprocessing = self._full_model()
        with self._model_lock:
            explanation = explain_pair(model, preprocessing, query, gallery)
        return (overlay_png(explanation.query_input, explanation.query),
                overlay_png(explanation.gallery_input, explanation.gallery))

    def _full_model(self):
        """The eager model behind the index (heat-maps need its feature maps, which the exported
        encoder does not give)."""
        with self._eager_lock:
            if self._eager is None:
                from .query import _full_encoder

                encoder = self.encoder if hasattr(self.encoder, "model") else \
                    _full_encoder(self.current().stored.manifest, self._model_path)
                self._eager = (encoder.model, encoder.preprocessing)
            return self._eager

    def identities(self) -> list[dict[str, Any]]:
        snapshot = self.current()
        return [{"identity": identity, "images": [snapshot.image_ids[r] for r in rows]}
                for identity, rows in sorted(snapshot.rows_of.items())]

    def image_path(self, image: str) -> Path:
        """The file of a gallery image named by its id (only images the index holds are served)."""
        snapshot = self.current()
        row = snapshot.row_of_id.get(image)
        if row is None:
            raise NotFound(f"no gallery image {image!r} in the index (it may have been removed)")
        return Path(snapshot.paths[row])

    def health(self) -> dict[str, Any]:
        manifest = self.current().stored.manifest
        return {"status": "ok", "index": str(self.index_dir), "images": manifest.counts["images"],
                "identities": manifest.counts["identities"], "threshold": manifest.threshold,
                "threshold_source": manifest.threshold_source, "model": manifest.fingerprint,
                "index_type": manifest.index["kind"], "uptime_s": round(time.time() - self.started, 1)}

    # ------------------------------------------------------------------ editing

    def add(self, data: bytes, identity: str, new_identity: bool = False,
            name: str = "upload") -> Added:
        """Put a photo into the gallery as ``identity`` (an existing one, or a ``new_identity``)
        and return once that is committed to disk; the next query sees it."""
        identity = check_identity_name(identity)
        image = decode_upload(data, name)
        snapshot = self.current()
        if not new_identity and identity not in snapshot.rows_of:
            raise NotFound(f"identity {identity!r} is not in the gallery: add it as a new identity")
        vector, maps = self.embed(image)  # outside the edit lock: queries and other uploads go on
        with self._edit_lock, self._writer_lock():
            stored, vectors = self._read_for_edit()
            if new_identity and identity in set(stored.identities):
                raise Conflict(f"identity {identity!r} already exists: add the photo to it instead")
            if not new_identity and identity not in set(stored.identities):
                raise NotFound(f"identity {identity!r} is not in the gallery (removed meanwhile?)")
            path = self._store_upload(data)
            known = dict(zip(stored.paths, stored.identities))
            if str(path) in known:
                if known[str(path)] != identity:
                    raise Conflict(f"this photo is already in the gallery as {known[str(path)]!r}: "
                                   "remove that identity first to relabel it")
                return Added(identity, GalleryImage(image_id(str(path)), identity), False,
                             len(stored.paths))
            local = None if stored.local is None else \
                [stored.local.descriptors, stored.local.queries(maps).astype(np.float16)]
            self._commit(stored, np.concatenate([vectors, stored.to_gallery_space(vector)]),
                         stored.paths + [str(path)], stored.identities + [identity], local)
        log.info("added %s to %s (%s)", path.name, identity, "new identity" if new_identity else "existing")
        return Added(identity, GalleryImage(image_id(str(path)), identity), True, len(stored.paths) + 1)

    def remove_identity(self, identity: str) -> int:
        """Drop every image of ``identity``; returns how many. Its uploaded photos are deleted."""
        with self._edit_lock, self._writer_lock():
            stored, vectors = self._read_for_edit()
            keep = np.asarray(stored.identities, dtype=object) != identity
            removed = int((~keep).sum())
            if not removed:
                raise NotFound(f"identity {identity!r} is not in the gallery")
            if not keep.any():
                raise Conflict(f"removing {identity!r} would leave the gallery empty: an index "
                               "needs at least one image")
            self._commit(stored, np.asarray(vectors)[keep],
                         [p for p, k in zip(stored.paths, keep) if k],
                         [i for i, k in zip(stored.identities, keep) if k],
                         None if stored.local is None else
                         [(stored.local.descriptors, np.flatnonzero(keep))])
            uploads = self.index_dir / UPLOADS_DIR
            for path, kept in zip(stored.paths, keep):
                if not kept and Path(path).parent == uploads:
                    Path(path).unlink(missing_ok=True)
        log.info("removed identity %s (%d image(s))", identity, removed)
        return removed

    def _writer_lock(self):
        from index.store import writer_lock

        return writer_lock(self.index_dir)

    def _read_for_edit(self):
        """Under the locks: the committed index and its vectors (what this process last loaded,
        unless another writer has committed since)."""
        snapshot = self.current()
        return snapshot.stored, snapshot.vectors

    def _commit(self, stored, vectors: np.ndarray, paths: list[str], identities: list[str],
                local: list | None = None) -> None:
        """Write the edited gallery; ``local``: the parts of its local descriptors, row for row
        (``save_index``), for an index that keeps them (the share and mean stay)."""
        from index import types
        from index.store import save_index

        manifest = stored.manifest
        save_index(self.index_dir, vectors, paths, identities, model=manifest.model,
                   tta=manifest.tta, threshold=manifest.threshold,
                   threshold_source=manifest.threshold_source, index_type=manifest.index["requested"],
                   target_recall=manifest.index.get("target_recall"),
                   gpu_float16=types.gpu_float16(manifest.index), created=manifest.created,
                   whitening=stored.whitening,
                   local=None if local is None else (stored.local.share, stored.local.mean, local),
                   attachments={name: stored.attachment(name) for name in manifest.attachments})
        self._reload()

    def _reload(self) -> None:
        from index.store import load_index

        stamp = self._stamp()
        self._snapshot = _Snapshot(load_index(self.index_dir), stamp)

    def _stamp(self) -> tuple[int, ...]:
        try:
            info = os.stat(self.index_dir / "manifest.json")
        except OSError:
            return ()
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def _store_upload(self, data: bytes) -> Path:
        """``uploads/<sha256><ext>``, written whole (temp file, flush, rename) before the index
        names it; the same bytes always give the same path."""
        from ..files import atomic_write

        path = self.index_dir / UPLOADS_DIR / (hashlib.sha256(data).hexdigest()[:40] + _extension(data))
        if not (path.is_file() and path.stat().st_size == len(data)):
            atomic_write(path, lambda temp: temp.write_bytes(data), durable=True)
        return path


def decode_upload(data: bytes, name: str = "upload") -> np.ndarray:
    """An uploaded image as RGB uint8, with the loader's size guard and one-line errors."""
    from ..data import load_image

    if len(data) > MAX_UPLOAD_BYTES:
        raise TooLarge(f"{name} is {len(data) / 2**20:.1f} MB, over the {MAX_UPLOAD_BYTES // 2**20} MB "
                       "limit: downscale it")
    if not data:
        raise UserError(f"{name} is empty: send the image's bytes")
    return load_image(io.BytesIO(data), name=name)


def check_identity_name(identity: str) -> str:
    """A usable identity label (the same rule as a gallery's folder names or CSV ids)."""
    from ..data import identity_problem, suggested_identity

    identity = (identity or "").strip()
    if not identity:
        raise UserError("the identity name is empty: give the identity a name")
    if len(identity) > MAX_IDENTITY_LENGTH:
        raise UserError(f"the identity name is {len(identity)} characters long, over "
                        f"{MAX_IDENTITY_LENGTH}: shorten it")
    if identity == NEW_WHALE:
        raise UserError(f"{NEW_WHALE!r} means 'not in the gallery' and cannot be an identity: name it")
    problem = identity_problem(identity)
    if problem:
        raise UserError(f"identity {identity!r} {problem}: try {suggested_identity(identity)!r}")
    return identity


def _extension(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return _FORMAT_EXTENSIONS.get(image.format or "", ".img")


def answer_json(answer: Answer, image_url: Any = None) -> dict[str, Any]:
    """The JSON of an answer; ``image_url(id)`` adds each gallery image's thumbnail URL."""
    def image(img: GalleryImage) -> dict[str, Any]:
        entry = {"id": img.id, "similarity": None if img.similarity is None else round(img.similarity, 6)}
        if image_url is not None:
            entry["url"] = image_url(img.id)
        return entry

    return {"threshold": answer.threshold, "probably_new": answer.probably_new,
            "candidates": [{"identity": c.identity,
                            "similarity": None if c.similarity is None else round(c.similarity, 6),
                            "images": [image(i) for i in c.images]} for c in answer.candidates]}

