"""The font-glyph source: the original "base" dataset unchanged, the "many" variant, the font task,
parallel rendering and the refusal when a font package is missing."""
import collections
import os

import numpy as np
import pytest

from dml_core.data.sharding import shard_dataset
from dml_core.data.sources import FontGlyphSource, SourceError
from dml_core.data.sources.font_glyph_variants import MANY

#: FontGlyphSource(image_size=24, max_classes=30).fingerprint() before variants existed (Debian 12 fonts)
BASE_24PX_30_FINGERPRINT = "ef3750b8ac68b3a178c9437c40d8f4481ed8f269059fffea8c5486c361baaf3d"

needs_many = pytest.mark.skipif(
    not all(os.path.isdir(os.path.join(MANY.font_root, p.folder)) for p in MANY.packages),
    reason="fonts of the many variant: source scripts/setup.sh")


def _check_font_items(src, items):
    from fontTools.ttLib import TTFont

    cmaps = {}
    for item in items:
        cp_text, font_rel = item.ref.split("@")
        font_rel = font_rel.split("#")[0]
        cp = int(cp_text[2:], 16)
        if font_rel not in cmaps:
            cmaps[font_rel] = TTFont(f"{src.font_root}/{font_rel}", lazy=True).getBestCmap()
        assert cmaps[font_rel].get(cp, ".notdef") != ".notdef", item.ref  # glyph really exists
        if src.task == "glyph":
            assert item.class_name == f"U+{cp:04X} {chr(cp)}"
        px = src.load(item)
        assert px.shape == (src.image_size, src.image_size) and px.dtype == np.uint8 and px.max() > 0


def _content(src):
    return [(i.ref, i.class_name, src.load(i).tobytes()) for i in src.list_items()]


def test_base_fingerprint_unchanged():
    src = FontGlyphSource(image_size=24, max_classes=30)
    assert src.fingerprint() == BASE_24PX_30_FINGERPRINT
    assert FontGlyphSource(image_size=24, max_classes=30, variant="base", task="glyph",
                           render_workers=2).fingerprint() == BASE_24PX_30_FINGERPRINT
    assert src.describe()["variant"] == "base" and src.describe()["task"] == "glyph"
    assert FontGlyphSource(image_size=24, max_classes=30, task="font").fingerprint() != BASE_24PX_30_FINGERPRINT


def test_font_glyphs_subset_real_glyphs_distinct_classes():
    src = FontGlyphSource(image_size=24, max_classes=30)
    items = src.list_items()
    counts = collections.Counter(i.class_name for i in items)
    assert len(counts) == 30 and min(counts.values()) >= 20
    assert len({i.ref.split("@")[1] for i in items}) >= 20  # many different fonts
    _check_font_items(src, items)
    assert src.fingerprint() == FontGlyphSource(image_size=24, max_classes=30).fingerprint()
    assert src.fingerprint() != FontGlyphSource(image_size=32, max_classes=30).fingerprint()


def test_font_glyphs_augmentation_fills_classes_deterministically():
    src = FontGlyphSource(image_size=24, max_classes=3, min_items=70, seed=5)
    items = src.list_items()
    counts = collections.Counter(i.class_name for i in items)
    assert set(counts.values()) == {70}
    aug = [i for i in items if "#aug" in i.ref]
    assert aug
    again = FontGlyphSource(image_size=24, max_classes=3, min_items=70, seed=5)
    other = FontGlyphSource(image_size=24, max_classes=3, min_items=70, seed=6)
    for item in aug[:10]:
        base = src.load(type(item)(item.ref.split("#")[0], item.class_name))
        assert not np.array_equal(src.load(item), base)  # really transformed
        np.testing.assert_array_equal(src.load(item), again.load(item))
    assert any(not np.array_equal(src.load(i), other.load(i)) for i in aug[:10])


