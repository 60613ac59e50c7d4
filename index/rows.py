"""Gallery vectors read in chunks, so a 10M x 512 gallery (20 GB) is never copied whole.

An index write reads its vectors from up to two places: what stays of the stored index (its
``vectors.npy``, memory-mapped, minus removed rows) and the new embeddings. ``GalleryRows`` is
their concatenation without concatenating: rows are gathered a chunk at a time, in any order, to
check them and to write them (sorted by path) straight into the new ``vectors.npy``, which is then
memory-mapped again to build the FAISS index. The page cache, which the kernel can drop, holds the
file; the process itself holds at most the new embeddings plus one chunk.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

CHUNK_ROWS = 65_536  # 128 MiB of 512-d float32 per chunk


class GalleryRows:
    """Rows of several float32 matrices of one width, seen as one, optionally through a row
    selection per part (``parts``: arrays, or ``(array, selected rows)`` pairs)."""

    def __init__(self, parts: Sequence[np.ndarray | tuple[np.ndarray, np.ndarray]]):
        self._parts: list[tuple[np.ndarray, np.ndarray | None]] = []
        for part in parts:
            array, selected = part if isinstance(part, tuple) else (part, None)
            if array.ndim != 2:
                raise ValueError(f"gallery vectors must be a matrix, got shape {array.shape}")
            if selected is not None:
                selected = np.asarray(selected, dtype=np.int64)
            if (len(array) if selected is None else len(selected)):
                self._parts.append((array, selected))
        widths = {array.shape[1] for array, _ in self._parts}
        if len(widths) > 1:
            raise ValueError(f"gallery vectors of different widths {sorted(widths)}")
        self.dim = widths.pop() if widths else 0
        sizes = [len(a) if s is None else len(s) for a, s in self._parts]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @classmethod
    def of(cls, vectors: "np.ndarray | GalleryRows") -> "GalleryRows":
        """``vectors`` as rows: itself if it already is, else one part (any array-like)."""
        return vectors if isinstance(vectors, GalleryRows) else cls([np.asarray(vectors)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (global numbers, any order) as one float32 array."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self._starts, rows, side="right") - 1
        for p, (array, selected) in enumerate(self._parts):
            mine = np.flatnonzero(part_of == p)
            if not len(mine):
                continue
            local = rows[mine] - self._starts[p]
            if selected is not None:
                local = selected[local]
            ascending = np.argsort(local, kind="stable")  # sequential reads of a memory map
            out[mine[ascending]] = array[local[ascending]]
        return out

    def chunks(self, order: np.ndarray | None = None,
               size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(first output row, rows)`` chunks in ``order`` (default: row order)."""
        size = size or CHUNK_ROWS
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            wanted = np.arange(start, stop) if order is None else order[start:stop]
            yield start, self.take(wanted)

    def array(self) -> np.ndarray:
        """All rows in one array: a copy unless there is a single unselected part."""
        if len(self._parts) == 1 and self._parts[0][1] is None:
            return self._parts[0][0]
        return self.take(np.arange(len(self)))


def non_finite_rows(vectors: np.ndarray | GalleryRows, size: int | None = None) -> np.ndarray:
    """The numbers of rows holding NaN or infinity, checked a chunk at a time."""
    source = GalleryRows.of(vectors)
    bad = [start + np.flatnonzero(~np.isfinite(chunk).all(axis=1))
           for start, chunk in source.chunks(size=size)]
    return np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)


def write_rows(path: Path, vectors: np.ndarray | GalleryRows, order: np.ndarray | None = None,
               size: int | None = None) -> None:
    """Save the rows (in ``order``) as a float32 ``.npy`` file, written chunk by chunk."""
    source = GalleryRows.of(vectors)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=source.shape)
    for start, chunk in source.chunks(order, size):
        out[start:start + len(chunk)] = chunk
    out.flush()
    del out


def sample_rows(n_rows: int, n_wanted: int, seed: int = 0) -> np.ndarray:
    """``n_wanted`` distinct row numbers (all rows if fewer), ascending: a training sample."""
    if n_wanted >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=n_wanted, replace=False))
