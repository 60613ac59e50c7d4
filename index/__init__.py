"""The FAISS gallery index: nearest gallery images folded into ranked identities, kept on disk.

  search  ``GalleryIndex.search`` -> ``IdentityRanking``: the one search path
  types   which FAISS structure (flat / ivf / hnsw / ivfpq / auto) and its recall trade-off
  store   the index folder: atomic writes, manifest checks, load/save
  errors  the index's own exception types (callers add advice for their interface)
  milvus  the second backend: the gallery in a Milvus collection, same search, same guarantees
  local_match  a query's shortlist re-scored location by location (chamfer similarity of local
          descriptors), where the index keeps them

This floor depends on FAISS, NumPy, pyarrow and pydantic (and pymilvus for the Milvus backend) only, never on ``retrieval``. Names are
exported lazily, so ``import index.errors`` stays cheap (no FAISS) for a CLI's ``--help``.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"GalleryIndex": "search", "IdentityRanking": "search", "DEFAULT_INDEX_DIR": "store",
            "Manifest": "store", "StoredIndex": "store", "load_index": "store",
            "read_manifest": "store", "save_index": "store", "GalleryIndexError": "errors"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'index' has no attribute {name!r}")
