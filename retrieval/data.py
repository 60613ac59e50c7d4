"""Reading a labelled gallery and splitting it the way the benchmarks here do.

Two layouts are accepted:
  * a folder with one sub-folder per identity (nested allowed: the identity is the relative
    folder path, e.g. ``Greek/character03``);
  * Kaggle's whale layout: a CSV with columns ``Image,Id`` plus the folder holding the images.
``new_whale`` rows are never a training identity: they are dropped when a gallery is read.
Identity names are checked here (``check_identities``), so a name that would corrupt a submission
is refused when the gallery is read, not discovered in the file Kaggle rejects.
"""
from __future__ import annotations

import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import NEW_WHALE
from .errors import UserError

if TYPE_CHECKING:  # pandas loads only when a CSV is read
    import pandas as pd

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
CSV_COLUMNS = ("Image", "Id")
# Refused before decoding. Every model here reads 224 px or less, and real inputs (whale photos,
# 48-Mpixel phone shots, scans) stay under it, while a decoded image costs 3 bytes a pixel: 100 M
# pixels is 300 MB, about the most one image should take in a DataLoader worker. A 20000x20000 PNG
# is ~50 KB on disk yet 1.2 GB decoded: such a decompression bomb is refused in one line instead of
# exhausting memory. (PIL's own guard only warns above ~89 M pixels and raises above ~179 M.)
MAX_IMAGE_PIXELS = 100_000_000
# A label cell starting with one of these is run as a formula by spreadsheets.
FORMULA_START = ("=", "+", "-", "@")
_BAD_IDENTITY_CHARS = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")  # whitespace, control characters


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
    for path in _walk_images(root):
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
    check_identities((s.identity for s in samples), f"gallery {root}", "rename its folder")
    return samples


def _walk_images(root: Path) -> list[Path]:
    """Every image under ``root``, sorted, following symlinked folders (users link an identity's
    folder in from elsewhere; ``Path.rglob`` silently skips those). Each real folder is read once,
    so a link loop ends; a second link to a folder already read is named in a warning."""
    seen: set[str] = set()
    images: list[Path] = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            log.warning("skipped %s: it links to %s, which is already read (a link loop, or a "
                        "second link to one folder)", folder, real)
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()
        images.extend(path for path in (Path(folder, name) for name in files) if is_image(path))
    return sorted(images)


def read_kaggle_gallery(csv_path: str | Path, images_dir: str | Path,
                        allow_outside: bool = False) -> list[Sample]:
    """Kaggle's ``train.csv`` (``Image,Id``) plus the folder that holds the images.

    An ``Image`` entry must stay inside ``images_dir`` unless ``allow_outside``: a CSV from
    elsewhere could otherwise read (and show in report.html) any file on the machine.
    """
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    table = _read_labels(csv_path, images_dir)
    table = _drop_duplicate_rows(table, csv_path)
    new = table["Id"] == NEW_WHALE
    if new.any():
        log.info("%s: %d new_whale row(s) are not a training identity and are left out",
                 csv_path.name, int(new.sum()))
    table = table[~new]
    if not allow_outside:
        _refuse_outside(list(table["Image"]), csv_path, images_dir)
    check_identities(table["Id"], csv_path.name, f"rename it in {csv_path.name}")
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


def _read_labels(csv_path: Path, images_dir: Path) -> "pd.DataFrame":
    """The CSV's ``Image,Id`` rows, those missing either dropped."""
    import pandas as pd

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
    return table.dropna(subset=list(CSV_COLUMNS))


def _drop_duplicate_rows(table: "pd.DataFrame", csv_path: Path) -> "pd.DataFrame":
    """One row per image: a repeated row is harmless (dropped), but one image under two Ids
    would be silently resolved by whichever row came last, so it is refused."""
    key = table["Image"].map(os.path.normpath)  # 'a.png' and './a.png' are one image
    repeated = table.assign(_key=key).duplicated(subset=["_key", "Id"])
    if repeated.any():
        log.info("%s: %d duplicate row(s) (same Image, same Id) dropped", csv_path.name,
                 int(repeated.sum()))
    table, key = table[~repeated], key[~repeated]
    conflicting = key.duplicated(keep=False)
    if conflicting.any():
        groups = table[conflicting].groupby(key[conflicting], sort=True)["Id"]
        image, ids = next(iter(groups))
        others = f" (and {groups.ngroups - 1} other image(s))" if groups.ngroups > 1 else ""
        raise UserError(f"image {image!r} is listed in {csv_path.name} with {len(ids)} different "
                        f"Ids ({', '.join(map(repr, sorted(ids)))}){others}: keep one row per "
                        "image, with its true Id")
    return table


def _refuse_outside(names: Sequence[str], csv_path: Path, images_dir: Path) -> None:
    """Refuse ``Image`` entries that are absolute or climb out of ``images_dir`` with '..'. Judged
    on the text (``os.path.normpath``), so a symlink the user placed inside the folder is fine."""
    outside = [name for name in names
               if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir]
    if outside:
        raise UserError(f"{len(outside)} row(s) of {csv_path.name} name images outside "
                        f"{images_dir} (e.g. {outside[0]!r}): Image must be a path inside the "
                        "gallery folder; move the images there, or pass --allow-outside if you "
                        "trust this CSV")


