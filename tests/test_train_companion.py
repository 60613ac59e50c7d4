"""Training with a companion network (``train_embed.py --companion``): the share of a second
network's untrained features is chosen on the validation carve-out (or, where the model ships
the ImageNet features alone, by leave-one-out over all the training images), ships inside the
checkpoint, and leaves the trained weights as they were."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from retrieval.config import COMPANION_BACKBONE, COMPANION_SHARES, TrainConfig
from retrieval.data import validation_split
from retrieval.models.checkpoint import load_checkpoint, load_model
from retrieval.models.embed import embed_images
from retrieval.models.model import blend, create_model, zero_shot_model
from retrieval.training.evaluate import evaluate_blends, evaluate_queries
from retrieval.training.train import Selection, _choose_companion, train

from .test_train import TINY


@pytest.fixture
def orl_subset(orl_samples):
    """Ten people, all ten photos each."""
    keep = {f"s{i}" for i in range(1, 11)}
    return [s for s in orl_samples if s.identity in keep]


@pytest.fixture(scope="module")
def lite2():
    return zero_shot_model(COMPANION_BACKBONE).eval()


def _without_companion(model):
    """The same checkpoint's model with its companion taken off (the trained part alone)."""
    config = replace(model.config, companion="", companion_share=0.0, companion_pool_stages=0)
    own = create_model(config, pretrained=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("companion.")}
    own.load_state_dict(state)
    return own.eval()


def test_the_companion_share_is_chosen_as_a_naive_search_of_the_carve_out_chooses_it(
        orl_samples, tmp_path, lite2):
    """On a selected model (best.pt), the share kept is the one whose validation MAP@5 beats
    the model alone strictly and scores best, computed here from the two networks' vectors;
    best.pt is rewritten only where a share is kept, and then answers validation as scored."""
    # the trained model alone (no blend): it leaves the companion room to add something
    config = TrainConfig(out=str(tmp_path), epochs=1, refit=False, blend_pretrained=False, **TINY)
    train(config, orl_samples)  # all 40 people: ten answer every validation query right
    split = validation_split(orl_samples, seed=config.seed, new_fraction=config.val_new_fraction)
    model, pre, before = load_model(tmp_path / "best.pt")
    other = [embed_images(lite2, [s.path for s in part], pre, progress=False)
             for part in (split.gallery, split.queries)]
    naive = evaluate_blends(model, pre, split.gallery, split.queries, progress=False,
                            reference=tuple(other), shares=COMPANION_SHARES)
    scores = [r.map5 for r in naive]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    expected = COMPANION_SHARES[best] if scores[best] > scores[0] else 0.0

    selection = Selection(best_epoch=1, shipped_map5=before["metrics"]["val_map5"])
    _choose_companion(split, selection, tmp_path / "best.pt", torch.device("cpu"),
                      COMPANION_BACKBONE)
    assert selection.companion_share == expected
    after = load_checkpoint(tmp_path / "best.pt")
    assert expected, "this carve-out should keep a share: the test would check nothing"
    assert after["model_config"]["companion"] == COMPANION_BACKBONE
    assert after["model_config"]["companion_share"] == expected
    joined, _, _ = load_model(tmp_path / "best.pt")
    result = evaluate_queries(joined, pre, split.gallery, split.queries, progress=False)
    assert result.map5 == pytest.approx(after["metrics"]["val_map5"]) == pytest.approx(scores[best])


@pytest.mark.slow
def test_a_forced_companion_ships_through_the_refit_and_leaves_the_trained_weights_alone(
        orl_subset, tmp_path, monkeypatch, lite2):
    """With only share 1/2 to try, selection keeps it: model.pt carries the companion (its
    manifest entry and weights), its cosine is the even sum of the trained model's and the
    companion's untrained cosine, and the trained weights equal a run without --companion
    (the choice is outside the run's random stream)."""
    import retrieval.training.train as train_module

    monkeypatch.setattr(train_module, "COMPANION_SHARES", (0.5,))
    plain = TrainConfig(out=str(tmp_path / "plain"), epochs=1, **TINY)
    with_companion = replace(plain, out=str(tmp_path / "joined"), companion=COMPANION_BACKBONE)
    model, pre, payload = load_model(train(with_companion, orl_subset))
    assert payload["model_config"]["companion"] == COMPANION_BACKBONE
    assert payload["model_config"]["companion_share"] == 0.5
    assert payload["metrics"]["companion_share"] == 0.5
    paths = [s.path for s in orl_subset[:12]]
    vectors = embed_images(model, paths, pre, progress=False)
    own = embed_images(_without_companion(model), paths, pre, progress=False)
    other = embed_images(lite2, paths, pre, progress=False)
    np.testing.assert_allclose(vectors @ vectors.T,
                               0.5 * own @ own.T + 0.5 * other @ other.T, atol=1e-5)
    np.testing.assert_allclose(vectors, blend(own, other, 0.5), atol=1e-5)

    reference = load_checkpoint(train(plain, orl_subset))["state_dict"]
    for name, tensor in reference.items():
        assert torch.equal(payload["state_dict"][name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("refit", [True, False])
def test_a_model_shipping_the_imagenet_features_alone_takes_the_companion_its_images_prefer(
        orl_subset, tmp_path, monkeypatch, refit, lite2):
    """Selection keeps the untrained features alone (share 1): the companion's share is then
    chosen by leave-one-out over all the training images, as the zero-shot index chooses it
    (computed here naively), and its threshold is the calibration of model.pt's own vectors."""
    import retrieval.training.train as train_module
    from retrieval.gallery_threshold import calibrate_gallery

    monkeypatch.setattr(train_module, "BLEND_SHARES", (1.0,))
    config = TrainConfig(out=str(tmp_path), epochs=1, refit=refit,
                         **{**TINY, "companion": COMPANION_BACKBONE})
    model, pre, payload = load_model(train(config, orl_subset))
    assert payload["model_config"]["pretrained_share"] == 1.0
    paths, identities = [s.path for s in orl_subset], [s.identity for s in orl_subset]
    own = embed_images(zero_shot_model(), paths, pre, progress=False)
    other = embed_images(lite2, paths, pre, progress=False)
    scores = [calibrate_gallery(blend(own, other, share).astype(np.float32) if share else own,
                                identities, None, weights=(0.0,), whiten=False)[0].map5
              for share in COMPANION_SHARES]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert payload["model_config"]["companion_share"] == COMPANION_SHARES[best]
    vectors = embed_images(model, paths, pre, progress=False)
    calibration, _, _ = calibrate_gallery(vectors, identities, None, weights=(0.0,), whiten=False)
    assert payload["threshold"] == pytest.approx(calibration.threshold, abs=1e-5)


def test_the_cli_turns_the_companion_off_or_names_another():
    import train_embed

    parser = train_embed.build_parser()
    gallery = ["--gallery", "g"]
    assert parser.parse_args(gallery).companion == COMPANION_BACKBONE == TrainConfig().companion
    assert parser.parse_args([*gallery, "--no-companion"]).companion == ""
    assert parser.parse_args([*gallery, "--companion"]).companion == COMPANION_BACKBONE
    assert parser.parse_args([*gallery, "--companion", "x"]).companion == "x"
