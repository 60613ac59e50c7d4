"""The index folder: round trip, atomic replacement, and clear refusals of what it cannot trust."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import index.store as store
from index import GalleryIndex
from index.errors import (
    GalleryIndexError,
    IndexCorrupt,
    IndexNotFound,
    InvalidGallery,
    NotReplaceable,
)
from index.store import load_index, read_manifest, save_index, writer_lock
from index.synthetic import clustered_vectors
from retrieval.answering.encoder import check_index_model
from retrieval.errors import UserError, index_advice

MODEL = {"fingerprint": "0123456789abcdef", "source": "checkpoint", "checkpoint": "/m/model.pt",
         "model_config": {"backbone": "tf_efficientnet_lite0", "embedding_dim": 32, "gem_p": 3.0},
         "preprocessing": {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                           "interpolation": "bicubic"}}


@pytest.fixture(scope="module")
def gallery():
    vectors, labels, queries, _ = clustered_vectors(60, 32, seed=3)
    paths = [f"/gallery/{label}/{i:03d}.png" for i, label in enumerate(labels)]
    return vectors, list(paths), list(labels), queries


def data_file(folder, name):
    """Where the current manifest keeps one of the index's data files."""
    return folder / read_manifest(folder).data_dir / name


def save(folder, gallery, **overrides):
    vectors, paths, labels, _ = gallery
    kwargs = dict(model=MODEL, tta="flip", threshold=0.42, index_type="flat")
    kwargs.update(overrides)
    return save_index(folder, vectors, paths, labels, **kwargs)


def test_round_trip_gives_identical_results_and_a_complete_manifest(gallery, tmp_path):
    vectors, paths, labels, queries = gallery
    save(tmp_path / "idx", gallery)
    stored = load_index(tmp_path / "idx")
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
    assert sorted(os.listdir(tmp_path / "idx")) == sorted([m.data_dir, "manifest.json"])


def test_rows_are_sorted_by_path_whatever_the_input_order(gallery, tmp_path):
    vectors, paths, labels, _ = gallery
    order = np.random.default_rng(0).permutation(len(paths))
    save_index(tmp_path / "a", vectors[order], [paths[i] for i in order], [labels[i] for i in order],
               model=MODEL, tta="none", threshold=None)
    save(tmp_path / "b", gallery)
    a, b = load_index(tmp_path / "a"), load_index(tmp_path / "b")
    assert a.paths == sorted(paths) == b.paths and a.identities == b.identities
    np.testing.assert_array_equal(a.vectors(), b.vectors())
    assert data_file(tmp_path / "a", "index.faiss").read_bytes() == \
        data_file(tmp_path / "b", "index.faiss").read_bytes()


def test_another_models_index_is_refused(gallery, tmp_path):
    save(tmp_path / "idx", gallery)
    with pytest.raises(UserError) as err:
        check_index_model(load_index(tmp_path / "idx").manifest, tmp_path / "idx", "ffffffffffffffff",
                          fix="rebuild it")
    message = str(err.value)
    assert "another model" in message and "0123456789abcdef" in message and "/m/model.pt" in message
    assert message.endswith("rebuild it") and "\n" not in message


@pytest.mark.parametrize("name", ["index.faiss", "gallery.parquet"])
def test_truncated_file_is_refused_with_the_fix(gallery, tmp_path, name):
    save(tmp_path / "idx", gallery)
    path = data_file(tmp_path / "idx", name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(IndexCorrupt, match=rf"{name} is truncated") as err:
        load_index(tmp_path / "idx")
    assert index_advice(err.value).endswith(": rebuild it with build_index.py")


def test_corrupt_bytes_of_the_same_size_are_refused(gallery, tmp_path):
    save(tmp_path / "idx", gallery)
    path = data_file(tmp_path / "idx", "index.faiss")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorrupt, match="index.faiss is corrupt .*checksum"):
        load_index(tmp_path / "idx")


def test_truncated_vectors_are_refused_when_an_edit_needs_them(gallery, tmp_path):
    save(tmp_path / "idx", gallery)
    stored = load_index(tmp_path / "idx")  # queries never read vectors.npy
    path = data_file(tmp_path / "idx", "vectors.npy")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(IndexCorrupt, match="vectors.npy is truncated"):
        stored.vectors()


