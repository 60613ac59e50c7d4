"""Writing files so that a crash never leaves a half-written one (checkpoints, CSVs, reports)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """Write via a temporary file in the same folder, then rename: a crash leaves the old file.

    The file gets the permissions a plain ``open()`` would give it (0666 less the umask), not
    ``mkstemp``'s private 0600: a model or report written for a team must stay readable.
    ``durable`` flushes the file to disk before the rename, for a file something committed later
    will point at (an index names the server's stored uploads): a power cut then cannot leave the
    name with empty contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        os.chmod(temp, 0o666 & ~current_umask())
        write(Path(temp))
        if durable:
            _fsync(Path(temp))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
