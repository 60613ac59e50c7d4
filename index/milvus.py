"""The gallery on Milvus: the same identity search as ``GalleryIndex``, in a (distributed) database.

The FAISS index folder is the embedded default. A catalogue that outgrows one machine, or that
several services query and append to, lives in a Milvus collection instead; the index folder then
holds only ``manifest.json`` (backend, URI, collection, model fingerprint, threshold; never a
password) and the exported encoder, so ``query.py --index DIR`` works unchanged.

* **URI**: a file path runs milvus-lite inside the process (one process at a time per file);
  ``http://host:19530`` reaches a Milvus server or cluster. Credentials come from the environment
  only: ``MILVUS_TOKEN``, or ``MILVUS_USER`` + ``MILVUS_PASSWORD``.
* **Rows**: one per gallery image. The primary key is the SHA-256 of the image's path, so writing
  an image again *upserts* it: two appenders of the same photo store it once, and re-running a
  failed append finishes it without duplicates.
* **Search**: Milvus's grouping search (``group_by_field="identity"``) returns each identity's best
  image, best first: the same fold of images into identities as ``index.search``, done by the
  database, then ``new_whale`` is placed by the caller exactly as for FAISS.
* **Ownership**: the collection's properties record the model fingerprint and dimension; a
  collection written by another model, or not by this tool, is refused.

Milvus has no transaction across batches: an append of many images is several upserts, and a
failure part-way reports how many rows were written (re-running the same append completes it).
A Milvus server is eventually consistent by default; every search here asks for ``Strong``
consistency, so a query sees every write acknowledged before it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import InvalidGallery, MilvusError
from .search import IdentityRanking
from .types import IndexSpec

log = logging.getLogger(__name__)

FORMAT_PROPERTY = "whale.format"
FORMAT_VALUE = "whale-gallery-collection/1"
FINGERPRINT_PROPERTY = "whale.fingerprint"
DIM_PROPERTY = "whale.dim"
KEY, PATH, IDENTITY, VECTOR = "image_id", "path", "identity", "vector"
MAX_PATH = 4096
MAX_IDENTITY = 1024
WRITE_BATCH = 512  # rows per upsert: a few MB per gRPC message at 1280-d
SEARCH_BATCH = 256  # queries per search call
COLLECTION_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
DEFAULT_COLLECTION = "whale_gallery"
# Milvus's name for each of our index kinds, and which manifest parameters are build- or
# search-time (our names -> Milvus's). milvus-lite has no IVF_PQ, so ivfpq is not offered here.
MILVUS_TYPES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW"}
BUILD_PARAMS = {"ivf": {"nlist": "nlist"}, "hnsw": {"M": "M", "efConstruction": "efConstruction"}}
SEARCH_PARAMS = {"ivf": {"nprobe": "nprobe"}, "hnsw": {"efSearch": "ef"}}
# Milvus builds an index per sealed segment, not one over the collection: IVF's cells are sized
# for a segment. milvus-lite compacts to at most 100k rows (its MAX_SEGMENT_ROWS) and flushes
# files of 128 MiB (~62k rows at 512-d); a server's default 1 GiB segment holds ~500k such rows, so
# this errs on the side of fewer cells there, which tuning then compensates with nprobe.
SEGMENT_ROWS = 100_000
OPEN_ATTEMPTS_S = 10.0  # how long to wait for a milvus-lite file another process holds
SETTLE_POLL_S = 2.0  # how often settle() looks at the index build
# milvus-lite serves a file through a local gRPC address: the client forgets the file, so
# connect() remembers it for settle() (which reads the database folder to see its index build)
_LITE_FILES: "weakref.WeakKeyDictionary[Any, Path]" = weakref.WeakKeyDictionary()


def image_key(path: str) -> str:
    """The primary key of an image's row: stable for a path, so a re-write is an upsert."""
    return hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()


def is_local(uri: str) -> bool:
    """A file path (milvus-lite) rather than a server address."""
    return "://" not in uri


def normalise_uri(uri: str) -> str:
    """A local file as an absolute path (the index folder may be used from another directory);
    a server URI as given, refused if it carries credentials (the manifest is shared)."""
    if is_local(uri):
        return str(Path(uri).expanduser().resolve())
    if re.search(r"://[^/]*@", uri) or re.search(r"[?&](token|password)=", uri, re.I):
        raise MilvusError(f"the Milvus URI {_redacted(uri)} carries credentials, which would be "
                          "written into the index manifest: pass them as MILVUS_TOKEN (or "
                          "MILVUS_USER and MILVUS_PASSWORD) in the environment instead")
    return uri


