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


def brute_force_identities(gallery, labels, queries, k, penalty=None):
    similarity = queries @ gallery.T - (0 if penalty is None else penalty[None, :])
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


def test_crowded_count_is_the_identity_size_of_the_99th_percentile_image():
    from index.search import crowded_count

    rng = np.random.default_rng(0)
    for counts in ([1], [3, 3, 3], [1] * 500 + [40], [1, 2, 41], list(rng.integers(1, 42, 300))):
        counts = np.array(counts)
        per_image = np.repeat(counts, counts)  # each image's identity size
        assert crowded_count(counts) == int(np.quantile(per_image, 0.99, method="inverted_cdf"))


def test_queries_left_short_are_asked_again_and_answered_like_brute_force(orl_vectors):
    """A first ask too small for crowded identities: the short queries, and only they, are asked
    again, and every answer is the brute-force one (also with each query's own image left out)."""
    from index.search import exact_top, fold_asking_again

    vectors, labels = orl_vectors
    rows = (np.arange(len(labels)) % 10 < 3) | (labels == "s1")  # s1: 10 images, others 3
    gallery, gallery_labels = vectors[rows], labels[rows].astype(object)
    queries = vectors[np.arange(len(labels)) % 10 == 5]
    asked = []

    def top(q, n):
        asked.append((len(q), n))
        return exact_top(q, gallery, n)

    ranking = fold_asking_again(top, queries, gallery_labels, 5, [5, 50])
    assert asked[0] == (len(queries), 5) and asked[1][1] == 50 and 0 < asked[1][0] < len(queries)
    for q, reference in enumerate(brute_force_identities(gallery, gallery_labels, queries, 5)):
        assert ranking.identities[q] == [name for name, _ in reference]
        assert np.allclose(ranking.scores[q], [score for _, score in reference], atol=1e-5)
    own = np.arange(0, len(gallery), 7)  # gallery images asked as queries, each without itself
    ranking = fold_asking_again(lambda q, n: exact_top(q, gallery, n), gallery[own],
                                gallery_labels, 5, [5, 50], own_rows=own)
    for position, row in enumerate(own):
        rest = np.delete(np.arange(len(gallery)), row)
        reference = brute_force_identities(gallery[rest], gallery_labels[rest], gallery[[row]], 5)[0]
        assert ranking.identities[position] == [name for name, _ in reference]


def test_gallery_index_asks_for_few_neighbours_and_again_where_an_identity_is_crowded():
    from index.synthetic import clustered_vectors

    gallery, labels, queries, _ = clustered_vectors(3000, 32, seed=3, max_images=2)
    crowded = labels[0]  # gets 30 images: 15x any other, yet under 1 % of the gallery's images
    extra = gallery[:1] + 0.01 * np.random.default_rng(0).normal(size=(29, 32))
    gallery = np.vstack([gallery, extra / np.linalg.norm(extra, axis=1, keepdims=True)]).astype(np.float32)
    labels = np.concatenate([labels, np.repeat(crowded, 29)])
    queries[0] = gallery[0]  # its 30 nearest images are all the crowded identity's
    index = GalleryIndex(gallery, labels)
    assert index.first_ask(5) == 2 + 2 * 5 and index.sure_ask(5) == 5 * 30
    asked = []
    top = index._top
    index._top = lambda q, n: (asked.append((q, n)), top(q, n))[1]
    ranking = index.search(queries, 5)
    (first, n_first), (again, n_again) = asked  # one ask for all, one for the short ones
    assert (len(first), n_first, n_again) == (3000, 12, 150)
    assert 1 <= len(again) <= 5 and np.array_equal(again[0], queries[0])  # query 0 is short
    assert ranking.identities[0][0] == crowded and len(set(ranking.identities[0])) == 5
    for q, reference in enumerate(brute_force_identities(gallery, labels, queries, 5)):
        assert ranking.identities[q] == [name for name, _ in reference]


def test_hubness_is_the_mean_similarity_to_the_k_nearest_other_gallery_images(orl_vectors):
    from index.hubness import gallery_hubness

    vectors, _ = orl_vectors
    gallery = np.vstack([vectors[:60], vectors[:1]])  # row 60 duplicates row 0
    similarity = gallery @ gallery.T
    for k in (10, 3):
        naive = [np.sort(np.delete(similarity[i], i))[-k:].mean() for i in range(len(gallery))]
        assert np.allclose(gallery_hubness(gallery, k), naive, atol=1e-5)
    assert np.allclose(gallery_hubness(gallery[:4], 10), [np.delete(similarity[i, :4], i).mean()
                                                          for i in range(4)], atol=1e-5)
    assert gallery_hubness(gallery[:1]).tolist() == [0.0]


@pytest.mark.parametrize("batch", [40, 7])  # FAISS's search; the few-queries NumPy path
def test_search_with_the_hubness_penalty_is_brute_force_on_penalised_similarities(orl_vectors, batch):
    from index.hubness import gallery_hubness

    vectors, labels = orl_vectors
    rows = np.arange(len(labels)) % 10 < 3
    gallery, gallery_labels = vectors[rows], labels[rows]
    queries = vectors[np.arange(len(labels)) % 10 == 5]
    index = GalleryIndex(gallery, gallery_labels, hubness=0.5)
    penalty = 0.5 * gallery_hubness(gallery)
    assert np.allclose(index.penalty, penalty) and np.ptp(penalty) > 0.05  # hubs differ
    identities = [ids for i in range(0, len(queries), batch)
                  for ids in index.search(queries[i:i + batch], k=5).identities]
    scores = np.concatenate([index.search(queries[i:i + batch], k=5).scores
                             for i in range(0, len(queries), batch)])
    expected = brute_force_identities(gallery, gallery_labels, queries, 5, penalty)
    for q, reference in enumerate(expected):
        assert identities[q] == [name for name, _ in reference]
        assert np.allclose(scores[q], [score for _, score in reference], atol=1e-5)
    plain = GalleryIndex(gallery, gallery_labels).search(queries, 5).identities
    assert plain != identities  # the penalty changed some answers
