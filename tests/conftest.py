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