def connect(uri: str):
    """A ``MilvusClient`` for ``uri``: milvus-lite for a file path (waiting a few seconds while
    another process holds the file), a server otherwise, credentials from the environment."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise MilvusError("the Milvus backend needs pymilvus (and milvus-lite for a file URI): "
                          "pip install pymilvus; pip install --no-deps milvus-lite") from None
    kwargs: dict[str, Any] = {}
    if os.environ.get("MILVUS_TOKEN"):
        kwargs["token"] = os.environ["MILVUS_TOKEN"]
    elif os.environ.get("MILVUS_USER"):
        kwargs["user"] = os.environ["MILVUS_USER"]
        kwargs["password"] = os.environ.get("MILVUS_PASSWORD", "")
    if is_local(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        # milvus-lite serves pymilvus over an in-process gRPC server: its start/stop notices and
        # the tracebacks of calls it does not implement (pymilvus falls back) are not news
        logging.getLogger("milvus_lite").setLevel(logging.WARNING)
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    deadline = time.monotonic() + (OPEN_ATTEMPTS_S if is_local(uri) else 0)
    while True:
        try:
            client = MilvusClient(uri=uri, **kwargs)
            if is_local(uri):
                _LITE_FILES[client] = Path(uri)
            return client
        except Exception as err:  # pymilvus raises several types for an unreachable server
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise MilvusError(_connect_failure(uri, err)) from None


def _connect_failure(uri: str, err: Exception) -> str:
    detail = str(getattr(err, "message", "") or err).splitlines()[0][:200]
    if is_local(uri):
        return (f"cannot open the milvus-lite database {uri} ({detail}): milvus-lite lets one "
                "process at a time use a file; stop the other one (or use a Milvus server for "
                "several), and check that milvus-lite is installed (pip install --no-deps milvus-lite)")
    return (f"cannot reach Milvus at {_redacted(uri)} ({detail}): check the address, that the "
            "server is up, and MILVUS_TOKEN / MILVUS_USER + MILVUS_PASSWORD")


def _redacted(uri: str) -> str:
    return re.sub(r"(://)[^/]*@", r"\1***@", uri)


def check_collection_name(name: str) -> str:
    if not COLLECTION_PATTERN.match(name):
        raise MilvusError(f"{name!r} is not a valid Milvus collection name: letters, digits and "
                          "underscores, starting with a letter or underscore, at most 255")
    return name


# ----------------------------------------------------------------------------- the collection

@dataclass
class CollectionInfo:
    """What a collection says about itself (``None`` fields: not written by this tool)."""

    fingerprint: str | None
    dim: int | None
    ours: bool


def describe(client, collection: str) -> CollectionInfo | None:
    """The collection's owner marks, or None if it does not exist."""
    if not client.has_collection(collection):
        return None
    properties = client.describe_collection(collection).get("properties") or {}
    dim = properties.get(DIM_PROPERTY)
    return CollectionInfo(fingerprint=properties.get(FINGERPRINT_PROPERTY),
                          dim=int(dim) if dim and str(dim).isdigit() else None,
                          ours=properties.get(FORMAT_PROPERTY) == FORMAT_VALUE)


