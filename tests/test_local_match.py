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
    from retrieval.models.local_descriptors import embed_with_descriptors
    from retrieval.models.model import preprocessing_for, zero_shot_model

    people = group_by_identity(orl_samples)
    samples = [s for name in sorted(people)[:6] for s in people[name][:3]]
    model = zero_shot_model()
    preprocessing = preprocessing_for(model, 64)
    paths = [s.path for s in samples]
    vectors, maps = embed_with_descriptors(model, paths, preprocessing)
    assert vectors == pytest.approx(embed_images(model, paths, preprocessing, progress=False),
                                    abs=1e-5)
    assert maps.shape == (len(samples), 16, 112) and maps.dtype == np.float16
    descriptors = normalised_descriptors(maps, mean_descriptor(maps))
    similarity = chamfer_similarity(descriptors, descriptors)
    np.fill_diagonal(similarity, -np.inf)
    ids = np.array([s.identity for s in samples])
    nearest_is_same = ids[similarity.argmax(axis=1)] == ids
    assert nearest_is_same.mean() >= 0.8, nearest_is_same
    with pytest.raises(ValueError, match="untrained"):
        from retrieval.models.model import ModelConfig, create_model

        embed_with_descriptors(create_model(ModelConfig(pool_stages=0), pretrained=False),
                               paths[:1], preprocessing)
