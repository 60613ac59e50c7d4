"""The zero-shot index's new_whale threshold, calibrated on the gallery itself: the FAISS-backed
leave-one-out search against a naive NumPy reference, and what build_index.py records."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval import NEW_WHALE
from retrieval.answering.gallery_threshold import calibrate_on_gallery
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
