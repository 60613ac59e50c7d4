"""Local matching: a query and a gallery image compared location by location, not only as two
pooled vectors.

A pooled (GeM) vector keeps *what* is in an image and loses *where*; two drawings of one
character, or two photos of one face, share many local patterns that pooling blurs together
with everything else. Each image here is a set of local descriptors (one per location of a
mid-level feature map, e.g. 10 x 10 x 112 for EfficientNet-Lite0's stride-16 stage at 160 px),
centred on the gallery's mean descriptor and normalised to unit length, and two images are
compared by the symmetric *chamfer* similarity: each location's best match in the other image,
averaged over locations, both ways. It is the "max-sim" of late-interaction retrieval (ColBERT,
Khattab & Zaharia, SIGIR 2020) and the chamfer similarity of Jégou et al.'s aggregated local
descriptors, without any training.

Pure NumPy, so the index floor can use it; the descriptors come from
``retrieval.models.local_descriptors``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def normalised_descriptors(maps: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(N, L, C) float32: ``maps`` (N images x L locations x C channels) minus the gallery's
    ``mean`` descriptor (C,), each location scaled to unit length. Post-ReLU maps are all
    non-negative, so without the centring every pair of locations looks alike."""
    centred = np.asarray(maps, dtype=np.float32) - np.asarray(mean, dtype=np.float32)
    norms = np.linalg.norm(centred, axis=2, keepdims=True)
    return centred / np.maximum(norms, 1e-12)


def mean_descriptor(maps: np.ndarray) -> np.ndarray:
    """(C,) float32: the mean over every image and location of ``maps`` (N, L, C)."""
    total = np.zeros(maps.shape[-1], dtype=np.float64)
    for start in range(0, len(maps), 1024):  # float64 a block at a time, not the whole gallery
        block = np.asarray(maps[start:start + 1024], dtype=np.float64)
        total += block.reshape(-1, block.shape[-1]).sum(axis=0)
    return (total / max(1, len(maps) * maps.shape[1])).astype(np.float32)


def chamfer_similarity(queries: np.ndarray, gallery: np.ndarray, block: int = 128) -> np.ndarray:
    """(Q, G) float32 symmetric chamfer similarity of normalised descriptor sets (Q, L, C) and
    (G, M, C): ``(mean_l max_m s_lm + mean_m max_l s_lm) / 2`` with ``s`` the cosine of two
    locations; 1 for identical images. ``block`` gallery images are compared at a time, so
    memory stays at ``L x block x M`` floats per query."""
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    n_gallery, locations, channels = gallery.shape
    out = np.empty((len(queries), n_gallery), dtype=np.float32)
    for start in range(0, n_gallery, block):
        part = gallery[start:start + block]
        flat = part.reshape(-1, channels).T  # (C, b*M)
        for q, query in enumerate(queries):
            s = (query @ flat).reshape(len(query), len(part), locations)  # (L, b, M)
            forward = s.max(axis=2).mean(axis=0)   # each query location's best match
            backward = s.max(axis=0).mean(axis=1)  # each gallery location's best match
            out[q, start:start + len(part)] = 0.5 * (forward + backward)
    return out


# ----------------------------------------------------------------------------- in an index

# Pooled neighbours a query's local re-scoring looks at: on the five trained Omniglot seeds the
# 50 nearest by the pooled cosine gave exactly the full matrix's test MAP@5 (20: -0.0003).
SHORTLIST = 50
# Galleries above this many images are not offered local matching: the descriptors cost
# 22-44 KB an image (160-224 px) and choosing the share re-scores every image's shortlist.
MAX_IMAGES = 20_000
# the shares of the chamfer similarity tried (0, the pooled cosine alone, is always tried first)
SHARES = (0.25, 0.5, 0.75, 1.0)


