"""The gallery audit on real ORL faces with mistakes put in on purpose: a re-saved copy under the
same identity and one under another, a photo under the wrong person; and outliers against a
hand-made reference. The audit writes its CSV and page and changes nothing."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from index import load_index, read_manifest
from retrieval.answering.audit import audit_gallery
from retrieval.answering.indexing import BuildOptions, run
from retrieval.data import load_image

from .conftest import ORL
from .index_helpers import IMAGE_SIZE, assert_one_line_error, run_cli, single_threaded

PEOPLE = [f"s{i}" for i in range(1, 9)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


@pytest.fixture(scope="module")
def flawed(tmp_path_factory):
    """An index over 8 people x 4 photos, with a copy of s1/1 re-saved as JPEG under s1, a copy of
    s2/1 under s3, and s4's photo 5 labelled s5."""
    root = tmp_path_factory.mktemp("audit")
    rows = [(str(ORL / p / f"{n}.pgm"), p) for p in PEOPLE for n in (1, 2, 3, 4)]
    for name, source, identity in (("copy_same.jpg", "s1/1.pgm", "s1"),
                                   ("copy_other.jpg", "s2/1.pgm", "s3")):
        image = Image.fromarray(load_image(ORL / source))
        image.resize((round(image.width * 0.95), round(image.height * 0.95))).save(
            root / name, quality=90)
        rows.append((str(root / name), identity))
    rows.append((str(ORL / "s4" / "5.pgm"), "s5"))
    labels = root / "labels.csv"
    labels.write_text("Image,Id\n" + "".join(f"{p},{i}\n" for p, i in rows))
    run(BuildOptions(out=str(root / "index"), gallery="/", labels=str(labels), allow_outside=True,
                     image_size=IMAGE_SIZE, workers=0, progress=False))
    return root


def test_the_audit_finds_the_planted_duplicates_and_the_wrong_label(flawed):
    stored = load_index(flawed / "index")
    findings = audit_gallery(stored.embeddings(), stored.paths, stored.identities)
    # which image of a pair comes first depends on how the paths sort, so compare unordered pairs
    duplicates = {frozenset(((f.image, f.identity), (f.other_image, f.other_identity or f.identity)))
                  for f in findings if f.kind == "duplicate"}
    copy_same, copy_other = str(flawed / "copy_same.jpg"), str(flawed / "copy_other.jpg")
    assert duplicates == {frozenset(((str(ORL / "s1" / "1.pgm"), "s1"), (copy_same, "s1"))),
                          frozenset(((copy_other, "s3"), (str(ORL / "s2" / "1.pgm"), "s2")))}
    cross = [f for f in findings if f.kind == "duplicate" and f.other_identity]
    assert [f.other_identity for f in cross] != [f.identity for f in cross]
    mislabels = [f for f in findings if f.kind == "mislabel"]
    assert mislabels[0].image == str(ORL / "s4" / "5.pgm") and mislabels[0].other_identity == "s4"
    # the copy under s3 is reported once, as a duplicate across identities, not again as a mislabel
    assert str(flawed / "copy_other.jpg") not in {f.image for f in mislabels}


def test_outliers_are_the_images_far_below_their_identitys_typical_similarity():
    rng = np.random.default_rng(0)
    centre = rng.normal(size=32)
    group = centre + 0.1 * rng.normal(size=(8, 32))
    group[3] = rng.normal(size=32)  # a different thing under the same name
    other = rng.normal(size=32) + 0.1 * rng.normal(size=(4, 32))
    vectors = np.vstack([group, other]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [f"/g/{i}.png" for i in range(12)]
    findings = audit_gallery(vectors, paths, ["a"] * 8 + ["b"] * 4)
    outliers = [f.image for f in findings if f.kind == "outlier"]
    assert outliers == ["/g/3.png"]


def test_audit_cli_writes_csv_and_page_and_changes_nothing(flawed, tmp_path):
    before = (flawed / "index" / "manifest.json").read_bytes()
    result = run_cli("audit.py", "--index", flawed / "index", "--out", tmp_path / "audit")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 near-duplicate pair(s)" in result.stderr
    with open(tmp_path / "audit" / "audit.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["kind"] for r in rows[:2]] == ["duplicate", "duplicate"]
    assert any(r["kind"] == "mislabel" and r["image"].endswith("s4/5.pgm") for r in rows)
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert page.count('<tr class="duplicate">') == 2 and "data:image/jpeg;base64," in page
    assert (flawed / "index" / "manifest.json").read_bytes() == before
    assert read_manifest(flawed / "index").counts["images"] == 35


def test_audit_cli_on_a_missing_index_is_one_line(tmp_path):
    assert_one_line_error(run_cli("audit.py", "--index", tmp_path / "nothing"), "does not exist")
