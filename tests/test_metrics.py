"""Metrics against hand-computed cases and naive reference implementations."""
import numpy as np
import pytest

from retrieval import NEW_WHALE
from retrieval.metrics import (
    average_precision_at_k,
    calibrate_threshold,
    insert_new_whale,
    map_at_k,
)


def test_average_precision_is_one_over_rank_of_first_hit():
    assert average_precision_at_k(["a", "b", "c", "d", "e"], "a") == 1.0
    assert average_precision_at_k(["a", "b", "c", "d", "e"], "c") == pytest.approx(1 / 3)
    assert average_precision_at_k(["a", "b", "c", "d", "e"], "e") == pytest.approx(1 / 5)
    assert average_precision_at_k(["a", "b", "c", "d", "e"], "z") == 0.0
    # only the first occurrence counts, and only within k
    assert average_precision_at_k(["x", "a", "a", "b", "c"], "a") == 0.5
    assert average_precision_at_k(["a", "b", "c", "d", "e", "f"], "f") == 0.0


def test_map_at_5_hand_computed_kaggle_example():
    predictions = [["w1", NEW_WHALE, "w2", "w3", "w4"],
                   [NEW_WHALE, "w1", "w2", "w3", "w4"],
                   ["w5", "w6", "w7", "w8", "w9"],
                   ["w2", "w3", "w1", "w4", NEW_WHALE]]
    truths = ["w1", "w1", NEW_WHALE, NEW_WHALE]
    assert map_at_k(predictions, truths) == pytest.approx((1 + 0.5 + 0 + 0.2) / 4)


def test_map_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        map_at_k([["a"]], ["a", "b"])


def test_insert_new_whale_before_first_identity_under_threshold():
    ids, scores = ["a", "b", "c", "d", "e"], [0.9, 0.8, 0.5, 0.4, 0.3]
    assert insert_new_whale(ids, scores, 0.6) == ["a", "b", NEW_WHALE, "c", "d"]
    assert insert_new_whale(ids, scores, 0.95) == [NEW_WHALE, "a", "b", "c", "d"]
    assert insert_new_whale(ids, scores, 0.1) == ids
    assert insert_new_whale(ids, scores, None) == ids
    assert insert_new_whale(["a", "b"], [0.9, 0.2], 0.5, k=5) == ["a", NEW_WHALE, "b"]


def _brute_force_best_map(ranked, scores, truths, thresholds):
    return max(map_at_k([insert_new_whale(i, s, t) for i, s in zip(ranked, scores)], truths)
               for t in thresholds)


def test_calibrated_threshold_is_optimal_against_brute_force():
    rng = np.random.default_rng(1)
    names = [f"id{i}" for i in range(30)]
    ranked, truths = [], []
    scores = np.sort(rng.uniform(0, 1, size=(200, 5)), axis=1)[:, ::-1]
    for q in range(200):
        ids = list(rng.choice(names, size=5, replace=False))
        ranked.append(ids)
        roll = rng.uniform()
        truths.append(NEW_WHALE if roll < 0.3 else ids[int(rng.integers(5))] if roll < 0.8 else "other")
    threshold, best = calibrate_threshold(ranked, scores, truths)
    achieved = map_at_k([insert_new_whale(i, s, threshold) for i, s in zip(ranked, scores)], truths)
    assert achieved == pytest.approx(best)
    grid = np.concatenate([np.linspace(-0.1, 1.1, 241), scores.ravel()])
    assert best == pytest.approx(_brute_force_best_map(ranked, scores, truths, grid))
    assert best > map_at_k([i for i in ranked], truths)  # a threshold helps with 30% new queries


def test_evaluation_matches_scikit_learn_and_a_hand_count():
    from sklearn.metrics import accuracy_score, f1_score

    from retrieval.metrics import evaluate_answers

    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", NEW_WHALE]
    truths = list(rng.choice(labels, 60))
    predictions = [list(rng.permutation(labels + ["d"])) for _ in truths]
    e = evaluate_answers(predictions, truths)
    first = [p[0] for p in predictions]
    assert e.queries == 60
    assert e.top1 == pytest.approx(accuracy_score(truths, first))
    assert e.macro_f1 == pytest.approx(f1_score(truths, first, average="macro"))
    assert e.top5 == pytest.approx(np.mean([t in p[:5] for p, t in zip(predictions, truths)]))
    assert e.map5 == pytest.approx(np.mean([1 / (p.index(t) + 1) for p, t in zip(predictions, truths)]))
    rows = {row["identity"]: row for row in e.per_identity}
    assert set(rows) == set(truths) and sum(r["queries"] for r in rows.values()) == 60
    per_label_f1 = dict(zip(sorted(set(truths) | set(first)),
                            f1_score(truths, first, average=None, labels=sorted(set(truths) | set(first)))))
    for identity, row in rows.items():
        mine = [i for i, t in enumerate(truths) if t == identity]
        assert row["top1"] == pytest.approx(np.mean([first[i] == identity for i in mine]))
        assert row["f1"] == pytest.approx(per_label_f1[identity])
