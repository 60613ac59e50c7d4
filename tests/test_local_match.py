"""Local matching (issue 16): the chamfer similarity of descriptor sets against a naive loop,
and the untrained backbone's descriptors on real faces."""
from __future__ import annotations

import numpy as np
import pytest

from index.local_match import chamfer_similarity, mean_descriptor, normalised_descriptors


def _naive_chamfer(query: np.ndarray, image: np.ndarray) -> float:
    forward = np.mean([max(float(a @ b) for b in image) for a in query])
    backward = np.mean([max(float(a @ b) for a in query) for b in image])
    return 0.5 * (forward + backward)


def test_chamfer_similarity_equals_a_naive_loop_across_gallery_blocks():
    rng = np.random.default_rng(0)
    maps_q, maps_g = rng.random((4, 6, 5)), rng.random((9, 6, 5))
    mean = mean_descriptor(maps_g)
    assert mean == pytest.approx(maps_g.reshape(-1, 5).mean(axis=0), abs=1e-6)
    queries, gallery = normalised_descriptors(maps_q, mean), normalised_descriptors(maps_g, mean)
    assert np.linalg.norm(gallery, axis=2) == pytest.approx(1.0, abs=1e-5)
    fast = chamfer_similarity(queries, gallery, block=4)  # 9 images: blocks of 4, 4, 1
    naive = np.array([[_naive_chamfer(q, g) for g in gallery] for q in queries])
    assert fast.shape == (4, 9) and fast == pytest.approx(naive, abs=1e-5)
    # symmetric, and an image matches itself perfectly
    assert chamfer_similarity(gallery, gallery) == pytest.approx(
        chamfer_similarity(gallery, gallery).T, abs=1e-5)
    assert np.diag(chamfer_similarity(gallery, gallery)) == pytest.approx(1.0, abs=1e-5)


def test_descriptors_come_with_the_pooled_vectors_and_tell_faces_apart(orl_samples):
    """One forward pass gives embed_images' vectors and the stride-16 map (112 channels at
    (64 / 16)^2 locations); on real faces the chamfer similarity ranks another photo of the
    same person above the other people's photos for most photos."""
    from retrieval.data import group_by_identity
    from retrieval.models.embed import embed_images
    from retrieval.models.model import preprocessing_for, zero_shot_model

    people = group_by_identity(orl_samples)
    samples = [s for name in sorted(people)[:6] for s in people[name][:3]]
    model = zero_shot_model()
    preprocessing = preprocessing_for(model, 64)
    paths = [s.path for s in samples]
    vectors, maps = embed_images(model, paths, preprocessing, progress=False, maps=True)
    assert vectors == pytest.approx(embed_images(model, paths, preprocessing, progress=False),
                                    abs=1e-5)
    assert maps.shape == (len(samples), 16, 112) and maps.dtype == np.float16
    descriptors = normalised_descriptors(maps, mean_descriptor(maps))
    similarity = chamfer_similarity(descriptors, descriptors)
    np.fill_diagonal(similarity, -np.inf)
    ids = np.array([s.identity for s in samples])
    nearest_is_same = ids[similarity.argmax(axis=1)] == ids
    assert nearest_is_same.mean() >= 0.8, nearest_is_same
    with pytest.raises(ValueError, match="pools a stage"):
        from retrieval.models.model import ModelConfig, create_model

        embed_images(create_model(ModelConfig(pool_stages=0), pretrained=False), paths[:1],
                     preprocessing, progress=False, maps=True)


def _random_local(n_gallery: int, share: float, seed: int = 0):
    """Unit pooled vectors, raw descriptor maps and the LocalGallery of a random gallery."""
    from index.local_match import LocalGallery

    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n_gallery, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    maps = rng.random((n_gallery, 6, 5)).astype(np.float32)
    mean = mean_descriptor(maps)
    return vectors, maps, LocalGallery(share, mean,
                                       normalised_descriptors(maps, mean).astype(np.float16))


def _naive_blend(query_vectors, query_descriptors, vectors, local):
    gallery = np.asarray(local.descriptors, dtype=np.float32)
    return ((1 - local.share) * query_vectors @ vectors.T
            + local.share * chamfer_similarity(query_descriptors, gallery))


