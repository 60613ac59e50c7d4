"""The FAISS gallery index: nearest gallery images folded into ranked identities."""
from .search import GalleryIndex, IdentityRanking

__all__ = ["GalleryIndex", "IdentityRanking"]
