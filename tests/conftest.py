"""Shared fixtures: the real data sets in ../shared/data (never copied into the repo)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
OMNIGLOT = SHARED_DATA / "omniglot" / "images_background_small1"
ORL = SHARED_DATA / "orl_faces"


def pytest_sessionstart(session):
    if not OMNIGLOT.is_dir() or not ORL.is_dir():
        raise pytest.UsageError(f"real test data not found under {SHARED_DATA}: the tests need the "
                                "shared/ folder beside the repository")


@pytest.fixture(scope="session")
def omniglot_samples():
    from retrieval.data import read_folder_gallery
    return read_folder_gallery(OMNIGLOT)


@pytest.fixture(scope="session")
def orl_samples():
    from retrieval.data import read_folder_gallery
    return read_folder_gallery(ORL)


def make_kaggle_layout(samples, folder: Path, extra_rows: list[tuple[str, str]] = ()) -> tuple[Path, Path]:
    """Kaggle whale layout built from real images: folder/train/<n>.<ext> + folder/train.csv."""
    images = folder / "train"
    images.mkdir(parents=True)
    rows = []
    for i, sample in enumerate(samples):
        name = f"{i:05d}{sample.path.suffix}"
        shutil.copy(sample.path, images / name)
        rows.append((name, sample.identity))
    rows.extend(extra_rows)
    csv = folder / "train.csv"
    pd.DataFrame(rows, columns=["Image", "Id"]).to_csv(csv, index=False)
    return images, csv


SERVICE_GALLERY = [f"s{i}" for i in range(1, 7)]  # the served index: 6 ORL people x 3 photos


@pytest.fixture(scope="session")
def service_built(tmp_path_factory, orl_samples):
    """A zero-shot index at 64 px over ``SERVICE_GALLERY``, built once for the service and
    server tests (their ``index_dir`` fixtures copy it, since they edit it)."""
    from retrieval.answering.indexing import BuildOptions, run

    from .index_helpers import IMAGE_SIZE, copy_gallery

    root = tmp_path_factory.mktemp("service")
    gallery = copy_gallery(orl_samples, root / "gallery", SERVICE_GALLERY, per_identity=3)
    run(BuildOptions(out=str(root / "index"), gallery=str(gallery), image_size=IMAGE_SIZE,
                     workers=0, batch_size=16, progress=False))
    return root


@pytest.fixture
def index_dir(service_built, tmp_path):
    """A private copy of the served index per test: the tests add and remove photos."""
    shutil.copytree(service_built / "index", tmp_path / "index")
    return tmp_path / "index"
