"""build_index.py and query.py on real images (ORL faces at 64 px): round trips, edits that equal
a rebuild, the submission and HTML outputs, torchrun, and one-line errors for bad input."""
from __future__ import annotations

import argparse
import csv
import json
import shutil

import numpy as np
import pytest

import build_index
import query
import serve
from index import GalleryIndex, load_index, read_manifest
from retrieval import NEW_WHALE
from retrieval.answering.indexing import BuildOptions, run
from retrieval.answering.query import run_query
from retrieval.errors import UserError
from retrieval.models.checkpoint import load_model
from retrieval.models.embed import embed_images

from .conftest import ORL as ORL_DIR
from .index_helpers import (
    IMAGE_SIZE,
    assert_one_line_error,
    check_html,
    copy_gallery,
    make_checkpoint,
    run_cli,
    single_threaded,
    torchrun,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


KNOWN = [f"s{i}" for i in range(1, 9)]  # in the gallery
LATER = ["s9", "s10", "s11"]  # appended later
UNKNOWN = ["s30", "s31", "s32"]  # never in the gallery: their queries should be new_whale-ish


@pytest.fixture(scope="module")
def data(tmp_path_factory, orl_samples):
    root = tmp_path_factory.mktemp("cli")
    ckpt = make_checkpoint(root / "model.pt", seed=0, threshold=0.5)
    other = make_checkpoint(root / "other.pt", seed=1, threshold=0.3)
    gallery = copy_gallery(orl_samples, root / "gallery", KNOWN + LATER, per_identity=3)
    queries = root / "queries"
    copy_gallery(orl_samples, root / "q", KNOWN[:5] + UNKNOWN, per_identity=1, skip=5)
    queries.mkdir()
    for image in sorted((root / "q").rglob("*.pgm")):  # a flat test/ folder, Kaggle style
        shutil.copy(image, queries / f"{image.parent.name}_{image.name}")
    return argparse.Namespace(root=root, ckpt=ckpt, other=other, gallery=gallery, queries=queries)


def build(out, gallery, **options):
    defaults = dict(out=str(out), gallery=str(gallery) if gallery else None, workers=0,
                    batch_size=16, progress=False)
    return run(BuildOptions(**{**defaults, **options}))


@pytest.fixture(scope="module")
def index_dir(data):
    out = data.root / "index"
    build(out, data.gallery, model=str(data.ckpt))
    return out


def test_build_load_query_round_trip_equals_direct_search(data, index_dir):
    stored = load_index(index_dir)
    m = stored.manifest
    assert m.threshold == 0.5 and m.tta == "none" and m.model["checkpoint"] == str(data.ckpt)
    assert m.model["preprocessing"]["image_size"] == IMAGE_SIZE and m.dim == 32
    assert m.counts == {"images": 33, "identities": 11}
    model, preprocessing, payload = load_model(data.ckpt)
    assert m.fingerprint == payload["fingerprint"]
    gallery_paths = sorted(str(p) for p in data.gallery.rglob("*.pgm"))
    assert stored.paths == gallery_paths
    query_paths = sorted(data.queries.iterdir())
    direct = GalleryIndex(embed_images(model, gallery_paths, preprocessing, progress=False),
                          [p.split("/")[-2] for p in gallery_paths]).search(
        embed_images(model, query_paths, preprocessing, progress=False), 5)
    result = run_query(data.queries, index_dir, k=5, threshold=-1.0)  # -1: never new_whale
    assert [a.image for a in result.answers] == [str(p) for p in query_paths]
    assert [a.labels for a in result.answers] == direct.identities
    for answer, scores, rows in zip(result.answers, direct.scores, direct.best_rows):
        np.testing.assert_allclose([h.similarity for h in answer.hits], scores, atol=1e-5)
        assert [h.gallery_image for h in answer.hits] == [gallery_paths[r] for r in rows]
    # the stored threshold places new_whale; --threshold overrides it
    default = run_query(data.queries, index_dir)
    assert default.threshold == 0.5
    for answer, scores in zip(default.answers, direct.scores):
        expected = sum(s >= 0.5 for s in scores)
        assert (NEW_WHALE in answer.labels) == (expected < 5)
        if expected < 5:
            assert answer.labels.index(NEW_WHALE) == expected
    assert all(a.labels[0] == NEW_WHALE for a in run_query(data.queries, index_dir, threshold=2.0).answers)


def test_append_and_remove_equal_a_fresh_build(data, tmp_path, orl_samples):
    gallery = copy_gallery(orl_samples, tmp_path / "gallery", KNOWN, per_identity=3)
    build(tmp_path / "edited", gallery, model=str(data.ckpt))
    copy_gallery(orl_samples, gallery, LATER, per_identity=3)  # new photos arrive
    build(tmp_path / "edited", gallery, append=True)  # model, tta, size: the index's own
    build(tmp_path / "fresh", gallery, model=str(data.ckpt))
    assert_same_index(tmp_path / "edited", tmp_path / "fresh", data.queries)

    build(tmp_path / "edited", None, remove=["s3", "s10"])
    for identity in ("s3", "s10"):
        shutil.rmtree(gallery / identity)
    build(tmp_path / "fresh", gallery, model=str(data.ckpt))
    assert_same_index(tmp_path / "edited", tmp_path / "fresh", data.queries)
    assert load_index(tmp_path / "edited").manifest.counts == {"images": 27, "identities": 9}


def test_gpu_float16_and_the_target_recall_survive_appends_and_removals(data, tmp_path, orl_samples):
    """Both are the index's own settings (the manifest's), like its type: an edit that does not
    name them keeps them; naming them changes them."""
    gallery = copy_gallery(orl_samples, tmp_path / "gallery", KNOWN, per_identity=3)
    build(tmp_path / "idx", gallery, model=str(data.ckpt), index_type="ivf", target_recall=0.9,
          gpu_float16=True)

    def settings():
        entry = read_manifest(tmp_path / "idx").index
        return entry["kind"], entry["target_recall"], entry["params"].get("float16")

    assert settings() == ("ivf", 0.9, 1)
    copy_gallery(orl_samples, gallery, LATER, per_identity=3)
    build(tmp_path / "idx", gallery, append=True)
    assert settings() == ("ivf", 0.9, 1)
    build(tmp_path / "idx", None, remove=["s3"])
    assert settings() == ("ivf", 0.9, 1)
    build(tmp_path / "idx", gallery, append=True, gpu_float16=False)  # nothing new, a setting
    assert settings() == ("ivf", 0.9, None)


def assert_same_index(a_dir, b_dir, queries):
    a, b = load_index(a_dir), load_index(b_dir)
    assert a.paths == b.paths and a.identities == b.identities
    np.testing.assert_allclose(a.vectors(), b.vectors(), atol=1e-5)
    assert a.manifest.model == b.manifest.model and a.manifest.threshold == b.manifest.threshold
    ra, rb = run_query(queries, a_dir), run_query(queries, b_dir)
    assert [x.labels for x in ra.answers] == [x.labels for x in rb.answers]


def test_append_does_not_re_embed_what_is_there(data, tmp_path, monkeypatch):
    build(tmp_path / "idx", data.gallery, model=str(data.ckpt))
    from retrieval.answering.encoder import Encoder
    embedded = []
    original = Encoder.encode
    monkeypatch.setattr(Encoder, "encode",
                        lambda self, paths, **kw: embedded.extend(paths) or original(self, paths, **kw))
    build(tmp_path / "idx", data.gallery, append=True)
    assert embedded == []


def test_append_refuses_another_model_or_preprocessing(data, index_dir):
    with pytest.raises(UserError, match="built by another model .*rebuild the index without --append"):
        build(index_dir, data.gallery, append=True, model=str(data.other))
    with pytest.raises(UserError, match="built with --tta none"):
        build(index_dir, data.gallery, append=True, tta="flip")
    with pytest.raises(UserError, match="identity 'nobody' is not in index"):
        build(index_dir, None, remove=["nobody"])
    assert load_index(index_dir).manifest.counts["images"] == 33  # untouched


def test_zero_shot_index_with_flip_tta_applies_it_to_queries(data, tmp_path, orl_samples):
    gallery = copy_gallery(orl_samples, tmp_path / "gallery", KNOWN[:4], per_identity=2)
    build(tmp_path / "idx", gallery, tta="flip", image_size=IMAGE_SIZE)
    stored = load_index(tmp_path / "idx")
    assert stored.manifest.tta == "flip" and stored.manifest.threshold_source == "gallery"
    assert stored.manifest.model["source"] == "pretrained" and stored.manifest.dim == 1280 + 112 + 320
    image = sorted(gallery.rglob("*.pgm"))[0]
    answer = run_query(image, tmp_path / "idx").answers[0]
    assert answer.hits[0].gallery_image == str(image)  # itself, only if flipped both ways
    # cosine 1, less the hubness correction where the gallery chose one
    penalty = stored.gallery.penalty
    correction = 0.0 if penalty is None else penalty[stored.paths.index(str(image))]
    assert answer.hits[0].similarity == pytest.approx(1.0 - correction, abs=1e-5)


def test_zero_shot_index_calibrates_a_threshold_on_its_gallery_that_says_new(data, tmp_path, caplog):
    caplog.set_level("INFO")
    build(tmp_path / "idx", data.gallery, image_size=IMAGE_SIZE)
    manifest = read_manifest(tmp_path / "idx")
    assert manifest.threshold_source == "gallery" and -1 < manifest.threshold < 1
    assert "calibrated on the gallery itself" in caplog.text
    answers = run_query(data.queries, tmp_path / "idx", progress=False).answers
    new_first = {a.image: a.hits[0].identity == NEW_WHALE for a in answers}
    unknown = [v for image, v in new_first.items() if any(f"/{u}_" in image for u in UNKNOWN)]
    known = [v for image, v in new_first.items() if not any(f"/{u}_" in image for u in UNKNOWN)]
    assert len(unknown) == 3 and len(known) == 5
    assert np.mean(unknown) > np.mean(known)  # unseen people are called new more often

    build(tmp_path / "idx", data.gallery, image_size=IMAGE_SIZE, append=True, threshold=0.9)
    assert (read_manifest(tmp_path / "idx").threshold,
            read_manifest(tmp_path / "idx").threshold_source) == (0.9, "user")
    build(tmp_path / "idx", None, remove=["s1"])  # an edit keeps the recorded threshold
    assert read_manifest(tmp_path / "idx").threshold == 0.9


def test_kaggle_layout_gallery_with_nested_identities(data, tmp_path, omniglot_samples):
    """train/ + train.csv (Image,Id); Omniglot's identities contain a slash; new_whale rows are
    not an identity."""
    from .conftest import make_kaggle_layout

    chosen = [s for s in omniglot_samples if s.identity in
              {"Alphabet_of_the_Magi/character01", "Greek/character02"}][::5]
    images, labels = make_kaggle_layout(chosen, tmp_path / "kaggle", extra_rows=[("x.png", NEW_WHALE)])
    build(tmp_path / "idx", images, labels=str(labels), model=str(data.ckpt))
    stored = load_index(tmp_path / "idx")
    assert stored.identities == [s.identity for s in chosen]  # CSV order = sorted file names
    assert stored.paths == [str(images / f"{i:05d}.png") for i in range(len(chosen))]
    answer = run_query(images / "00000.png", tmp_path / "idx", k=2, threshold=-1).answers[0]
    assert answer.hits[0].identity == chosen[0].identity
    assert answer.hits[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_query_cli_outputs_submission_html_and_json(data, index_dir, tmp_path):
    submission, report = tmp_path / "submission.csv", tmp_path / "report.html"
    result = run_cli("query.py", data.queries, "--index", index_dir, "--json",
                     "--submission", submission, "--html", report)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert answers["threshold"] == 0.5 and answers["k"] == 5
    by_name = {r["image"].split("/")[-1]: [h["identity"] for h in r["answers"]] for r in answers["results"]}
    check_submission(submission, by_name, allowed=set(KNOWN + LATER) | {NEW_WHALE})
    check_html(report, expected_images=len(by_name) * 6 - sum(NEW_WHALE in v for v in by_name.values()))


def test_query_cli_scores_labelled_queries_like_the_submission_scorer(data, index_dir, tmp_path):
    from retrieval.answering.submission import evaluate_submission

    truth = tmp_path / "truth.csv"
    rows = [(p.name, p.name.split("_")[0]) for p in sorted(data.queries.iterdir())]
    rows = [(name, NEW_WHALE if identity in UNKNOWN else identity) for name, identity in rows]
    truth.write_text("Image,Id\n" + "".join(f"{n},{i}\n" for n, i in rows))
    submission, metrics, report = tmp_path / "s.csv", tmp_path / "m.json", tmp_path / "r.html"
    result = run_cli("query.py", data.queries, "--index", index_dir, "--truth", truth,
                     "--submission", submission, "--metrics", metrics, "--html", report)
    assert result.returncode == 0, result.stderr
    scored = json.loads(metrics.read_text())
    reference = evaluate_submission(submission, truth)
    assert scored["queries"] == len(rows) == reference.queries
    for name in ("map5", "top1", "top5", "macro_f1"):
        assert scored[name] == pytest.approx(getattr(reference, name), abs=1e-12), name
    assert {r["identity"] for r in scored["per_identity"]} == {i for _, i in rows}
    assert f"MAP@5 {reference.map5:.4f}" in result.stderr  # the summary line
    page = report.read_text()
    assert f"MAP@5 {reference.map5:.4f}" in page
    found = sum(truth_ in labels for truth_, labels in [
        (i, read_labels(submission)[n]) for n, i in rows])
    assert page.count('class="query wrong-query"') == len(rows) - found
    assert page.count("truth: ") == len(rows)


def read_labels(path) -> dict[str, list[str]]:
    lines = path.read_text().splitlines()[1:]
    return {line.split(",")[0]: line.split(",")[1].split() for line in lines}


def test_a_folder_per_identity_query_tree_is_scored_by_its_folder_names(data, index_dir, tmp_path,
                                                                       orl_samples):
    tree = copy_gallery(orl_samples, tmp_path / "val", KNOWN[:3], per_identity=2, skip=6)
    (tree / NEW_WHALE).mkdir()
    shutil.copy(sorted((ORL_DIR / "s35").iterdir())[0], tree / NEW_WHALE / "stranger.pgm")
    result = run_query(tree, index_dir, progress=False)
    assert result.truth_source == "folder names" and len(result.answers) == 7
    assert {r["identity"] for r in result.evaluation.per_identity} == set(KNOWN[:3]) | {NEW_WHALE}
    text = run_cli("query.py", tree, "--index", index_dir)
    assert text.returncode == 0 and "evaluation against folder names: 7 queries" in text.stdout


def test_metrics_without_a_truth_and_a_truth_naming_no_query_are_one_line_errors(data, index_dir,
                                                                                tmp_path):
    assert_one_line_error(run_cli("query.py", data.queries, "--index", index_dir, "--metrics",
                                  tmp_path / "m.json"), "--metrics needs a truth")
    truth = tmp_path / "t.csv"
    truth.write_text("Image,Id\nother.jpg,s1\n")
    assert_one_line_error(run_cli("query.py", data.queries, "--index", index_dir, "--truth", truth),
                          "no query image is named in truth file")


def check_submission(path, expected: dict[str, list[str]], allowed: set[str]) -> None:
    lines = path.read_text().split("\n")
    assert lines[0] == "Image,Id" and lines[-1] == ""  # header, trailing newline, nothing else
    rows = lines[1:-1]
    assert len(rows) == len(expected)
    names = []
    for line in rows:
        name, ids = line.split(",")
        labels = ids.split(" ")
        assert len(labels) == 5 and len(set(labels)) == 5 and set(labels) <= allowed, line
        assert labels == expected[name]
        names.append(name)
    assert names == sorted(expected)
    with open(path, newline="") as handle:  # also valid CSV for pandas / Kaggle
        assert list(csv.reader(handle))[0] == ["Image", "Id"]


def test_query_cli_single_image_prints_ranked_identities(data, index_dir):
    image = sorted(data.queries.iterdir())[0]
    result = run_cli("query.py", image, "--index", index_dir, "-k", "3", "--threshold", "-1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().split("\n")
    assert lines[0] == str(image) and len(lines) == 4
    for rank, line in enumerate(lines[1:], start=1):
        number, identity, similarity, gallery_image = line.split()
        assert number == f"{rank}." and identity in KNOWN + LATER
        assert -1 <= float(similarity) <= 1 and gallery_image.split("/")[-2] == identity


def test_build_cli_removes_an_identity_without_loading_a_model(data, index_dir, tmp_path):
    shutil.copytree(index_dir, tmp_path / "idx")
    result = run_cli("build_index.py", "--out", tmp_path / "idx", "--remove-identity", "s1",
                     "--remove-identity", "s2")
    assert result.returncode == 0, result.stderr
    stored = load_index(tmp_path / "idx")
    assert stored.manifest.counts == {"images": 27, "identities": 9}
    assert not {"s1", "s2"} & set(stored.identities)
    assert stored.manifest.created == load_index(index_dir).manifest.created


@pytest.mark.slow
def test_torchrun_two_processes_build_the_same_index(data, tmp_path):
    result = torchrun("build_index.py", "--gallery", data.gallery, "--model", data.ckpt,
                      "--out", tmp_path / "ddp", "--workers", "0", "--batch-size", "8", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_index(tmp_path / "ddp", data.root / "index", data.queries)


@pytest.mark.parametrize("make_args, fragments", [
    (lambda d: ["query.py", d.root / "missing.jpg", "--index", d.root / "index"], ["does not exist"]),
    (lambda d: ["query.py", d.queries, "--index", d.root / "no_index"],
     ["index folder", "does not exist", "build_index.py"]),
    (lambda d: ["build_index.py", "--gallery", d.root / "empty", "--out", d.root / "x"],
     ["no images found"]),
    (lambda d: ["query.py", d.queries, "--index", d.root / "index", "--model", d.other],
     ["built by another model"]),
    (lambda d: ["build_index.py", "--out", d.root / "index", "--remove-identity", "s1",
                "--threshold", "nan"], ["--threshold must be a finite number"]),
])
def test_cli_bad_input_is_one_line_and_exit_2(data, index_dir, make_args, fragments):
    (data.root / "empty" / "s1").mkdir(parents=True, exist_ok=True)
    assert_one_line_error(run_cli(*make_args(data)), *fragments)


def test_cli_refuses_a_truncated_index(data, index_dir, tmp_path):
    shutil.copytree(index_dir, tmp_path / "damaged")
    faiss_file = tmp_path / "damaged" / read_manifest(tmp_path / "damaged").data_dir / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:1000])
    result = run_cli("query.py", data.queries, "--index", tmp_path / "damaged")
    assert_one_line_error(result, "index.faiss is truncated", "rebuild it with build_index.py")


@pytest.mark.parametrize("module", [build_index, query, serve])
def test_every_cli_flag_has_help(module):
    for action in module.build_parser()._actions:
        assert action.help, action.dest


def test_query_errors_on_inputs_come_before_any_heavy_import(data):
    """A missing index is reported without loading torch, timm or albumentations."""
    result = run_cli("-X", "importtime", "query.py", data.queries, "--index", data.root / "no_index")
    assert_one_line_error(result, "does not exist")
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "faiss" in imported and not imported & {"torch", "timm", "albumentations", "pandas"}


def test_report_with_heatmaps_has_a_toggle_per_match(data, index_dir, tmp_path):
    one = tmp_path / "q"
    one.mkdir()
    for image in sorted(data.queries.iterdir())[:2]:
        shutil.copy(image, one / image.name)
    report = tmp_path / "r.html"
    result = run_cli("query.py", one, "--index", index_dir, "--html", report, "--heatmaps",
                     "--threshold", "-1")  # no new_whale: five matches per query
    assert result.returncode == 0, result.stderr[-2000:]
    page = report.read_text()
    assert page.count('<details class="why">') == 2 * 5
    assert page.count('src="data:image/png;base64,') == 2 * 5 * 2
    assert_one_line_error(run_cli("query.py", one, "--index", index_dir, "--heatmaps"),
                          "--heatmaps draws into the HTML report")


def test_zero_shot_index_chooses_its_hubness_correction_on_the_gallery(data, tmp_path):
    """With no checkpoint, the gallery's own leave-one-out queries choose the hubness correction
    weight with the threshold; the index records both and searches with them (plain cosine
    here: the whitening choice has its own test)."""
    from index.hubness import WEIGHTS
    from retrieval.gallery_threshold import calibrate_on_gallery

    build(tmp_path / "idx", data.gallery, image_size=IMAGE_SIZE, whiten=False, local=False)
    stored = load_index(tmp_path / "idx")
    expected = calibrate_on_gallery(stored.vectors(), stored.identities, weights=WEIGHTS)
    assert stored.manifest.model.get("hubness", 0.0) == expected.hubness
    assert stored.manifest.threshold == pytest.approx(expected.threshold, abs=1e-6)
    assert (stored.gallery.penalty is None) == (expected.hubness == 0)
    build(tmp_path / "idx", None, remove=["s1"])  # an edit keeps both
    edited = read_manifest(tmp_path / "idx")
    assert (edited.model.get("hubness", 0.0), edited.threshold) == \
        (expected.hubness, stored.manifest.threshold)


def test_zero_shot_index_whitens_its_gallery_and_every_query_where_the_gallery_says_so(
        data, tmp_path, orl_samples):
    """The choice is the gallery's (honest leave-one-out, ``choose_gallery_space``); a whitened
    index stores whitened vectors and its map, whitens each query (a gallery photo asked again
    finds itself at cosine 1), and an append sends new photos through the same map."""
    from index.hubness import WEIGHTS
    from index.whitening import whiten
    from retrieval.answering.encoder import EncoderSpec, load_encoder
    from retrieval.gallery_threshold import choose_gallery_space

    gallery = copy_gallery(orl_samples, tmp_path / "gallery", KNOWN, per_identity=3)
    build(tmp_path / "idx", gallery, image_size=IMAGE_SIZE, local=False)  # local: its own tests
    stored = load_index(tmp_path / "idx")
    encoder = load_encoder(EncoderSpec.of_index(stored.manifest))
    raw = encoder.encode(stored.paths, progress=False)
    calibration, whitening = choose_gallery_space(raw, stored.identities, weights=WEIGHTS)
    assert whitening is not None  # these faces calibrate better whitened (the premise)
    assert stored.manifest.model["whitening"] is True
    assert stored.manifest.threshold == pytest.approx(calibration.threshold, abs=1e-5)
    np.testing.assert_allclose(stored.whitening[1], whitening[1], atol=1e-5)
    np.testing.assert_allclose(stored.vectors(), whiten(raw, *whitening), atol=1e-5)

    image = stored.paths[4]
    hit = run_query(image, tmp_path / "idx").answers[0].hits[0]
    penalty = stored.gallery.penalty
    assert hit.gallery_image == image
    assert hit.similarity == pytest.approx(1.0 - (0.0 if penalty is None else penalty[4]), abs=1e-5)

    copy_gallery(orl_samples, gallery, LATER, per_identity=3)
    build(tmp_path / "idx", gallery, append=True)
    edited = load_index(tmp_path / "idx")
    np.testing.assert_array_equal(edited.whitening[1], stored.whitening[1])  # the same map
    new = [i for i, path in enumerate(edited.paths) if path not in stored.paths]
    np.testing.assert_allclose(edited.vectors()[new],
                               whiten(encoder.encode([edited.paths[i] for i in new], progress=False),
                                      *stored.whitening), atol=1e-5)

    build(tmp_path / "plain", gallery, image_size=IMAGE_SIZE, whiten=False)
    plain = load_index(tmp_path / "plain")
    assert plain.whitening is None and "whitening" not in plain.manifest.model
    assert "whitening.npz" not in plain.manifest.files
