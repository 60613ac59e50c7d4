"""The identity search core against a brute-force numpy reference, on real embeddings."""
from __future__ import annotations

import numpy as np
import pytest

from index import GalleryIndex
from retrieval.models.embed import embed_images
from retrieval.models.model import ModelConfig, create_model, preprocessing_for


@pytest.fixture(scope="module")
def orl_vectors(orl_samples):
    """Zero-shot (pretrained + GeM) embeddings of the 400 ORL faces at 64 px."""
    model = create_model(ModelConfig(embedding_dim=0), pretrained=True)
    vectors = embed_images(model, [s.path for s in orl_samples], preprocessing_for(model, 64),
                           progress=False)
    return vectors, np.array([s.identity for s in orl_samples])


def brute_force_identities(gallery, labels, queries, k):
    similarity = queries @ gallery.T
    result = []
    for row in similarity:
        best: dict[str, float] = {}
        for j in np.argsort(-row, kind="stable"):
            best.setdefault(labels[j], float(row[j]))
        ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
        result.append(ranked)
    return result


@pytest.mark.parametrize("batch", [40, 7, 1])  # FAISS's search; the few-queries NumPy path
def test_search_folds_neighbours_into_identities_like_brute_force(orl_vectors, batch):
    from index.search import FEW_QUERIES, IdentityRanking

    vectors, labels = orl_vectors
    gallery_rows = np.arange(len(labels)) % 10 < 3  # 3 images of each person in the gallery
    gallery, gallery_labels = vectors[gallery_rows], labels[gallery_rows]
    queries = vectors[np.arange(len(labels)) % 10 == 5]
    index = GalleryIndex(gallery, gallery_labels)
    assert (batch < FEW_QUERIES) == (batch != 40)
    parts = [index.search(queries[i:i + batch], k=5) for i in range(0, len(queries), batch)]
    ranking = IdentityRanking([ids for p in parts for ids in p.identities],
                              np.concatenate([p.scores for p in parts]),
                              np.concatenate([p.best_rows for p in parts]))
    expected = brute_force_identities(gallery, gallery_labels, queries, 5)
    for q, reference in enumerate(expected):
        assert ranking.identities[q] == [name for name, _ in reference]
        assert np.allclose(ranking.scores[q], [score for _, score in reference], atol=1e-5)
        # the best row of each identity is an image of that identity with that score
        for position, row in enumerate(ranking.best_rows[q]):
            assert gallery_labels[row] == ranking.identities[q][position]
            assert np.isclose(gallery[row] @ queries[q], ranking.scores[q][position], atol=1e-5)
    # pretrained features already recognise most ORL faces
    truth = labels[np.arange(len(labels)) % 10 == 5]
    top1 = np.mean([ids[0] == t for ids, t in zip(ranking.identities, truth)])
    assert top1 > 0.6


def test_fewer_identities_than_k(orl_vectors):
    vectors, labels = orl_vectors
    two = np.isin(labels, ["s1", "s2"])
    ranking = GalleryIndex(vectors[two], labels[two]).search(vectors[:3], k=5)
    assert all(len(ids) == 2 for ids in ranking.identities)
    assert np.all(np.isneginf(ranking.scores[:, 2:])) and np.all(ranking.best_rows[:, 2:] == -1)


def test_dimension_mismatch_and_empty_gallery_are_refused(orl_vectors):
    vectors, labels = orl_vectors
    index = GalleryIndex(vectors[:10], labels[:10])
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.zeros((1, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="at least one"):
        GalleryIndex(np.zeros((0, 4), dtype=np.float32), [])
