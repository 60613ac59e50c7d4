"""User-facing errors: one line that names the problem and the fix, never a traceback."""
from __future__ import annotations

import logging
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input or environment that the user can fix.

    The message is printed as-is by the CLIs, so it must say what is wrong, where, and how to fix it.
    """


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point, turning UserError into a one-line message and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        sys.exit(0)
    sys.exit(code or 0)
