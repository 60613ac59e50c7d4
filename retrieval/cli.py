"""Command-line pieces more than one CLI shares, so a flag means the same everywhere."""
from __future__ import annotations

import argparse


def add_index_argument(parser: argparse.ArgumentParser) -> None:
    """--index: the index folder a CLI answers from (query.py, serve.py, audit.py)."""
    from index.store import (
        DEFAULT_INDEX_DIR,  # here, not at the top: train_embed.py --help
    )
                                               # imports this module and must not load FAISS
    parser.add_argument("--index", default=DEFAULT_INDEX_DIR,
                        help="index folder written by build_index.py (default %(default)s)")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """--model: the index's checkpoint where it has moved (query.py, serve.py)."""
    parser.add_argument("--model", metavar="CKPT",
                        help="the checkpoint the index was built from, if it has moved since "
                             "(default: the path recorded in the index); given, embedding uses "
                             "this full model instead of the index's exported ONNX encoder")


def add_companion_arguments(group: argparse._ArgumentGroup, default: str | None, help: str,
                            off_help: str) -> None:
    """--companion [BACKBONE] / --no-companion (build_index.py, train_embed.py): a second
    network beside the first, ``COMPANION_BACKBONE`` where no name follows; off is ""."""
    from .config import COMPANION_BACKBONE

    group.add_argument("--companion", nargs="?", const=COMPANION_BACKBONE, default=default,
                       metavar="BACKBONE", help=help)
    group.add_argument("--no-companion", dest="companion", action="store_const", const="",
                       help=off_help)


def add_gallery_arguments(parser: argparse.ArgumentParser, required: bool) -> argparse._ArgumentGroup:
    """--gallery, --labels, --strict, --allow-outside: how a labelled gallery is read."""
    group = parser.add_argument_group("gallery")
    group.add_argument("--gallery", required=required,
                       help="folder of images: one sub-folder per identity, or (with --labels) the "
                            "folder holding the images named in the CSV")
    group.add_argument("--labels", help="Kaggle-style CSV with columns Image,Id (new_whale rows are "
                                        "not an identity and are left out)")
    group.add_argument("--strict", action="store_true",
                       help="fail on an unreadable image instead of skipping it with a warning")
    group.add_argument("--allow-outside", action="store_true",
                       help="with --labels: accept CSV rows naming images outside --gallery "
                            "(absolute paths, or '..' climbing out of it); refused by default, "
                            "because a CSV from elsewhere could then read any file on this machine "
                            "(and show it in query.py's HTML report). A symlink placed inside "
                            "--gallery is always fine")
    return group
