"""Search parameters tuned to a target recall (index.tuning): the chosen value is the smallest
that meets the target, checked against a naive re-measurement; it goes into the manifest and
comes back on load; a target that cannot be met is said at build time."""
from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from index import tuning, types
from index.store import load_index, read_manifest, save_index
from index.synthetic import clustered_vectors

from .index_helpers import single_threaded

MODEL = {"fingerprint": "synthetic", "source": "pretrained", "checkpoint": None,
         "model_config": {}, "preprocessing": {"image_size": 64}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


@pytest.fixture(scope="module")
def gallery():
    vectors, labels, _, _ = clustered_vectors(2000, 64, seed=3, spread=0.3)
    return vectors, labels


def naive_recall(index, vectors, labels, rows, k=5) -> float:
    """How often exact search's first identity (own image left out) is in the index's top k,
    written the slow obvious way."""
    hits = []
    for row in rows:
        similarities = vectors @ vectors[row]
        exact_order = [r for r in np.argsort(-similarities, kind="stable") if r != row]
        first = labels[exact_order[0]]
        _, found = index.search(vectors[row:row + 1], 200)
        answered = []
        for r in found[0]:
            if r < 0 or r == row or labels[r] in answered:
                continue
            answered.append(labels[r])
        hits.append(first in answered[:k])
    return float(np.mean(hits))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_the_chosen_value_is_the_smallest_that_meets_the_target(gallery, kind):
    vectors, labels = gallery
    spec = types.resolve(kind, len(vectors), vectors.shape[1])
    index = types.build(vectors, spec)
    found = tuning.tune(index, spec, vectors, labels, target=0.9)
    assert found.reached and found.recall >= 0.9
    rows = np.random.default_rng(0).choice(len(vectors), size=tuning.SAMPLE, replace=False)
    options = tuning.candidates(spec)
    setting = faiss.extract_index_ivf(index).nprobe if kind == "ivf" else index.hnsw.efSearch
    assert setting == found.value  # left on the index as chosen
    if kind == "ivf":
        assert abs(naive_recall(index, vectors, labels, rows) - found.recall) < 1e-9
    smaller = options[options.index(found.value) - 1] if found.value != options[0] else None
    if smaller is not None and kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = smaller
        assert naive_recall(index, vectors, labels, rows) < 0.9


def test_the_tuned_value_and_recall_go_into_the_manifest_and_come_back(gallery, tmp_path):
    vectors, labels = gallery
    paths = [f"/g/{i:05d}.png" for i in range(len(vectors))]
    save_index(tmp_path / "ivf", vectors, paths, labels, model=MODEL, tta="none", threshold=None,
               index_type="ivf", target_recall=0.8)
    entry = read_manifest(tmp_path / "ivf").index
    assert entry["target_recall"] == 0.8 and entry["recall"] >= 0.8
    assert faiss.extract_index_ivf(load_index(tmp_path / "ivf").gallery.cpu_index).nprobe == \
        entry["params"]["nprobe"]
    # a higher target needs at least as many cells
    save_index(tmp_path / "ivf99", vectors, paths, labels, model=MODEL, tta="none",
               threshold=None, index_type="ivf", target_recall=0.99)
    assert read_manifest(tmp_path / "ivf99").index["params"]["nprobe"] >= entry["params"]["nprobe"]
    # an exact index has nothing to tune
    save_index(tmp_path / "flat", vectors, paths, labels, model=MODEL, tta="none", threshold=None)
    assert read_manifest(tmp_path / "flat").index.get("recall") is None
    assert "recall" not in (tmp_path / "flat" / "manifest.json").read_text()


def test_a_target_that_cannot_be_met_is_said_at_build_time(gallery, tmp_path, caplog, monkeypatch):
    vectors, labels = gallery
    paths = [f"/g/{i:05d}.png" for i in range(len(vectors))]
    # a shortlist no longer than the answer: the codes alone choose it, so it misses some
    monkeypatch.setattr(tuning, "RERANK_FACTORS", (1,))
    with caplog.at_level(logging.WARNING):
        save_index(tmp_path / "pq", vectors, paths, labels, model=MODEL, tta="none",
                   threshold=None, index_type="ivfpq", target_recall=1.0)
    entry = read_manifest(tmp_path / "pq").index
    assert entry["recall"] < 1.0  # product-quantised codes shortlist: never exactly
    assert "cannot reach the target recall 1.00" in caplog.text


def test_ivfpq_lengthens_its_shortlist_where_codes_shortlist_poorly(tmp_path):
    """On isotropic 64-d vectors with 8-byte codes, the default x4 shortlist misses the target even
    scanning every cell; tuning then keeps the shortest longer shortlist that meets it, and the
    loaded index searches with it."""
    from index import GalleryIndex
    from index.synthetic import clustered_float32

    vectors, labels, _, _ = clustered_float32(20_000, 64, 10, spread=0.35)
    short = GalleryIndex(vectors, labels, "ivfpq")
    default_only = tuning.tune(short.cpu_index, short.spec, vectors, labels, search=short.neighbours)
    assert not default_only.reached  # x4 alone: the premise of this test
    paths = [f"/g/{i:06d}.png" for i in range(len(vectors))]
    save_index(tmp_path / "pq", vectors, paths, list(labels), model=MODEL, tta="none",
               threshold=None, index_type="ivfpq")
    entry = read_manifest(tmp_path / "pq").index
    assert entry["params"]["rerank"] in tuning.RERANK_FACTORS[1:]
    assert entry["recall"] >= tuning.DEFAULT_TARGET
    assert load_index(tmp_path / "pq").gallery.rerank_factor == entry["params"]["rerank"]


def test_auto_ships_its_approximate_choice_at_the_target_recall(gallery, tmp_path, monkeypatch):
    """Above ``FLAT_MAX`` (lowered here so a small gallery crosses it) ``auto`` picks ivfpq and
    tunes it: the manifest records the target and a measured recall that meets it, and a naive
    re-measurement on the loaded index agrees."""
    vectors, labels = gallery
    monkeypatch.setattr(types, "FLAT_MAX", 1000)
    paths = [f"/g/{i:05d}.png" for i in range(len(vectors))]
    save_index(tmp_path / "auto", vectors, paths, labels, model=MODEL, tta="none",
               threshold=None, index_type="auto")
    entry = read_manifest(tmp_path / "auto").index
    assert (entry["kind"], entry["requested"]) == ("ivfpq", "auto")
    assert entry["recall"] >= entry["target_recall"] == tuning.DEFAULT_TARGET
    loaded = load_index(tmp_path / "auto").gallery

    class Searched:  # the loaded index's own search, re-ranking included, under FAISS's signature
        search = staticmethod(loaded.neighbours)

    rows = tuning.held_out(len(vectors))
    assert naive_recall(Searched, vectors, np.asarray(labels), rows) >= tuning.DEFAULT_TARGET


def test_auto_indexes_exactly_where_its_choice_cannot_reach_the_target(gallery, tmp_path, caplog,
                                                                      monkeypatch):
    """Codes that shortlist no more than the answer cannot reach recall 1.0: ``auto`` then writes
    an exact index, recorded as such, unless the raw vectors would not fit in memory (then it
    keeps the approximate one and says so)."""
    vectors, labels = gallery
    monkeypatch.setattr(types, "FLAT_MAX", 1000)
    monkeypatch.setattr(tuning, "RERANK_FACTORS", (1,))
    paths = [f"/g/{i:05d}.png" for i in range(len(vectors))]
    with caplog.at_level(logging.WARNING):
        save_index(tmp_path / "auto", vectors, paths, labels, model=MODEL, tta="none",
                   threshold=None, index_type="auto", target_recall=1.0)
    entry = read_manifest(tmp_path / "auto").index
    assert (entry["kind"], entry["requested"], entry["recall"]) == ("flat", "auto", 1.0)
    assert "indexing the gallery exactly (flat) instead" in caplog.text
    assert "use --index-type flat" not in caplog.text  # no advice to do what auto did
    loaded = load_index(tmp_path / "auto").gallery
    assert isinstance(loaded.cpu_index, faiss.IndexFlatIP)
    rows = tuning.held_out(len(vectors))
    assert naive_recall(loaded.cpu_index, vectors, np.asarray(labels), rows) == 1.0

    monkeypatch.setattr(types, "exact_fits_in_memory", lambda n, dim: False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        save_index(tmp_path / "big", vectors, paths, labels, model=MODEL, tta="none",
                   threshold=None, index_type="auto", target_recall=1.0)
    entry = read_manifest(tmp_path / "big").index
    assert entry["kind"] == "ivfpq" and entry["recall"] < 1.0
    assert "auto keeps its ivfpq index below the target recall" in caplog.text