def test_an_index_with_local_descriptors_answers_as_the_naive_blended_search():
    """Gallery smaller than the shortlist: every image is re-scored, so the search with local
    descriptors and the hubness measured on blended scores equal the full blended matrix, the
    correction subtracted, folded into identities by hand."""
    from index.hubness import K
    from index.search import GalleryIndex

    vectors, maps, local = _random_local(30, share=0.5)
    ids = np.array([f"id{i // 3}" for i in range(30)])
    rng = np.random.default_rng(1)
    query_vectors = rng.normal(size=(4, 8)).astype(np.float32)
    query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
    query_descriptors = local.queries(rng.random((4, 6, 5)))

    gallery_gallery = _naive_blend(vectors, np.asarray(local.descriptors, np.float32), vectors, local)
    np.fill_diagonal(gallery_gallery, -np.inf)
    hubness = -np.sort(-gallery_gallery, axis=1)[:, :K].mean(axis=1)
    plain = GalleryIndex(vectors, ids)
    measured = local.hubness(vectors, plain.neighbours, K)
    np.testing.assert_allclose(measured, hubness, atol=2e-3)  # float16 descriptors

    weight = 0.5
    index = GalleryIndex.from_faiss(plain.cpu_index, ids, plain.spec, None, weight * measured, local)
    ranking = index.search(query_vectors, k=4, local_queries=query_descriptors)
    scores = _naive_blend(query_vectors, query_descriptors, vectors, local) - weight * measured
    for q in range(4):
        order = np.argsort(-scores[q], kind="stable")
        expected = list(dict.fromkeys(ids[order]))[:4]
        assert ranking.identities[q] == expected
        best = [scores[q][ids == name].max() for name in expected]
        np.testing.assert_allclose(ranking.scores[q], best, atol=1e-3)
        rows = np.flatnonzero(ids == expected[0])  # each image's own score, as a service shows it
        np.testing.assert_allclose(index.scores_of(query_vectors[q], rows, vectors[rows],
                                                   query_descriptors[q]), scores[q][rows], atol=1e-3)
    with pytest.raises(ValueError, match="local descriptors"):
        index.search(query_vectors, k=4)
    with pytest.raises(ValueError, match="local descriptors"):
        index.scores_of(query_vectors[0], np.arange(3), vectors[:3])


def test_an_index_keeps_its_local_descriptors_sorted_with_its_rows(tmp_path):
    """save_index writes the descriptors in path order like the vectors, records the share,
    measures hubness on blended scores; load_index memory-maps them back."""
    from index.local_match import LocalGallery
    from index.store import load_index, save_index

    vectors, maps, local = _random_local(12, share=0.75)
    paths = [f"/g/{name}.png" for name in "lkjihgfedcba"]  # reverse order: the index sorts
    ids = [f"id{i % 4}" for i in range(12)]
    save_index(tmp_path / "idx", vectors, paths, ids, model={
        "fingerprint": "f", "source": "pretrained", "hubness": 0.25}, tta="none", threshold=0.3,
        local=(local.share, local.mean, [local.descriptors]))
    stored = load_index(tmp_path / "idx")
    order = np.argsort(paths)
    assert stored.paths == [paths[i] for i in order]
    assert stored.manifest.model["local"] == 0.75 and stored.local.share == 0.75
    np.testing.assert_array_equal(stored.local.mean, local.mean)
    np.testing.assert_array_equal(stored.local.descriptors, local.descriptors[order])
    expected = LocalGallery(0.75, local.mean, local.descriptors[order]).hubness(
        vectors[order], stored.gallery.neighbours, 10)
    np.testing.assert_allclose(stored.gallery.penalty, 0.25 * expected, atol=1e-6)
    ranking = stored.search(vectors[:2], 3, maps[:2])
    assert [r[0] for r in ranking.identities] == [ids[0], ids[1]]  # each finds its own image
    with pytest.raises(ValueError, match="maps"):
        stored.search(vectors[:2], 3)


@pytest.fixture(scope="module")
def characters(tmp_path_factory, omniglot_samples):
    """A gallery of 24 Omniglot characters (1-3 drawings each), 6 more characters to append,
    and one unseen drawing of each gallery character as a query, copied into folders."""
    import shutil

    from retrieval.data import group_by_identity

    root = tmp_path_factory.mktemp("characters")
    by_identity = group_by_identity(omniglot_samples)
    names = sorted(by_identity)[:30]
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        drawings = by_identity[name]
        n = int(rng.integers(1, 4))
        for j, sample in enumerate(drawings[:n]):
            folder = root / ("gallery" if i < 24 else "later") / name
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample.path, folder / sample.path.name)
        if i < 24:
            query = root / "queries" / name
            query.mkdir(parents=True)
            shutil.copy(drawings[n].path, query / drawings[n].path.name)
    return root


def _build(out, gallery, **options):
    from retrieval.answering.indexing import BuildOptions, run

    return run(BuildOptions(**{"out": str(out), "gallery": gallery and str(gallery), "workers": 0,
                               "batch_size": 16, "progress": False, **options}))