def count_rows(client, collection: str) -> int:
    result = client.query(collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(result[0]["count(*)"])


def create_collection(client, collection: str, dim: int, spec: IndexSpec, fingerprint: str,
                      replace: bool = False) -> None:
    """A new collection for ``dim``-wide vectors searched by inner product, marked with the
    model's fingerprint. An existing one is dropped only with ``replace`` (the caller has checked
    it is this index's own); otherwise a non-empty collection is refused, never overwritten."""
    from pymilvus import DataType, MilvusClient

    if spec.kind not in MILVUS_TYPES:
        raise InvalidGallery(f"the Milvus backend offers index types {', '.join(MILVUS_TYPES)}, "
                             f"not {spec.kind}: pick one of those with --index-type")
    existing = describe(client, collection)
    if existing is not None:
        rows = count_rows(client, collection)
        if not replace and (rows or not existing.ours):
            raise MilvusError(
                f"Milvus collection {collection!r} exists already ({rows} rows"
                f"{'' if existing.ours else ', not written by this tool'}): name another one with "
                "--milvus-collection, or --append to it through its own index folder")
        client.drop_collection(collection)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(KEY, DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field(PATH, DataType.VARCHAR, max_length=MAX_PATH)
    schema.add_field(IDENTITY, DataType.VARCHAR, max_length=MAX_IDENTITY)
    schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dim)
    index_params = client.prepare_index_params()
    build = {theirs: int(spec.params[ours]) for ours, theirs in BUILD_PARAMS.get(spec.kind, {}).items()}
    # nested under "params" (one JSON value on the wire, as Milvus servers have always read it):
    # pymilvus 3 would otherwise send each key alone, which milvus-lite 3.2 ignores
    index_params.add_index(field_name=VECTOR, index_type=MILVUS_TYPES[spec.kind], metric_type="IP",
                           params={"params": build} if build else {})
    client.create_collection(collection, schema=schema, index_params=index_params,
                             consistency_level="Strong")
    client.alter_collection_properties(collection, properties={
        FORMAT_PROPERTY: FORMAT_VALUE, FINGERPRINT_PROPERTY: fingerprint, DIM_PROPERTY: str(dim)})


def check_ours(client, collection: str, fingerprint: str, dim: int) -> CollectionInfo:
    """Refuse a missing collection, one not written by this tool, or one of another model."""
    info = describe(client, collection)
    if info is None:
        raise MilvusError(f"Milvus collection {collection!r} does not exist (dropped outside this "
                          "tool?): rebuild the index with build_index.py --backend milvus")
    if not info.ours:
        raise MilvusError(f"Milvus collection {collection!r} was not written by this tool: "
                          "name another collection with --milvus-collection")
    if info.fingerprint != fingerprint or info.dim != dim:
        raise MilvusError(f"Milvus collection {collection!r} holds vectors of another model "
                          f"(fingerprint {info.fingerprint}, dimension {info.dim}; the index "
                          f"expects {fingerprint}, {dim}): its vectors are not comparable; "
                          "rebuild it, or point the index at its own collection")
    client.load_collection(collection)  # a collection is searchable only once loaded
    return info


def upsert(client, collection: str, vectors: np.ndarray, paths: Sequence[str],
           identities: Sequence[str], progress: bool = False) -> int:
    """Write rows in batches; each batch is one upsert. A failure part-way raises MilvusError
    saying how many rows were written before it (they are whole rows, and re-running the same
    write completes it without duplicates)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    for values, limit, what in ((paths, MAX_PATH, "path"), (identities, MAX_IDENTITY, "identity")):
        too_long = next((v for v in values if len(v.encode()) > limit), None)
        if too_long is not None:
            raise InvalidGallery(f"a {what} longer than Milvus's field allows ({limit} bytes): "
                                 f"{too_long[:80]}...")
    written = 0
    batches = range(0, len(paths), WRITE_BATCH)
    if progress and len(paths) > WRITE_BATCH:
        from tqdm import tqdm

        batches = tqdm(batches, desc="writing to Milvus", unit="batch")
    for start in batches:
        stop = min(start + WRITE_BATCH, len(paths))
        rows = [{KEY: image_key(paths[i]), PATH: paths[i], IDENTITY: identities[i],
                 VECTOR: vectors[i].tolist()} for i in range(start, stop)]
        try:
            client.upsert(collection, rows)
        except Exception as err:
            raise MilvusError(f"writing to Milvus collection {collection!r} failed after {written} "
                              f"of {len(paths)} row(s) ({str(err).splitlines()[0][:200]}): those "
                              "rows are stored whole; run the same command again to write the rest"
                              ) from None
        written = stop
    # seal what was written: unsealed (growing) data is searched by brute force, sealed
    # segments get the collection's index (and are persisted)
    client.flush(collection)
    return written


def resolve(requested: str, n_vectors: int, dim: int) -> IndexSpec:
    """The index kind for the collection: ``auto`` is exact below ``types.FLAT_MAX`` vectors and
    HNSW above (Milvus's own IVF_PQ is a server-side option this backend does not offer). Build
    parameters are those of one segment (``SEGMENT_ROWS``): at 1M rows, FAISS's 4,000 cells
    would leave ~15 training points per cell in each 62k-row file milvus-lite indexes."""
    from . import types

    kind = ("flat" if n_vectors < types.FLAT_MAX else "hnsw") if requested == "auto" else requested
    if kind not in MILVUS_TYPES:
        raise InvalidGallery(f"the Milvus backend offers index types {', '.join(MILVUS_TYPES)} and "
                             f"auto, not {requested}: pick one of those with --index-type")
    spec = types.resolve(kind, min(n_vectors, SEGMENT_ROWS), dim, gpus=0)
    return IndexSpec(spec.kind, spec.params, requested)


def indexed_among(client, collection: str, paths: Sequence[str]) -> dict[str, str]:
    """{path: identity} for those of ``paths`` the collection holds (looked up by key, so an
    append costs what it adds, not what the collection holds)."""
    found: dict[str, str] = {}
    unique = list(dict.fromkeys(paths))
    for start in range(0, len(unique), WRITE_BATCH):
        keys = [image_key(p) for p in unique[start:start + WRITE_BATCH]]
        for row in client.get(collection, ids=keys, output_fields=[PATH, IDENTITY]):
            found[row[PATH]] = row[IDENTITY]
    return found


def counts(client, collection: str) -> dict[str, int]:
    """{"images", "identities"} as the collection holds them now (one pass over the identities)."""
    identities = {row[IDENTITY] for row in iterate_rows(client, collection, (IDENTITY,))}
    return {"images": count_rows(client, collection), "identities": len(identities)}


def has_identity(client, collection: str, identity: str) -> bool:
    rows = client.query(collection, filter=f"{IDENTITY} == {_quoted(identity)}",
                        output_fields=[KEY], limit=1, consistency_level="Strong")
    return bool(rows)


def delete_identities(client, collection: str, identities: Sequence[str]) -> None:
    for identity in identities:
        client.delete(collection, filter=f"{IDENTITY} == {_quoted(identity)}")


def _quoted(value: str) -> str:
    """A string literal for a Milvus filter expression."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def iterate_rows(client, collection: str, fields: Sequence[str] = (PATH, IDENTITY),
                 batch: int = 4096) -> Iterator[dict[str, Any]]:
    """Every row's ``fields``, in batches (the whole collection never in one response)."""
    iterator = client.query_iterator(collection, batch_size=batch, filter="",
                                     output_fields=list(fields))
    try:
        while True:
            rows = iterator.next()
            if not rows:
                return
            yield from rows
    finally:
        iterator.close()


# ----------------------------------------------------------------------------- searching

def settle(client, collection: str, timeout_s: float = 6 * 3600.0) -> None:
    """Return once searches go through the collection's index, so tuning does not measure exact
    search. Milvus indexes each sealed segment in the background and answers from its raw vectors
    (exactly) until then. A server reports the rows still waiting (``pending_index_rows``).
    milvus-lite reports its index finished at once; its background worker writes one index file
    per data file, so we wait until every data file of the collection has one (twice in a row, as
    a compaction may still merge indexed files into a new one). A collection that is not loaded is
    loaded: that builds the missing indexes inside the call. Never released and reloaded: at 1M
    rows a reload rebuilds every segment's index in one call that outlives the connection."""
    from pymilvus.client.types import LoadState

    if client.get_load_state(collection).get("state") != LoadState.Loaded:
        _load(client, collection)
        return
    deadline = time.monotonic() + timeout_s
    settled_polls = 0
    while True:
        pending = _pending_index(client, collection)
        if pending is None:  # a milvus-lite whose folder we cannot read: the old, slow way
            client.release_collection(collection)
            _load(client, collection)
            return
        settled_polls = settled_polls + 1 if pending == 0 else 0
        if settled_polls == 2:
            return
        if time.monotonic() > deadline:
            log.warning("Milvus collection %r is still building its index after %.0f s "
                        "(%d waiting); searching what is built", collection, timeout_s, pending)
            return
        time.sleep(SETTLE_POLL_S)


def _pending_index(client, collection: str) -> int | None:
    """Rows (a server) or data files (milvus-lite) not indexed yet; None where it cannot tell."""
    lite = _LITE_FILES.get(client)
    if lite is None:
        described = client.describe_index(collection, VECTOR) or {}
        return int(described.get("pending_index_rows", 0) or 0)
    return unindexed_lite_files(lite, collection)


def unindexed_lite_files(database: Path, collection: str) -> int | None:
    """How many of a milvus-lite collection's data files lack their vector index file (milvus-lite
    3.x layout: ``collections/NAME/manifest.json`` lists ``data/*.parquet`` per partition, and
    ``indexes/STEM.vector.TYPE.idx`` sits beside them); None where the layout is not that."""
    folder = Path(database) / "collections" / collection
    try:
        partitions = json.loads((folder / "manifest.json").read_text())["partitions"]
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, KeyError, TypeError):  # caught mid-write: look again
        return 1
    missing = 0
    for name, files in partitions.items():
        indexes = folder / "partitions" / name / "indexes"
        for data_file in files.get("data_files", []):
            stem = Path(data_file).stem
            if not any(indexes.glob(f"{stem}.{VECTOR}.*.idx")):
                missing += 1
    return missing


