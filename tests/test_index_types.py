"""Index types: approximate ones keep recall close to exact, and every type answers the same API."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from index import GalleryIndex
from index.errors import InvalidGallery
from index.store import load_index, save_index
from index.synthetic import clustered_vectors
from index.types import FLAT_MAX, FLAT_MAX_GPU, gpu_options, resolve

from .index_helpers import single_threaded


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


MODEL = {"fingerprint": "synthetic", "source": "pretrained", "checkpoint": None,
         "model_config": {}, "preprocessing": {"image_size": 64}}


@pytest.fixture(scope="module")
def synthetic():
    """~3000 vectors of 1200 identities (1-4 images each), 128-d, one query per identity."""
    return clustered_vectors(1200, 128, seed=0, spread=0.2)


@pytest.fixture(scope="module")
def exact(synthetic):
    gallery, labels, queries, _ = synthetic
    return GalleryIndex(gallery, labels).search(queries, 5)


def recall_at_5(ranking, truth) -> float:
    return float(np.mean([t in ids for ids, t in zip(ranking.identities, truth)]))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_keeps_95_percent_of_exact_recall(synthetic, exact, kind):
    gallery, labels, queries, truth = synthetic
    assert 2500 < len(gallery) < 3500
    index = GalleryIndex(gallery, labels, kind)
    assert index.spec.kind == kind
    ranking = index.search(queries, 5)
    assert recall_at_5(exact, truth) > 0.9  # the task is learnable: a meaningful reference
    assert recall_at_5(ranking, truth) >= 0.95 * recall_at_5(exact, truth)
    if kind == "hnsw":  # the graph finds nearly the same identities as brute force
        overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ranking.identities, exact.identities)])
        assert overlap >= 0.95


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_every_type_answers_the_same_api_and_survives_save_load(synthetic, kind, tmp_path):
    gallery, labels, queries, _ = synthetic
    index = GalleryIndex(gallery, labels, kind)
    ranking = index.search(queries[:50], 5)
    assert ranking.scores.shape == ranking.best_rows.shape == (50, 5)
    assert all(len(ids) == 5 for ids in ranking.identities)
    for ids, rows in zip(ranking.identities, ranking.best_rows):
        assert [labels[r] for r in rows] == ids  # each best row is an image of that identity
    assert np.all(np.diff(ranking.scores, axis=1) <= 1e-6)  # best first
    paths = [f"/g/{i:05d}.png" for i in range(len(gallery))]  # sorted: rows keep their order
    save_index(tmp_path / "index", gallery, paths, labels, model=MODEL, tta="none", threshold=None,
               index_type=kind)
    stored = load_index(tmp_path / "index")
    assert stored.manifest.index["kind"] == kind
    again = stored.gallery.search(queries[:50], 5)
    # saving tunes an approximate type's search parameter: compare with the same parameters
    ranking = GalleryIndex(gallery, labels, stored.manifest.spec).search(queries[:50], 5)
    assert again.identities == ranking.identities
    np.testing.assert_allclose(again.scores, ranking.scores, atol=1e-6)


def test_ivfpq_codes_shortlist_and_the_raw_vectors_rescore_exactly(synthetic, exact, tmp_path):
    gallery, labels, queries, truth = synthetic
    estimated = GalleryIndex(gallery, labels, "ivfpq", rerank=False).search(queries, 5)
    assert recall_at_5(estimated, truth) >= 0.8 * recall_at_5(exact, truth)
    reranked = GalleryIndex(gallery, labels, "ivfpq").search(queries, 5)
    assert recall_at_5(reranked, truth) >= recall_at_5(estimated, truth)
    # every reported similarity is now the exact cosine of the query and that best image
    for q, rows, scores in zip(queries, reranked.best_rows, reranked.scores):
        np.testing.assert_allclose(scores, gallery[rows] @ q, atol=1e-5)
    # loaded from disk, the re-ranking reads the memory-mapped raw vectors
    paths = [f"/g/{i:05d}.png" for i in range(len(gallery))]
    save_index(tmp_path / "pq", gallery, paths, labels, model=MODEL, tta="none", threshold=None,
               index_type="ivfpq")
    stored = load_index(tmp_path / "pq")
    assert isinstance(stored.gallery._rerank_rows, np.memmap)
    again = stored.gallery.search(queries, 5)
    for q, rows, scores in zip(queries, again.best_rows, again.scores):
        np.testing.assert_allclose(scores, gallery[rows] @ q, atol=1e-5)


def test_auto_picks_by_gallery_size_and_gpus():
    assert resolve("auto", 1000, 512, gpus=0).kind == "flat"
    # measured fastest at recall 0.95 on a CPU from 200k to 1M: ivfpq; hnsw: slow build, low recall
    assert resolve("auto", FLAT_MAX, 512, gpus=0).kind == "ivfpq"
    assert resolve("auto", 10_000_000, 512, gpus=0).kind == "ivfpq"
    assert resolve("auto", FLAT_MAX, 512, gpus=1).kind == "flat"
    assert resolve("auto", FLAT_MAX_GPU, 512, gpus=1).kind == "ivf"  # no GPU fast-scan in FAISS
    assert resolve("auto", 1000, 512, gpus=0).requested == "auto"
    with pytest.raises(ValueError, match="unknown index type"):
        resolve("annoy", 10, 8)


def test_small_galleries_get_trainable_parameters():
    """IVF cells never outnumber what k-means can train; PQ bits shrink with few vectors."""
    for n in (1000, 5000, 200_000):
        params = resolve("ivfpq", n, 1280, gpus=0).params
        assert 1 <= params["nlist"] <= n // 39 and params["nprobe"] <= params["nlist"]
        assert 1280 % params["m"] == 0 and 4 <= params["nbits"] <= 8
    vectors, labels, _, _ = clustered_vectors(20, 16, seed=1)
    for kind in ("flat", "ivf", "hnsw", "auto"):
        assert len(GalleryIndex(vectors, labels, kind)) == len(vectors)
    with pytest.raises(InvalidGallery, match="ivfpq .* at least 1000 vectors"):
        GalleryIndex(vectors, labels, "ivfpq")


def test_ivfpq_rotates_before_coding_so_few_axes_of_variance_still_shortlist_well():
    """Codes of 4-d sub-vectors waste their bits where the variance sits in a few axes (real
    embeddings' spectra are steep): without the rotation most sub-quantisers code near-constant
    coordinates. 20k 64-d vectors whose axes decay in scale; every cell scanned, so only the
    codes decide whether the exact nearest image makes a 20-row shortlist."""
    from index.synthetic import clustered_float32
    from index.tuning import exact_blocked
    from index.types import IndexSpec

    gallery, labels, queries, _ = clustered_float32(20_000, 64, 200, spread=0.5)
    spectrum = np.exp(-np.arange(64) / 8).astype(np.float32)
    gallery, queries = (x * spectrum / np.linalg.norm(x * spectrum, axis=1, keepdims=True)
                        for x in (gallery, queries))
    nearest = exact_blocked(queries, gallery, 1)[1][:, 0]
    params = resolve("ivfpq", len(gallery), 64).params
    assert params["rotation"] == 1  # new indexes rotate
    found = {}
    for rotation in (0, 1):
        spec = IndexSpec("ivfpq", {**params, "rotation": rotation, "nprobe": params["nlist"]}, "ivfpq")
        rows = GalleryIndex(gallery, labels, spec, rerank=False).neighbours(queries, 20)[1]
        found[rotation] = np.mean([n in r for n, r in zip(nearest, rows)])
    assert found[1] >= 0.7 and found[0] <= found[1] - 0.3, found


def test_gpu_copies_shard_and_store_float16_only_where_asked():
    """How an index is copied to GPUs, checked on any machine (the options need no GPU):
    sharded; float16 lookup tables for ivfpq; float16 vectors for flat / ivf only when the
    manifest says ``float16``."""
    for kind, float16, expected in (("flat", False, False), ("flat", True, True),
                                    ("ivf", False, False), ("ivf", True, True), ("ivfpq", False, True)):
        spec = resolve(kind, 5000, 64, gpus=0, float16=float16)
        assert ("float16" in spec.params) == float16
        options = gpu_options(spec)
        assert options.shard and options.useFloat16 == expected, (kind, float16)


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs a GPU that faiss sees")
@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_an_index_on_the_gpus_answers_as_on_the_cpu(synthetic, exact, kind):
    """Run where a GPU is lent: the GPU copy (sharded over every GPU) answers the same
    identities as exact CPU search, within the approximate types' usual recall; float16 flat
    storage moves similarities by at most ~1e-3."""
    gallery, labels, queries, truth = synthetic
    index = GalleryIndex(gallery, labels, resolve(kind, len(gallery), gallery.shape[1]))
    assert kind == "ivfpq" or index.faiss_index is not index.cpu_index  # ivfpq fast-scan: CPU
    ranking = index.search(queries, 5)
    assert recall_at_5(ranking, truth) >= 0.95 * recall_at_5(exact, truth)
    if kind == "flat":
        assert [a[0] for a in ranking.identities] == [a[0] for a in exact.identities]
        half = GalleryIndex(gallery, labels, resolve("flat", len(gallery), gallery.shape[1], float16=True))
        np.testing.assert_allclose(half.search(queries, 5).scores, exact.scores, atol=2e-3)


def test_search_parameters_come_from_the_manifest(synthetic, tmp_path):
    """efSearch / nprobe can be raised in manifest.json without a rebuild."""
    import json

    import faiss

    gallery, labels, _, _ = synthetic
    paths = [f"/g/{i:05d}.png" for i in range(len(gallery))]
    save_index(tmp_path / "ivf", gallery, paths, labels, model=MODEL, tta="none", threshold=None,
               index_type="ivf")
    manifest_path = tmp_path / "ivf" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert faiss.extract_index_ivf(load_index(tmp_path / "ivf").gallery.cpu_index).nprobe == \
        manifest["index"]["params"]["nprobe"]
    manifest["index"]["params"]["nprobe"] = manifest["index"]["params"]["nlist"]
    manifest_path.write_text(json.dumps(manifest))
    stored = load_index(tmp_path / "ivf")
    assert faiss.extract_index_ivf(stored.gallery.cpu_index).nprobe == manifest["index"]["params"]["nlist"]


SEARCH_IN_A_FRESH_PROCESS = r"""
import json, sys
patched = sys.argv[1] == "1"
if patched:  # what `import pytorch_metric_learning.samplers` does, as training validation runs
    import faiss.contrib.torch_utils  # noqa: F401
import faiss
from index import GalleryIndex
from index.synthetic import clustered_vectors
assert (faiss.Index.search.__module__ == "faiss.contrib.torch_utils") == patched
gallery, labels, queries, _ = clustered_vectors(300, 32, seed=1)
out = {kind: GalleryIndex(gallery, labels, kind).search(queries[:20], 5).identities
       for kind in ("flat", "hnsw", "ivf")}
print(json.dumps(out))
"""


def test_search_is_the_same_after_pytorch_metric_learning_patches_faiss():
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which replaces Index.search on
    every index class. In this test process that import has long happened, so the comparison runs
    in two fresh interpreters: one patched, one not (checked), answers identical."""
    import subprocess
    import sys

    from .index_helpers import ROOT

    def answers(patched: bool) -> dict:
        done = subprocess.run([sys.executable, "-c", SEARCH_IN_A_FRESH_PROCESS, "1" if patched else "0"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    plain, patched = answers(False), answers(True)
    assert plain == patched
    assert all(len(ids) == 5 for ranking in plain.values() for ids in ranking)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_many_cells_train_in_two_levels_as_well_as_in_one(kind, monkeypatch):
    """From TWO_LEVEL_MIN_CELLS cells the coarse k-means runs in two levels (how a 1M gallery
    trains in minutes): at the same nprobe it finds what one-level training finds."""
    import faiss

    from index import types

    gallery, labels, queries, truth = clustered_vectors(6000, 64, seed=3, spread=0.3)
    spec = resolve(kind, len(gallery), 64)
    spec.params["nprobe"] = max(1, spec.params["nlist"] // 16)
    calls = []
    real = types._train_cells_in_two_levels
    monkeypatch.setattr(types, "_train_cells_in_two_levels",
                        lambda *a: (calls.append(a[2]), real(*a)))
    one_level = types.build(gallery, spec)  # nlist below the threshold
    assert calls == [] and spec.params["nlist"] < types.TWO_LEVEL_MIN_CELLS
    monkeypatch.setattr(types, "TWO_LEVEL_MIN_CELLS", 64)
    two_level = types.build(gallery, spec)
    assert calls == [spec.params["nlist"]]
    quantizer = faiss.extract_index_ivf(two_level).quantizer
    assert quantizer.ntotal == spec.params["nlist"] and two_level.ntotal == len(gallery)
    lists = faiss.extract_index_ivf(two_level).invlists
    sizes = np.array([lists.list_size(i) for i in range(spec.params["nlist"])])
    assert (sizes > 0).mean() > 0.9  # the cells are used, not a few giant ones

    def found(index) -> float:
        _, rows = index.search(queries, 20)
        return float(np.mean([t in set(labels[r[r >= 0]]) for r, t in zip(rows, truth)]))

    assert found(two_level) >= found(one_level) - 0.03
    assert found(two_level) > (0.5 if kind == "ivf" else 0.3)  # a real task (4-bit codes: rough)
