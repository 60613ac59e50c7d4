"""Heat-maps that explain a match, on real photos: a dog's face pasted into a grocery shelf photo
lights up where it was pasted; the report's and the server's heat-maps are real PNGs."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from retrieval.answering.heatmap import explain_pair, overlay_png
from retrieval.data import load_image
from retrieval.models.model import preprocessing_for, zero_shot_model

from .conftest import SHARED_DATA
from .index_helpers import single_threaded


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


@pytest.fixture(scope="module")
def model():
    net = zero_shot_model()
    return net, preprocessing_for(net, 224)


@pytest.mark.parametrize("corner", [(0, 0), (112, 112), (112, 0)])
def test_a_pasted_crop_is_where_the_query_map_is_hottest(model, corner):
    shelf = sorted((SHARED_DATA / "grocery").rglob("*.jpg"))[50]
    dog = sorted((SHARED_DATA / "dogfacenet").rglob("*.jpg"))[0]
    background = Image.fromarray(load_image(shelf)).resize((224, 224))
    original = Image.fromarray(load_image(dog)).resize((224, 224))
    query = background.copy()
    query.paste(original.resize((112, 112)), corner)
    explanation = explain_pair(*model, np.asarray(query), np.asarray(original))
    pasted = np.zeros((224, 224), dtype=bool)
    pasted[corner[1]:corner[1] + 112, corner[0]:corner[0] + 112] = True
    heat = explanation.query
    assert heat.shape == (224, 224) and 0 <= heat.min() and heat.max() <= 1
    assert pasted.flat[heat.argmax()]  # hottest point inside the pasted region
    assert heat[pasted].mean() > heat[~pasted].mean() + 0.3
    png = Image.open(io.BytesIO(overlay_png(explanation.query_input, heat)))
    assert png.size == (224, 224) and png.mode == "RGB"


def test_identical_images_light_up_alike(model):
    dog = load_image(sorted((SHARED_DATA / "dogfacenet").rglob("*.jpg"))[3])
    explanation = explain_pair(*model, dog, dog)
    np.testing.assert_allclose(explanation.query, explanation.gallery, atol=1e-5)


def decode_data_uri(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_a_blend_of_share_one_is_explained_by_the_untrained_features(model):
    """A model that ships the untrained features alone (share 1) matches by them, not by its
    trained backbone: its heat-maps are the untrained model's."""
    import torch

    from retrieval.models.model import ModelConfig, create_model, with_pretrained_share

    trained = create_model(ModelConfig(embedding_dim=16), pretrained=True)
    with torch.no_grad():
        for weight in trained.backbone.parameters():  # a backbone unlike the ImageNet one
            weight.mul_(0.5)
    blended = with_pretrained_share(trained, 1.0)
    dogs = sorted((SHARED_DATA / "dogfacenet").rglob("*.jpg"))
    pair = load_image(dogs[0]), load_image(dogs[1])
    expected = explain_pair(*model, *pair)
    got = explain_pair(blended, model[1], *pair)
    assert np.allclose(got.query, expected.query, atol=1e-5)
    assert np.allclose(got.gallery, expected.gallery, atol=1e-5)
    own = explain_pair(trained, model[1], *pair)
    assert not np.allclose(own.query, expected.query, atol=1e-3)
