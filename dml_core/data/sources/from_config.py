"""The `data.source` config section -> a `Source`: `kind` names the source, the other keys are its options.

One table maps each kind to its constructor, so config validation (`check_source`) and the shard stage
(`build_source`) accept exactly the same options, and an unknown option is named before anything runs.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from dml_core.data.sources.base import Source

SOURCE_KINDS = ("fashion_mnist", "image_folder", "manifest_file", "synthetic", "font_glyphs")


def _fashion_mnist(root: str | None = None, subsets: list[str] = ("train", "t10k"),
                   max_per_class: int | None = None) -> Source:
    """Fashion-MNIST's IDX files (default: Debian's dataset-fashion-mnist folder)."""
    from dml_core.data.sources.idx import FASHION_MNIST_DIR, fashion_mnist

    return fashion_mnist(root or FASHION_MNIST_DIR, tuple(subsets), max_per_class)


def _synthetic(data: str = "embeddings", num_classes: int = 10, per_class: int = 20, dim: int = 32,
               image_size: list[int] = (32, 32), noise: float = 0.1, seed: int = 0) -> Source:
    """SyntheticSource; `data` is its own `kind` (embeddings or images), renamed since `kind` names the source."""
    from dml_core.data.sources.synthetic import SyntheticSource

    return SyntheticSource(num_classes, per_class, data, dim, tuple(image_size), noise, seed)


def _builders() -> dict[str, Callable[..., Source]]:
    from dml_core.data.sources.font_glyphs import FontGlyphSource
    from dml_core.data.sources.image_folder import ImageFolderSource
    from dml_core.data.sources.manifest_file import ManifestSource

    return {"fashion_mnist": _fashion_mnist, "image_folder": ImageFolderSource, "manifest_file": ManifestSource,
            "synthetic": _synthetic, "font_glyphs": FontGlyphSource}


def check_source(section: dict[str, Any], field: str = "data.source") -> None:
    """Raise ValueError naming `<field>.<key>` unless `section` has a known `kind`, only that kind's options
    and every option it requires."""
    kind = section.get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"{field}.kind must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
    params = inspect.signature(_builders()[kind]).parameters
    for key in section:
        if key != "kind" and key not in params:
            raise ValueError(f"{field}.{key} is not an option of source kind {kind} (its options: "
                             f"{', '.join(params)})")
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name not in section:
            raise ValueError(f"{field}.{name} is required for source kind {kind}")


def build_source(section: dict[str, Any], field: str = "data.source") -> Source:
    """The Source that a `data.source` section describes (checked first)."""
    check_source(section, field)
    return _builders()[section["kind"]](**{k: v for k, v in section.items() if k != "kind"})
