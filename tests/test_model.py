"""The embedding model: GeM against a naive reference, offline ImageNet weights, the factory."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from retrieval.models.model import GeM, ModelConfig, create_model, preprocessing_for
from retrieval.models.pretrained import load_offline_weights, offline_weights_file
from retrieval.models.transforms import eval_transform

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


def naive_gem(features: torch.Tensor, p: float) -> torch.Tensor:
    n, c, h, w = features.shape
    out = torch.empty(n, c)
    for i in range(n):
        for j in range(c):
            values = features[i, j].clamp(min=1e-6).flatten()
            out[i, j] = (values ** p).sum() / (h * w)
    return out ** (1 / p)


def test_gem_matches_naive_reference_and_limits():
    features = torch.rand(2, 3, 4, 5) * 3
    for p in (1.0, 3.0, 7.5):
        assert torch.allclose(GeM(p)(features), naive_gem(features, p), atol=1e-5)
    assert torch.allclose(GeM(1.0)(features), features.mean(dim=(2, 3)), atol=1e-6)
    high = GeM(60.0)(features)
    assert torch.allclose(high, features.amax(dim=(2, 3)), rtol=0.05)


def test_gem_exponent_is_learned():
    gem = GeM(3.0)
    gem(torch.rand(2, 3, 4, 4)).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs() > 0


@pytest.fixture(scope="module")
def imagenet_classifier():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert load_offline_weights(model, "tf_efficientnet_lite0")
    return model.eval()


def _classify(model, image: np.ndarray) -> torch.Tensor:
    pre = preprocessing_for(create_model(ModelConfig(embedding_dim=0), pretrained=False))
    tensor = eval_transform(pre)(image=image)["image"][None]
    with torch.no_grad():
        return model(tensor).softmax(dim=1)[0]


def test_offline_weights_classify_real_photos(imagenet_classifier):
    """Google's weights, renamed onto timm, still see a cat and an espresso."""
    from skimage import data

    assert offline_weights_file("tf_efficientnet_lite0") is not None
    cat = _classify(imagenet_classifier, data.chelsea())
    assert int(cat.argmax()) in {TABBY, TIGER_CAT, EGYPTIAN_CAT}
    assert float(cat[[TABBY, TIGER_CAT, EGYPTIAN_CAT]].sum()) > 0.6
    coffee = _classify(imagenet_classifier, data.coffee())
    assert int(coffee.argmax()) == ESPRESSO


def test_preprocessing_comes_from_the_backbone_config():
    model = create_model(ModelConfig(), pretrained=False)
    pre = preprocessing_for(model)
    assert pre.image_size == 224 and pre.mean == (0.5, 0.5, 0.5) and pre.interpolation == "bicubic"
    assert preprocessing_for(model, 96).image_size == 96


def test_embeddings_are_unit_vectors_of_configured_size():
    model = create_model(ModelConfig(embedding_dim=64), pretrained=True).eval()
    out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 64)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    zero_shot = create_model(ModelConfig(embedding_dim=0), pretrained=True).eval()
    assert zero_shot(torch.randn(2, 3, 64, 64)).shape == (2, 1280)  # the final map only


UNTRAINED_DIM = 1280 + 112 + 320  # Lite0's untrained features: its final map + its last 2 stages


def test_untrained_features_pool_the_last_stages_each_normalised():
    """Naive reference: GeM (p=3) of Lite0's last two feature stages (112 and 320 channels) and of
    its final map (1280), each unit-normalised, concatenated, normalised again."""
    from retrieval.models.model import UNTRAINED_POOL_STAGES, zero_shot_model

    model = zero_shot_model().eval()
    assert model.config.pool_stages == UNTRAINED_POOL_STAGES == 2
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        stages = model.backbone.forward_intermediates(images, indices=[3, 4],
                                                      intermediates_only=True)
        maps = [*stages, model.backbone.forward_features(images)]
    gem = [m.clamp(min=1e-6).pow(3).mean(dim=(-2, -1)).pow(1 / 3) for m in maps]
    naive = torch.cat([g / g.norm(dim=1, keepdim=True) for g in gem], dim=1)
    naive = naive / naive.norm(dim=1, keepdim=True)
    assert out.shape == (3, UNTRAINED_DIM) and [g.shape[1] for g in gem] == [112, 320, 1280]
    assert torch.allclose(out, naive, atol=1e-5)


