"""What can go wrong with a gallery index, as exception types of the index's own.

Messages say what is wrong in the index's terms (a folder, a file, a count). How a person fixes it
depends on the program in front of them, so the advice is added by the caller:
``retrieval.errors`` words each type as command-line advice ("rebuild it with build_index.py").
"""
from __future__ import annotations

from pathlib import Path


class GalleryIndexError(Exception):
    """Base of every error an index folder or a FAISS build raises for bad input."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


class IndexNotFound(GalleryIndexError):
    """No index folder there. ``backup``: an interrupted write of an older version left the
    previous index under that name."""

    def __init__(self, message: str, path: Path, backup: Path | None = None):
        super().__init__(message, path)
        self.backup = backup


class NotAnIndex(GalleryIndexError):
    """A folder exists but holds no index manifest (reading)."""


class NotReplaceable(GalleryIndexError):
    """Writing would mix an index into a folder that is not one (or not a folder)."""


class IndexCorrupt(GalleryIndexError):
    """A file of the index is missing, truncated, fails its checksum, or holds invalid values;
    or the manifest is of a format this version does not read. ``detail``: what exactly."""

    def __init__(self, message: str, path: Path | None = None, detail: str | None = None):
        super().__init__(message, path)
        self.detail = detail or message


class InvalidGallery(GalleryIndexError):
    """What was handed to ``save_index`` cannot be indexed (no vectors, NaN vectors, a type the
    gallery is too small for)."""


class MilvusError(GalleryIndexError):
    """The Milvus backend cannot do what was asked: not installed, unreachable, a collection that
    is not this tool's or holds another model's vectors, a write that failed part-way."""


class WrongBackend(GalleryIndexError):
    """An operation that needs the index folder's own vectors, on an index whose vectors live in
    Milvus."""
