"""Hostile or careless inputs, on real ORL faces copied into tmp_path (models at 64 px, no training):
decompression bombs, identities that would corrupt a submission, formula injection, CSV paths
outside the gallery, conflicting labels, symlinked identity folders, bad images in a query folder,
and an absurd -k. Each case is checked in-process and through the CLI a user would run."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest

from retrieval import NEW_WHALE
from retrieval.answering.query import Hit, QueryAnswer
from retrieval.data import (
    drop_unreadable,
    load_image,
    read_folder_gallery,
    read_kaggle_gallery,
)
from retrieval.errors import UserError

from .conftest import make_kaggle_layout
from .index_helpers import (
    assert_one_line_error,
    check_html,
    copy_gallery,
    make_checkpoint,
    run_cli,
    single_threaded,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from single_threaded()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A valid all-black 1-bit PNG. 20000x20000 is 50 MB of zero rows that deflate to ~50 KB in
    ~0.2 s, streamed row by row: the image is never held (PIL would need 400 MB to build it)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed pixels
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data)
                     + _chunk(b"IEND", b""))
    return path


def corrupt(path: Path) -> Path:
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return path


# ---------------------------------------------------------------- 1. decompression bombs


def test_bomb_writer_makes_a_real_png(tmp_path):
    image = load_image(write_png_bomb(tmp_path / "small.png", 300, 200))
    assert image.shape == (200, 300, 3) and image.max() == 0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_is_refused_cheaply_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from retrieval import data

    started = time.perf_counter()
    bomb = write_png_bomb(tmp_path / "bomb.png")  # 400 Mpixels: PIL itself raises
    just_over = write_png_bomb(tmp_path / "big.png", 10_050, 10_000)  # ours only: PIL warns
    assert bomb.stat().st_size < 100_000 and time.perf_counter() - started < 5
    assert 10_050 * 10_000 > data.MAX_IMAGE_PIXELS >= 50_000_000
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    for path in (bomb, just_over):
        started = time.perf_counter()
        with pytest.raises(UserError, match=f"{path.name} is too large to decode.*downscale"):
            load_image(path)
        assert time.perf_counter() - started < 1


def test_bomb_in_a_gallery_is_skipped_with_a_warning_or_fatal_when_strict(tmp_path, orl_samples,
                                                                         caplog):
    root = copy_gallery(orl_samples, tmp_path / "g", ["s1", "s2"], per_identity=2)
    write_png_bomb(root / "s1" / "bomb.png")
    samples = read_folder_gallery(root)
    assert len(drop_unreadable(samples)) == 4
    assert "skipped 1 unreadable image(s)" in caplog.text and "bomb.png" in caplog.text
    with pytest.raises(UserError, match="bomb.png is too large.*--strict"):
        drop_unreadable(samples, strict=True)


def test_report_gives_a_bomb_no_thumbnail(tmp_path, orl_samples, caplog):
    from retrieval.answering.report import thumbnail_uri

    assert thumbnail_uri(str(orl_samples[0].path)).startswith("data:image/jpeg;base64,")
    bomb = write_png_bomb(tmp_path / "report_bomb.png")
    assert thumbnail_uri(str(bomb)) is None
    assert "no thumbnail" in caplog.text and "too large" in caplog.text


def test_train_cli_strict_fails_on_a_bomb_in_one_line(tmp_path, orl_samples):
    root = copy_gallery(orl_samples, tmp_path / "g", ["s1", "s2"], per_identity=2)
    write_png_bomb(root / "s2" / "bomb.png")
    result = run_cli("train_embed.py", "--gallery", root, "--strict", "--out", tmp_path / "run",
                     "--epochs", "1", "--image-size", "32", "--workers", "0")
    assert_one_line_error(result, "bomb.png is too large to decode", "--strict")


# ---------------------------------------------------------------- 2. identities


@pytest.mark.parametrize("identity, suggestion", [
    ("John Smith", "John_Smith"), ("tab\there", "tab_here"), ("bell\x07", "bell_"),
    ("=HYPERLINK(1)", None), ("+1", None), ("-1", None), ("@sum", None), ("nbsp\xa0x", "nbsp_x"),
])
def test_identity_that_would_corrupt_a_submission_is_refused_at_read_time(
        tmp_path, orl_samples, identity, suggestion):
    images, csv = make_kaggle_layout(orl_samples[:4], tmp_path / "kaggle")
    table = pd.read_csv(csv, dtype=str)
    table.loc[0, "Id"] = identity
    table.to_csv(csv, index=False)
    with pytest.raises(UserError, match="rename") as caught:
        read_kaggle_gallery(csv, images)
    message = str(caught.value)
    assert repr(identity) in message and "\n" not in message
    if suggestion:
        assert repr(suggestion) in message

    root = copy_gallery(orl_samples, tmp_path / "folders", ["s1", "s2"], per_identity=1)
    os.rename(root / "s1", root / identity)
    with pytest.raises(UserError, match="rename"):
        read_folder_gallery(root)


def test_bad_identities_are_named_with_a_count_of_the_others(tmp_path, orl_samples):
    root = copy_gallery(orl_samples, tmp_path / "g", ["s1", "s2", "s3", "s4"], per_identity=1)
    for good, bad in (("s1", "Ann Lee"), ("s2", "Bob Ray"), ("s3", "=cmd")):
        os.rename(root / good, root / bad)
    with pytest.raises(UserError, match=r"'=cmd'.*and 2 other"):
        read_folder_gallery(root)


def test_nested_identities_with_a_slash_are_fine(omniglot_samples):
    assert any("/" in s.identity for s in omniglot_samples)  # read by the conftest fixture


def test_submission_refuses_a_label_with_a_space():
    from retrieval.answering.submission import write_submission

    answers = [QueryAnswer("/q/a.jpg", [Hit("John Smith", 0.9, "/g/1.jpg"),
                                        Hit(NEW_WHALE, None, None)])]
    with pytest.raises(UserError, match="'John Smith'.*rebuild the index"):
        write_submission("/nonexistent/never_written.csv", answers)


def test_train_cli_refuses_an_identity_with_a_space_in_one_line(tmp_path, orl_samples):
    root = copy_gallery(orl_samples, tmp_path / "g", ["s1", "s2"], per_identity=2)
    os.rename(root / "s1", root / "John Smith")
    result = run_cli("train_embed.py", "--gallery", root, "--out", tmp_path / "run",
                     "--epochs", "1", "--image-size", "32", "--workers", "0", "--no-refit")
    assert_one_line_error(result, "'John Smith'", "'John_Smith'")


# ---------------------------------------------------------------- 3. formula injection


def test_submission_escapes_file_names_that_start_a_formula(tmp_path, caplog):
    from retrieval.answering.submission import (
        score_submission,
        submission_rows,
        write_submission,
    )

    names = ["=1+1.jpg", "+a.jpg", "-b.jpg", "@c.jpg", "\td.jpg", "\re.jpg", "ok.jpg"]
    answers = [QueryAnswer(f"/q/{n}", [Hit("w1", 0.9, "/g/1.jpg")]) for n in names]
    cells = [name for name, _ in submission_rows(answers)]
    assert sorted(cells) == cells
    assert set(cells) == {"'=1+1.jpg", "'+a.jpg", "'-b.jpg", "'@c.jpg", "'\td.jpg", "'\re.jpg",
                          "ok.jpg"}
    assert "6 query file name(s)" in caplog.text
    write_submission(tmp_path / "s.csv", answers)
    truth = pd.DataFrame({"Image": names, "Id": ["w1"] * len(names)})
    truth.to_csv(tmp_path / "t.csv", index=False)
    assert score_submission(tmp_path / "s.csv", tmp_path / "t.csv") == 1.0  # escape undone on read


# ---------------------------------------------------------------- 4. CSV paths outside the gallery


def outside_layout(tmp_path: Path, orl_samples) -> tuple[Path, Path, Path]:
    """train/ + train.csv of 4 images, plus one row '../elsewhere/x.pgm' and one absolute path."""
    subset = [s for s in orl_samples if s.identity in {"s1", "s2"}][::5] + \
        [s for s in orl_samples if s.identity in {"s3", "s4"}][::5]
    images, csv = make_kaggle_layout(subset[:4], tmp_path / "kaggle")
    elsewhere = tmp_path / "kaggle" / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(subset[4].path, elsewhere / "x.pgm")
    shutil.copy(subset[5].path, elsewhere / "y.pgm")
    rows = pd.read_csv(csv, dtype=str)
    extra = pd.DataFrame({"Image": ["../elsewhere/x.pgm", str(elsewhere / "y.pgm")],
                          "Id": [subset[4].identity, subset[5].identity]})
    pd.concat([rows, extra]).to_csv(csv, index=False)
    return images, csv, elsewhere


def test_csv_rows_outside_the_gallery_are_refused_unless_allowed(tmp_path, orl_samples):
    from retrieval.data import read_gallery

    images, csv, elsewhere = outside_layout(tmp_path, orl_samples)
    with pytest.raises(UserError,
                       match=r"2 row\(s\).*outside.*\.\./elsewhere/x\.pgm.*--allow-outside"):
        read_kaggle_gallery(csv, images)
    samples = read_gallery(images, csv, allow_outside=True)
    assert len(samples) == 6 and samples[-1].path == elsewhere / "y.pgm"
    assert os.path.realpath(samples[-2].path) == str(elsewhere / "x.pgm")


def test_links_and_dot_dots_that_stay_inside_are_fine(tmp_path, orl_samples):
    images, csv = make_kaggle_layout(orl_samples[:3], tmp_path / "kaggle")
    (tmp_path / "kaggle" / "elsewhere").mkdir()
    shutil.copy(orl_samples[3].path, tmp_path / "kaggle" / "elsewhere" / "z.pgm")
    (images / "link.pgm").symlink_to(tmp_path / "kaggle" / "elsewhere" / "z.pgm")  # user-placed
    (images / "sub").mkdir()
    rows = pd.concat([pd.read_csv(csv, dtype=str),
                      pd.DataFrame({"Image": ["link.pgm", "sub/../00000.pgm"], "Id": ["s9", "s1"]})])
    rows.to_csv(csv, index=False)
    assert len(read_kaggle_gallery(csv, images)) == 4  # 00000.pgm listed twice, same Id: once


def test_train_cli_refuses_outside_rows_and_passes_allow_outside(tmp_path, orl_samples):
    images, csv, _ = outside_layout(tmp_path, orl_samples)
    common = ["train_embed.py", "--gallery", images, "--labels", csv, "--out", tmp_path / "run",
              "--epochs", "1", "--image-size", "32", "--workers", "0", "--no-refit"]
    assert_one_line_error(run_cli(*common), "2 row(s)", "outside", "--allow-outside")
    # with the flag the CSV is read; the protocol's export (paths relative to --gallery) then
    # refuses up front instead of failing after training
    assert_one_line_error(run_cli(*common, "--allow-outside", "--whale-protocol", "0"),
                          "--whale-protocol", "outside")


@pytest.mark.parametrize("script", ["train_embed.py", "build_index.py"])
def test_allow_outside_is_explained_in_help(script):
    result = run_cli(script, "--help")
    assert result.returncode == 0 and "--allow-outside" in result.stdout


# ---------------------------------------------------------------- 5. duplicate CSV rows


def test_duplicate_csv_rows_are_dropped_and_conflicting_ones_refused(tmp_path, orl_samples, caplog):
    import logging
    caplog.set_level(logging.INFO)
    images, csv = make_kaggle_layout(orl_samples[:4], tmp_path / "kaggle",
                                     extra_rows=[("00001.pgm", orl_samples[1].identity)])
    samples = read_kaggle_gallery(csv, images)
    assert [s.path.name for s in samples] == ["00000.pgm", "00001.pgm", "00002.pgm", "00003.pgm"]
    assert "1 duplicate row(s)" in caplog.text
    conflicting = pd.concat([pd.read_csv(csv, dtype=str),
                             pd.DataFrame({"Image": ["00002.pgm"], "Id": ["w_other"]})])
    conflicting.to_csv(csv, index=False)
    with pytest.raises(UserError, match=r"00002\.pgm.*'s1'.*'w_other'.*keep one row"):
        read_kaggle_gallery(csv, images)


def test_train_cli_refuses_conflicting_labels_in_one_line(tmp_path, orl_samples):
    images, csv = make_kaggle_layout(orl_samples[:12], tmp_path / "kaggle",
                                     extra_rows=[("00000.pgm", "w_other")])
    result = run_cli("train_embed.py", "--gallery", images, "--labels", csv, "--out", tmp_path / "r",
                     "--epochs", "1", "--image-size", "32", "--workers", "0", "--no-refit")
    assert_one_line_error(result, "00000.pgm", "w_other", "keep one row")


# ---------------------------------------------------------------- 6. symlinked identity folders


def symlinked_gallery(tmp_path: Path, orl_samples) -> Path:
    """g/s1 (real), g/s2 -> ../elsewhere/s2 (a linked identity), g/s1/loop -> .. (a loop),
    g/group/s3 -> ../../elsewhere/s3 (nested link), g/again -> ../elsewhere/s2 (second link)."""
    root = copy_gallery(orl_samples, tmp_path / "g", ["s1"], per_identity=2)
    elsewhere = copy_gallery(orl_samples, tmp_path / "elsewhere", ["s2", "s3"], per_identity=2)
    (root / "s2").symlink_to(elsewhere / "s2")
    (root / "s1" / "loop").symlink_to(root)
    (root / "group").mkdir()
    (root / "group" / "s3").symlink_to(elsewhere / "s3")
    (root / "zz_again").symlink_to(elsewhere / "s2")
    return root


def test_symlinked_identity_folders_are_followed_without_looping(tmp_path, orl_samples, caplog):
    root = symlinked_gallery(tmp_path, orl_samples)
    samples = read_folder_gallery(root)
    by_identity = {}
    for sample in samples:
        by_identity.setdefault(sample.identity, []).append(sample.path)
    assert sorted(by_identity) == ["group/s3", "s1", "s2"]
    assert all(len(paths) == 2 for paths in by_identity.values())
    assert all(p.parent == root / "s2" for p in by_identity["s2"])  # the path as the user sees it
    assert "zz_again" in caplog.text  # the second link to one folder is named, not read twice


# ---------------------------------------------------------------- query CLI: 1, 3, 7, 8


@pytest.fixture(scope="module")
def index(tmp_path_factory, orl_samples):
    """A 64-px checkpoint index of s1..s4 (2 images each) and s5 (1 image, then swapped for a
    bomb: a gallery file replaced after indexing, as the HTML report meets it)."""
    from retrieval.answering.indexing import BuildOptions, run

    root = tmp_path_factory.mktemp("hardening")
    ckpt = make_checkpoint(root / "model.pt", threshold=0.5)
    gallery = copy_gallery(orl_samples, root / "gallery", ["s1", "s2", "s3", "s4"], per_identity=2)
    copy_gallery(orl_samples, gallery, ["s5"], per_identity=1)
    run(BuildOptions(out=str(root / "index"), gallery=str(gallery), model=str(ckpt), workers=0,
                     batch_size=16, progress=False))
    (gallery_bomb,) = (gallery / "s5").iterdir()
    write_png_bomb(Path(gallery_bomb))  # same name, now a bomb
    queries = copy_gallery(orl_samples, root / "q", ["s1", "s2", "s3"], per_identity=1, skip=5)
    return argparse.Namespace(root=root, dir=root / "index", queries=queries, identities=5)


def query_folder(tmp_path: Path, index, names: dict[str, str]) -> Path:
    """tmp_path/queries: the fixture's three query images under the given new names."""
    folder = tmp_path / "queries"
    folder.mkdir()
    for source, name in zip(sorted(index.queries.rglob("*.pgm")), names):
        shutil.copy(source, folder / name)
    return folder


