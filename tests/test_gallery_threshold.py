"""The zero-shot index's new_whale threshold, calibrated on the gallery itself: the FAISS-backed
leave-one-out search against a naive NumPy reference, and what build_index.py records."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval import NEW_WHALE
from retrieval.gallery_threshold import calibrate_on_gallery
from retrieval.metrics import calibrate_threshold


def _naive(vectors, identities, k=5, leave_identity_out=False):
    """Brute force: every image against all others, best image per identity, sorted."""
    labels = np.asarray(identities)
    sims = vectors @ vectors.T
    counts = {name: int((labels == name).sum()) for name in set(identities)}
    ranked, scores, truths = [], [], []

    def ask(q, excluded):
        best = {}
        for row in range(len(labels)):
            if row in excluded:
                continue
            best[labels[row]] = max(best.get(labels[row], -np.inf), sims[q, row])
        order = sorted(best, key=lambda name: -best[name])[:k]
        padded = [best[name] for name in order] + [-np.inf] * (k - len(order))
        return order, padded

    for q in range(len(labels)):
        order, padded = ask(q, {q})
        ranked.append(order), scores.append(padded)
        truths.append(NEW_WHALE if counts[labels[q]] == 1 else labels[q])
        if leave_identity_out:
            order, padded = ask(q, set(np.flatnonzero(labels == labels[q])))
            ranked.append(order), scores.append(padded), truths.append(NEW_WHALE)
    return calibrate_threshold(ranked, np.array(scores), truths, k), truths


def _unit(rng, n, d=16):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_leave_one_out_calibration_equals_a_naive_reference():
    rng = np.random.default_rng(0)
    centres = _unit(rng, 12)
    identities = [f"id{i}" for i in range(12) for _ in range(1 + i % 3)]  # 1, 2 or 3 images each
    vectors = centres[[int(name[2:]) for name in identities]] + 0.6 * _unit(rng, len(identities))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    (threshold, map5), truths = _naive(vectors, identities)
    got = calibrate_on_gallery(vectors, identities)
    assert got.threshold == pytest.approx(threshold, abs=1e-6)
    assert got.map5 == pytest.approx(map5, abs=1e-9)
    assert (got.known_queries, got.new_queries) == (len(truths) - truths.count(NEW_WHALE),
                                                    truths.count(NEW_WHALE))
    assert got.new_queries == 4  # the four single-image identities stand in for new ones


def test_without_single_image_identities_whole_identities_are_left_out():
    rng = np.random.default_rng(1)
    identities = [f"id{i}" for i in range(6) for _ in range(3)]
    vectors = _unit(rng, len(identities))
    (threshold, map5), truths = _naive(vectors, identities, leave_identity_out=True)
    got = calibrate_on_gallery(vectors, identities)
    assert got.known_queries == got.new_queries == len(identities)
    assert got.threshold == pytest.approx(threshold, abs=1e-6) and got.map5 == pytest.approx(map5)


def test_no_threshold_when_no_identity_has_two_images():
    vectors = _unit(np.random.default_rng(2), 5)
    assert calibrate_on_gallery(vectors, list("abcde")) is None


def test_a_large_gallery_is_sampled_not_searched_whole():
    rng = np.random.default_rng(3)
    identities = [f"id{i // 2}" for i in range(300)]
    got = calibrate_on_gallery(_unit(rng, 300), identities, max_queries=50)
    assert got.known_queries == got.new_queries == 50


def test_the_hubness_weight_is_chosen_with_the_threshold_like_a_naive_reference():
    """Each weight's leave-one-out answers on the penalised similarities (brute force, the
    hubness from a naive top-10 mean), calibrated; the best weight is kept, the first of equals."""
    rng = np.random.default_rng(4)
    centres = _unit(rng, 20)
    identities = [f"id{i}" for i in range(20) for _ in range(1 + i % 3)]
    vectors = centres[[int(name[2:]) for name in identities]] + 0.7 * _unit(rng, len(identities))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    sims = vectors @ vectors.T
    hubness = np.array([np.sort(np.delete(row, i))[-10:].mean() for i, row in enumerate(sims)])
    naive = []
    for weight in (0.0, 0.5, 1.0):
        penalised = vectors @ vectors.T - weight * hubness[None, :]
        # the naive reference scores "similarities"; feed it vectors whose products are penalised
        (threshold, map5), _ = _naive_on(penalised, identities)
        naive.append((map5, threshold, weight))
    got = calibrate_on_gallery(vectors, identities, weights=(0.0, 0.5, 1.0))
    best = max(naive, key=lambda item: item[0])
    assert (got.map5, got.hubness) == (pytest.approx(best[0]), best[2])
    assert got.threshold == pytest.approx(best[1], abs=1e-6)
    assert len({round(m, 6) for m, _, _ in naive}) > 1  # the weights really score differently


def _naive_on(sims, identities, k=5):
    """``_naive`` over a given similarity matrix (leave-one-out, single-image identities new)."""
    labels = np.asarray(identities)
    counts = {name: int((labels == name).sum()) for name in set(identities)}
    ranked, scores, truths = [], [], []
    for q in range(len(labels)):
        best = {}
        for row in range(len(labels)):
            if row != q:
                best[labels[row]] = max(best.get(labels[row], -np.inf), sims[q, row])
        order = sorted(best, key=lambda name: -best[name])[:k]
        ranked.append(order)
        scores.append([best[name] for name in order] + [-np.inf] * (k - len(order)))
        truths.append(NEW_WHALE if counts[labels[q]] == 1 else labels[q])
    return calibrate_threshold(ranked, np.array(scores), truths, k), truths


# ----------------------------------------------------------------------------- whitened gallery

def _nuisance_gallery(seed: int, n_identities: int = 30, d: int = 24):
    """Identities whose photos differ mostly along a few directions shared by all identities
    (pose / light, say): within-identity whitening has something to remove."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng, n_identities, d)
    nuisance = np.linalg.qr(rng.normal(size=(d, 3)))[0].T  # 3 shared directions
    identities = [f"id{i}" for i in range(n_identities) for _ in range(1 + i % 3)]
    rows = [int(name[2:]) for name in identities]
    vectors = centres[rows] + 1.2 * rng.normal(size=(len(rows), 3)) @ nuisance \
        + 0.15 * _unit(rng, len(rows), d)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), identities


