"""Progress bars (tqdm) with one switch for the whole engine.

Each caller decides where a bar makes sense (``enabled=``: rank 0 only, not for one batch, ...);
a program that writes logs instead, such as the benchmarks, turns every bar off once with
``set_enabled(False)`` rather than patching modules.
"""
from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled)


def bar(iterable: Iterable[T], enabled: bool = True, **tqdm_options) -> "tqdm[T]":
    """``tqdm(iterable)``, shown only where the caller and the global switch both allow it."""
    return tqdm(iterable, disable=not (enabled and _enabled), **tqdm_options)
