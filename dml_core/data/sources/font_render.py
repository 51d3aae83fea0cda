"""Rendering glyphs of font files, in a pool of worker processes.

Work is split by font: a worker scans one font (its names and cmap) or renders a list of code points in
one font. Results come back in submission order, so a build is the same for any number of workers.
Each worker keeps its fonts open between tasks (an LRU cache of `GlyphFont`s).
"""
from __future__ import annotations

import functools
import math
import multiprocessing
import os
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

UNMAPPED = 0x10FFFD  # a private-use code point no font here maps: its rendering is the .notdef box
STYLE_ORDER = ("Regular", "Italic", "Bold", "Bold Italic")  # kept first where a variant caps styles


class GlyphFont:
    """One font file at the dataset's pixel size: its names, cmap and a renderer."""

    def __init__(self, path: str, size: int) -> None:
        from fontTools.ttLib import TTFont

        tt = TTFont(path, lazy=True)
        names = tt["name"]
        self.path, self.size = path, size
        self.full_name = str(names.getDebugName(4) or path)
        self.family = str(names.getDebugName(16) or names.getDebugName(1) or self.full_name)
        self.style = str(names.getDebugName(17) or names.getDebugName(2) or "")
        self.cmap = {cp: g for cp, g in (tt.getBestCmap() or {}).items() if g != ".notdef"}
        self.pil = ImageFont.truetype(path, size=round(0.72 * size))
        self.notdef = self.render(UNMAPPED)

    def render(self, cp: int) -> np.ndarray:
        image = Image.new("L", (self.size, self.size), 0)
        ImageDraw.Draw(image).text((self.size / 2, round(0.78 * self.size)), chr(cp), fill=255,
                                   font=self.pil, anchor="ms")
        return np.asarray(image)

    def has_glyph(self, cp: int) -> np.ndarray | None:
        """The rendering if the code point really has a glyph here, else None (also when FreeType cannot
        draw it: "raster overflow" on a few broken outlines)."""
        if cp not in self.cmap:
            return None
        try:
            pixels = self.render(cp)
        except OSError:
            return None
        if pixels.max() == 0 or np.array_equal(pixels, self.notdef):
            return None
        return pixels


@functools.lru_cache(maxsize=1024)
def load_font(path: str, size: int) -> GlyphFont:
    return GlyphFont(path, size)


def scan_font(path: str, size: int, cps: frozenset[int]) -> dict:
    """A font's names and the candidate code points its cmap maps; {"path", "error"} if it is unusable."""
    try:
        font = load_font(path, size)
    except Exception as e:  # a broken font file is reported and left out of the dataset
        return {"path": path, "error": f"{type(e).__name__}: {e}"}
    return {"path": path, "full_name": font.full_name, "family": font.family, "style": font.style,
            "mapped": sorted(cps.intersection(font.cmap))}


def render_font(path: str, size: int, cps: tuple[int, ...]) -> tuple[list[int], np.ndarray]:
    """The code points of `cps` that really have a glyph in the font, and their renderings (n, size, size)."""
    font = load_font(path, size)
    found, pixels = [], []
    for cp in cps:
        px = font.has_glyph(cp)
        if px is not None:
            found.append(cp)
            pixels.append(px)
    return found, (np.stack(pixels) if pixels else np.zeros((0, size, size), np.uint8))


def _call(job):
    fn, args = job
    return fn(*args)


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


class RenderPool:
    """`map(fn, args_list)` in order, in `workers` processes, or in this process for workers=1.
    The workers come from a forkserver, not a plain fork: the shard stage runs inside a Prefect flow, whose
    threads may hold a lock (logging, Prefect's services) at the moment of a fork, and a forked worker that
    inherits it waits forever. A script that builds a source must guard its main code
    (`if __name__ == "__main__":`), as for any DataLoader with workers."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        self._pool = None

    def __enter__(self) -> "RenderPool":
        if self.workers > 1:
            self._pool = multiprocessing.get_context("forkserver").Pool(self.workers)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def map(self, fn: Callable, args: Iterable[tuple]) -> list:
        jobs = [(fn, a) for a in args]
        if self._pool is None or len(jobs) < 2:
            return [_call(j) for j in jobs]
        return self._pool.map(_call, jobs, chunksize=max(1, len(jobs) // (4 * self.workers)))


def augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small random rotation ([-8, 8] degrees), scale ([0.9, 1.1]) and shift ([-s/16, s/16] px)."""
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
