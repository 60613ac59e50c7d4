"""The gallery index on disk: one folder, written atomically, checked when read.

Layout of an index folder::

    manifest.json    what built it (model fingerprint + spec, tta, new_whale threshold), the FAISS
                     type and parameters, counts, times, and the size + sha256 of every other file
    index.faiss      the FAISS index (CPU form; moved to GPUs when loaded on a machine with some)
    gallery.parquet  one row per vector: path, identity, vector_id (= FAISS id = row number)
    vectors.npy      the raw float32 embeddings, so --append / --remove-identity / a change of
                     index type rebuild exactly without re-embedding a single image

Rows are kept sorted by image path: any sequence of appends and removals then writes the same
files as one fresh build of the same images.

Writes go to a hidden temp sibling folder that is swapped in by one atomic rename (Linux
``renameat2(RENAME_EXCHANGE)``; elsewhere two renames with a tiny window, reported on load if a
crash hits it), so a crash mid-write leaves the previous index whole. Reads refuse, with one line
saying what to do, a folder that is not an index, a truncated or corrupt file, an index written by
an incompatible version, or (``expected_fingerprint``) one built by another model.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import faiss
import numpy as np

from retrieval.errors import UserError

from . import types
from .search import GalleryIndex
from .types import IndexSpec

log = logging.getLogger(__name__)

FORMAT = "whale-gallery-index/1"
METRIC = "inner_product"  # on L2-normalised vectors: cosine similarity
DEFAULT_INDEX_DIR = "runs/index"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
TABLE_FILE = "gallery.parquet"
VECTORS_FILE = "vectors.npy"
REBUILD = "rebuild it with build_index.py"


@dataclass
class Manifest:
    """Everything needed to trust and use an index without opening its other files."""

    dim: int
    model: dict[str, Any]  # fingerprint, source, checkpoint, model_config, preprocessing
    tta: str  # "none" or "flip": applied to queries exactly as to the gallery
    threshold: float | None  # new_whale threshold, from the checkpoint (None: zero-shot model)
    index: dict[str, Any]  # IndexSpec.to_dict()
    counts: dict[str, int]
    created: str
    updated: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = METRIC
    format: str = FORMAT

    @property
    def fingerprint(self) -> str:
        return self.model["fingerprint"]

    @property
    def spec(self) -> IndexSpec:
        return IndexSpec.from_dict(self.index)


@dataclass
class StoredIndex:
    """An index read back from disk: its manifest, its gallery table and the searchable index."""

    directory: Path
    manifest: Manifest
    paths: list[str]
    identities: list[str]
    gallery: GalleryIndex

    def vectors(self) -> np.ndarray:
        """The raw embeddings (checked against the manifest), row for row with ``paths``."""
        path = _verified(self.directory, VECTORS_FILE, self.manifest)
        try:
            vectors = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise _corrupt(path, f"{type(err).__name__}: {err}") from None
        if vectors.shape != (len(self.paths), self.manifest.dim):
            raise _corrupt(path, f"shape {vectors.shape}, expected ({len(self.paths)}, {self.manifest.dim})")
        return vectors


# ----------------------------------------------------------------------------- writing

def save_index(directory: str | Path, vectors: np.ndarray, paths: Sequence[str],
               identities: Sequence[str], *, model: dict[str, Any], tta: str,
               threshold: float | None, index_type: str | IndexSpec = "flat",
               created: str | None = None) -> Manifest:
    """Build the FAISS index over ``vectors`` and write the whole folder atomically.

    ``index_type`` is a name (``auto`` resolves by gallery size) or an already resolved spec.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or not len(vectors) == len(paths) == len(identities):
        raise ValueError(f"{len(paths)} paths, {len(identities)} identities, vectors {vectors.shape}")
    if len(vectors) == 0:
        raise UserError("the gallery index would be empty: it needs at least one image")
    order = np.argsort(np.asarray(paths, dtype=str), kind="stable")
    paths = [str(paths[i]) for i in order]
    identities = [str(identities[i]) for i in order]
    vectors = vectors[order]
    requested = index_type.requested if isinstance(index_type, IndexSpec) else index_type
    spec = types.resolve(requested, len(vectors), vectors.shape[1])
    log.info("building a %s index of %d vectors", spec.kind, len(vectors))
    faiss_index = types.build(vectors, spec)
    now = _now()
    manifest = Manifest(dim=int(vectors.shape[1]), model=dict(model), tta=tta,
                        threshold=None if threshold is None else float(threshold),
                        index=spec.to_dict(),
                        counts={"images": len(paths), "identities": len(set(identities))},
                        created=created or now, updated=now)
    write_directory(directory, lambda temp: _write_files(temp, manifest, faiss_index, vectors,
                                                         paths, identities))
    return manifest


def _write_files(folder: Path, manifest: Manifest, faiss_index: faiss.Index, vectors: np.ndarray,
                 paths: list[str], identities: list[str]) -> None:
    faiss.write_index(faiss_index, str(folder / INDEX_FILE))
    _write_table(folder / TABLE_FILE, paths, identities)
    np.save(folder / VECTORS_FILE, vectors, allow_pickle=False)
    manifest.files = {name: _describe(folder / name) for name in (INDEX_FILE, TABLE_FILE, VECTORS_FILE)}
    (folder / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
    for name in (INDEX_FILE, TABLE_FILE, VECTORS_FILE, MANIFEST):
        _fsync(folder / name)


def _write_table(path: Path, paths: list[str], identities: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"path": pa.array(paths, pa.string()),
                      "identity": pa.array(identities, pa.string()),
                      "vector_id": pa.array(np.arange(len(paths), dtype=np.int64))})
    pq.write_table(table, path)


