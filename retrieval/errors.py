"""User-facing errors: one line that names the problem and the fix, never a traceback."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from index.errors import (
    GalleryIndexError,
    IndexCorrupt,
    IndexNotFound,
    NotAnIndex,
    NotReplaceable,
)


class UserError(Exception):
    """A problem with the user's input or environment that the user can fix.

    The message is printed as-is by the CLIs, so it must say what is wrong, where, and how to fix it.
    """


def index_advice(err: GalleryIndexError) -> str:
    """An index error (worded in the index's own terms) with what to do about it on the
    command line."""
    if isinstance(err, IndexNotFound):
        if err.backup is not None:
            return (f"{err}: rename that folder to {err.path}, or run build_index.py --append "
                    f"--out {err.path} --gallery DIR, which puts it back first")
        return f"{err}: build one with build_index.py --gallery DIR --out {err.path}, or pass --index"
    if isinstance(err, NotAnIndex):
        return f"{err}: pass the folder written by build_index.py --out"
    if isinstance(err, NotReplaceable):
        return f"{err}: pass a new or empty folder as --out, or an index folder written by build_index.py"
    if isinstance(err, IndexCorrupt):
        return f"{err}: rebuild it with build_index.py"
    return str(err)  # InvalidGallery: its message already says what to change


def as_user_error(err: Exception) -> UserError:
    """A UserError as is; an index error with its command-line advice."""
    if isinstance(err, GalleryIndexError):
        return UserError(index_advice(err))
    return err if isinstance(err, UserError) else UserError(str(err))


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point, turning UserError (and the index's own errors, with advice) into a
    one-line message and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it tried: noise
    try:
        code = main()
    except (UserError, GalleryIndexError) as err:
        print(f"error: {as_user_error(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        sys.exit(0)
    sys.exit(code or 0)
