"""Reading a labelled gallery and splitting it the way the benchmarks here do.

Two layouts are accepted:
  * a folder with one sub-folder per identity (nested allowed: the identity is the relative
    folder path, e.g. ``Greek/character03``);
  * Kaggle's whale layout: a CSV with columns ``Image,Id`` plus the folder holding the images.
``new_whale`` rows are never a training identity: they are dropped when a gallery is read.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import NEW_WHALE
from .errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
CSV_COLUMNS = ("Image", "Id")


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``identity`` is ``new_whale`` only for protocol queries."""

    path: Path
    identity: str


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def read_folder_gallery(root: str | Path) -> list[Sample]:
    """One sub-folder per identity; the identity is the folder's path relative to ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"gallery folder {root} does not exist: pass an existing folder with one "
                        "sub-folder per identity, or a Kaggle CSV with --labels")
    samples, loose = [], 0
    for path in sorted(root.rglob("*")):
        if not is_image(path):
            continue
        identity = path.parent.relative_to(root).as_posix()
        if identity == ".":
            loose += 1
            continue
        if identity == NEW_WHALE:
            continue
        samples.append(Sample(path, identity))
    if loose:
        log.warning("ignored %d image(s) directly in %s: put each identity's images in a "
                    "sub-folder named after it", loose, root)
    if not samples:
        raise UserError(f"no images found in identity sub-folders of {root}: expected "
                        f"{root}/<identity>/<image> (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples


def read_kaggle_gallery(csv_path: str | Path, images_dir: str | Path) -> list[Sample]:
    """Kaggle's ``train.csv`` (``Image,Id``) plus the folder that holds the images."""
    import pandas as pd

    csv_path, images_dir = Path(csv_path), Path(images_dir)
    if not csv_path.is_file():
        raise UserError(f"labels file {csv_path} does not exist: pass the Kaggle train.csv "
                        "(columns Image,Id) with --labels")
    if not images_dir.is_dir():
        raise UserError(f"image folder {images_dir} does not exist: pass the folder holding the "
                        f"images named in {csv_path.name}")
    try:
        table = pd.read_csv(csv_path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"cannot parse {csv_path} as CSV ({err}): expected a header line "
                        "'Image,Id' and one row per image") from None
    missing_columns = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing_columns:
        raise UserError(f"{csv_path} has columns {list(table.columns)} but needs "
                        f"{list(CSV_COLUMNS)}: rename the header to 'Image,Id'")
    table = table.dropna(subset=list(CSV_COLUMNS))
    new = table["Id"] == NEW_WHALE
    if new.any():
        log.info("%s: %d new_whale row(s) are not a training identity and are left out",
                 csv_path.name, int(new.sum()))
    table = table[~new]
    samples = [Sample(images_dir / name, identity)
               for name, identity in zip(table["Image"], table["Id"])]
    absent = [s.path.name for s in samples if not s.path.is_file()]
    if absent:
        shown = ", ".join(absent[:3]) + (" ..." if len(absent) > 3 else "")
        raise UserError(f"{len(absent)} image(s) listed in {csv_path.name} are not in {images_dir} "
                        f"({shown}): fix the CSV or copy the images there")
    if not samples:
        raise UserError(f"{csv_path} lists no labelled images (besides new_whale)")
    return samples


def read_gallery(gallery: str | Path, labels: str | Path | None = None) -> list[Sample]:
    """Read either layout: ``labels`` (a Kaggle CSV) selects the CSV layout."""
    if labels is not None:
        return read_kaggle_gallery(labels, gallery)
    return read_folder_gallery(gallery)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image as an RGB uint8 array; grey and 1-bit images become 3-channel."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"image {path} is unreadable or corrupt ({err}): replace or remove it") from None


