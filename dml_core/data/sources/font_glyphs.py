"""A many-class real dataset with no download: characters rendered from Debian's font packages.

How it is built (deterministic for given package versions; the fingerprint hashes every font file):
- Fonts: every *.ttf / *.otf in the variant's folders (font_glyph_variants.py: "base", the original
  642-class set, is the default; "many" has 54 packages and 22 Unicode blocks), in sorted path order; a
  font whose full name (name id 4) was already seen is dropped (Liberation 1.x and 2.x share names). A
  variant may keep at most `styles_per_family` styles of one family ("many": 2, Regular and Italic
  first); a missing package is a SourceError naming it and the apt-get command.
- Code points: the variant's ranges, general category L*, N*, P* or S* only (no marks, spaces, formats).
- A (code point, font) pair is a render only if the font's cmap maps the code point to a glyph other
  than .notdef AND the rendering has ink AND differs from the font's rendering of an unmapped code point.
- Rendering: Pillow, 8-bit grayscale, `image_size` x `image_size` (default 32), white on black, font
  size round(0.72 * image_size) px, anchor "ms" at (size/2, round(0.78 * size)); stored as PNG. Fonts are
  rendered in `render_workers` processes (default: the CPUs, at most 8); the result does not depend on it.
- Homoglyphs: a code point whose rendering in the reference font (the font covering most candidate
  code points) is pixel-identical to an earlier kept code point's rendering is dropped (Latin A,
  Greek Alpha and Cyrillic A would otherwise be three classes of identical images).
- Classes need >= `min_fonts` real fonts (default: the variant's, base 5, many 10).

Two tasks on the same renders:
- task "glyph" (default): class = code point, "U+XXXX c"; images = its renders in every font. A class
  with fewer than `min_items` real renders gets augmented renders up to `min_items`: render j uses font
  j mod k with a rotation in [-8, 8] degrees, scale in [0.9, 1.1] and shift in [-s/16, s/16] px drawn
  from numpy default_rng([seed, code point, j]). `max_classes`: the first N classes in code point order.
- task "font": class = a font's full name (family and style); images = its real renders of the kept
  glyph classes (no augmentation). A font needs >= `min_glyphs_per_font` of them (fewer: it is a
  fallback font, e.g. a Noto script font with its digits); a font with more keeps `max_glyphs_per_font`,
  evenly spaced over its code points in order, so classes are balanced and span every block it covers.
  `max_classes`: the first N fonts in path order. Held-out classes are then unseen fonts.
"""
from __future__ import annotations

import glob
import hashlib
import io
import logging
import unicodedata

import numpy as np
from PIL import Image

from dml_core.data.sources.base import ItemError, ItemRef, Source
from dml_core.data.sources.font_glyph_variants import BASE, get_variant
from dml_core.data.sources.font_render import STYLE_ORDER, RenderPool, augment, render_font, scan_font

log = logging.getLogger(__name__)

FONT_ROOT = BASE.font_root
FONT_DIRS = BASE.font_dirs
DEBIAN_PACKAGES = tuple(BASE.package_names)
CODE_POINT_RANGES = BASE.ranges
TASKS = ("glyph", "font")
#: options added after the first version: left out of the fingerprint at these values, so the original
#: dataset ("base", glyph task) keeps its fingerprint.
_NEW_DEFAULTS = {"variant": "base", "task": "glyph", "styles_per_family": None}


def candidate_code_points(ranges=CODE_POINT_RANGES) -> list[int]:
    return [cp for lo, hi in ranges for cp in range(lo, hi + 1) if unicodedata.category(chr(cp))[0] in "LNPS"]


def find_fonts(font_root: str = FONT_ROOT, dirs=FONT_DIRS) -> list[str]:
    """The *.ttf / *.otf files in `dirs` under `font_root`, sorted; an entry with a wildcard is a file
    pattern without its extension ("fonts/truetype/noto/NotoSerif-*")."""
    patterns = [d if glob.has_magic(d) else f"{d}/*" for d in dirs]
    return sorted({p for d in patterns for ext in ("ttf", "otf") for p in glob.glob(f"{font_root}/{d}.{ext}")})


