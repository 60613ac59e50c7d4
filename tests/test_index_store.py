"""The index folder: round trip, atomic replacement, and clear refusals of what it cannot trust."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import index.store as store
from index import GalleryIndex
from index.store import load_index, read_manifest, save_index, write_directory, writer_lock
from retrieval.errors import UserError

from .index_helpers import clustered_vectors

MODEL = {"fingerprint": "0123456789abcdef", "source": "checkpoint", "checkpoint": "/m/model.pt",
         "model_config": {"backbone": "tf_efficientnet_lite0", "embedding_dim": 32, "gem_p": 3.0},
         "preprocessing": {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                           "interpolation": "bicubic"}}


@pytest.fixture(scope="module")
def gallery():
    vectors, labels, queries, _ = clustered_vectors(60, 32, seed=3)
    paths = [f"/gallery/{label}/{i:03d}.png" for i, label in enumerate(labels)]
    return vectors, list(paths), list(labels), queries


def save(folder, gallery, **overrides):
    vectors, paths, labels, _ = gallery
    kwargs = dict(model=MODEL, tta="flip", threshold=0.42, index_type="flat")
    kwargs.update(overrides)
    return save_index(folder, vectors, paths, labels, **kwargs)


def test_round_trip_gives_identical_results_and_a_complete_manifest(gallery, tmp_path):
    vectors, paths, labels, queries = gallery
    save(tmp_path / "idx", gallery)
    stored = load_index(tmp_path / "idx", expected_fingerprint=MODEL["fingerprint"])
    direct = GalleryIndex(vectors, labels).search(queries, 5)
    loaded = stored.gallery.search(queries, 5)
    assert loaded.identities == direct.identities
    np.testing.assert_array_equal(loaded.scores, direct.scores)
    assert [stored.paths[r] for r in loaded.best_rows[:, 0]] == [paths[r] for r in direct.best_rows[:, 0]]
    np.testing.assert_array_equal(stored.vectors(), vectors)
    m = stored.manifest
    assert (m.format, m.dim, m.metric) == (store.FORMAT, 32, "inner_product")
    assert (m.tta, m.threshold) == ("flip", 0.42)
    assert m.model == MODEL and m.counts == {"images": len(paths), "identities": 60}
    assert m.index["kind"] == "flat" and m.created and m.updated
    assert set(m.files) == {"index.faiss", "gallery.parquet", "vectors.npy"}
    assert sorted(os.listdir(tmp_path)) == ["idx"]  # no temp folders left behind


def test_rows_are_sorted_by_path_whatever_the_input_order(gallery, tmp_path):
    vectors, paths, labels, _ = gallery
    order = np.random.default_rng(0).permutation(len(paths))
    save_index(tmp_path / "a", vectors[order], [paths[i] for i in order], [labels[i] for i in order],
               model=MODEL, tta="none", threshold=None)
    save(tmp_path / "b", gallery)
    a, b = load_index(tmp_path / "a"), load_index(tmp_path / "b")
    assert a.paths == sorted(paths) == b.paths and a.identities == b.identities
    np.testing.assert_array_equal(a.vectors(), b.vectors())
    assert (tmp_path / "a" / "index.faiss").read_bytes() == (tmp_path / "b" / "index.faiss").read_bytes()


def test_another_models_index_is_refused(gallery, tmp_path):
    save(tmp_path / "idx", gallery)
    with pytest.raises(UserError) as err:
        load_index(tmp_path / "idx", expected_fingerprint="ffffffffffffffff", fix="rebuild it")
    message = str(err.value)
    assert "another model" in message and "0123456789abcdef" in message and "/m/model.pt" in message
    assert message.endswith("rebuild it") and "\n" not in message


@pytest.mark.parametrize("name", ["index.faiss", "gallery.parquet"])
def test_truncated_file_is_refused_with_the_fix(gallery, tmp_path, name):
    save(tmp_path / "idx", gallery)
    path = tmp_path / "idx" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"{name} is truncated .*: rebuild it with build_index.py"):
        load_index(tmp_path / "idx")


def test_corrupt_bytes_of_the_same_size_are_refused(gallery, tmp_path):
    save(tmp_path / "idx", gallery)
    path = tmp_path / "idx" / "index.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="index.faiss is corrupt .*checksum"):
        load_index(tmp_path / "idx")


def test_truncated_vectors_are_refused_when_an_edit_needs_them(gallery, tmp_path):
    save(tmp_path / "idx", gallery)
    stored = load_index(tmp_path / "idx")  # queries never read vectors.npy
    path = tmp_path / "idx" / "vectors.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="vectors.npy is truncated"):
        stored.vectors()


def test_faiss_file_that_passes_the_checksum_but_does_not_parse(gallery, tmp_path):
    """E.g. a manifest rewritten by hand over a damaged index: FAISS's own error, one line."""
    save(tmp_path / "idx", gallery)
    folder = tmp_path / "idx"
    (folder / "index.faiss").write_bytes(b"garbage!" * 10)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["index.faiss"] = store._describe(folder / "index.faiss")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as err:
        load_index(folder)
    assert "index.faiss is corrupt" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage, expected", [
    (lambda folder: (folder / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
    (lambda folder: (folder / "manifest.json").unlink(), "is not a gallery index"),
    (lambda folder: (folder / "gallery.parquet").unlink(), "gallery.parquet is missing"),
    (lambda folder: (folder / "manifest.json").write_text(json.dumps({"format": "other/9"})),
     "format 'other/9'"),
])
def test_damaged_folder_is_refused(gallery, tmp_path, damage, expected):
    save(tmp_path / "idx", gallery)
    damage(tmp_path / "idx")
    with pytest.raises(UserError, match=expected):
        load_index(tmp_path / "idx")