@needs_many
def test_many_variant_deterministic_for_any_worker_count():
    one = FontGlyphSource(image_size=16, max_classes=40, variant="many", render_workers=1)
    two = FontGlyphSource(image_size=16, max_classes=40, variant="many", render_workers=2)
    assert one.fingerprint() == two.fingerprint() != FontGlyphSource(image_size=16, max_classes=40).fingerprint()
    items = one.list_items()
    assert _content(one) == _content(two)
    counts = collections.Counter(i.class_name for i in items)
    assert len(counts) == 40 and min(counts.values()) >= 20
    assert len({i.ref.split("@")[1] for i in items}) > 62  # more fonts than the base variant has
    rng = np.random.default_rng(0)
    _check_font_items(one, [items[i] for i in rng.choice(len(items), 200, replace=False)])


@needs_many
def test_many_variant_class_counts_match_manifest(tmp_path):
    src = FontGlyphSource(image_size=16, max_classes=40, variant="many")
    m = shard_dataset(src, str(tmp_path), "glyphs", eval_class_fraction=0.25)
    counts = collections.Counter(i.class_name for i in src.list_items())
    assert m.num_classes == 40 and sorted(m.class_names) == sorted(counts)
    assert m.num_train_classes == 30 and m.source["variant"] == "many"
    for split in ("train", "eval", "gallery"):
        info = m.split(split)
        assert info.count == sum(info.classes.values())
    for label, name in enumerate(m.class_names):
        assert sum(m.split(s).classes.get(label, 0) for s in ("train", "eval", "gallery")) == counts[name]


def test_font_task_classes_are_fonts():
    src = FontGlyphSource(image_size=16, task="font", max_classes=8, min_glyphs_per_font=100, max_glyphs_per_font=50)
    items = src.list_items()
    per_class = collections.defaultdict(set)
    for i in items:
        per_class[i.class_name].add(i.ref.split("@")[1])
    assert len(per_class) == 8 and all(len(files) == 1 for files in per_class.values())  # one font per class
    assert collections.Counter(i.class_name for i in items) == {c: 50 for c in per_class}
    assert not any("#aug" in i.ref for i in items)
    from fontTools.ttLib import TTFont
    for name, (font_rel,) in per_class.items():  # the class name is the font's full name
        assert str(TTFont(f"{src.font_root}/{font_rel}", lazy=True)["name"].getDebugName(4)) == name
    _check_font_items(src, items[::7])
    assert "max_glyphs_per_font" in src.describe()


def test_missing_font_package_is_refused_by_name(tmp_path):
    root = tmp_path / "fonts"
    root.mkdir()
    for d in ("dejavu", "freefont", "liberation2"):  # no liberation, no croscore
        os.symlink(f"/usr/share/fonts/truetype/{d}", root / d)
    src = FontGlyphSource(image_size=16, max_classes=3, font_root=str(root))
    with pytest.raises(SourceError) as e:
        src.list_items()
    msg = str(e.value)
    assert "fonts-liberation," in msg and "fonts-croscore" in msg and "apt-get install" in msg
    assert "fonts-dejavu-core" not in msg and "fonts-liberation2" not in msg
    with pytest.raises(ValueError, match="variant"):
        FontGlyphSource(variant="nope")


@pytest.mark.slow
def test_font_glyphs_full_dataset_has_500_classes_of_20():
    src = FontGlyphSource()  # the documented default: 32x32
    items = src.list_items()
    counts = collections.Counter(i.class_name for i in items)
    assert len(counts) >= 500 and min(counts.values()) >= 20
    assert not any("#aug" in i.ref for i in items)  # enough real fonts: no augmentation needed
    rng = np.random.default_rng(0)
    _check_font_items(src, [items[i] for i in rng.choice(len(items), 300, replace=False)])
    # in the font with the most glyphs (the reference), no two classes render identically
    fonts = collections.Counter(i.ref.split("@")[1] for i in items)
    reference = fonts.most_common(1)[0][0]
    renders = [src.load(i).tobytes() for i in items if i.ref.split("@")[1] == reference]
    assert len(set(renders)) == len(renders) == fonts[reference]


@pytest.mark.slow
@needs_many
def test_many_variant_full_size():
    src = FontGlyphSource(variant="many", image_size=16)
    counts = collections.Counter(i.class_name for i in src.list_items())
    assert len(counts) >= 1000 and sum(counts.values()) >= 100_000 and min(counts.values()) >= 20