def test_query_cli_single_bomb_image_is_one_line(tmp_path, index):
    bomb = write_png_bomb(tmp_path / "bomb.png")
    assert_one_line_error(run_cli("query.py", bomb, "--index", index.dir), "bomb.png", "too large")


def test_query_cli_folder_skips_bad_images_and_report_skips_a_bomb(tmp_path, index):
    folder = query_folder(tmp_path, index, ["a.pgm", "b.pgm", "c.pgm"])
    corrupt(folder / "broken.jpg")
    write_png_bomb(folder / "bomb.png")
    submission, report = tmp_path / "s.csv", tmp_path / "r.html"
    result = run_cli("query.py", folder, "--index", index.dir, "--threshold", "-1",
                     "--submission", submission, "--html", report)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 2 of 5 query image(s)" in result.stderr and "submission" in result.stderr
    assert submission.read_text().splitlines()[1:] and \
        [line.split(",")[0] for line in submission.read_text().splitlines()[1:]] == \
        ["a.pgm", "b.pgm", "c.pgm"]
    assert "no thumbnail" in result.stderr  # s5's gallery image is now a bomb
    check_html(report, expected_images=3 + 3 * 4)  # 3 queries + 5 hits each, s5's left blank


def test_query_cli_folder_strict_or_all_bad_fails_in_one_line(tmp_path, index):
    folder = query_folder(tmp_path, index, ["a.pgm"])
    corrupt(folder / "broken.jpg")
    assert_one_line_error(run_cli("query.py", folder, "--index", index.dir, "--strict"),
                          "broken.jpg", "--strict")
    (folder / "a.pgm").unlink()
    write_png_bomb(folder / "bomb.png")
    assert_one_line_error(run_cli("query.py", folder, "--index", index.dir),
                          "no readable image", "2 image(s)")