def test_whitened_calibration_answers_each_query_with_a_map_fitted_without_it(monkeypatch):
    """With one fold per image, the whitened calibration equals a naive loop: for each image,
    fit the map on all the others, whiten everything, rank the others by cosine."""
    from index.whitening import fit_within_identity, whiten
    from retrieval import gallery_threshold

    vectors, identities = _nuisance_gallery(0, n_identities=12)
    monkeypatch.setattr(gallery_threshold, "WHITENING_FOLDS", len(vectors))
    labels = np.asarray(identities)
    sims = np.empty((len(vectors), len(vectors)))
    for q in range(len(vectors)):
        others = np.arange(len(vectors)) != q
        space = whiten(vectors, *fit_within_identity(vectors[others], labels[others]))
        sims[q] = space @ space[q]
    (threshold, map5), _ = _naive_on(sims, identities)
    got = calibrate_on_gallery(vectors, identities, whitened=True)
    assert got.map5 == pytest.approx(map5, abs=1e-9)
    assert got.threshold == pytest.approx(threshold, abs=1e-5)


def test_the_whitened_calibration_is_not_flattered_by_its_own_queries():
    """Fitting the map on every image (queries included) makes the leave-one-out look better
    than it is (near 1.0 here); the folds do not, and here whitening does not even beat plain
    cosine. 40 dimensions, 2-3 images an identity: plenty to overfit."""
    from index.whitening import fit_within_identity, whiten

    rng = np.random.default_rng(0)
    centres = _unit(rng, 25, 40)
    identities = [f"id{i}" for i in range(25) for _ in range(2 + i % 2)]
    vectors = centres[[int(name[2:]) for name in identities]] + 1.2 * _unit(rng, len(identities), 40)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    leaky = calibrate_on_gallery(whiten(vectors, *fit_within_identity(vectors, identities)), identities)
    honest = calibrate_on_gallery(vectors, identities, whitened=True)
    assert honest.map5 < leaky.map5 - 0.1, (honest.map5, leaky.map5)
    assert honest.map5 < calibrate_on_gallery(vectors, identities).map5


def test_the_gallery_is_whitened_only_where_it_calibrates_better():
    from index.whitening import fit_within_identity
    from retrieval.gallery_threshold import choose_gallery_space

    vectors, identities = _nuisance_gallery(2)
    plain = calibrate_on_gallery(vectors, identities)
    calibration, whitening = choose_gallery_space(vectors, identities)
    assert whitening is not None and calibration.map5 > plain.map5 + 0.05
    expected = fit_within_identity(vectors, identities)  # fitted on the whole gallery
    np.testing.assert_allclose(whitening[1], expected[1], atol=1e-6)
    assert choose_gallery_space(vectors, identities, whiten=False) == (plain, None)
