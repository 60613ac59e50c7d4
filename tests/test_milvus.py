"""The Milvus backend (milvus-lite in a file) on real ORL faces: build -> query -> append -> remove
-> reload, the same answers as the FAISS index with exact search, two appenders at once, and the
refusals (another model's collection, someone else's collection, credentials in the URI)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from index import load_index, milvus
from index.errors import MilvusError
from retrieval.answering.indexing import BuildOptions, run
from retrieval.answering.query import run_query
from retrieval.errors import UserError

from .index_helpers import (
    IMAGE_SIZE,
    ROOT,
    assert_one_line_error,
    copy_gallery,
    run_cli,
    single_threaded,
)

PEOPLE = [f"s{i}" for i in range(1, 7)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


def build(gallery, out, uri=None, **options):
    backend = {"backend": "milvus", "milvus_uri": str(uri)} if uri else {}
    return run(BuildOptions(out=str(out), gallery=str(gallery), image_size=IMAGE_SIZE, workers=0,
                            progress=False, **backend, **options))


@pytest.fixture(scope="module")
def twins(tmp_path_factory, orl_samples):
    """The same 18 photos (6 people x 3) in a Milvus index and in a FAISS index, both exact and
    plain cosine (Milvus has no hubness correction, no gallery whitening, no local matching)."""
    root = tmp_path_factory.mktemp("milvus")
    gallery = copy_gallery(orl_samples, root / "gallery", PEOPLE, per_identity=3)
    build(gallery, root / "faiss", hubness=False, whiten=False, local=False)
    build(gallery, root / "milvus", uri=root / "gallery.db")
    queries = copy_gallery(orl_samples, root / "queries", PEOPLE + ["s30"], per_identity=1, skip=6)
    return root, queries


def test_the_manifest_names_the_collection_and_holds_no_vectors(twins):
    root, _ = twins
    manifest = json.loads((root / "milvus" / "manifest.json").read_text())
    assert manifest["backend"] == "milvus"
    assert manifest["milvus"] == {"uri": str(root / "gallery.db"), "collection": "whale_gallery"}
    assert manifest["counts"] == {"images": 18, "identities": 6}
    assert set(manifest["files"]) == {"encoder.onnx"}
    assert not list((root / "milvus").rglob("*.npy")) and not list((root / "milvus").rglob("*.faiss"))
    # a FAISS index's manifest is written as before the backend existed
    assert "backend" not in json.loads((root / "faiss" / "manifest.json").read_text())


def test_both_backends_give_the_same_answers_with_exact_search(twins):
    root, queries = twins
    by_faiss = run_query(queries, root / "faiss", k=5, progress=False)
    by_milvus = run_query(queries, root / "milvus", k=5, progress=False)
    assert by_milvus.threshold == by_faiss.threshold is not None
    for a, b in zip(by_faiss.answers, by_milvus.answers):
        assert a.labels == b.labels, a.image
        assert [h.gallery_image for h in a.hits] == [h.gallery_image for h in b.hits]
        np.testing.assert_allclose([h.similarity or 0 for h in a.hits],
                                   [h.similarity or 0 for h in b.hits], atol=1e-5)


def test_a_gallery_image_finds_its_own_identity_first(twins):
    root, _ = twins
    photo = next((root / "gallery" / "s4").iterdir())
    hit = run_query(photo, root / "milvus", k=3, progress=False).answers[0].hits[0]
    assert hit.identity == "s4" and hit.gallery_image == str(photo) and hit.similarity > 0.999


def test_append_remove_and_reload(twins, orl_samples, tmp_path):
    root, _ = twins
    out, db = tmp_path / "index", tmp_path / "g.db"
    build(root / "gallery", out, uri=db)
    newcomer = copy_gallery(orl_samples, tmp_path / "new", ["s9"], per_identity=3)
    written = build(newcomer, out, append=True)
    assert written.counts == {"images": 21, "identities": 7}
    answer = run_query(next((tmp_path / "new" / "s9").iterdir()), out, k=1, progress=False)
    assert answer.answers[0].hits[0].identity == "s9"
    # appending the same photos again stores nothing twice
    assert build(newcomer, out, append=True).counts == {"images": 21, "identities": 7}
    run(BuildOptions(out=str(out), remove=["s9", "s2"]))
    stored = load_index(out)
    assert stored.manifest.counts == {"images": 15, "identities": 5}
    assert milvus.count_rows(stored.gallery.client, "whale_gallery") == 15
    assert not milvus.has_identity(stored.gallery.client, "whale_gallery", "s9")
    ranked = run_query(root / "queries", out, k=5, progress=False)
    assert not {"s2", "s9"} & {label for a in ranked.answers for label in a.labels}
    with pytest.raises(UserError, match="'s9' is not in index"):
        run(BuildOptions(out=str(out), remove=["s9"]))


def test_a_collection_is_never_taken_over(twins, tmp_path):
    root, _ = twins
    # another index folder pointing at an existing collection is refused, nothing dropped
    with pytest.raises(MilvusError, match="exists already"):
        build(root / "gallery", tmp_path / "other", uri=root / "gallery.db")
    assert milvus.count_rows(load_index(root / "milvus").gallery.client, "whale_gallery") == 18
    # a folder whose manifest names another model than the collection's is refused on load
    copy = tmp_path / "copy"
    shutil.copytree(root / "milvus", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0123456789abcdef"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MilvusError, match="another model"):
        load_index(copy)


def test_rebuilding_an_index_replaces_its_own_collection(twins, orl_samples, tmp_path):
    root, _ = twins
    out, db = tmp_path / "index", tmp_path / "g.db"
    build(root / "gallery", out, uri=db)
    smaller = copy_gallery(orl_samples, tmp_path / "small", PEOPLE[:2], per_identity=2)
    assert build(smaller, out, uri=db).counts == {"images": 4, "identities": 2}
    assert milvus.count_rows(load_index(out).gallery.client, "whale_gallery") == 4


@pytest.mark.slow
def test_two_appenders_at_once_lose_nothing_and_duplicate_nothing(twins, orl_samples, tmp_path):
    root, _ = twins
    out, db = tmp_path / "index", tmp_path / "g.db"
    first = run_cli("build_index.py", "--gallery", root / "gallery", "--out", out, "--backend",
                    "milvus", "--milvus-uri", db, "--image-size", IMAGE_SIZE, "--no-progress")
    assert first.returncode == 0, first.stderr[-2000:]
    new = copy_gallery(orl_samples, tmp_path / "new", ["s10", "s11", "s12", "s13"], per_identity=3)
    # s10's photos are in both appends: one of the two writes them, the other finds them there
    # or upserts the same keys
    for name, people in (("a", ["s10", "s11"]), ("b", ["s10", "s12", "s13"])):
        rows = [f"{p}/{f.name},{p}" for p in people for f in sorted((new / p).iterdir())]
        (tmp_path / f"{name}.csv").write_text("Image,Id\n" + "\n".join(rows) + "\n")
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}
    appenders = [subprocess.Popen([sys.executable, "build_index.py", "--gallery", str(new),
                                   "--labels", str(tmp_path / f"{name}.csv"), "--out", str(out),
                                   "--append", "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for name in ("a", "b")]
    for appender in appenders:
        _, stderr = appender.communicate(timeout=300)
        assert appender.returncode == 0, stderr[-2000:]
    stored = load_index(out)
    assert stored.manifest.counts == {"images": 18 + 12, "identities": 6 + 4}
    assert milvus.count_rows(stored.gallery.client, "whale_gallery") == 30


def test_bad_milvus_options_get_one_line_errors(twins, tmp_path):
    root, _ = twins
    result = run_cli("build_index.py", "--gallery", root / "gallery", "--out", tmp_path / "x",
                     "--backend", "milvus")
    assert_one_line_error(result, "--backend milvus needs --milvus-uri")
    result = run_cli("build_index.py", "--gallery", root / "gallery", "--out", tmp_path / "x",
                     "--backend", "milvus", "--append")  # no index there yet: a fresh build
    assert_one_line_error(result, "needs --milvus-uri")
    result = run_cli("build_index.py", "--gallery", root / "gallery", "--out", tmp_path / "x",
                     "--milvus-uri", tmp_path / "g.db")
    assert_one_line_error(result, "go with --backend milvus")
    result = run_cli("build_index.py", "--gallery", root / "gallery", "--out", tmp_path / "x",
                     "--backend", "milvus", "--milvus-uri", "http://root:secret@db:19530")
    line = assert_one_line_error(result, "carries credentials", "MILVUS_TOKEN")
    assert "secret" not in line
    result = run_cli("build_index.py", "--gallery", root / "gallery", "--out", tmp_path / "x",
                     "--backend", "milvus", "--milvus-uri", tmp_path / "g.db", "--index-type", "ivfpq")
    assert_one_line_error(result, "Milvus backend offers index types")
    result = run_cli("serve.py", "--index", root / "milvus", "--port", "0")
    assert_one_line_error(result, "serve.py serves FAISS index folders")
    result = run_cli("audit.py", "--index", root / "milvus", "--out", tmp_path / "audit")
    assert_one_line_error(result, "keeps its vectors in Milvus", "default FAISS backend")


def test_image_keys_and_uris():
    assert milvus.image_key("/g/a.jpg") == milvus.image_key("/g/a.jpg") != milvus.image_key("/g/b.jpg")
    assert milvus.normalise_uri("http://db:19530") == "http://db:19530"
    assert milvus.normalise_uri("rel/g.db").startswith("/")
    with pytest.raises(MilvusError):
        milvus.normalise_uri("https://db:19530/?token=abc")
    with pytest.raises(MilvusError):
        milvus.check_collection_name("1-bad name")


def test_a_failed_append_says_what_was_written_and_a_rerun_completes_it(twins, orl_samples,
                                                                           tmp_path, monkeypatch):
    from pymilvus import MilvusClient

    root, _ = twins
    out, db = tmp_path / "index", tmp_path / "g.db"
    build(root / "gallery", out, uri=db)
    newcomers = copy_gallery(orl_samples, tmp_path / "new", ["s9", "s10"], per_identity=3)
    real_upsert, calls = MilvusClient.upsert, []

    def failing_upsert(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("connection reset by peer")
        return real_upsert(self, *args, **kwargs)

    monkeypatch.setattr(milvus, "WRITE_BATCH", 2)
    monkeypatch.setattr(MilvusClient, "upsert", failing_upsert)
    with pytest.raises(MilvusError, match="failed after 2 of 6 row"):
        build(newcomers, out, append=True)
    monkeypatch.setattr(MilvusClient, "upsert", real_upsert)
    assert load_index(out).manifest.counts == {"images": 18, "identities": 6}  # not committed
    assert build(newcomers, out, append=True).counts == {"images": 24, "identities": 8}
    assert milvus.count_rows(load_index(out).gallery.client, "whale_gallery") == 24


def test_an_ivf_collection_is_tuned_to_the_target_recall_like_faiss(tmp_path):
    from index import GalleryIndex, tuning
    from index.synthetic import clustered_vectors

    vectors, labels, _, _ = clustered_vectors(1500, 32, seed=2, spread=0.3)
    paths = [f"/g/{i:05d}.png" for i in range(len(vectors))]
    client = milvus.connect(str(tmp_path / "t.db"))
    spec = milvus.resolve("ivf", len(vectors), 32)
    milvus.create_collection(client, "t", 32, spec, "fp")
    milvus.upsert(client, "t", vectors, paths, list(labels))
    milvus.settle(client, "t")
    assert milvus.unindexed_lite_files(tmp_path / "t.db", "t") == 0  # milvus-lite's layout read
    gallery = milvus.MilvusGallery(client, "t", 32, len(set(labels)), len(vectors), spec)
    found = gallery.tune(vectors, paths, list(labels), 0.9)
    assert found.reached and found.recall >= 0.9 and found.value < spec.params["nlist"]
    # FAISS with the same cells' count measures the same way on the same held-out images
    faiss_index = GalleryIndex(vectors, labels, "ivf")
    faiss_found = tuning.tune(faiss_index.cpu_index, faiss_index.spec, vectors, labels, 0.9)
    assert abs(np.log2(faiss_found.value) - np.log2(found.value)) <= 1


def test_settle_counts_the_data_files_still_without_an_index_file(tmp_path):
    folder = tmp_path / "db" / "collections" / "c"
    assert milvus.unindexed_lite_files(tmp_path / "db", "c") is None  # no such layout: unknown
    (folder / "partitions" / "_default" / "indexes").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"partitions": {"_default": {"data_files": [
        "data/data_000001_000100.parquet", "data/data_000101_000200.parquet"]}}}))
    assert milvus.unindexed_lite_files(tmp_path / "db", "c") == 2
    (folder / "partitions" / "_default" / "indexes" / "data_000001_000100.vector.ivf_flat.idx").touch()
    (folder / "partitions" / "_default" / "indexes" / "data_000101_000200.path.inverted.sidx").touch()
    assert milvus.unindexed_lite_files(tmp_path / "db", "c") == 1
    (folder / "manifest.json").write_text('{"partitions": {"_def')  # caught mid-write
    assert milvus.unindexed_lite_files(tmp_path / "db", "c") == 1


def test_ivf_cells_are_sized_for_a_segment_not_the_collection():
    """Milvus trains IVF per segment (milvus-lite: files of ~62k rows at 512-d): cells sized for
    1M rows would get ~15 training points each, below k-means' 39."""
    from index import types

    assert milvus.resolve("ivf", 1_000_000, 512).params == types.resolve("ivf", milvus.SEGMENT_ROWS, 512).params
    flushed_rows = 128 * 2 ** 20 // (512 * 4 + 64)  # one 128 MiB file of 512-d rows
    assert milvus.resolve("ivf", 1_000_000, 512).params["nlist"] * types.MIN_POINTS_PER_CELL <= flushed_rows
    assert milvus.resolve("ivf", 5_000, 512).params == types.resolve("ivf", 5_000, 512).params
