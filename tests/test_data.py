"""Reading galleries (both layouts), the clear errors for bad input, and the seeded splits."""
from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from retrieval import NEW_WHALE
from retrieval.data import (
    drop_unreadable,
    load_image,
    open_set_split,
    read_folder_gallery,
    read_gallery,
    read_kaggle_gallery,
    require_identities,
    validation_split,
    whale_split,
)
from retrieval.errors import UserError

from .conftest import make_kaggle_layout


def test_folder_layout_nested_identities(omniglot_samples, orl_samples):
    assert len(omniglot_samples) == 2720
    counts = Counter(s.identity for s in omniglot_samples)
    assert len(counts) == 136 and set(counts.values()) == {20}
    assert all("/" in identity for identity in counts)  # <alphabet>/<character>
    assert len(orl_samples) == 400 and len({s.identity for s in orl_samples}) == 40


def test_grey_and_one_bit_images_become_rgb(omniglot_samples, orl_samples):
    one_bit = load_image(omniglot_samples[0].path)
    grey = load_image(orl_samples[0].path)
    assert one_bit.shape == (105, 105, 3) and one_bit.dtype == np.uint8
    assert grey.shape == (112, 92, 3)
    assert set(np.unique(one_bit)) <= {0, 255}


def test_kaggle_layout_matches_folder_layout(tmp_path, orl_samples):
    subset = orl_samples[:30]
    images, csv = make_kaggle_layout(subset, tmp_path, extra_rows=[("unlabelled.pgm", NEW_WHALE)])
    shutil.copy(subset[0].path, images / "unlabelled.pgm")
    samples = read_gallery(images, csv)
    assert [s.identity for s in samples] == [s.identity for s in subset]  # new_whale left out
    assert all(s.path.is_file() for s in samples)


@pytest.mark.parametrize("case, expected", [
    ("missing_folder", "does not exist"),
    ("missing_csv", "does not exist"),
    ("wrong_columns", "needs ['Image', 'Id']"),
    ("absent_image", "are not in"),
])
def test_bad_gallery_input_gives_clear_error(tmp_path, orl_samples, case, expected):
    images, csv = make_kaggle_layout(orl_samples[:5], tmp_path)
    if case == "missing_folder":
        call = lambda: read_folder_gallery(tmp_path / "nope")
    elif case == "missing_csv":
        call = lambda: read_kaggle_gallery(tmp_path / "nope.csv", images)
    elif case == "wrong_columns":
        pd.DataFrame({"file": ["a"], "whale": ["b"]}).to_csv(csv, index=False)
        call = lambda: read_kaggle_gallery(csv, images)
    else:
        (images / "00003.pgm").unlink()
        call = lambda: read_kaggle_gallery(csv, images)
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_corrupt_image_skipped_with_warning_or_fatal_when_strict(tmp_path, orl_samples, caplog):
    root = tmp_path / "gallery"
    for sample in orl_samples[:20]:
        target = root / sample.identity / sample.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.path, target)
    corrupt = root / orl_samples[0].identity / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    truncated = root / orl_samples[0].identity / "truncated.pgm"
    truncated.write_bytes(orl_samples[1].path.read_bytes()[:200])
    samples = read_folder_gallery(root)
    assert len(samples) == 22
    good = drop_unreadable(samples)
    assert len(good) == 20
    assert "skipped 2 unreadable image(s)" in caplog.text
    with pytest.raises(UserError, match="broken.jpg.*--strict"):
        drop_unreadable(samples, strict=True)


def test_fewer_than_two_identities_is_an_error(orl_samples):
    one_identity = [s for s in orl_samples if s.identity == "s1"]
    with pytest.raises(UserError, match="at least 2 identities, found 1"):
        require_identities(one_identity)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no images found"):
        read_folder_gallery(tmp_path)


def test_whale_split_follows_the_protocol(omniglot_samples):
    split = whale_split(omniglot_samples, seed=0)
    truths = [q.identity for q in split.queries]
    assert len(split.queries) == 136  # one query per identity
    assert truths.count(NEW_WHALE) == round(0.25 * 136)
    per_identity = Counter(s.identity for s in split.gallery)
    assert set(per_identity.values()) <= {1, 2, 3} and len(per_identity) == 136 - 34
    assert not {q.path for q in split.queries} & {g.path for g in split.gallery}
    new_paths = {q.path for q in split.queries if q.identity == NEW_WHALE}
    new_identities = {s.identity for s in omniglot_samples if s.path in new_paths}
    assert not new_identities & set(per_identity)  # new identities have nothing in the gallery
    again = whale_split(omniglot_samples, seed=0)
    assert again == split and whale_split(omniglot_samples, seed=1) != split


def test_validation_split_uses_training_data_only(omniglot_samples):
    split = whale_split(omniglot_samples, seed=0)
    val = validation_split(split.gallery, seed=0)
    train_paths = {s.path for s in split.gallery}
    assert {q.path for q in val.queries} <= train_paths
    assert not {q.path for q in val.queries} & {g.path for g in val.gallery}
    assert any(q.identity == NEW_WHALE for q in val.queries)
    known = {q.identity for q in val.queries} - {NEW_WHALE}
    assert known <= {g.identity for g in val.gallery}


def test_open_set_split_halves_identities(orl_samples):
    train, test = open_set_split(orl_samples)
    assert len({s.identity for s in train}) == 20 and len({s.identity for s in test}) == 20
    assert not {s.identity for s in train} & {s.identity for s in test}
