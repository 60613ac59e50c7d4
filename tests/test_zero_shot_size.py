"""The zero-shot index chooses its image size on the gallery's leave-one-out (ORL faces): the
candidates, the identity sample, and a build against a naive re-computation of the choice."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from index import load_index
from index.hubness import WEIGHTS
from retrieval import NEW_WHALE
from retrieval.gallery_threshold import choose_gallery_space
from retrieval.answering.indexing import BuildOptions, run
from retrieval.image_size import SAMPLE_IMAGES, candidate_sizes, identity_sample
from retrieval.data import Sample, read_folder_gallery
from retrieval.models.embed import embed_images
from retrieval.models.model import preprocessing_for, zero_shot_model

from .index_helpers import copy_gallery, single_threaded


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


def test_candidates_are_the_native_size_and_five_sevenths_of_it():
    assert candidate_sizes(224) == [224, 160]
    assert candidate_sizes(260) == [260, 192]  # 185.7 rounded to a multiple of 32
    assert candidate_sizes(32) == [32]  # nothing smaller worth trying


def test_the_sample_keeps_whole_identities_and_leaves_new_whale_out():
    samples = [Sample(f"{identity}_{i}.png", identity)
               for identity, n in (("a", 3), ("b", 2), ("c", 4), ("d", 1), (NEW_WHALE, 5))
               for i in range(n)]
    sample = identity_sample(samples, max_images=6, seed=0)
    counts = {identity: sum(s.identity == identity for s in sample) for identity in "abcd"}
    assert len(sample) <= 6 and NEW_WHALE not in {s.identity for s in sample}
    assert all(counts[i] in (0, n) for i, n in zip("abcd", (3, 2, 4, 1)))  # all or none
    assert sample == identity_sample(samples, max_images=6, seed=0)  # seeded
    assert len(identity_sample(samples)) == 10  # everything but new_whale fits the default cap
    assert SAMPLE_IMAGES >= 1000


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, orl_samples):
    root = tmp_path_factory.mktemp("size")
    return copy_gallery(orl_samples, root / "gallery", [f"s{i}" for i in range(1, 9)], per_identity=3)


def build(out, gallery, **options):
    """A zero-shot build; one network unless a test says otherwise (the size choice is tested
    here, the companion's in test_companion.py)."""
    options.setdefault("companion", "")
    return run(BuildOptions(out=str(out), gallery=str(gallery), workers=0, batch_size=16,
                            progress=False, **options))


def test_a_zero_shot_build_keeps_the_size_its_gallery_leave_one_out_prefers(gallery, tmp_path, caplog,
                                                                           monkeypatch):
    from retrieval import gallery_threshold

    calls = []
    monkeypatch.setattr(gallery_threshold, "choose_gallery_space",
                        lambda *a, **k: calls.append(1) or choose_gallery_space(*a, **k))
    with caplog.at_level(logging.INFO):
        # stored vectors stay the model's own; the pooled calibration alone (local has its tests)
        build(tmp_path / "index", gallery, whiten=False, local=False)
    assert len(calls) == 2  # once per size: the chosen size's calibration is the index's
    stored = load_index(tmp_path / "index")
    chosen = stored.manifest.model["preprocessing"]["image_size"]
    # the naive choice: the whole gallery at each size, calibrated as that index calibrates it
    samples = read_folder_gallery(gallery)
    model = zero_shot_model()
    calibrations, vectors = {}, {}
    for size in (224, 160):
        vectors[size] = embed_images(model, [s.path for s in samples], preprocessing_for(model, size),
                                     progress=False)
        calibrations[size], _ = choose_gallery_space(vectors[size], [s.identity for s in samples],
                                                     weights=WEIGHTS, whiten=False)
    assert chosen == (224 if calibrations[224].map5 >= calibrations[160].map5 else 160)
    assert stored.manifest.threshold == pytest.approx(calibrations[chosen].threshold, abs=1e-4)
    assert "image size: leave-one-out MAP@5 of the untrained features on 24 gallery images" in caplog.text
    # the sample was the whole gallery: its vectors at the chosen size are the index's, in order
    order = {str(s.path): i for i, s in enumerate(samples)}
    np.testing.assert_allclose(stored.vectors(), vectors[chosen][[order[p] for p in stored.paths]],
                               atol=1e-5)


def test_a_given_image_size_or_threshold_is_kept_without_choosing(gallery, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        build(tmp_path / "sized", gallery, image_size=128)
        build(tmp_path / "threshold", gallery, threshold=0.5)
    assert "image size: leave-one-out" not in caplog.text
    sizes = [load_index(tmp_path / name).manifest.model["preprocessing"]["image_size"]
             for name in ("sized", "threshold")]
    assert sizes == [128, 224]