def identity_problem(identity: str) -> str | None:
    """Why ``identity`` cannot be a label, or None. Labels are space-separated in a submission
    (a space splits one identity into two) and the file is opened in spreadsheets (a leading
    = + - @ runs as a formula); control characters corrupt both."""
    if any(c.isspace() for c in identity):
        return "contains whitespace"
    if any(unicodedata.category(c) == "Cc" for c in identity):
        return "contains a control character"
    if identity.startswith(FORMULA_START):
        return f"starts with {identity[0]!r} (a spreadsheet formula)"
    return None


def suggested_identity(identity: str) -> str:
    """A usable name for a refused one: 'John Smith' -> 'John_Smith', '=x' -> 'id_=x'."""
    name = _BAD_IDENTITY_CHARS.sub("_", identity)
    return "id_" + name if name.startswith(FORMULA_START) else name


def check_identities(identities: Iterable[str], where: str, fix: str = "rename it") -> None:
    """The one rule for labels (``identity_problem``), applied when a gallery is read and when a
    submission is written (an older index may still hold such labels). Names the first bad
    identity, counts the others, and says how to fix it; one line whatever the name holds."""
    bad = sorted({identity for identity in identities if identity_problem(identity)})
    if not bad:
        return
    first, n_others = bad[0], len(bad) - 1
    others = f" (and {n_others} other {'identity' if n_others == 1 else 'identities'})" \
        if n_others else ""
    raise UserError(f"identity {first!r} in {where} {identity_problem(first)}{others}: labels are "
                    "space-separated in a submission and must not start a spreadsheet formula; "
                    f"{fix} (e.g. {first!r} -> {suggested_identity(first)!r})")


def read_gallery(gallery: str | Path, labels: str | Path | None = None,
                 allow_outside: bool = False) -> list[Sample]:
    """Read either layout: ``labels`` (a Kaggle CSV) selects the CSV layout. ``allow_outside``
    lets the CSV name images outside ``gallery`` (the folder layout has no such paths)."""
    if labels is not None:
        return read_kaggle_gallery(labels, gallery, allow_outside=allow_outside)
    return read_folder_gallery(gallery)


def load_image(path: "str | Path | BinaryIO", max_side: int | None = None,
               name: str | None = None) -> np.ndarray:
    """Decode an image as an RGB uint8 array; grey and 1-bit images become 3-channel.

    The one image loader (gallery, training, queries, report thumbnails, the server's uploads), so
    every caller gets the same size guard and the same one-line UserError for a file it cannot
    use. The size is checked from the header, before any pixel is decoded. ``max_side`` lets a
    JPEG decode at a reduced scale (still at least that size) when only a thumbnail is wanted.
    ``path`` may be an open binary stream (an upload); ``name`` then names it in messages.
    """
    label = name or path
    try:
        with Image.open(path) as image:
            _check_size(label, image.size)
            if max_side is not None:
                image.draft("RGB", (max_side, max_side))
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"image {label} does not exist") from None
    except Image.DecompressionBombError:  # PIL's own guard, at open: not an OSError
        raise _too_large(label) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        detail = "not a recognised image format" if isinstance(err, UnidentifiedImageError) else err
        raise UserError(f"image {label} is unreadable or corrupt ({detail}): replace or remove it") \
            from None


def _check_size(path: str | Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(path, f"{width}x{height} pixels, ")


def _too_large(path: str | Path, size: str = "") -> UserError:
    return UserError(f"image {path} is too large to decode safely ({size}over "
                     f"{MAX_IMAGE_PIXELS // 1_000_000} M pixels: a decompression bomb, or a scan "
                     "far bigger than any model input): downscale or remove it")


def find_unreadable(paths: Sequence[str | Path], strict: bool = False) -> dict[int, str]:
    """Decode every image once: {position: why} for each one ``load_image`` refuses. ``strict``
    raises at the first instead, saying how to skip them.

    Checking up front keeps a bad file from killing a long run half-way, in a worker traceback.
    """
    from .progress import bar

    bad: dict[int, str] = {}
    for i, path in enumerate(bar(paths, len(paths) >= 500, desc="checking images", unit="img",
                                 leave=False)):
        try:
            load_image(path)
        except UserError as err:
            if strict:
                raise UserError(f"{err} (--strict is set; drop it to skip bad images)") from None
            bad[i] = str(err)
    return bad


def drop_unreadable(samples: Sequence[Sample], strict: bool = False) -> list[Sample]:
    """The samples ``load_image`` accepts; the others are skipped with a warning (``strict``:
    the first one is an error)."""
    bad = find_unreadable([s.path for s in samples], strict)
    if bad:
        log.warning("skipped %d unreadable image(s) (use --strict to fail instead), e.g. %s",
                    len(bad), next(iter(bad.values())))
    return [s for i, s in enumerate(samples) if i not in bad]


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