def drop_unreadable(samples: Sequence[Sample], strict: bool = False) -> list[Sample]:
    """Decode every image once; skip corrupt ones with a warning, or fail when ``strict``.

    Checking up front keeps a corrupt file from killing a long training run half-way.
    """
    from tqdm import tqdm

    good, bad = [], []
    for sample in tqdm(samples, desc="checking images", unit="img", leave=False,
                       disable=len(samples) < 500):
        try:
            load_image(sample.path)
        except UserError as err:
            if strict:
                raise UserError(f"{err} (--strict is set; drop it to skip bad images)") from None
            bad.append(sample.path)
            continue
        good.append(sample)
    if bad:
        log.warning("skipped %d unreadable image(s), e.g. %s (use --strict to fail instead)",
                    len(bad), bad[0])
    return good


def identities_of(samples: Iterable[Sample]) -> list[str]:
    """Sorted distinct identities (``new_whale`` excluded): the class order used for training."""
    return sorted({s.identity for s in samples} - {NEW_WHALE})


def group_by_identity(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.identity, []).append(sample)
    return {identity: sorted(group, key=lambda s: str(s.path))
            for identity, group in sorted(groups.items())}


def require_identities(samples: Sequence[Sample], minimum: int = 2, what: str = "training") -> None:
    count = len(identities_of(samples))
    if count < minimum:
        raise UserError(f"{what} needs at least {minimum} identities, found {count}: "
                        "add images of more identities")


@dataclass(frozen=True)
class QuerySplit:
    """A gallery to train on / index, and queries whose truth is an identity or ``new_whale``."""

    gallery: list[Sample]
    queries: list[Sample]


def _draw_new_identities(names: Sequence[str], fraction: float,
                         rng: np.random.Generator) -> set[str]:
    """``round(fraction * n)`` identities drawn without replacement: the (pseudo-)new ones."""
    n_new = int(round(fraction * len(names)))
    return {names[i] for i in rng.choice(len(names), size=n_new, replace=False)}


def whale_split(samples: Sequence[Sample], seed: int, new_fraction: float = 0.25,
                max_gallery: int = 3) -> QuerySplit:
    """The whale protocol of ../shared/data/README.md, deterministic from ``seed``.

    A quarter of the identities are *new*: one random image of each is a query whose truth is
    ``new_whale``. Every other identity gives one query and 1..max_gallery gallery images.
    """
    groups = group_by_identity(samples)
    names = sorted(groups)
    rng = np.random.default_rng(seed)
    new = _draw_new_identities(names, new_fraction, rng)
    gallery, queries = [], []
    for name in names:
        images = groups[name]
        if name in new:
            queries.append(Sample(images[int(rng.integers(len(images)))].path, NEW_WHALE))
            continue
        order = [images[i] for i in rng.permutation(len(images))]
        queries.append(order[0])
        n_gallery = int(rng.integers(1, max_gallery + 1))
        gallery.extend(order[1:1 + n_gallery])
    return QuerySplit(gallery, queries)


def validation_split(samples: Sequence[Sample], seed: int, new_fraction: float = 0.2) -> QuerySplit:
    """Carve validation queries out of *training* data only (the test queries stay unseen).

    A share of identities is held back as pseudo-new (one image each is a ``new_whale`` query, the
    rest unused); every other identity with two or more images lends one image as a query. The
    remaining images are both the training set and the validation gallery.
    """
    groups = group_by_identity(samples)
    names = sorted(groups)
    rng = np.random.default_rng(seed)
    new = _draw_new_identities(names, new_fraction, rng)
    gallery, queries = [], []
    for name in names:
        images = [groups[name][i] for i in rng.permutation(len(groups[name]))]
        if name in new:
            queries.append(Sample(images[0].path, NEW_WHALE))
        elif len(images) >= 2:
            queries.append(images[0])
            gallery.extend(images[1:])
        else:
            gallery.extend(images)
    return QuerySplit(gallery, queries)


def open_set_split(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Metric-learning papers' split: first half of the sorted identities trains, second tests."""
    names = identities_of(samples)
    train_names = set(names[: len(names) // 2])
    train = [s for s in samples if s.identity in train_names]
    test = [s for s in samples if s.identity not in train_names]
    return train, test