def test_faiss_file_that_passes_the_checksum_but_does_not_parse(gallery, tmp_path):
    """E.g. a manifest rewritten by hand over a damaged index: FAISS's own error, one line."""
    save(tmp_path / "idx", gallery)
    folder = tmp_path / "idx"
    data_file(folder, "index.faiss").write_bytes(b"garbage!" * 10)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["index.faiss"] = store._describe(data_file(folder, "index.faiss"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorrupt) as err:
        load_index(folder)
    assert "index.faiss is corrupt" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage, expected", [
    (lambda folder: (folder / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
    (lambda folder: (folder / "manifest.json").unlink(), "is not a gallery index"),
    (lambda folder: data_file(folder, "gallery.parquet").unlink(), "gallery.parquet is missing"),
    (lambda folder: (folder / "manifest.json").write_text(json.dumps({"format": "other/9"})),
     "format 'other/9'"),
])
def test_damaged_folder_is_refused(gallery, tmp_path, damage, expected):
    save(tmp_path / "idx", gallery)
    damage(tmp_path / "idx")
    with pytest.raises(GalleryIndexError, match=expected):
        load_index(tmp_path / "idx")


def test_missing_folder_says_how_to_build_one(tmp_path):
    with pytest.raises(IndexNotFound, match="does not exist") as err:
        read_manifest(tmp_path / "nowhere")
    assert "build one with build_index.py --gallery DIR --out" in index_advice(err.value)


def _crash(*args, **kwargs):
    raise KeyboardInterrupt("simulated crash mid-write")


@pytest.mark.parametrize("fail_in", ["_write_table", "_fsync", "replace"])
def test_interrupted_write_leaves_the_previous_index_loadable(gallery, tmp_path, monkeypatch, fail_in):
    """A crash while the data files are written, while they are flushed, or at the manifest
    rename (the commit point) leaves the previous index whole and nothing else behind."""
    vectors, paths, labels, queries = gallery
    save(tmp_path / "idx", gallery)
    before = load_index(tmp_path / "idx").gallery.search(queries, 5)
    contents = sorted(os.listdir(tmp_path / "idx"))
    monkeypatch.setattr(store.os if fail_in == "replace" else store, fail_in, _crash)
    with pytest.raises(KeyboardInterrupt):
        save_index(tmp_path / "idx", vectors[:10], paths[:10], labels[:10], model=MODEL,
                   tta="none", threshold=None)
    monkeypatch.undo()
    after = load_index(tmp_path / "idx")
    assert after.manifest.counts["images"] == len(paths)
    assert after.gallery.search(queries, 5).identities == before.identities
    assert sorted(os.listdir(tmp_path)) == ["idx"]
    assert sorted(os.listdir(tmp_path / "idx")) == contents


def test_a_crash_leaves_an_index_that_append_extends_not_a_fresh_one(gallery, tmp_path, monkeypatch):
    """Issue 12 item 6: a crash at the commit point used to leave (without renameat2) only a
    backup that the next --append ignored and the write after deleted. Now the manifest rename
    is the only commit and the old index stays in place for the next edit."""
    vectors, paths, labels, _ = gallery
    save(tmp_path / "idx", gallery)
    monkeypatch.setattr(store.os, "replace", _crash)
    with pytest.raises(KeyboardInterrupt):
        save_index(tmp_path / "idx", vectors[:5], paths[:5], labels[:5], model=MODEL, tta="none",
                   threshold=None)
    monkeypatch.undo()
    with writer_lock(tmp_path / "idx"):
        current = load_index(tmp_path / "idx")
        extra = np.ones((1, vectors.shape[1]), np.float32) / np.sqrt(vectors.shape[1])
        save_index(tmp_path / "idx", np.vstack([current.vectors(), extra]),
                   current.paths + ["/gallery/new/1.png"], current.identities + ["new"],
                   model=MODEL, tta="flip", threshold=0.42)
    assert load_index(tmp_path / "idx").manifest.counts == {"images": len(paths) + 1,
                                                             "identities": 61}


def test_a_legacy_crash_between_two_renames_is_recovered_by_the_next_writer(gallery, tmp_path):
    """Format 1 (older versions) could leave the index only in .NAME.old-PID: the next writer
    puts it back instead of starting a fresh index and deleting the backup."""
    save(tmp_path / "idx", gallery)
    os.rename(tmp_path / "idx", tmp_path / ".idx.old-123")
    with pytest.raises(IndexNotFound, match=r"interrupted write left the previous index in .*\.idx\.old-123"):
        load_index(tmp_path / "idx")
    with writer_lock(tmp_path / "idx") as real:
        assert load_index(real).manifest.counts["images"] == len(gallery[1])
    assert not (tmp_path / ".idx.old-123").exists()


def test_a_folder_that_is_not_an_index_is_never_replaced(gallery, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"precious")
    with pytest.raises(NotReplaceable, match="exists and is not a gallery index"):
        save(tmp_path / "photos", gallery)
    assert (tmp_path / "photos" / "keep.jpg").read_bytes() == b"precious"
    (tmp_path / "empty").mkdir()
    save(tmp_path / "empty", gallery)  # an empty folder is fine
    assert load_index(tmp_path / "empty").manifest.counts["images"] == len(gallery[1])


def test_an_unrelated_manifest_json_does_not_make_a_folder_an_index(gallery, tmp_path):
    """Issue 12 item 2: a project folder with its own manifest.json lost notes.txt and src/."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('hi')\n")
    (project / "notes.txt").write_text("my notes\n")
    (project / "manifest.json").write_text(json.dumps({"name": "my-app", "version": 3}))
    with pytest.raises(NotReplaceable, match="manifest.json that is not a valid gallery index manifest"):
        save(project, gallery)
    assert (project / "notes.txt").read_text() == "my notes\n"
    assert (project / "src" / "main.py").is_file()
    assert json.loads((project / "manifest.json").read_text())["name"] == "my-app"


def test_files_a_user_adds_to_an_index_folder_survive_rebuilds(gallery, tmp_path):
    vectors, paths, labels, _ = gallery
    save(tmp_path / "idx", gallery)
    (tmp_path / "idx" / "README.md").write_text("what this index is for\n")
    (tmp_path / "idx" / "reports").mkdir()
    (tmp_path / "idx" / "reports" / "report.html").write_text("<html></html>")
    first = read_manifest(tmp_path / "idx").data_dir
    save_index(tmp_path / "idx", vectors[:10], paths[:10], labels[:10], model=MODEL, tta="none",
               threshold=None)
    save(tmp_path / "idx", gallery)
    assert (tmp_path / "idx" / "README.md").read_text() == "what this index is for\n"
    assert (tmp_path / "idx" / "reports" / "report.html").is_file()
    current = read_manifest(tmp_path / "idx").data_dir
    assert current != first and sorted(os.listdir(tmp_path / "idx")) == sorted(
        ["README.md", "reports", "manifest.json", current])  # superseded data folders are gone


def test_a_format_1_index_is_read_and_upgraded_in_place(gallery, tmp_path):
    """Indexes written before the data folder existed (files beside the manifest) still load;
    the next write moves them into a data folder and deletes only the old data files."""
    vectors, paths, labels, queries = gallery
    save(tmp_path / "idx", gallery)
    folder = tmp_path / "idx"
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("index.faiss", "gallery.parquet", "vectors.npy"):
        os.rename(folder / manifest["data_dir"] / name, folder / name)
    os.rmdir(folder / manifest["data_dir"])
    manifest.update(format="whale-gallery-index/1")
    del manifest["data_dir"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "notes.txt").write_text("keep")
    old = load_index(folder)
    assert old.manifest.format == "whale-gallery-index/1" and old.manifest.data_dir == ""
    np.testing.assert_array_equal(old.vectors(), vectors[np.argsort(np.asarray(paths))])
    save(folder, gallery)
    new = read_manifest(folder)
    assert new.format == store.FORMAT
    assert sorted(os.listdir(folder)) == sorted([new.data_dir, "manifest.json", "notes.txt"])


def test_out_through_a_symlink_writes_the_linked_index(gallery, tmp_path):
    """Issue 12 item 5: the link itself used to be swapped out, the linked index went stale and
    the lock was per spelling. Now the real folder is written, under one lock for both."""
    vectors, paths, labels, _ = gallery
    save(tmp_path / "real", gallery)
    os.symlink(tmp_path / "real", tmp_path / "link")
    with writer_lock(tmp_path / "link") as real:
        assert real == (tmp_path / "real").resolve()
        save_index(tmp_path / "link", vectors[:10], paths[:10], labels[:10], model=MODEL,
                   tta="none", threshold=None)
    assert (tmp_path / "link").is_symlink()
    assert load_index(tmp_path / "real").manifest.counts["images"] == 10
    assert load_index(tmp_path / "link").manifest.counts["images"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [".real.lock", "link", "real"]


def test_both_spellings_of_an_index_share_one_lock(gallery, tmp_path):
    import fcntl

    save(tmp_path / "real", gallery)
    os.symlink(tmp_path / "real", tmp_path / "link")
    with writer_lock(tmp_path / "link"):
        with open(tmp_path / ".real.lock", "a") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_writer_lock_clears_what_crashed_writers_left(gallery, tmp_path):
    save(tmp_path / "idx", gallery)
    folder = tmp_path / "idx"
    current = read_manifest(folder).data_dir
    (folder / "data-0123456789ab").mkdir()  # a crashed writer's data folder
    (folder / "data-0123456789ab" / "index.faiss").write_bytes(b"half")
    (folder / ".manifest.json.0123456789ab.tmp").write_text("{")
    (folder / "data-user-notes").mkdir()  # not ours: a name the index never writes
    with writer_lock(folder):
        assert sorted(os.listdir(folder)) == sorted([current, "data-user-notes", "manifest.json"])
    assert load_index(folder).manifest.counts["images"] == len(gallery[1])


def test_a_first_build_that_crashed_does_not_block_the_next(gallery, tmp_path, monkeypatch):
    vectors, paths, labels, _ = gallery
    monkeypatch.setattr(store.os, "replace", _crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "idx", gallery)
    monkeypatch.undo()
    save(tmp_path / "idx", gallery)
    assert load_index(tmp_path / "idx").manifest.counts["images"] == len(paths)


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.update(dim="512"), "dim"),
    (lambda m: m.update(dim=10**9), "dim"),
    (lambda m: m["counts"].update(images=None), "counts.images"),
    (lambda m: m.update(threshold="high"), "threshold"),
    (lambda m: m.update(threshold=float("nan")), "threshold"),
    (lambda m: m["index"].update(kind="magic"), "index.kind"),
    (lambda m: m["index"]["params"].clear() or m["index"].update(kind="hnsw"), "efSearch"),
    (lambda m: m["model"].pop("fingerprint"), "model.fingerprint"),
    (lambda m: m["files"].pop("vectors.npy"), "files must list"),
    (lambda m: m["files"]["index.faiss"].update(bytes="12"), "files.index.faiss.bytes"),
    (lambda m: m.update(data_dir="../../etc"), "data_dir"),
    (lambda m: m.update(tta=["flip"]), "tta"),
])
def test_manifest_fields_of_the_wrong_type_are_one_clear_error(gallery, tmp_path, edit, expected):
    """Issue 12 item 7: hand-edited manifests used to give tracebacks or garbage."""
    save(tmp_path / "idx", gallery)
    path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexCorrupt) as err:
        load_index(tmp_path / "idx")
    message = str(err.value)
    assert "manifest.json is corrupt" in message and expected in message and "\n" not in message


def _rewrite_data_file(folder, name, write):
    """Replace a data file and fix its manifest entry, as a careless or hostile edit would."""
    path = data_file(folder, name)
    write(path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = store._describe(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("array, expected", [
    (lambda v: v.astype(np.float64), "float64 array"),
    (lambda v: np.where(np.arange(len(v))[:, None] == 3, np.nan, v).astype(np.float32), "NaN"),
])
def test_vectors_of_the_wrong_dtype_or_nan_are_refused(gallery, tmp_path, array, expected):
    save(tmp_path / "idx", gallery)
    vectors = load_index(tmp_path / "idx").vectors()
    _rewrite_data_file(tmp_path / "idx", "vectors.npy",
                       lambda path: np.save(path, array(vectors), allow_pickle=False))
    with pytest.raises(IndexCorrupt, match=f"vectors.npy is corrupt .*{expected}"):
        load_index(tmp_path / "idx").vectors()


def test_a_table_with_null_identities_is_refused(gallery, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    save(tmp_path / "idx", gallery)
    stored = load_index(tmp_path / "idx")
    identities = [None if i == 2 else x for i, x in enumerate(stored.identities)]
    table = pa.table({"path": pa.array(stored.paths, pa.string()),
                      "identity": pa.array(identities, pa.string()),
                      "vector_id": pa.array(np.arange(len(identities), dtype=np.int64))})
    _rewrite_data_file(tmp_path / "idx", "gallery.parquet", lambda path: pq.write_table(table, path))
    with pytest.raises(IndexCorrupt, match="gallery.parquet is corrupt .*1 row.s. have no identity"):
        load_index(tmp_path / "idx")


def test_nan_embeddings_are_never_indexed(gallery, tmp_path):
    vectors, paths, labels, _ = gallery
    broken = vectors.copy()
    broken[7] = np.nan
    with pytest.raises(InvalidGallery, match=f"NaN or infinite embeddings for 1 image.*{paths[7]}"):
        save_index(tmp_path / "idx", broken, paths, labels, model=MODEL, tta="none", threshold=None)
    assert not (tmp_path / "idx").exists() or not os.listdir(tmp_path / "idx")


def test_a_reader_retries_when_a_writer_swaps_the_manifest_under_it(gallery, tmp_path, monkeypatch):
    """A query that read the old manifest just before a rebuild finds the old data folder gone:
    it reads the new manifest and answers from the new index instead of failing."""
    vectors, paths, labels, _ = gallery
    save(tmp_path / "idx", gallery)
    real_parse = store._parse_manifest
    calls = []

    def parse_then_rebuild(directory):
        manifest = real_parse(directory)
        if not calls:
            calls.append(1)
            save_index(tmp_path / "idx", vectors[:10], paths[:10], labels[:10], model=MODEL,
                       tta="none", threshold=None)
        return manifest

    monkeypatch.setattr(store, "_parse_manifest", parse_then_rebuild)
    assert load_index(tmp_path / "idx").manifest.counts["images"] == 10


def test_empty_gallery_is_refused(tmp_path):
    with pytest.raises(InvalidGallery, match="would be empty"):
        save_index(tmp_path / "idx", np.zeros((0, 8), np.float32), [], [], model=MODEL,
                   tta="none", threshold=None)


def test_a_model_with_a_hubness_correction_is_searched_with_it_after_a_round_trip(gallery, tmp_path):
    """The hubness of every row is written beside the index and applied when it is read; an
    append measures it again, so it gives the files of a fresh build."""
    from index.hubness import gallery_hubness

    vectors, paths, labels, queries = gallery
    model = {**MODEL, "hubness": 0.5}
    save(tmp_path / "idx", gallery, model=model)
    stored = load_index(tmp_path / "idx")
    assert stored.manifest.model["hubness"] == 0.5 and "hubness.npy" in stored.manifest.files
    direct = GalleryIndex(vectors, labels, hubness=0.5).search(queries, 5)
    loaded = stored.gallery.search(queries, 5)
    assert loaded.identities == direct.identities != GalleryIndex(vectors, labels).search(queries, 5).identities
    np.testing.assert_allclose(loaded.scores, direct.scores, atol=1e-6)
    order = np.argsort(paths, kind="stable")
    np.testing.assert_allclose(np.load(data_file(tmp_path / "idx", "hubness.npy")),
                               gallery_hubness(vectors[order]), atol=1e-6)
    half = len(paths) // 2  # the same gallery in two writes
    save_index(tmp_path / "two", vectors[:half], paths[:half], labels[:half], model=model,
               tta="flip", threshold=0.42)
    save_index(tmp_path / "two", np.vstack([load_index(tmp_path / "two").vectors(), vectors[half:]]),
               sorted(paths[:half]) + paths[half:],
               [labels[i] for i in sorted(range(half), key=lambda i: paths[i])] + labels[half:],
               model=model, tta="flip", threshold=0.42)
    assert data_file(tmp_path / "two", "hubness.npy").read_bytes() == \
        data_file(tmp_path / "idx", "hubness.npy").read_bytes()
    # no correction: no file, as before
    save(tmp_path / "plain", gallery)
    assert "hubness.npy" not in read_manifest(tmp_path / "plain").files


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["model"].update(hubness=3), "hubness must be a weight"),
    (lambda m: m["files"].pop("hubness.npy"), "needs the FAISS backend and its hubness.npy"),
    (None, "(3,) float32 values, expected 139 finite float32"),
])
def test_a_damaged_hubness_correction_is_one_clear_error(gallery, tmp_path, edit, expected):
    folder = tmp_path / "idx"
    save(folder, gallery, model={**MODEL, "hubness": 0.25})
    if edit is None:  # a hubness file of the wrong length, its checksum fixed
        _rewrite_data_file(folder, "hubness.npy", lambda p: np.save(p, np.zeros(3, np.float32)))
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorrupt) as err:
        load_index(folder)
    assert expected in str(err.value) and "\n" not in str(err.value)
