"""Which FAISS structure holds the gallery: exact, or faster / smaller at a measured recall cost.

Every type searches unit vectors by inner product (= cosine similarity) and answers through the
same ``GalleryIndex.search``; only speed, memory and recall differ (measured figures, and how they
were taken, are in bench/README.md):

* ``flat`` (IndexFlatIP): exact brute force, the default; a batch of queries is one matrix product.
* ``hnsw`` (IndexHNSWFlat): a graph over the raw vectors, low single-query latency, slow to build,
  CPU only. Its fixed parameters lose recall on very large galleries: raise ``efSearch``.
* ``ivf`` (IndexIVFFlat): k-means cells, a query scans ``nprobe`` of them; fast to build, GPU-able.
* ``ivfpq`` (IndexIVFPQFastScan): cells plus 4-bit product-quantised codes scanned with SIMD
  (64 B per 512-d vector instead of 2 KB), for galleries that do not fit in memory. The codes
  only shortlist: ``GalleryIndex`` re-scores ``rerank`` (tuned; default ``search.RERANK_FACTOR``)
  times the neighbours it needs exactly from the raw vectors, memory-mapped from ``vectors.npy``
  (only the candidates' rows are read), so similarities and the ``new_whale`` threshold stay exact.
* ``auto``: exact ``flat`` below ``FLAT_MAX`` vectors (``FLAT_MAX_GPU`` with GPUs); above it
  ``ivfpq`` on a CPU, ``ivf`` on GPUs (FAISS has no GPU fast-scan). What was measured
  (bench/README.md, realistic galleries, one CPU thread, each type tuned to recall 0.95): at 200k
  vectors flat 60 queries/s, ivf 243, ivfpq 1,014; at 1M flat 9.3, ivf 50, ivfpq 318 (before the
  rotation; "A random rotation before the codes" has the figures with it). hnsw
  with its fixed parameters took 32 min to build 1M isotropic vectors and found the true identity
  for only 0.667 of the queries, so ``auto`` never picks it; it stays available by name. When the
  type ``auto`` picked cannot reach the target recall even after tuning, the gallery is indexed
  exactly (flat) instead, where its raw vectors fit in half the machine's memory
  (``store.save_index``): ``auto`` never ships an index below its target without saying so.

After building, an approximate index's search parameter (``nprobe``, ``efSearch``) is tuned to a
target recall on the gallery's own vectors (``index.tuning``, ``--target-recall``). The resolved
type and its parameters are stored in the index manifest, and the search-time ones are read back
from it on every load, so they can be raised there without a rebuild; appends rebuild with the
same requested type and target.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from .errors import InvalidGallery

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
CHOICES = INDEX_TYPES + ("auto",)
REQUIRED_PARAMS = {"flat": (), "hnsw": ("M", "efConstruction", "efSearch"), "ivf": ("nlist", "nprobe"),
                   "ivfpq": ("nlist", "nprobe", "m", "nbits")}

FLAT_MAX = 100_000  # exact search below this on a CPU: ~10 ms per query at 512-d, no recall loss
FLAT_MAX_GPU = 1_000_000

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 256  # 128 lost ~7% recall@5 on 100k x 512 synthetic data
MIN_POINTS_PER_CELL = 39  # FAISS's k-means wants at least 39 training points per centroid
TRAIN_POINTS_PER_CELL = 64  # k-means sample per cell (FAISS default 256): 4x faster at 1M vectors
# from this many cells the coarse k-means runs in two levels (sqrt(nlist) groups, then cells within
# each): 12x faster at 200k x 512 (1,788 cells: 14 s vs 180 s), same tuned nprobe and recall
TWO_LEVEL_MIN_CELLS = 1024
PQ_MIN_VECTORS = 1000  # below this PQ cannot train even 4-bit codes well (and is pointless)
ADD_CHUNK = 65_536  # vectors added to a FAISS index at a time
ROTATION_SEED = 1234  # the ivfpq rotation's seed: any fixed value; stored inside the FAISS file
GPU_MAX_K = 2048  # FAISS GPU indexes answer at most this many neighbours per query


@dataclass(frozen=True)
class IndexSpec:
    """A resolved index type and its parameters (what the manifest stores under ``index``)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    requested: str = "flat"
    # an approximate index's search parameter chosen by ``index.tuning``: the agreement with exact
    # search it was required to reach, and what it measured (None: not tuned)
    target_recall: float | None = None
    recall: float | None = None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        return {k: v for k, v in values.items() if v is not None or k not in ("target_recall", "recall")}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "IndexSpec":
        return cls(values["kind"], dict(values.get("params", {})), values.get("requested", values["kind"]),
                   values.get("target_recall"), values.get("recall"))


