"""Two networks side by side (``build_index.py --companion``): the joined vector's cosine is the
share-weighted sum of the two networks' cosines, it is rebuilt from the manifest alone, and a
zero-shot build keeps the share its gallery's leave-one-out prefers (ORL faces)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from index import load_index
from index.hubness import WEIGHTS
from retrieval.answering.indexing import BuildOptions, run
from retrieval.answering.query import run_query
from retrieval.config import COMPANION_BACKBONE, COMPANION_SHARES
from retrieval.data import read_folder_gallery
from retrieval.errors import UserError
from retrieval.gallery_threshold import choose_gallery_space
from retrieval.models.embed import embed_images
from retrieval.models.model import (
    blend,
    create_model,
    model_spec,
    preprocessing_for,
    pretrained_backbone,
    spec_from_dict,
    with_companion,
    zero_shot_model,
)

from .index_helpers import copy_gallery, single_threaded

SIZE = 96  # given, so the build makes no size choice: the companion's is the one under test


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


@pytest.fixture(scope="module")
def networks():
    return zero_shot_model().eval(), zero_shot_model(COMPANION_BACKBONE).eval()


def test_the_joined_cosine_is_the_share_weighted_sum_and_the_manifest_rebuilds_it(networks):
    own, other = networks
    joined = with_companion(own, 0.25, pretrained_backbone(COMPANION_BACKBONE),
                            COMPANION_BACKBONE).eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, v = own(images), other(images), joined(images)
    assert v.shape[1] == joined.embedding_dim == a.shape[1] + b.shape[1]
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(v @ v.T, 0.75 * a @ a.T + 0.25 * b @ b.T, atol=1e-5, rtol=0)
    config, _ = spec_from_dict(model_spec(joined, preprocessing_for(joined, 64)))
    assert (config.companion, config.companion_share) == (COMPANION_BACKBONE, 0.25)
    with torch.no_grad():
        torch.testing.assert_close(create_model(config).eval()(images), v, atol=1e-5, rtol=0)
    assert with_companion(own, 0.0, other.backbone, COMPANION_BACKBONE) is own


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, orl_samples):
    root = tmp_path_factory.mktemp("companion")
    return copy_gallery(orl_samples, root / "gallery", [f"s{i}" for i in range(1, 9)],
                        per_identity=3)


def build(out, gallery, **options):
    """A fresh zero-shot build as the default makes it (a companion tried), at one size."""
    return run(BuildOptions(out=str(out), gallery=str(gallery), workers=0, batch_size=16,
                            progress=False, image_size=SIZE, whiten=False, local=False,
                            **options))


def shares_of(gallery, networks):
    """The naive choice: the whole gallery through each network, every share calibrated as
    that index calibrates it; (leave-one-out MAP@5 per share, the two networks' vectors)."""
    samples = read_folder_gallery(gallery)
    paths, identities = [s.path for s in samples], [s.identity for s in samples]
    own, other = (embed_images(m, paths, preprocessing_for(m, SIZE), progress=False)
                  for m in networks)
    scores = [choose_gallery_space(blend(own, other, share) if share else own, identities,
                                   weights=WEIGHTS, whiten=False)[0].map5
              for share in COMPANION_SHARES]
    return scores, own, other, samples


def test_a_build_keeps_the_share_its_gallery_leave_one_out_prefers(gallery, networks, tmp_path):
    build(tmp_path / "index", gallery)
    stored = load_index(tmp_path / "index")
    scores, own, _, _ = shares_of(gallery, networks)
    best = COMPANION_SHARES[max(range(len(scores)), key=lambda i: (scores[i], -i))]
    config = stored.manifest.model["model_config"]
    assert config["companion_share"] == best
    assert stored.vectors().shape[1] == (own.shape[1] if best == 0 else
                                         own.shape[1] + networks[1].embedding_dim)


def test_the_chosen_share_reaches_the_manifest_the_vectors_and_the_queries(gallery, networks,
                                                                          tmp_path, monkeypatch):
    """Leave-one-out made to prefer share 1/2 (read back from the vectors: the first network's
    part of a joined unit vector has norm sqrt(1 - share)): the index is that model's."""
    from retrieval import gallery_threshold

    own_width = networks[0].embedding_dim

    def preferring_half(vectors, identities, **options):
        calibration, whitening = choose_gallery_space(vectors, identities, **options)
        share = 1.0 - float(np.linalg.norm(vectors[0, :own_width])) ** 2
        return dataclasses.replace(calibration, map5=1.0 if abs(share - 0.5) < 1e-3 else 0.0), whitening

    monkeypatch.setattr(gallery_threshold, "choose_gallery_space", preferring_half)
    build(tmp_path / "index", gallery)
    stored = load_index(tmp_path / "index")
    config = stored.manifest.model["model_config"]
    assert (config["companion"], config["companion_share"]) == (COMPANION_BACKBONE, 0.5)
    _, own, other, samples = shares_of(gallery, networks)
    order = {str(s.path): i for i, s in enumerate(samples)}
    rows = [order[p] for p in stored.paths]
    np.testing.assert_allclose(stored.vectors(), blend(own, other, 0.5)[rows], atol=1e-5)
    result = run_query(samples[4].path, tmp_path / "index", k=3, progress=False)
    assert result.answers[0].hits[0].identity == samples[4].identity  # its own image is indexed
    assert result.answers[0].hits[0].gallery_image == str(samples[4].path)


@pytest.mark.parametrize("options", [{"model": "runs/model.pt"}, {"threshold": 0.5}])
def test_a_companion_named_goes_with_a_fresh_zero_shot_build_only(gallery, tmp_path, options):
    with pytest.raises(UserError, match="--companion adds a second network"):
        build(tmp_path / "index", gallery, companion=COMPANION_BACKBONE, **options)


def test_no_companion_tries_one_network_only(gallery, tmp_path, monkeypatch):
    """``--no-companion`` (""): the second network is never built, the index is the first's;
    ``--threshold`` without a named companion is no error either (nothing to choose)."""
    import retrieval.models.model as model_module

    built = []
    original = model_module.zero_shot_model
    monkeypatch.setattr(model_module, "zero_shot_model",
                        lambda *a, **k: built.append((a, k)) or original(*a, **k))
    build(tmp_path / "index", gallery, companion="")
    build(tmp_path / "fixed", gallery, threshold=0.5)
    assert not any(COMPANION_BACKBONE in (*a, *k.values()) for a, k in built)
    for out in ("index", "fixed"):
        config = load_index(tmp_path / out).manifest.model["model_config"]
        assert (config["companion"], config["companion_share"]) == ("", 0.0)


def test_the_cli_turns_the_companion_off_or_names_another():
    import build_index

    parser = build_index.build_parser()
    assert parser.parse_args(["--gallery", "g"]).companion is None  # the default network
    assert parser.parse_args(["--gallery", "g", "--no-companion"]).companion == ""
    assert parser.parse_args(["--gallery", "g", "--companion"]).companion == COMPANION_BACKBONE
    assert parser.parse_args(["--gallery", "g", "--companion", "x"]).companion == "x"


def test_a_gallery_larger_than_the_sample_reuses_the_size_choices_vectors(gallery, tmp_path,
                                                                         monkeypatch):
    """Where the choices are made on a sample (galleries above image_size.SAMPLE_IMAGES), the
    companion's choice starts from the vectors the size choice made of that sample: the first
    network embeds the sample once per size, then the whole gallery once for the index."""
    from retrieval import image_size
    from retrieval.answering.encoder import Encoder

    original_sample = image_size.identity_sample
    monkeypatch.setattr(image_size, "identity_sample",
                        lambda samples, *a, **k: original_sample(samples, max_images=12))
    calls = []
    original_encode = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, paths, *a, **k:
                        calls.append((len(paths), k.get("desc"))) or original_encode(self, paths, *a, **k))
    run(BuildOptions(out=str(tmp_path / "index"), gallery=str(gallery), workers=0, batch_size=16,
                     progress=False, whiten=False, local=False))
    assert [n for n, _ in calls] == [12, 12, 24]  # two sizes on the sample, then the gallery
    assert len(load_index(tmp_path / "index").paths) == 24
