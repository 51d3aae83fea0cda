"""Raw dataset sources; each lists (ref, class) items, loads one item, and fingerprints itself."""
from dml_core.data.sources.base import ItemError, ItemRef, Source, SourceError
from dml_core.data.sources.font_glyphs import FontGlyphSource
from dml_core.data.sources.idx import IdxSource, fashion_mnist, parse_idx, read_idx
from dml_core.data.sources.image_folder import ImageFolderSource
from dml_core.data.sources.manifest_file import ManifestSource
from dml_core.data.sources.synthetic import SyntheticSource

__all__ = ["ItemError", "ItemRef", "Source", "SourceError", "FontGlyphSource", "IdxSource", "fashion_mnist",
           "parse_idx", "read_idx", "ImageFolderSource", "ManifestSource", "SyntheticSource"]
