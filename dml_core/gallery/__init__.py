"""Galleries: embedding shards of a dataset under a model version, their FAISS indexes, the registry."""
from dml_core.gallery.index import GalleryIndex, IndexSearchResult, IndexSpec, build_index
from dml_core.gallery.index_files import IndexFileError, IndexManifest
from dml_core.gallery.index_recall import RECALL_DEFINITION

__all__ = ["GalleryIndex", "IndexSearchResult", "IndexSpec", "build_index", "IndexFileError", "IndexManifest",
           "RECALL_DEFINITION"]