def _load(client, collection: str) -> None:
    for attempt in range(10):
        try:
            client.load_collection(collection)
            return
        except Exception as err:  # milvus-lite: a segment's index file still being written
            if attempt == 9:
                raise MilvusError(f"cannot load Milvus collection {collection!r}: "
                                  f"{str(err).splitlines()[0][:200]}") from None
            time.sleep(2.0)


class MilvusGallery:
    """``GalleryIndex``'s search over a Milvus collection: identities, best first, each with its
    best image's similarity and path (``IdentityRanking.images``; ``best_rows`` are -1, as the
    gallery table lives in the database)."""

    def __init__(self, client, collection: str, dim: int, num_identities: int, num_images: int,
                 spec: IndexSpec):
        self.client = client
        self.collection = collection
        self.dim = dim
        self.num_identities = num_identities
        self.spec = spec
        self._size = num_images
        self._params = {"metric_type": "IP",
                        "params": {theirs: int(spec.params[ours])
                                   for ours, theirs in SEARCH_PARAMS.get(spec.kind, {}).items()}}

    def __len__(self) -> int:
        return self._size

    def tune(self, vectors: np.ndarray, paths: Sequence[str], identities: Sequence[str],
             target: float):
        """Set the search parameter (nprobe / ef) to the smallest meeting ``target`` recall@5
        against exact search, measured as ``index.tuning`` does for FAISS: a sample of the
        gallery's own images, asked for their nearest rows (not grouped), their own row dropped,
        the rest folded into identities here. None for FLAT. (Not a filter per query: milvus-lite
        answers filtered searches by brute force, which would measure nothing.)"""
        from . import tuning

        if self.spec.kind not in SEARCH_PARAMS:
            return None
        ours, theirs = next(iter(SEARCH_PARAMS[self.spec.kind].items()))
        rows = tuning.held_out(len(vectors))
        identities = np.asarray(identities, dtype=object)
        max_images = int(np.unique(identities.astype(str), return_counts=True)[1].max())
        wanted = tuning.K * max_images + 1
        exact = tuning.exact_answers(vectors, identities, rows, min(len(vectors), wanted - 1))
        queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        own = [image_key(paths[row]) for row in rows]

        def answers(value: int) -> list[list[str]]:
            value = max(value, wanted) if theirs == "ef" else value
            params = {"metric_type": "IP", "params": {theirs: int(value)}}
            hits = self.client.search(self.collection, data=queries.tolist(), limit=wanted,
                                      anns_field=VECTOR, output_fields=[KEY, IDENTITY],
                                      search_params=params, consistency_level="Strong")
            answered = []
            for key, row_hits in zip(own, hits):
                ranked: list[str] = []
                for hit in row_hits:
                    identity = hit["entity"][IDENTITY]
                    if hit["entity"][KEY] != key and identity not in ranked:
                        ranked.append(identity)
                answered.append(ranked[:tuning.K])
            return answered

        values = tuning.candidates(IndexSpec(self.spec.kind, {
            "nlist": self.spec.params.get("nlist", 1)}))
        found = tuning.choose(self.spec, ours, values, answers, exact, target)
        self._params = {"metric_type": "IP", "params": {theirs: int(found.value)}}
        return found

    def search(self, queries: np.ndarray, k: int = 5) -> IdentityRanking:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape} for an index of dimension {self.dim}")
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        identities: list[list[str]] = []
        images: list[list[str]] = []
        for start in range(0, len(queries), SEARCH_BATCH):
            chunk = queries[start:start + SEARCH_BATCH]
            params = dict(self._params)
            if "ef" in params["params"]:  # HNSW must explore at least as many as it returns
                params["params"] = {"ef": max(params["params"]["ef"], k)}
            try:
                results = self.client.search(self.collection, data=chunk.tolist(), limit=k,
                                             anns_field=VECTOR, output_fields=[PATH, IDENTITY],
                                             group_by_field=IDENTITY, search_params=params,
                                             consistency_level="Strong")
            except Exception as err:
                raise MilvusError(f"searching Milvus collection {self.collection!r} failed: "
                                  f"{str(err).splitlines()[0][:200]}") from None
            for offset, hits in enumerate(results):
                row_ids, row_images = [], []
                for rank, hit in enumerate(hits[:k]):
                    entity = hit["entity"]
                    scores[start + offset, rank] = hit["distance"]
                    row_ids.append(entity[IDENTITY])
                    row_images.append(entity[PATH])
                identities.append(row_ids)
                images.append(row_images)
        return IdentityRanking(identities, scores, np.full((len(queries), k), -1, dtype=np.int64),
                               images)