def test_a_last_stage_that_is_the_final_map_is_not_pooled_twice():
    """ResNet's last stage is its final map (no head convolution after it): the stages pooled
    are the two before it, 128 and 256 channels."""
    from retrieval.models.model import pooled_width, stage_indices

    backbone = create_model(ModelConfig("resnet18", embedding_dim=0), pretrained=False).backbone
    assert stage_indices(backbone, 2) == [2, 3]
    assert pooled_width(backbone, stage_indices(backbone, 2)) == 512 + 128 + 256
    model = create_model(ModelConfig("resnet18", embedding_dim=8, pool_stages=2),
                         pretrained=False).eval()
    assert model.neck[0].in_features == 512 + 128 + 256
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 8)


def test_a_model_description_without_pool_stages_reads_as_the_final_map_only():
    """Checkpoints and indexes written before stage pooling rebuild the vectors they hold."""
    from retrieval.models.model import spec_from_dict

    config, _ = spec_from_dict({"model_config": {"backbone": "tf_efficientnet_lite0",
                                                 "embedding_dim": 0},
                                "preprocessing": {"image_size": 64, "mean": [0.5] * 3,
                                                  "std": [0.5] * 3}})
    assert config.pool_stages == 0 and config.reference_pool_stages == 0


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
                                  "efficientvit_b0"])
def test_transformer_and_channels_last_backbones_pool_their_patch_grid(name):
    """ViT gives (N, 1 + 14*14, C) tokens, Swin an (N, 7, 7, C) channels-last map, EfficientViT
    refuses to drop its pooling: each trains and embeds, and the untrained vector is GeM over the
    patch grid (naive loop: class token dropped, channels moved first)."""
    model = create_model(ModelConfig(name, embedding_dim=8, pool_stages=2, pretrained_share=1.0,
                                     reference_pool_stages=0), pretrained=False).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(images)).norm(dim=1),
                              torch.ones(2), atol=1e-5)
        out = model(images)
        raw = model.reference.backbone.forward_features(images)
    if raw.ndim == 3:  # tokens: drop the class token, lay the rest on the 14 x 14 grid
        grid = torch.stack([torch.stack([raw[i, 1 + r * 14: 1 + (r + 1) * 14].T
                                         for r in range(14)], dim=1) for i in range(2)])
    elif raw.shape[-1] == model.reference.backbone.num_features:  # channels last
        grid = raw.permute(0, 3, 1, 2)
    else:
        grid = raw
    naive = naive_gem(grid, 3.0)
    untrained = out[:, 8:]  # after the trained part, weighted 0 at share 1
    assert torch.allclose(untrained / untrained.norm(dim=1, keepdim=True),
                          naive / naive.norm(dim=1, keepdim=True), atol=1e-5)


def test_a_fixed_size_transformer_at_another_size_is_a_clear_error():
    from retrieval.errors import UserError

    model = create_model(ModelConfig("vit_tiny_patch16_224", embedding_dim=8), pretrained=False)
    assert preprocessing_for(model).image_size == 224
    with pytest.raises(UserError, match="224 px images only"):
        preprocessing_for(model, 160)


def test_other_timm_backbones_build_without_offline_weights():
    model = create_model(ModelConfig("resnet18", embedding_dim=32), pretrained=False).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 32)
    assert offline_weights_file("resnet18") is None


def test_unknown_backbone_is_a_clear_error():
    from retrieval.errors import UserError
    with pytest.raises(UserError, match="unknown backbone 'no_such_net'"):
        create_model(ModelConfig("no_such_net"), pretrained=False)