@dataclass
class LocalGallery:
    """The gallery's local descriptors as an index keeps them: ``descriptors`` (N, L, C) float16,
    already centred on ``mean`` (C,) and normalised (``normalised_descriptors``; may be
    memory-mapped), and the ``share`` of the chamfer similarity in a gallery image's score,
    ``(1 - share) x cosine + share x chamfer``."""

    share: float
    mean: np.ndarray
    descriptors: np.ndarray

    def queries(self, maps: np.ndarray) -> np.ndarray:
        """Raw query maps (Q, L, C) as this gallery's descriptors are: centred and normalised."""
        return normalised_descriptors(maps, self.mean)

    def rescored(self, queries: np.ndarray, similarities: np.ndarray, rows: np.ndarray,
                 chamfer: "ChamferCache | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """Best-first neighbour lists (pooled ``similarities`` of gallery ``rows``, -1 padded)
        re-scored with the chamfer similarity of the normalised query descriptors ``queries``
        (Q, L, C) and sorted best-first again, padding last at -inf. ``chamfer``: a cache of
        gallery-to-gallery values, for gallery images asked as queries (``queries`` is then the
        (Q,) int array of their rows)."""
        blended = np.where(rows >= 0, self.blended(queries, similarities, rows, chamfer),
                           -np.inf).astype(np.float32)
        order = np.argsort(-blended, axis=1, kind="stable")
        return np.take_along_axis(blended, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def blended(self, queries: np.ndarray, similarities: np.ndarray, rows: np.ndarray,
                chamfer: "ChamferCache | None" = None) -> np.ndarray:
        """(Q, n) float32: ``(1 - share) x`` the pooled ``similarities`` of gallery ``rows``
        (-1: none, left at the pooled value) ``+ share x`` their chamfer similarity to the
        query's descriptors, in the order given (``rescored`` without the sorting)."""
        local = np.zeros(rows.shape, dtype=np.float32)
        for q in range(len(rows)):
            found = np.flatnonzero(rows[q] >= 0)
            if not len(found):
                continue
            wanted = rows[q, found]
            if chamfer is not None:
                local[q, found] = chamfer.values(int(queries[q]), wanted)
                continue
            ascending = np.argsort(wanted, kind="stable")  # sequential reads of a memory map
            gallery = np.asarray(self.descriptors[wanted[ascending]], dtype=np.float32)
            local[q, found[ascending]] = chamfer_similarity(queries[q:q + 1], gallery)[0]
        local = np.where(rows >= 0, local, similarities)
        return ((1.0 - self.share) * similarities + self.share * local).astype(np.float32)

    def hubness(self, vectors: np.ndarray, neighbours, k: int, block: int = 1024,
                chamfer: "ChamferCache | None" = None) -> np.ndarray:
        """(N,) float32: each gallery image's mean blended similarity to its ``k`` best *other*
        gallery images among its ``SHORTLIST`` pooled neighbours (``neighbours(queries, n)``: a
        built index's search, best first): ``index.hubness`` on the scores queries get."""
        n = len(vectors)
        if n < 2:
            return np.zeros(n, dtype=np.float32)
        chamfer = chamfer or ChamferCache(self.descriptors)
        wanted = min(n, max(SHORTLIST, k) + 1)
        out = np.empty(n, dtype=np.float32)
        for start in range(0, n, block):
            own = np.arange(start, min(start + block, n))
            similarities, rows = neighbours(np.ascontiguousarray(vectors[own], dtype=np.float32),
                                            wanted)
            rows = np.where(rows == own[:, None], -1, rows)  # its own image is no neighbour
            blended, rows = self.rescored(own, similarities, rows, chamfer)
            top = blended[:, :k]
            finite = np.isfinite(top)
            out[own] = np.where(finite, top, 0.0).sum(axis=1) / np.maximum(finite.sum(axis=1), 1)
        return out


def local_gallery(maps: np.ndarray, share: float, block: int = 1024) -> LocalGallery:
    """The ``LocalGallery`` of a gallery's raw maps (N, L, C): centred on their mean and
    normalised, stored float16 (a block at a time in float32: 1.7 GB for 20,000 images at
    224 px otherwise)."""
    mean = mean_descriptor(maps)
    descriptors = np.empty(maps.shape, dtype=np.float16)
    for start in range(0, len(maps), block):
        descriptors[start:start + block] = normalised_descriptors(maps[start:start + block], mean)
    return LocalGallery(share, mean, descriptors)


class ChamferCache:
    """Chamfer similarities between gallery images, computed once per pair: choosing the share
    asks the same shortlists under every share, hubness weight and whitening fold."""

    def __init__(self, descriptors: np.ndarray):
        self.descriptors = descriptors
        self._known: dict[tuple[int, int], float] = {}

    def values(self, row: int, others: np.ndarray) -> np.ndarray:
        """(len(others),) float32: the chamfer similarity of gallery image ``row`` to each of
        ``others`` (symmetric, so a pair is computed once whichever side asks)."""
        keys = [(min(row, int(o)), max(row, int(o))) for o in others]
        missing = sorted({int(o) for o, key in zip(others, keys) if key not in self._known})
        if missing:
            query = np.asarray(self.descriptors[row:row + 1], dtype=np.float32)
            gallery = np.asarray(self.descriptors[missing], dtype=np.float32)
            for other, value in zip(missing, chamfer_similarity(query, gallery)[0]):
                self._known[(min(row, other), max(row, other))] = float(value)
        return np.array([self._known[key] for key in keys], dtype=np.float32)


def write_descriptors(path, parts, order: np.ndarray, chunk: int = 1024) -> None:
    """Save normalised descriptors as one float16 ``.npy`` (N, L, C) in ``order``, a chunk at a
    time. ``parts``: arrays, or ``(array, selected rows)`` pairs (what stays of a stored index
    and the new images), seen as one concatenation: ``index.rows.GalleryRows`` over each part
    viewed as (N, L x C) rows (float16 -> float32 -> float16 is exact)."""
    from .rows import GalleryRows

    pieces = [part if isinstance(part, tuple) else (part, None) for part in parts]
    shapes = {array.shape[1:] for array, _ in pieces}
    if len(shapes) > 1:
        raise ValueError(f"descriptors of different shapes {sorted(shapes)}")
    shape = shapes.pop()
    rows = GalleryRows([(array.reshape(len(array), -1), selected) if selected is not None
                        else array.reshape(len(array), -1) for array, selected in pieces])
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(rows), *shape))
    for start, block in rows.chunks(np.asarray(order, dtype=np.int64), size=chunk):
        out[start:start + len(block)] = block.reshape(len(block), *shape)
    out.flush()
    del out
