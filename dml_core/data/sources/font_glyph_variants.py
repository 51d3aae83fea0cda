"""The named variants of the font-glyph dataset: which Debian font packages, font folders, code points.

A variant fixes everything that decides its items apart from the source's own options (image size,
seed, ...): the Debian packages and the folders (under `font_root`) where they put their fonts, the code
point ranges, the fonts a class needs (`min_fonts`) and how many styles of one family are kept. Each
package names a file pattern found only in its own files, so a missing package is named even where two
packages share a folder (fonts-dejavu-core and fonts-dejavu-extra).

- "base": the original 642-class dataset (6 packages, Latin-1/Latin Extended-A, Greek, Cyrillic), kept
  exactly as it was so existing configs and datasets keep their fingerprints.
- "many": 48 more packages (54 in all) (Noto core, URW base35, TeX Gyre, CMU, SIL, ...) and 22 Unicode blocks
  (Latin Extended-B/Additional/C/D, IPA, modifier letters, Greek Extended, Cyrillic Supplement, punctuation,
  super/subscripts, currency, letterlike, number forms, arrows, mathematical operators, geometric shapes,
  ligatures). From fonts-noto-core only the Latin-Greek-Cyrillic families (Noto Sans, Serif, Sans Mono, Sans/Serif
  Display): its ~100 script fonts carry copies of Noto Sans's Latin letters and digits, which would be
  near-duplicate images of one class. Box drawing and block elements are left out: they are drawn to the cell edge
  and look the same in every font. At most 2 styles per family (Regular and Italic first, then Bold, Bold Italic,
  then the rest in path order): families such as League Mono (40 styles), Junicode (38) or Inter (36) would
  otherwise give one class dozens of near-identical weights, and a font-retrieval task hundreds of classes that
  differ only by stroke width; 2 (not 4) also halves the images (~200k rather than ~400k) and so the shard time,
  and an italic differs more from its roman than a bold does. fonts-lmodern is not used: Latin Modern is Computer
  Modern again (fonts-cmu) in 72 optical sizes.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from dml_core.data.sources.base import SourceError

LATIN_GREEK_CYRILLIC = ((0x21, 0x7E), (0xA1, 0xFF), (0x100, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF))
MANY_RANGES = LATIN_GREEK_CYRILLIC + (
    (0x180, 0x24F), (0x250, 0x2AF), (0x2B0, 0x2FF), (0x500, 0x52F), (0x1E00, 0x1EFF), (0x1F00, 0x1FFF),
    (0x2010, 0x205E), (0x2070, 0x209F), (0x20A0, 0x20C0), (0x2100, 0x214F), (0x2150, 0x218B),
    (0x2190, 0x21FF), (0x2200, 0x22FF), (0x25A0, 0x25FF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFB00, 0xFB06))


@dataclass(frozen=True)
class FontPackage:
    """A Debian package, the folder (relative to the font root) holding its fonts, and a file pattern
    found only among its own files there."""

    name: str
    folder: str
    marker: str = "*"


@dataclass(frozen=True)
class GlyphVariant:
    name: str
    font_root: str
    packages: tuple[FontPackage, ...]
    font_dirs: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    min_fonts: int
    styles_per_family: int | None = None

    @property
    def package_names(self) -> list[str]:
        return [p.name for p in self.packages]

    def check_installed(self, font_root: str) -> None:
        """Raise SourceError naming every package whose fonts are missing under `font_root`, with the
        command that installs them."""
        missing = [p.name for p in self.packages if not _has_fonts(os.path.join(font_root, p.folder), p.marker)]
        if missing:
            raise SourceError(f"font_glyphs variant {self.name!r}: fonts of Debian package(s) {', '.join(missing)} "
                              f"not found under {font_root}; install them with: apt-get install "
                              f"--no-install-recommends {' '.join(missing)} (or run scripts/setup.sh)")


def _has_fonts(folder: str, marker: str) -> bool:
    return any(glob.glob(os.path.join(glob.escape(folder), f"{marker}.{ext}")) for ext in ("ttf", "otf"))


_BASE_PACKAGES = (FontPackage("fonts-dejavu-core", "dejavu", "DejaVuSans"),
                  FontPackage("fonts-dejavu-extra", "dejavu", "DejaVuSans-Oblique"),
                  FontPackage("fonts-freefont-ttf", "freefont"), FontPackage("fonts-liberation", "liberation"),
                  FontPackage("fonts-liberation2", "liberation2"), FontPackage("fonts-croscore", "croscore"))

BASE = GlyphVariant("base", "/usr/share/fonts/truetype", _BASE_PACKAGES,
                    ("dejavu", "freefont", "liberation", "liberation2", "croscore"), LATIN_GREEK_CYRILLIC, 5)


def _pkg(name: str, folder: str, marker: str = "*") -> FontPackage:
    return FontPackage(name, folder if folder.startswith("texmf/") else f"fonts/{folder}", marker)


_MANY_PACKAGES = tuple(FontPackage(p.name, f"fonts/truetype/{p.folder}", p.marker) for p in _BASE_PACKAGES) + (
    _pkg("fonts-noto-core", "truetype/noto", "NotoSans-*"), _pkg("fonts-noto-mono", "truetype/noto", "NotoMono-*"),
    _pkg("fonts-noto-core", "truetype/noto", "NotoSerif-*"), _pkg("fonts-noto-core", "truetype/noto", "NotoSansMono-*"),
    _pkg("fonts-noto-core", "truetype/noto", "NotoSansDisplay-*"),
    _pkg("fonts-noto-core", "truetype/noto", "NotoSerifDisplay-*"),
    _pkg("fonts-urw-base35", "opentype/urw-base35"), _pkg("fonts-texgyre", "texmf/fonts/opentype/public/tex-gyre"),
    _pkg("fonts-cmu", "truetype/cmu"), _pkg("fonts-sil-gentiumplus", "truetype/gentiumplus"),
    _pkg("fonts-sil-charis", "truetype/charis"), _pkg("fonts-sil-doulos", "truetype/doulos"),
    _pkg("fonts-sil-andika", "truetype/andika"), _pkg("fonts-open-sans", "truetype/open-sans"),
    _pkg("fonts-linuxlibertine", "opentype/linux-libertine"), _pkg("fonts-paratype", "truetype/paratype"),
    _pkg("fonts-ebgaramond", "opentype/ebgaramond"), _pkg("fonts-crosextra-carlito", "truetype/crosextra", "Carlito-*"),
    _pkg("fonts-crosextra-caladea", "truetype/crosextra", "Caladea-*"),
    _pkg("fonts-roboto-unhinted", "truetype/roboto/unhinted"), _pkg("fonts-stix", "opentype/stix"),
    _pkg("fonts-firacode", "truetype/firacode"), _pkg("fonts-hack", "truetype/hack"),
    _pkg("fonts-jetbrains-mono", "truetype/jetbrains-mono"), _pkg("fonts-go", "fonts-go"),
    _pkg("fonts-oldstandard", "truetype/fonts-oldstandard"), _pkg("fonts-inter", "opentype/inter"),
    _pkg("fonts-lato", "truetype/lato"), _pkg("fonts-junicode", "opentype/junicode"),
    _pkg("fonts-cardo", "truetype/cardo"), _pkg("fonts-vollkorn", "truetype/vollkorn"),
    _pkg("fonts-mph-2b-damase", "truetype/mph-2b-damase"), _pkg("fonts-tuffy", "truetype/tuffy"),
    _pkg("fonts-anonymous-pro", "truetype/anonymous-pro"), _pkg("fonts-clear-sans", "truetype/clear-sans"),
    _pkg("fonts-b612", "opentype/b612"), _pkg("fonts-uralic", "truetype/uralic"),
    _pkg("fonts-gfs-didot", "opentype/didot"), _pkg("fonts-gfs-artemisia", "opentype/artemisia"),
    _pkg("fonts-gfs-neohellenic", "opentype/neohellenic"), _pkg("fonts-yrsa-rasa", "truetype/fonts-yrsa-rasa"),
    _pkg("fonts-comic-neue", "opentype/comic-neue"), _pkg("fonts-courier-prime", "opentype/courier-prime"),
    _pkg("fonts-jura", "opentype/jura"), _pkg("fonts-play", "opentype/play"),
    _pkg("fonts-mononoki", "truetype/mononoki"), _pkg("fonts-league-mono", "opentype/league-mono"),
    _pkg("fonts-karla", "truetype/karla"), _pkg("fonts-cabin", "opentype/cabin"),
    _pkg("fonts-averia-gwf", "truetype/averia-gwf"), _pkg("fonts-adf-accanthis", "truetype/adf"),
    _pkg("fonts-opendyslexic", "opentype/opendyslexic"))

#: font folders, or file patterns for Noto (its script fonts copy Noto Sans's Latin: near-duplicate renders)
_MANY_DIRS = tuple(dict.fromkeys(p.folder if not p.folder.endswith("/noto") else f"{p.folder}/{p.marker}"
                                 for p in _MANY_PACKAGES))
MANY = GlyphVariant("many", "/usr/share", _MANY_PACKAGES, _MANY_DIRS,
                    MANY_RANGES, 10, styles_per_family=2)

VARIANTS = {v.name: v for v in (BASE, MANY)}


def get_variant(name: str) -> GlyphVariant:
    if name not in VARIANTS:
        raise ValueError(f"font_glyphs variant must be one of {', '.join(VARIANTS)}, got {name!r}")
    return VARIANTS[name]
