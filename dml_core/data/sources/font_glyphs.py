"""A many-class real dataset with no download: characters rendered from Debian's font packages.

How it is built (deterministic for given package versions; the fingerprint hashes every font file):
- Fonts: every *.ttf / *.otf under /usr/share/fonts/truetype/{dejavu,freefont,liberation,liberation2,
  croscore}, from the Debian packages fonts-dejavu-core, fonts-dejavu-extra, fonts-freefont-ttf,
  fonts-liberation, fonts-liberation2 and fonts-croscore, in sorted path order; a font whose full name
  (name id 4) was already seen is dropped (Liberation 1.x and 2.x share names).
- Code points: U+0021-007E, U+00A1-00FF, U+0100-017F (Latin), U+0370-03FF (Greek), U+0400-04FF
  (Cyrillic), general category L*, N*, P* or S* only (no marks, spaces or format characters).
- A (code point, font) pair is an item only if the font's cmap maps the code point to a glyph other
  than .notdef AND the rendering has ink AND differs from the font's rendering of an unmapped code point.
- Rendering: Pillow, 8-bit grayscale, `image_size` x `image_size` (default 32), white on black, font
  size round(0.72 * image_size) px, anchor "ms" at (size/2, round(0.78 * size)); stored as PNG.
- Homoglyphs: a code point whose rendering in the reference font (the font covering most candidate
  code points) is pixel-identical to an earlier kept code point's rendering is dropped (Latin A,
  Greek Alpha and Cyrillic A would otherwise be three classes of identical images); 642 classes remain
  with fonts-* from Debian 12, each with 22 to 62 fonts.
- Classes need >= `min_fonts` real fonts. A class with fewer than `min_items` real renders gets
  augmented renders up to `min_items`: render j uses font j mod k with a rotation in [-8, 8] degrees,
  scale in [0.9, 1.1] and shift in [-s/16, s/16] px drawn from numpy default_rng([seed, code point, j]).
Class name: "U+XXXX c" (the code point and the character).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import io
import logging
import math
import unicodedata

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dml_core.data.sources.base import ItemError, ItemRef, Source

log = logging.getLogger(__name__)

FONT_ROOT = "/usr/share/fonts/truetype"
FONT_DIRS = ("dejavu", "freefont", "liberation", "liberation2", "croscore")
DEBIAN_PACKAGES = ("fonts-dejavu-core", "fonts-dejavu-extra", "fonts-freefont-ttf", "fonts-liberation",
                   "fonts-liberation2", "fonts-croscore")
CODE_POINT_RANGES = ((0x21, 0x7E), (0xA1, 0xFF), (0x100, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF))
UNMAPPED = 0x10FFFD  # a private-use code point no font here maps: its rendering is the .notdef box


def candidate_code_points(ranges=CODE_POINT_RANGES) -> list[int]:
    return [cp for lo, hi in ranges for cp in range(lo, hi + 1) if unicodedata.category(chr(cp))[0] in "LNPS"]


def find_fonts(font_root: str = FONT_ROOT, dirs=FONT_DIRS) -> list[str]:
    return sorted(p for d in dirs for ext in ("ttf", "otf") for p in glob.glob(f"{font_root}/{d}/*.{ext}"))


class _Font:
    """One font file at the dataset's pixel size: its cmap and a renderer."""

    def __init__(self, path: str, size: int) -> None:
        from fontTools.ttLib import TTFont

        tt = TTFont(path, lazy=True)
        self.path, self.size = path, size
        self.full_name = str(tt["name"].getDebugName(4) or path)
        self.cmap = {cp: g for cp, g in (tt.getBestCmap() or {}).items() if g != ".notdef"}
        self.pil = ImageFont.truetype(path, size=round(0.72 * size))
        self.notdef = self.render(UNMAPPED)

    def render(self, cp: int) -> np.ndarray:
        image = Image.new("L", (self.size, self.size), 0)
        ImageDraw.Draw(image).text((self.size / 2, round(0.78 * self.size)), chr(cp), fill=255,
                                   font=self.pil, anchor="ms")
        return np.asarray(image)

    def has_glyph(self, cp: int) -> np.ndarray | None:
        """The rendering if the code point really has a glyph here, else None."""
        if cp not in self.cmap:
            return None
        pixels = self.render(cp)
        if pixels.max() == 0 or np.array_equal(pixels, self.notdef):
            return None
        return pixels


@functools.lru_cache(maxsize=512)
def _load_font(path: str, size: int) -> _Font:
    return _Font(path, size)