def test_query_cli_submission_escapes_formula_file_names(tmp_path, index):
    folder = query_folder(tmp_path, index, ["=cmd.pgm", "@sum.pgm", "plain.pgm"])
    submission = tmp_path / "s.csv"
    result = run_cli("query.py", folder, "--index", index.dir, "--submission", submission)
    assert result.returncode == 0, result.stderr[-2000:]
    names = [line.split(",")[0] for line in submission.read_text().splitlines()[1:]]
    assert sorted(names) == ["'=cmd.pgm", "'@sum.pgm", "plain.pgm"]
    assert "2 query file name(s)" in result.stderr


def test_query_cli_clamps_an_absurd_k(tmp_path, index):
    image = sorted(index.queries.rglob("*.pgm"))[0]
    result = run_cli("query.py", image, "--index", index.dir, "-k", "100000000000", "--json",
                     "--threshold", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout)
    assert answer["k"] == index.identities + 1
    labels = [hit["identity"] for hit in answer["results"][0]["answers"]]
    assert labels[0] == NEW_WHALE and sorted(labels[1:]) == [f"s{i}" for i in range(1, 6)]
    assert "-k 100000000000" in result.stderr


# ---------------------------------------------------------------- build CLI: 4, 6


def test_build_cli_allow_outside_and_symlinked_identities(tmp_path, orl_samples, index):
    images, csv, elsewhere = outside_layout(tmp_path, orl_samples)
    ckpt = index.root / "model.pt"
    common = ["build_index.py", "--model", ckpt, "--workers", "0", "--no-progress"]
    assert_one_line_error(run_cli(*common, "--gallery", images, "--labels", csv,
                                  "--out", tmp_path / "idx"), "outside", "--allow-outside")
    result = run_cli(*common, "--gallery", images, "--labels", csv, "--out", tmp_path / "idx",
                     "--allow-outside")
    assert result.returncode == 0, result.stderr[-2000:]
    from index import load_index
    assert str(elsewhere / "y.pgm") in load_index(tmp_path / "idx").paths

    root = symlinked_gallery(tmp_path / "links", orl_samples)
    result = run_cli(*common, "--gallery", root, "--out", tmp_path / "idx2")
    assert result.returncode == 0, result.stderr[-2000:]
    stored = load_index(tmp_path / "idx2")
    assert sorted(set(stored.identities)) == ["group/s3", "s1", "s2"]
    assert any(p.startswith(str(root / "s2") + "/") for p in stored.paths)