def write_directory(directory: str | Path, fill: Callable[[Path], None]) -> None:
    """Fill a temp sibling folder, then swap it in for ``directory`` in one rename.

    An exception (or a crash) before the swap leaves ``directory`` exactly as it was.
    """
    target = Path(directory)
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(temp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the index private
        fill(temp)
        _fsync(temp)
        _swap_in(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync(target.parent)


def _check_replaceable(target: Path) -> None:
    """Never swap away a folder that is not an index (a typo in --out must not delete data)."""
    if not target.exists():
        return
    if not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).is_file()):
        raise UserError(f"{target} exists and is not a gallery index: pass a new or empty folder, "
                        "or an index folder written by build_index.py")


def _swap_in(temp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(temp, target)
        return
    if _exchange(temp, target):
        shutil.rmtree(temp, ignore_errors=True)  # now holds the previous version
        return
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, backup)
    os.rename(temp, target)
    shutil.rmtree(backup, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    log.debug("renameat2 unavailable (errno %d): swapping with two renames", ctypes.get_errno())
    return False


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a power cut after the swap cannot leave empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def writer_lock(directory: str | Path) -> Iterator[None]:
    """Serialise writers of one index (a read-modify-write like --append must not interleave);
    readers need no lock since a swap is atomic. Also clears temp folders of crashed writers."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic swap still protects readers
        yield
        return
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process writing %s", target)
            fcntl.flock(handle, fcntl.LOCK_EX)
        _clear_leftovers(target)
        yield


def _clear_leftovers(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # a backup beside a complete index is garbage from a finished swap
        for stale in target.parent.glob(f".{target.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- reading

def read_manifest(directory: str | Path) -> Manifest:
    """The manifest alone (cheap): fails with a clear message if ``directory`` is not an index."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(_missing_message(directory))
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} is not a gallery index (no {MANIFEST}): pass the folder "
                        "written by build_index.py --out")
    try:
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise _corrupt(path, str(err)) from None
    if not isinstance(values, dict) or values.get("format") != FORMAT:
        found = values.get("format") if isinstance(values, dict) else None
        raise UserError(f"{directory} holds an index of format {found!r}, this version reads "
                        f"{FORMAT!r}: {REBUILD}")
    try:
        return Manifest(**values)
    except TypeError as err:
        raise _corrupt(path, str(err)) from None


def load_index(directory: str | Path, expected_fingerprint: str | None = None,
               fix: str = "") -> StoredIndex:
    """Read and check an index folder. ``expected_fingerprint`` refuses an index built by
    another model; ``fix`` is appended to that message (what the user should do instead)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if expected_fingerprint is not None:
        check_fingerprint(manifest, directory, expected_fingerprint, fix)
    faiss_index = _read_faiss(_verified(directory, INDEX_FILE, manifest))
    paths, identities = _read_table(_verified(directory, TABLE_FILE, manifest))
    if not faiss_index.ntotal == len(paths) == manifest.counts["images"] or faiss_index.d != manifest.dim:
        raise _corrupt(directory / INDEX_FILE, f"{faiss_index.ntotal} vectors of dimension "
                       f"{faiss_index.d}, {len(paths)} table rows, manifest says "
                       f"{manifest.counts['images']} of dimension {manifest.dim}")
    gallery = GalleryIndex.from_faiss(faiss_index, identities, manifest.spec)
    return StoredIndex(directory, manifest, paths, identities, gallery)


def check_fingerprint(manifest: Manifest, directory: Path, fingerprint: str, fix: str = "") -> None:
    if manifest.fingerprint != fingerprint:
        built_with = manifest.model.get("checkpoint") or "the pretrained backbone (no --model)"
        raise UserError(f"index {directory} was built by another model (fingerprint "
                        f"{manifest.fingerprint}, from {built_with}) than this one ({fingerprint}): "
                        + (fix or f"use the model it was built with, or {REBUILD}"))


def _read_faiss(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise _corrupt(path, str(err).splitlines()[-1][:200]) from None


def _read_table(path: Path) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["path", "identity", "vector_id"])
    except Exception as err:  # pyarrow raises several types for damaged files
        raise _corrupt(path, f"{type(err).__name__}: {err}") from None
    ids = table.column("vector_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise _corrupt(path, "vector ids are not 0..N-1")
    return table.column("path").to_pylist(), table.column("identity").to_pylist()


def _verified(directory: Path, name: str, manifest: Manifest) -> Path:
    """``directory/name`` if its size and sha256 match the manifest; else a one-line UserError."""
    path = directory / name
    expected = manifest.files.get(name)
    if expected is None:
        raise _corrupt(directory / MANIFEST, f"no entry for {name}")
    if not path.is_file():
        raise UserError(f"{path} is missing: {REBUILD}")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise UserError(f"{path} is truncated or damaged ({size} bytes, expected "
                        f"{expected['bytes']}): {REBUILD}")
    if _sha256(path) != expected["sha256"]:
        raise UserError(f"{path} is corrupt (checksum mismatch): {REBUILD}")
    return path


def _corrupt(path: Path, detail: str) -> UserError:
    return UserError(f"{path} is corrupt ({detail}): {REBUILD}")


def _missing_message(directory: Path) -> str:
    backups = sorted(directory.parent.glob(f".{directory.name}.old-*")) if directory.parent.is_dir() else []
    if backups:
        return (f"index folder {directory} does not exist, but an interrupted write left the "
                f"previous index in {backups[-1]}: rename that folder to {directory}")
    return (f"index folder {directory} does not exist: build one with "
            f"build_index.py --gallery DIR --out {directory}, or pass --index")


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