def test_blend_gives_the_weighted_sum_of_both_similarities():
    """Naive reference: the dot product of two blended vectors is (1-s) * trained + s * untrained,
    for torch and NumPy alike; the blended vectors stay unit vectors."""
    from retrieval.models.model import blend

    rng = np.random.default_rng(0)
    unit = lambda n, d: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(  # noqa: E731
        rng.normal(size=(n, d)))
    trained, untrained = unit(4, 8), unit(4, 5)
    for share in (0.0, 0.25, 0.5, 1.0):
        mixed = blend(trained, untrained, share)
        expected = (1 - share) * trained @ trained.T + share * untrained @ untrained.T
        assert np.allclose(mixed @ mixed.T, expected)
        assert np.allclose(np.linalg.norm(mixed, axis=1), 1.0)
        as_torch = blend(torch.from_numpy(trained), torch.from_numpy(untrained), share).numpy()
        assert np.allclose(as_torch, mixed)


def test_a_blended_model_embeds_with_the_untrained_backbone_beside_the_trained_one():
    """pretrained_share 0.25: the vector is [trained neck | untrained ImageNet GeM] in the blend's
    proportions; the reference is the untouched zero-shot model, frozen, even in train mode."""
    from retrieval.models.model import with_pretrained_share, zero_shot_model

    torch.manual_seed(0)
    trained = create_model(ModelConfig(embedding_dim=16), pretrained=True).eval()
    blended = with_pretrained_share(trained, 0.25).eval()
    assert blended.neck is trained.neck and blended.backbone is trained.backbone
    assert blended.embedding_dim == 16 + UNTRAINED_DIM and blended.head_dim == 16
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = blended(images)
        assert torch.allclose(out[:, :16], 0.75 ** 0.5 * trained(images), atol=1e-5)
        assert torch.allclose(out[:, 16:], 0.25 ** 0.5 * zero_shot_model().eval()(images), atol=1e-5)
    blended.train()
    assert not blended.reference.training and not blended.reference.backbone.training
    assert not any(p.requires_grad for p in blended.reference.parameters())
    assert with_pretrained_share(trained, 0.0) is trained


def test_a_blend_of_share_one_never_runs_the_trained_backbone(monkeypatch):
    """Share 1 (validation chose the untrained features alone): the trained half weighs 0, so the
    vector is [zeros | untrained GeM] and the trained backbone is not run at all (half the cost)."""
    from retrieval.models.model import with_pretrained_share, zero_shot_model

    trained = create_model(ModelConfig(embedding_dim=16), pretrained=True).eval()
    blended = with_pretrained_share(trained, 1.0).eval()
    monkeypatch.setattr(trained.backbone, "forward", lambda *_: pytest.fail("trained backbone ran"))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = blended(images)
        assert torch.equal(out[:, :16], torch.zeros(2, 16))
        assert torch.allclose(out[:, 16:], zero_shot_model().eval()(images), atol=1e-5)


def test_interpolating_towards_the_start_gives_the_weighted_weights():
    """Naive reference, weight by weight: (1 - s) * trained + s * start for every float tensor
    of the backbone (BatchNorm statistics included), GeM's exponent towards its initial value,
    integer counters and the neck as trained; the trained model itself is left untouched."""
    from retrieval.models.model import interpolate_towards

    torch.manual_seed(0)
    trained = create_model(ModelConfig(embedding_dim=16), pretrained=False)
    with torch.no_grad():
        trained.pool.p.fill_(5.0)
    start = create_model(ModelConfig(embedding_dim=16), pretrained=False).backbone
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    moved = interpolate_towards(trained, start, 0.25)
    start_state = start.state_dict()
    for key, value in moved.backbone.state_dict().items():
        old = before[f"backbone.{key}"]
        expected = 0.75 * old + 0.25 * start_state[key] if old.is_floating_point() else old
        assert torch.allclose(value, expected, atol=1e-6), key
    assert float(moved.pool.p.detach()) == pytest.approx(0.75 * 5.0 + 0.25 * 3.0)
    for key, value in moved.neck.state_dict().items():
        assert torch.equal(value, before[f"neck.{key}"]), key
    for key, value in trained.state_dict().items():
        assert torch.equal(value, before[key]), key  # the original is unchanged
    whole = interpolate_towards(trained, start, 1.0)
    for key, value in whole.backbone.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, start_state[key]), key
    assert interpolate_towards(trained, start, 0.0) is trained