def _augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = pixels.shape[0]
    angle = math.radians(rng.uniform(-8, 8))
    scale = rng.uniform(0.9, 1.1)
    tx, ty = rng.uniform(-size / 16, size / 16, size=2)
    cos, sin, c = math.cos(angle) / scale, math.sin(angle) / scale, size / 2
    # inverse map: output (x, y) samples input R(-angle)/scale * (out - centre - shift) + centre
    a, b, d, e = cos, sin, -sin, cos
    coeffs = (a, b, c - a * (c + tx) - b * (c + ty), d, e, c - d * (c + tx) - e * (c + ty))
    image = Image.fromarray(pixels).transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return np.asarray(image)


class FontGlyphSource(Source):
    kind = "font_glyphs"

    def __init__(self, image_size: int = 32, min_fonts: int = 5, min_items: int = 20, seed: int = 0,
                 max_classes: int | None = None, font_root: str = FONT_ROOT, font_dirs=FONT_DIRS,
                 code_point_ranges=CODE_POINT_RANGES) -> None:
        self.image_size, self.min_fonts, self.min_items, self.seed = image_size, min_fonts, min_items, seed
        self.max_classes = max_classes
        self.font_root, self.font_dirs, self.ranges = font_root, tuple(font_dirs), tuple(map(tuple, code_point_ranges))
        self._items: list[ItemRef] | None = None
        self._pixels: dict[str, np.ndarray] = {}
        self.stats: dict[str, int] = {}

    def describe(self) -> dict:
        return {"kind": self.kind, "image_size": self.image_size, "min_fonts": self.min_fonts,
                "min_items": self.min_items, "seed": self.seed, "max_classes": self.max_classes,
                "font_root": self.font_root, "font_dirs": list(self.font_dirs), "debian_packages": list(DEBIAN_PACKAGES),
                "code_point_ranges": [[f"U+{lo:04X}", f"U+{hi:04X}"] for lo, hi in self.ranges]}

    def _fonts(self) -> list[_Font]:
        fonts, names = [], set()
        for path in find_fonts(self.font_root, self.font_dirs):
            try:
                font = _load_font(path, self.image_size)
            except Exception as e:  # a broken font file is reported and left out of the dataset
                log.warning("font %s unusable, left out: %s", path, e)
                continue
            if font.full_name not in names:
                names.add(font.full_name)
                fonts.append(font)
        if not fonts:
            raise ItemError(f"no fonts under {self.font_root}/{{{','.join(self.font_dirs)}}}; "
                            f"apt-get install {' '.join(DEBIAN_PACKAGES)}")
        return fonts

    def list_items(self) -> list[ItemRef]:
        if self._items is None:
            self._items = self._build()
        return self._items

    def _build(self) -> list[ItemRef]:
        fonts = self._fonts()
        cps = candidate_code_points(self.ranges)
        reference = max(fonts, key=lambda f: sum(cp in f.cmap for cp in cps))
        kept_refs: set[bytes] = set()
        items: list[ItemRef] = []
        n_classes = homoglyphs = too_few = 0
        for cp in cps:
            renders = [(f, px) for f in fonts if (px := f.has_glyph(cp)) is not None]
            if len(renders) < self.min_fonts:
                too_few += 1
                continue
            ref_px = reference.has_glyph(cp)
            if ref_px is not None:
                if ref_px.tobytes() in kept_refs:
                    homoglyphs += 1
                    continue
                kept_refs.add(ref_px.tobytes())
            name = f"U+{cp:04X} {chr(cp)}"
            for font, px in renders:
                ref = f"U+{cp:04X}@{font.path[len(self.font_root) + 1:]}"
                self._pixels[ref] = px
                items.append(ItemRef(ref, name))
            for j in range(len(renders), self.min_items):
                font, px = renders[j % len(renders)]
                ref = f"U+{cp:04X}@{font.path[len(self.font_root) + 1:]}#aug{j}"
                self._pixels[ref] = _augment(px, np.random.default_rng([self.seed, cp, j]))
                items.append(ItemRef(ref, name))
            n_classes += 1
            if self.max_classes is not None and n_classes >= self.max_classes:
                break
        self.stats = {"fonts": len(fonts), "classes": n_classes, "items": len(items),
                      "dropped_homoglyphs": homoglyphs, "dropped_too_few_fonts": too_few}
        log.info("font glyphs: %s", self.stats)
        return items

    def load(self, item: ItemRef) -> np.ndarray:
        if item.ref not in self._pixels:
            self.list_items()
        try:
            return self._pixels[item.ref]
        except KeyError:
            raise ItemError(f"{item.ref}: not an item of this font glyph dataset") from None

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"font_glyphs\0v1\0")
        h.update(repr(sorted(self.describe().items())).encode())
        for path in find_fonts(self.font_root, self.font_dirs):
            with open(path, "rb") as f:
                h.update(f"{path}\0{hashlib.sha256(f.read()).hexdigest()}\n".encode())
        h.update(f"pillow {Image.__version__}".encode())
        return h.hexdigest()


def glyph_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