def test_a_zero_shot_index_of_characters_chooses_local_matching_and_queries_use_it(characters,
                                                                                     tmp_path):
    """The gallery's leave-one-out chooses the local share (characters gain, the premise); the
    index records exactly that choice, the exported encoder gives the maps the eager model
    gives, and query.py's answers are the stored search of the eager model's vectors and maps."""
    from index.hubness import WEIGHTS
    from index.store import load_index
    from retrieval.answering.encoder import EncoderSpec, load_encoder
    from retrieval.answering.onnx_encoder import ENCODER_FILE, OnnxEncoder
    from retrieval.answering.query import run_query
    from retrieval.gallery_threshold import choose_gallery_space, choose_local_share

    _build(tmp_path / "idx", characters / "gallery", image_size=64)
    stored = load_index(tmp_path / "idx")
    encoder = load_encoder(EncoderSpec.of_index(stored.manifest))
    vectors, maps = encoder.encode(stored.paths, progress=False, maps=True)
    calibration, whitening = choose_gallery_space(vectors, stored.identities, weights=WEIGHTS)
    calibration, local = choose_local_share(vectors, stored.identities, maps, calibration,
                                            whitened=whitening is not None, weights=WEIGHTS)
    assert local is not None and local.share > 0  # characters gain from local matching
    assert stored.manifest.model["local"] == local.share
    assert stored.manifest.threshold == pytest.approx(calibration.threshold, abs=1e-5)
    np.testing.assert_allclose(stored.local.mean, local.mean, atol=1e-5)
    np.testing.assert_allclose(stored.local.descriptors.astype(np.float32),
                               local.descriptors.astype(np.float32), atol=2e-3)

    queries = sorted(str(p) for p in (characters / "queries").rglob("*.png"))
    onnx = OnnxEncoder(stored.attachment(ENCODER_FILE), stored.manifest.model["preprocessing"],
                       stored.manifest.fingerprint)
    assert onnx.gives_maps
    query_vectors, query_maps = encoder.encode(queries, progress=False, maps=True)
    onnx_vectors, onnx_maps = onnx.encode(queries, progress=False, maps=True)
    np.testing.assert_allclose(onnx_vectors, query_vectors, atol=1e-4)
    np.testing.assert_allclose(onnx_maps.astype(np.float32), query_maps.astype(np.float32),
                               atol=2e-2)
    direct = stored.search(query_vectors, 5, query_maps)
    result = run_query(characters / "queries", tmp_path / "idx", threshold=-10.0)
    assert [a.image for a in result.answers] == queries
    assert [a.labels for a in result.answers] == direct.identities
    _build(tmp_path / "pooled", characters / "gallery", image_size=64, local=False)
    pooled = load_index(tmp_path / "pooled")
    assert pooled.local is None and "local" not in pooled.manifest.model
    assert not {"local.npy", "local_mean.npy"} & set(pooled.manifest.files)


def test_edits_keep_the_local_share_and_mean_and_carry_each_images_descriptors(characters,
                                                                               tmp_path):
    """An append centres the new drawings' descriptors on the index's mean (kept, as a
    whitening map is), a removal drops exactly the removed rows' descriptors."""
    import shutil

    from index.store import load_index
    from retrieval.answering.encoder import EncoderSpec, load_encoder

    gallery = tmp_path / "gallery"
    shutil.copytree(characters / "gallery", gallery)
    _build(tmp_path / "idx", gallery, image_size=64)
    before = load_index(tmp_path / "idx")
    assert before.local is not None
    old = {path: np.array(d) for path, d in zip(before.paths, before.local.descriptors)}
    shutil.copytree(characters / "later", gallery, dirs_exist_ok=True)
    _build(tmp_path / "idx", gallery, append=True)
    after = load_index(tmp_path / "idx")
    assert after.local.share == before.local.share
    np.testing.assert_array_equal(after.local.mean, before.local.mean)
    new = [i for i, path in enumerate(after.paths) if path not in old]
    assert len(new) == len(list((characters / "later").rglob("*.png")))
    encoder = load_encoder(EncoderSpec.of_index(after.manifest))
    _, maps = encoder.encode([after.paths[i] for i in new], progress=False, maps=True)
    np.testing.assert_allclose(after.local.descriptors[new].astype(np.float32),
                               before.local.queries(maps), atol=2e-3)
    for i, path in enumerate(after.paths):
        if path in old:
            np.testing.assert_array_equal(after.local.descriptors[i], old[path])

    removed = sorted(set(after.identities))[0]
    _build(tmp_path / "idx", None, remove=[removed])
    edited = load_index(tmp_path / "idx")
    assert removed not in edited.identities and len(edited.local.descriptors) == len(edited.paths)
    for i, path in enumerate(edited.paths):
        np.testing.assert_array_equal(edited.local.descriptors[i],
                                      after.local.descriptors[after.paths.index(path)])