def select_fonts(scans: list[dict], styles_per_family: int | None) -> list[dict]:
    """Usable fonts in path order, one per full name, at most `styles_per_family` per family."""
    fonts, names = [], set()
    for s in scans:
        if "error" in s:
            log.warning("font %s unusable, left out: %s", s["path"], s["error"])
        elif s["full_name"] not in names:
            names.add(s["full_name"])
            fonts.append(s)
    if styles_per_family is None:
        return fonts
    rank = {s["path"]: (STYLE_ORDER.index(s["style"]) if s["style"] in STYLE_ORDER else len(STYLE_ORDER), i)
            for i, s in enumerate(fonts)}
    kept: set[str] = set()
    for family in {s["family"] for s in fonts}:
        members = sorted((s["path"] for s in fonts if s["family"] == family), key=rank.__getitem__)
        kept.update(members[:styles_per_family])
    return [s for s in fonts if s["path"] in kept]


def _chunks(cps: list[int]):
    """Code points in growing chunks: a max_classes build renders little, a full one few rounds."""
    start, size = 0, 64
    while start < len(cps):
        yield cps[start:start + size]
        start, size = start + size, min(2 * size, 1024)


class FontGlyphSource(Source):
    kind = "font_glyphs"

    def __init__(self, image_size: int = 32, min_fonts: int | None = None, min_items: int = 20, seed: int = 0,
                 max_classes: int | None = None, font_root: str | None = None, variant: str = "base",
                 task: str = "glyph", min_glyphs_per_font: int = 100, max_glyphs_per_font: int = 200,
                 render_workers: int | None = None) -> None:
        if task not in TASKS:
            raise ValueError(f"font_glyphs task must be one of {', '.join(TASKS)}, got {task!r}")
        self.variant = get_variant(variant)
        self.image_size, self.min_items, self.seed = image_size, min_items, seed
        self.min_fonts = self.variant.min_fonts if min_fonts is None else min_fonts
        self.max_classes, self.task, self.render_workers = max_classes, task, render_workers
        self.min_glyphs_per_font, self.max_glyphs_per_font = min_glyphs_per_font, max_glyphs_per_font
        self.font_root = font_root or self.variant.font_root
        self.font_dirs, self.ranges = self.variant.font_dirs, self.variant.ranges
        self._items: list[ItemRef] | None = None
        self._pixels: dict[str, np.ndarray] = {}
        self.stats: dict[str, int] = {}

    def describe(self) -> dict:
        """Everything that decides the items (render_workers does not, so it is left out)."""
        d = {"kind": self.kind, "image_size": self.image_size, "min_fonts": self.min_fonts,
             "min_items": self.min_items, "seed": self.seed, "max_classes": self.max_classes,
             "font_root": self.font_root, "font_dirs": list(self.font_dirs),
             "debian_packages": self.variant.package_names,
             "code_point_ranges": [[f"U+{lo:04X}", f"U+{hi:04X}"] for lo, hi in self.ranges],
             "variant": self.variant.name, "task": self.task, "styles_per_family": self.variant.styles_per_family}
        if self.task == "font":
            d.update(min_glyphs_per_font=self.min_glyphs_per_font, max_glyphs_per_font=self.max_glyphs_per_font)
        return d

    def list_items(self) -> list[ItemRef]:
        if self._items is None:
            self.variant.check_installed(self.font_root)
            with RenderPool(self.render_workers) as pool:
                fonts, classes = self._render_classes(pool)
            items = self._glyph_items if self.task == "glyph" else self._font_items
            self._items = items(fonts, classes)
            self.stats.update(fonts=len(fonts), items=len(self._items),
                              classes=len({i.class_name for i in self._items}))
            log.info("font glyphs: %s", self.stats)
        return self._items

    def _scan_fonts(self, pool: RenderPool, cps: list[int]) -> list[dict]:
        paths = find_fonts(self.font_root, self.font_dirs)
        scans = pool.map(scan_font, [(p, self.image_size, frozenset(cps)) for p in paths])
        return select_fonts(scans, self.variant.styles_per_family)

    def _render_classes(self, pool: RenderPool) -> tuple[list[dict], list[tuple[int, list[tuple[int, np.ndarray]]]]]:
        """The fonts, and the kept classes in code point order: (code point, [(font index, pixels)])."""
        cps = candidate_code_points(self.ranges)
        fonts = self._scan_fonts(pool, cps)
        reference = max(range(len(fonts)), key=lambda i: len(fonts[i]["mapped"]))
        mapped = [set(f["mapped"]) for f in fonts]
        limit = self.max_classes if self.task == "glyph" else None
        kept_refs: set[bytes] = set()
        classes = []
        homoglyphs = too_few = 0
        for chunk in _chunks(cps):
            jobs = [(i, tuple(cp for cp in chunk if cp in mapped[i])) for i in range(len(fonts))]
            jobs = [(i, c) for i, c in jobs if c]
            results = pool.map(render_font, [(fonts[i]["path"], self.image_size, c) for i, c in jobs])
            renders: dict[int, list[tuple[int, np.ndarray]]] = {}
            for (i, _), (found, pixels) in zip(jobs, results):  # font order within each code point
                for cp, px in zip(found, pixels):
                    renders.setdefault(cp, []).append((i, px))
            for cp in chunk:
                found = renders.get(cp, [])
                if len(found) < self.min_fonts:
                    too_few += 1
                    continue
                ref_px = next((px for i, px in found if i == reference), None)
                if ref_px is not None:
                    if ref_px.tobytes() in kept_refs:
                        homoglyphs += 1
                        continue
                    kept_refs.add(ref_px.tobytes())
                classes.append((cp, found))
                if limit is not None and len(classes) >= limit:
                    break
            if limit is not None and len(classes) >= limit:
                break
        self.stats = {"glyph_classes": len(classes), "dropped_homoglyphs": homoglyphs, "dropped_too_few_fonts": too_few}
        return fonts, classes

    def _ref(self, cp: int, font: dict) -> str:
        return f"U+{cp:04X}@{font['path'][len(self.font_root) + 1:]}"

    def _glyph_items(self, fonts, classes) -> list[ItemRef]:
        items = []
        for cp, found in classes:
            name = f"U+{cp:04X} {chr(cp)}"
            for i, px in found:
                self._pixels[ref := self._ref(cp, fonts[i])] = px
                items.append(ItemRef(ref, name))
            for j in range(len(found), self.min_items):
                i, px = found[j % len(found)]
                ref = f"{self._ref(cp, fonts[i])}#aug{j}"
                self._pixels[ref] = augment(px, np.random.default_rng([self.seed, cp, j]))
                items.append(ItemRef(ref, name))
        return items

    def _font_items(self, fonts, classes) -> list[ItemRef]:
        per_font: dict[int, list[tuple[int, np.ndarray]]] = {}
        for cp, found in classes:
            for i, px in found:
                per_font.setdefault(i, []).append((cp, px))
        items, n_fonts = [], 0
        for i, font in enumerate(fonts):
            glyphs = per_font.get(i, [])
            if len(glyphs) < self.min_glyphs_per_font:
                continue
            if len(glyphs) > self.max_glyphs_per_font:
                keep = np.linspace(0, len(glyphs) - 1, self.max_glyphs_per_font).round().astype(int)
                glyphs = [glyphs[k] for k in keep]
            for cp, px in glyphs:
                self._pixels[ref := self._ref(cp, font)] = px
                items.append(ItemRef(ref, font["full_name"]))
            n_fonts += 1
            if self.max_classes is not None and n_fonts >= self.max_classes:
                break
        return items

    def load(self, item: ItemRef) -> np.ndarray:
        if item.ref not in self._pixels:
            self.list_items()
        try:
            return self._pixels[item.ref]
        except KeyError:
            raise ItemError(f"{item.ref}: not an item of this font glyph dataset") from None

    def fingerprint(self) -> str:
        identity = {k: v for k, v in self.describe().items() if k not in _NEW_DEFAULTS or v != _NEW_DEFAULTS[k]}
        h = hashlib.sha256(b"font_glyphs\0v1\0")
        h.update(repr(sorted(identity.items())).encode())
        for path in find_fonts(self.font_root, self.font_dirs):
            with open(path, "rb") as f:
                h.update(f"{path}\0{hashlib.sha256(f.read()).hexdigest()}\n".encode())
        h.update(f"pillow {Image.__version__}".encode())
        return h.hexdigest()


def glyph_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
