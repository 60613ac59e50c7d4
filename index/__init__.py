"""The FAISS gallery index: nearest gallery images folded into ranked identities, kept on disk.

  search  ``GalleryIndex.search`` -> ``IdentityRanking``: the one search path
  types   which FAISS structure (flat / ivf / hnsw / ivfpq / auto) and its recall trade-off
  store   the index folder: atomic writes, manifest checks, load/save
"""
from .search import GalleryIndex, IdentityRanking
from .store import DEFAULT_INDEX_DIR, Manifest, StoredIndex, load_index, read_manifest, save_index

__all__ = ["GalleryIndex", "IdentityRanking", "DEFAULT_INDEX_DIR", "Manifest", "StoredIndex",
           "load_index", "read_manifest", "save_index"]
