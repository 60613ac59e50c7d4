"""Galleries read a chunk at a time: the same rows and the same index as the whole-array path,
without a second copy of the vectors in memory (issue 11: 10M x 512 in 24 GiB)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import index.rows as rows_module
from index.rows import GalleryRows, non_finite_rows, write_rows
from index.store import load_index, save_index
from index.synthetic import clustered_vectors

MODEL = {"fingerprint": "0123456789abcdef", "source": "checkpoint", "checkpoint": "/m/model.pt",
         "model_config": {"backbone": "tf_efficientnet_lite0", "embedding_dim": 32, "gem_p": 3.0},
         "preprocessing": {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                           "interpolation": "bicubic"}}


@pytest.fixture
def parts(tmp_path):
    """A memory-mapped stored part with a row selection, and an in-memory part."""
    rng = np.random.default_rng(0)
    stored = rng.standard_normal((50, 8)).astype(np.float32)
    np.save(tmp_path / "stored.npy", stored)
    mapped = np.load(tmp_path / "stored.npy", mmap_mode="r")
    kept = np.flatnonzero(rng.random(50) < 0.6)
    new = rng.standard_normal((13, 8)).astype(np.float32)
    return (mapped, kept), new, np.concatenate([stored[kept], new])


def test_rows_gather_like_concatenating_the_selections(parts):
    stored, new, naive = parts
    source = GalleryRows([stored, new])
    assert source.shape == naive.shape
    order = np.random.default_rng(1).permutation(len(naive))
    np.testing.assert_array_equal(source.take(order), naive[order])
    gathered = np.concatenate([chunk for _, chunk in source.chunks(order, size=7)])
    np.testing.assert_array_equal(gathered, naive[order])
    np.testing.assert_array_equal(source.array(), naive)


def test_empty_parts_are_dropped_and_widths_must_agree(parts):
    stored, new, naive = parts
    assert len(GalleryRows([np.empty((0, 8), np.float32), new])) == len(new)
    assert len(GalleryRows([(stored[0], np.empty(0, np.int64)), new])) == len(new)
    with pytest.raises(ValueError, match="different widths"):
        GalleryRows([new, np.zeros((2, 4), np.float32)])


def test_non_finite_rows_match_a_whole_array_check(parts):
    _, new, _ = parts
    broken = new.copy()
    broken[[2, 9], [1, 5]] = [np.nan, np.inf]
    np.testing.assert_array_equal(non_finite_rows(broken, size=4),
                                  np.flatnonzero(~np.isfinite(broken).all(axis=1)))


def test_written_rows_are_the_ordered_rows(parts, tmp_path):
    stored, new, naive = parts
    order = np.argsort(naive[:, 0])
    write_rows(tmp_path / "out.npy", GalleryRows([stored, new]), order, size=5)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), naive[order])


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_an_index_from_parts_equals_one_from_the_whole_array(tmp_path, monkeypatch, kind):
    vectors, labels, queries, _ = clustered_vectors(3000, 32, seed=5)
    paths = [f"/g/{i:05d}.png" for i in range(len(vectors))][::-1]  # unsorted on purpose
    np.save(tmp_path / "stored.npy", vectors[:2000])
    mapped = np.load(tmp_path / "stored.npy", mmap_mode="r")
    kept = np.arange(0, 2000, 2)
    whole = np.concatenate([vectors[kept], vectors[2000:]])
    names = [paths[i] for i in kept] + paths[2000:]
    ids = [labels[i] for i in kept] + list(labels[2000:])
    common = dict(model=MODEL, tta="none", threshold=None, index_type=kind)
    save_index(tmp_path / "whole", whole, names, ids, **common)
    monkeypatch.setattr(rows_module, "CHUNK_ROWS", 256)
    monkeypatch.setattr("index.types.ADD_CHUNK", 300)
    save_index(tmp_path / "parts", GalleryRows([(mapped, kept), vectors[2000:]]), names, ids, **common)
    a, b = load_index(tmp_path / "whole"), load_index(tmp_path / "parts")
    assert a.paths == b.paths == sorted(names)
    np.testing.assert_array_equal(a.vectors(), b.vectors())
    ra, rb = a.gallery.search(queries, 5), b.gallery.search(queries, 5)
    assert ra.identities == rb.identities
    np.testing.assert_allclose(ra.scores, rb.scores, rtol=1e-5)


def test_a_memory_mapped_gallery_is_not_copied_into_memory(tmp_path, monkeypatch):
    """Sorting, checking and indexing a memory-mapped gallery allocate chunks, not a copy:
    numpy's allocations (tracked by tracemalloc) peak well under the gallery's size."""
    n, dim = 60_000, 256
    vectors = np.lib.format.open_memmap(tmp_path / "gallery.npy", mode="w+", dtype=np.float32,
                                        shape=(n, dim))
    rng = np.random.default_rng(0)
    for start in range(0, n, 10_000):
        block = rng.standard_normal((10_000, dim)).astype(np.float32)
        vectors[start:start + 10_000] = block / np.linalg.norm(block, axis=1, keepdims=True)
    vectors.flush()
    mapped = np.load(tmp_path / "gallery.npy", mmap_mode="r")
    paths = [f"/g/{i:06d}.png" for i in range(n)][::-1]  # every row moves when sorted
    identities = [f"id{i // 3}" for i in range(n)]
    monkeypatch.setattr(rows_module, "CHUNK_ROWS", 4096)
    monkeypatch.setattr("index.types.ADD_CHUNK", 4096)
    tracemalloc.start()
    try:
        save_index(tmp_path / "index", mapped, paths, identities, model=MODEL, tta="none",
                   threshold=None, index_type="flat")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.35 * mapped.nbytes, f"peak {peak / 2**20:.0f} MiB for a {mapped.nbytes / 2**20:.0f} MiB gallery"
    stored = load_index(tmp_path / "index").vectors(mmap=True)
    np.testing.assert_array_equal(stored[:5], np.asarray(mapped[::-1][:5]))


def test_rerank_equals_a_naive_loop(tmp_path):
    """The exact re-scoring of an ivfpq shortlist (FAISS's products by row number, over a
    memory-mapped file) against a per-query NumPy reference: missing candidates, -1, never come
    ahead of real ones, and a query with fewer real candidates than asked is padded with -1."""
    from index.search import rerank

    rng = np.random.default_rng(5)
    np.save(tmp_path / "raw.npy", rng.standard_normal((500, 16)).astype(np.float32))
    raw = np.load(tmp_path / "raw.npy", mmap_mode="r")
    queries = rng.standard_normal((53, 16)).astype(np.float32)
    rows = np.stack([rng.choice(500, size=12, replace=False) for _ in queries])
    rows[::7, -3:] = -1
    rows[5, 2:] = -1  # two real candidates for four places
    scores, best = rerank(queries, rows, raw, 4)
    for q, candidates, got_scores, got_rows in zip(queries, rows, scores, best):
        real = candidates[candidates >= 0]
        exact = raw[real] @ q
        order = np.argsort(-exact, kind="stable")[:4]
        np.testing.assert_array_equal(got_rows[:len(order)], real[order])
        np.testing.assert_allclose(got_scores[:len(order)], exact[order], rtol=1e-5)
        assert (got_rows[len(order):] == -1).all() and np.isneginf(got_scores[len(order):]).all()
    assert (best[5, 2:] == -1).all()