def resolve(requested: str, n_vectors: int, dim: int, gpus: int | None = None,
            float16: bool = False) -> IndexSpec:
    """The concrete type for ``requested`` (``auto`` chooses by size) and parameters for
    ``n_vectors``; ``float16``: store flat / ivf vectors in float16 on GPUs (``to_devices``)."""
    if requested not in CHOICES:
        raise ValueError(f"unknown index type {requested!r}; choose one of {', '.join(CHOICES)}")
    gpus = faiss.get_num_gpus() if gpus is None else gpus
    kind = _auto_kind(n_vectors, gpus) if requested == "auto" else requested
    if kind == "ivfpq" and n_vectors < PQ_MIN_VECTORS:
        raise InvalidGallery(f"an ivfpq index compresses big galleries and needs at least "
                             f"{PQ_MIN_VECTORS} vectors to train, this one has {n_vectors}: use a flat index")
    return IndexSpec(kind, {**_params(kind, n_vectors, dim), **({"float16": 1} if float16 else {})},
                     requested)


def gpu_float16(index_entry: dict[str, Any]) -> bool:
    """Whether a manifest's ``index`` entry asks for float16 vectors on GPUs."""
    return bool(index_entry.get("params", {}).get("float16"))


def gpu_options(spec: IndexSpec) -> "faiss.GpuMultipleClonerOptions":
    """How ``to_devices`` copies an index to the GPUs: sharded across them (each holds a share
    of the vectors, so a gallery larger than one GPU's memory fits), float16 lookup tables for
    ivfpq (more sub-quantisers fit), float16 vector storage for flat / ivf where the manifest
    asks for it (``float16``: half the GPU memory)."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = spec.kind == "ivfpq" or bool(spec.params.get("float16"))
    return options


def _auto_kind(n_vectors: int, gpus: int) -> str:
    if n_vectors < (FLAT_MAX_GPU if gpus else FLAT_MAX):
        return "flat"
    return "ivf" if gpus else "ivfpq"


def exact_fits_in_memory(n_vectors: int, dim: int) -> bool:
    """Whether an exact (flat) index of these vectors fits in half the machine's memory: the
    fallback of ``auto`` when its approximate choice misses the target recall."""
    import os

    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return n_vectors * dim * 4 <= memory // 2


def _n_cells(n_vectors: int) -> int:
    """~4 sqrt(N) cells (FAISS's usual advice), never fewer than 39 training points per cell."""
    return max(1, min(int(4 * math.sqrt(n_vectors)), n_vectors // MIN_POINTS_PER_CELL))


def _params(kind: str, n_vectors: int, dim: int) -> dict[str, Any]:
    if kind == "hnsw":
        return {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    if kind in ("ivf", "ivfpq"):
        nlist = _n_cells(n_vectors)
        params: dict[str, Any] = {"nlist": nlist, "nprobe": min(nlist, max(8, math.ceil(nlist / 4)))}
        if kind == "ivfpq":
            params.update(_pq_params(dim))
        return params
    return {}


def _pq_params(dim: int) -> dict[str, Any]:
    """4-dimensional sub-vectors (or the nearest divisor of ``dim``) with 4-bit codes, scanned by
    FAISS's SIMD fast-scan kernels (``IndexIVFPQFastScan``): 64 B per 512-d vector, as the 8-bit
    codes on 8-d sub-vectors were. The codes only shortlist and the raw vectors re-rank it; at
    200k x 512 ivfpq answered 12x IVF-flat's queries/s at the same nprobe (realistic gallery), and
    9x when both were tuned to 0.95 (isotropic; bench/README.md, "Fast-scan codes").

    ``rotation``: the vectors are turned by a fixed random orthogonal matrix before the codes
    (FAISS's ``RandomRotationMatrix``; inner products unchanged). Each sub-quantiser then sees an
    even share of the variance, wherever the embedding happens to put it: on a realistic 1M
    gallery whose variance sits in few axes, a shortlist of 4x the neighbours needed held the
    exact nearest image for 0.956 of held-out queries with the rotation and 0.630 without (nprobe
    128; OPQ's trained rotation reached 0.978 for 2 more minutes of build; bench/README.md, "A
    random rotation before the codes")."""
    sub_dim = next(s for s in (4, 8, 2, 16, 1) if dim % s == 0)
    return {"m": dim // sub_dim, "nbits": 4, "fastscan": 1, "rotation": 1}


def build(vectors: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """A trained CPU index holding ``vectors`` (ids = row numbers). Built on the CPU so the same
    file is written whatever the machine; ``to_devices`` moves it for searching."""
    dim = vectors.shape[1]
    p = spec.params
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["efConstruction"]
        index.hnsw.efSearch = p["efSearch"]
    elif spec.kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, p["nlist"], faiss.METRIC_INNER_PRODUCT)
    elif spec.kind == "ivfpq" and p.get("fastscan"):
        index = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(dim), dim, p["nlist"], p["m"], p["nbits"],
                                         faiss.METRIC_INNER_PRODUCT)
        if p.get("rotation"):  # indexes written before it have none and load as built
            index = faiss.IndexPreTransform(random_rotation(dim), index)
    elif spec.kind == "ivfpq":  # indexes written before fast-scan: 8-bit codes
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, p["nlist"], p["m"], p["nbits"],
                                 faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index type {spec.kind!r}")
    if spec.kind in ("ivf", "ivfpq"):
        # k-means time is what an IVF build costs: FAISS samples at most this many points per
        # cell (its default 256 means every vector at 1M x 4000 cells); recall measured in bench/
        faiss.extract_index_ivf(index).cp.max_points_per_centroid = TRAIN_POINTS_PER_CELL
    if not index.is_trained:
        sample = training_sample(vectors, spec)
        if spec.kind in ("ivf", "ivfpq") and p["nlist"] >= TWO_LEVEL_MIN_CELLS:
            _train_cells_in_two_levels(index, _rotated(index, sample), p["nlist"])
        index.train(sample)  # PQ codebooks; the cells are trained already where trained above
    for start in range(0, len(vectors), ADD_CHUNK):  # a memory-mapped gallery stays on disk
        index.add(np.ascontiguousarray(vectors[start:start + ADD_CHUNK], dtype=np.float32))
    apply_search_params(index, spec)
    return index


def random_rotation(dim: int) -> faiss.RandomRotationMatrix:
    """The fixed random orthogonal ``dim`` x ``dim`` matrix an ivfpq index turns vectors by
    before coding them (seeded: the same gallery gives the same index file)."""
    rotation = faiss.RandomRotationMatrix(dim, dim)
    rotation.init(ROTATION_SEED)
    return rotation


def _rotated(index: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """``vectors`` in the space the IVF part of ``index`` sees (after its pre-transforms)."""
    if isinstance(index, faiss.IndexPreTransform):
        for step in range(index.chain.size()):
            vectors = index.chain.at(step).apply(np.ascontiguousarray(vectors, dtype=np.float32))
    return vectors


def _train_cells_in_two_levels(index: faiss.Index, sample: np.ndarray, nlist: int) -> None:
    """The coarse centroids by FAISS's two-level k-means: sqrt(nlist) groups, then each group's
    share of the cells from its own points. One k-means over all cells costs samples x cells per
    iteration (at 1M vectors, 256k x 4,000 x 512: most of a 28-minute build here); this costs
    about 2 sqrt(nlist) times less, and ``index.train`` then skips the coarse step. A group too
    small to get a cell of its own makes FAISS refuse; the one-level k-means then runs instead."""
    from faiss.contrib.clustering import two_level_clustering

    try:
        centroids, _ = two_level_clustering(sample, max(2, math.isqrt(nlist)), nlist,
                                            spherical=True, clustering_niter=10)
    except RuntimeError as err:
        log.info("two-level k-means refused (%s); training the %d cells in one level",
                 str(err).splitlines()[0][:120], nlist)
        return
    faiss.extract_index_ivf(index).quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))


def training_sample(vectors: np.ndarray, spec: IndexSpec) -> np.ndarray:
    """The rows an IVF index trains on, read into memory: as many as its k-means uses
    (``TRAIN_POINTS_PER_CELL`` per cell, and 256 per PQ centroid), never the whole gallery,
    which may be a 20 GB memory map (the residuals of every vector would be another 20 GB)."""
    from .rows import sample_rows

    wanted = int(spec.params.get("nlist", 1)) * TRAIN_POINTS_PER_CELL
    if spec.kind == "ivfpq":
        wanted = max(wanted, 256 * 2 ** int(spec.params["nbits"]))
    rows = sample_rows(len(vectors), wanted)
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    """The manifest's search-time parameters win over whatever the FAISS file holds."""
    if "nprobe" in spec.params:
        faiss.extract_index_ivf(index).nprobe = int(spec.params["nprobe"])
    if "efSearch" in spec.params:
        index.hnsw.efSearch = int(spec.params["efSearch"])


def to_devices(index: faiss.Index, spec: IndexSpec) -> faiss.Index:
    """The index for searching: on every GPU FAISS sees (sharded across several), else as is.

    HNSW has no GPU implementation; a type the GPU cloner refuses (e.g. IVFPQ with too many
    sub-quantisers for shared memory) stays on the CPU with a warning rather than failing.
    """
    gpus = faiss.get_num_gpus()
    if gpus == 0 or spec.kind == "hnsw" or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return index
    try:
        moved = faiss.index_cpu_to_all_gpus(index, co=gpu_options(spec))
    except RuntimeError as err:
        log.warning("%s index stays on the CPU: FAISS cannot put it on the GPU (%s)", spec.kind, err)
        return index
    if "nprobe" in spec.params:
        faiss.GpuParameterSpace().set_index_parameter(moved, "nprobe", spec.params["nprobe"])
    log.info("%s index on %d GPU(s)", spec.kind, gpus)
    return moved


def prepare_search(index: faiss.Index, spec: IndexSpec, n_neighbours: int) -> None:
    """HNSW must explore at least as many candidates as it returns.

    Set on the index rather than passed as ``search(..., params=)``: pytorch-metric-learning
    imports ``faiss.contrib.torch_utils``, whose replacement ``search`` takes no ``params``.
    """
    if spec.kind == "hnsw":
        index.hnsw.efSearch = max(int(spec.params["efSearch"]), n_neighbours)