def test_missing_folder_says_how_to_build_one(tmp_path):
    with pytest.raises(UserError, match="does not exist: build one with build_index.py"):
        read_manifest(tmp_path / "nowhere")


@pytest.mark.parametrize("fail_in", ["_write_table", "_fsync"])
def test_interrupted_write_leaves_the_previous_index_loadable(gallery, tmp_path, monkeypatch, fail_in):
    vectors, paths, labels, queries = gallery
    save(tmp_path / "idx", gallery)
    before = load_index(tmp_path / "idx").gallery.search(queries, 5)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(store, fail_in, crash)
    with pytest.raises(KeyboardInterrupt):
        save_index(tmp_path / "idx", vectors[:10], paths[:10], labels[:10], model=MODEL,
                   tta="none", threshold=None)
    monkeypatch.undo()
    after = load_index(tmp_path / "idx")
    assert after.manifest.counts["images"] == len(paths)
    assert after.gallery.search(queries, 5).identities == before.identities
    assert sorted(os.listdir(tmp_path)) == ["idx"]


def test_replacement_without_atomic_exchange_falls_back_to_two_renames(gallery, tmp_path, monkeypatch):
    vectors, paths, labels, _ = gallery
    save(tmp_path / "idx", gallery)
    monkeypatch.setattr(store, "_exchange", lambda a, b: False)
    save_index(tmp_path / "idx", vectors[:10], paths[:10], labels[:10], model=MODEL, tta="none",
               threshold=None)
    assert load_index(tmp_path / "idx").manifest.counts["images"] == 10
    assert sorted(os.listdir(tmp_path)) == ["idx"]


def test_a_crash_between_the_two_renames_is_explained(gallery, tmp_path):
    save(tmp_path / "idx", gallery)
    os.rename(tmp_path / "idx", tmp_path / ".idx.old-123")
    with pytest.raises(UserError, match=r"interrupted write left the previous index in .*\.idx\.old-123"):
        load_index(tmp_path / "idx")


def test_a_folder_that_is_not_an_index_is_never_replaced(gallery, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"precious")
    with pytest.raises(UserError, match="exists and is not a gallery index"):
        save(tmp_path / "photos", gallery)
    assert (tmp_path / "photos" / "keep.jpg").read_bytes() == b"precious"
    (tmp_path / "empty").mkdir()
    save(tmp_path / "empty", gallery)  # an empty folder is fine
    assert load_index(tmp_path / "empty").manifest.counts["images"] == len(gallery[1])


def test_writer_lock_clears_temp_folders_of_crashed_writers(tmp_path):
    (tmp_path / ".idx.tmp-dead").mkdir()
    write_directory(tmp_path / "idx", lambda folder: (folder / "manifest.json").write_text("{}"))
    with writer_lock(tmp_path / "idx"):
        assert not (tmp_path / ".idx.tmp-dead").exists()
    assert (tmp_path / "idx" / "manifest.json").is_file()


def test_empty_gallery_is_refused(tmp_path):
    with pytest.raises(UserError, match="would be empty"):
        save_index(tmp_path / "idx", np.zeros((0, 8), np.float32), [], [], model=MODEL,
                   tta="none", threshold=None)
