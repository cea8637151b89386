"""Render long text (the conversation history) into square page images for the OCR encoder.

The layout follows the Glyph recipe the user's pipeline used (1280 px pages at 72 dpi,
margins 10, 9 pt font, line height 10, left-aligned), scaled to the encoder's page size,
with two deliberate differences:

* the default font covers CJK (the recipe's Verdana has no Chinese glyphs, so Chinese
  history became rows of empty boxes the encoder could not read), and a
  :class:`~ocrmem.errors.MissingGlyphWarning` says when a font still lacks characters;
* pages are composed from a per-(font, size) glyph atlas with numpy instead of asking
  Pillow to rasterise every line again: ~20x faster on a 1024-px page of 2,500
  characters, with the same pixels as drawing each line with ``ImageDraw.text`` (bit-exact
  except where three or more glyphs overlap one pixel: one grey level at most, on Pillow
  >= 10.2). :func:`render_baseline` is that plain line-by-line renderer, on the very same
  layout, kept here so tests and benchmarks compare like with like.

Pipeline::

    text ──atlas lookup──▶ glyph ids, advances ──greedy wrap──▶ lines ──▶ pages
    pages ──scatter cached glyph pixels (numpy)──▶ grey (P, S, S)
    grey ──▶ PIL RGB pages / uint8 (P, S, S, 3) / pixel_values (P, 3, S, S)
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import ConfigError, InputTypeError, MissingGlyphWarning

# ----------------------------------------------------------------------------- constants

# The Glyph recipe, in pixels at its own page size (72 dpi: 1 pt = 1 px).
GLYPH_PAGE_SIZE = 1280
GLYPH_FONT_SIZE = 9
GLYPH_LINE_HEIGHT = 10
GLYPH_MARGIN = 10

# Below 8 px, CJK strokes merge into blobs and Latin x-height is ~4 px: the encoder would
# see texture, not text. Scaling 9 px from 1280 to 1024 gives 7.2 px, so this floor matters
# for the default DeepSeek-OCR page size.
MIN_FONT_SIZE = 8
# Keep a little white border even on tiny pages so glyph overhangs are not cut off.
MIN_MARGIN = 2

# Searched in order by default_font_path(): CJK-capable fonts first (WenQuanYi Micro Hei,
# then Noto Sans CJK in the Debian/Ubuntu, Arch and Fedora locations), DejaVu Sans last.
DEFAULT_FONT_CANDIDATES: tuple[str, ...] = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)
CJK_FONT_HINT = (
    "pass font_path= a font that covers them, e.g. a CJK font such as "
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc (install it with `apt-get install -y fonts-wqy-microhei`)"
)

# A tab advances like this many spaces (chat history is rarely column-aligned; a fixed
# width keeps the layout independent of where the tab falls).
TAB_SPACES = 4
# Code points from here on (CJK radicals, kana, ideographs, Hangul, full-width forms) may be
# broken between: CJK text has no spaces to break at.
_WIDE_FROM = 0x2E80
# A noncharacter no font maps: drawing it shows the font's .notdef glyph (the "tofu" box).
_NOTDEF_PROBE = "\U0010ffff"
# Categories that never draw anything: controls (incl. "\n", "\r") and lone surrogates.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cs"})
# Format characters and line/paragraph separators: drawn if the font has them, else dropped.
_INVISIBLE_IF_MISSING = frozenset({"Cf", "Zl", "Zp"})
# Pad around a glyph's reported bbox when rasterising it, for antialiasing bleed.
_RASTER_PAD = 2


def default_font_path() -> str:
    """The first existing font of :data:`DEFAULT_FONT_CANDIDATES` (CJK-capable fonts first).

    Returns:
        An absolute path to a TrueType/OpenType font file.

    Raises:
        ConfigError: if none of the candidates exists.
    """
    for path in DEFAULT_FONT_CANDIDATES:
        if os.path.isfile(path):
            return path
    raise ConfigError(
        "`font_path` is None and no default font was found (looked for "
        + ", ".join(DEFAULT_FONT_CANDIDATES)
        + "). Install one with `apt-get install -y fonts-wqy-microhei` (covers Chinese and Latin) "
        "or pass font_path= the path of a .ttf/.ttc/.otf file."
    )


# ----------------------------------------------------------------------------- glyph atlas


class _Glyph(NamedTuple):
    """One rasterised character: its pen advance and its non-zero pixels."""

    advance: int
    dy: np.ndarray  # (K,) int16, row offset from the top of the ascender line
    dx: np.ndarray  # (K,) int16, column offset from the pen
    alpha: np.ndarray  # (K,) uint8 coverage
    missing: bool  # drawn as the font's .notdef box
    bbox: tuple[int, int, int, int]  # (left, top, right, bottom) of the pixels, exclusive


class _PackedGlyphs:
    """An immutable snapshot of the atlas as flat arrays (CSR-style), indexed by glyph id.

    Glyph ``g`` owns atlas pixels ``starts[g] : starts[g] + counts[g]``; each pixel is an
    offset ``(dy, dx)`` from the pen position (x = pen, y = top of the ascender line,
    Pillow's default "la" anchor) and a transmittance ``255 - alpha`` (uint8).

    Args:
        previous: The snapshot to extend (``None`` for the first).
        new_glyphs: Glyphs appended after ``previous``'s (at least one).
    """

    def __init__(self, previous: _PackedGlyphs | None, new_glyphs: list[_Glyph]) -> None:
        # Extending copies a few big arrays instead of re-walking thousands of per-glyph
        # ones: a CJK atlas growing by a handful of glyphs costs well under a millisecond.
        new = {
            "counts": np.array([g.alpha.size for g in new_glyphs], dtype=np.int64),  # (G,)
            "advance": np.array([g.advance for g in new_glyphs], dtype=np.int64),  # (G,)
            "missing": np.array([g.missing for g in new_glyphs], dtype=bool),  # (G,)
            "bbox": np.array([g.bbox for g in new_glyphs], dtype=np.int64).reshape(-1, 4),  # (G, 4)
            "dy": np.concatenate([g.dy for g in new_glyphs]).astype(np.int64),  # (A,) A = all pixels
            "dx": np.concatenate([g.dx for g in new_glyphs]).astype(np.int64),  # (A,)
            # 255 - alpha, uint8: where ink overlaps, Pillow multiplies these.
            "transmittance": 255 - np.concatenate([g.alpha for g in new_glyphs]),  # (A,)
        }
        if previous is not None:
            new = {name: np.concatenate([getattr(previous, name), array]) for name, array in new.items()}
        self.counts, self.advance, self.missing = new["counts"], new["advance"], new["missing"]
        self.bbox, self.dy, self.dx, self.transmittance = new["bbox"], new["dy"], new["dx"], new["transmittance"]
        self.starts = np.cumsum(self.counts) - self.counts  # (G,)
        self.left, self.top, self.right, self.bottom = self.bbox.T  # (G,) each, relative to the pen
        self._offsets: dict[int, np.ndarray] = {}

    def offsets(self, row_stride: int) -> np.ndarray:
        """Every atlas pixel's offset ``dy * row_stride + dx`` in a flat page, (A,) int64.

        Cached per stride: it turns two gathers and a multiply per page pixel into one gather.
        """
        offsets = self._offsets.get(row_stride)
        if offsets is None:
            offsets = self._offsets[row_stride] = self.dy * row_stride + self.dx
        return offsets


class _GlyphAtlas:
    """Every character this process has drawn with one font at one size, rasterised once.

    Glyphs are stored sparsely (only their non-zero pixels), so a page's pixels are
    gathered with a few vectorised numpy calls. Thread-safe: new glyphs are added under a
    lock and published as a fresh :class:`_PackedGlyphs` *before* their code points
    appear in ``table``, so a reader that found a glyph id always finds its pixels. Not
    pickled: each process builds its own.
    """

    def __init__(self, font_path: str, font_size: int) -> None:
        # BASIC layout: deterministic whether or not libraqm is installed, and exactly the
        # per-glyph pen advance our atlas reproduces (no shaping, ligatures or GPOS kerning;
        # complex scripts such as Arabic are not shaped, which chat history in Chinese and
        # English does not need).
        self.font = ImageFont.truetype(font_path, font_size, layout_engine=ImageFont.Layout.BASIC)
        self.font_path = font_path
        self.ascent, self.descent = self.font.getmetrics()
        self.space_advance = round(self.font.getlength(" "))
        self._lock = threading.Lock()
        # Code point -> glyph id (-1: not seen yet). 4.5 MB, but a lookup for a whole text
        # is then one numpy gather instead of a Python loop over characters.
        self.table = np.full(0x110000, -1, dtype=np.int32)
        self.chars: list[str] = []  # glyph id -> character
        # Characters render_baseline() must replace so ImageDraw.text draws what we draw.
        self.baseline_substitutes: dict[int, str] = {}
        self._notdef = self._rasterise(_NOTDEF_PROBE)
        # Start with "\n" so the packed arrays are never empty, even for "".
        self.packed = _PackedGlyphs(None, [self._make_glyph("\n")])
        self.chars.append("\n")
        self.table[ord("\n")] = 0

    def _rasterise(self, ch: str) -> _Glyph:
        """Draw ``ch`` alone and keep its non-zero pixels."""
        # Hinted advances are whole pixels in Pillow's basic layout; round() only guards
        # against float noise.
        advance = round(self.font.getlength(ch))
        left, top, right, bottom = self.font.getbbox(ch)
        if right <= left or bottom <= top:
            return _blank_glyph(advance)
        ox, oy = _RASTER_PAD - left, _RASTER_PAD - top  # pen position inside the scratch image
        scratch = Image.new("L", (right - left + 2 * _RASTER_PAD, bottom - top + 2 * _RASTER_PAD), 0)
        # Drawing 255 onto 0 stores the glyph's coverage exactly (BLEND(m, 0, 255) == m).
        ImageDraw.Draw(scratch).text((ox, oy), ch, fill=255, font=self.font)
        alpha = np.asarray(scratch)
        ys, xs = np.nonzero(alpha)
        if not ys.size:
            return _blank_glyph(advance)
        dy, dx = (ys - oy).astype(np.int16), (xs - ox).astype(np.int16)
        bbox = (int(dx.min()), int(dy.min()), int(dx.max()) + 1, int(dy.max()) + 1)
        return _Glyph(advance, dy, dx, alpha[ys, xs], False, bbox)

    def _make_glyph(self, ch: str) -> _Glyph:
        """The glyph we draw for ``ch`` (records what render_baseline must substitute)."""
        category = unicodedata.category(ch)
        if ch == "\t":
            self.baseline_substitutes[ord(ch)] = " " * TAB_SPACES
            return _blank_glyph(TAB_SPACES * self.space_advance)
        if category in _INVISIBLE_CATEGORIES:
            self.baseline_substitutes[ord(ch)] = ""
            return _blank_glyph(0)
        glyph = self._rasterise(ch)
        # No cmap access in Pillow: a character is missing when it draws exactly like the
        # .notdef glyph (same advance, same pixels).
        notdef = self._notdef
        if not (
            glyph.advance == notdef.advance
            and np.array_equal(glyph.dy, notdef.dy)
            and np.array_equal(glyph.dx, notdef.dx)
            and np.array_equal(glyph.alpha, notdef.alpha)
        ):
            return glyph
        if category == "Zs":  # e.g. U+3000 in a Latin font: still a space
            self.baseline_substitutes[ord(ch)] = " "
            return _blank_glyph(self.space_advance)
        if category in _INVISIBLE_IF_MISSING:  # e.g. U+200B: draw nothing
            self.baseline_substitutes[ord(ch)] = ""
            return _blank_glyph(0)
        return glyph._replace(missing=True)

    def glyph_ids(self, code_points: np.ndarray) -> tuple[np.ndarray, _PackedGlyphs]:
        """Glyph ids of ``code_points`` (int32, same shape), rasterising unseen characters.

        Returns:
            The ids and a packed snapshot that holds all of them.
        """
        gids = self.table[code_points]
        unseen = gids < 0
        if unseen.any():
            with self._lock:
                new = [cp for cp in np.unique(code_points[unseen]).tolist() if self.table[cp] < 0]
                if new:
                    glyphs = [self._make_glyph(chr(cp)) for cp in new]
                    first_id = len(self.chars)
                    self.packed = _PackedGlyphs(self.packed, glyphs)
                    self.chars.extend(chr(cp) for cp in new)
                    self.table[new] = np.arange(first_id, first_id + len(new))
            gids = self.table[code_points]
        return gids, self.packed


def _blank_glyph(advance: int) -> _Glyph:
    empty = np.zeros(0, dtype=np.int16)
    return _Glyph(advance, empty, empty, np.zeros(0, dtype=np.uint8), False, (0, 0, 0, 0))


_ATLASES: dict[tuple[str, int], _GlyphAtlas] = {}
_ATLASES_LOCK = threading.Lock()


def _load_atlas(font_path: str, font_size: int) -> _GlyphAtlas:
    """The process-wide atlas for (font file, size); raises ConfigError if the font won't load."""
    key = (os.path.realpath(font_path), font_size)
    atlas = _ATLASES.get(key)
    if atlas is not None:
        return atlas
    if not os.path.isfile(font_path):
        raise ConfigError(
            f"`font_path` is {font_path!r}, which does not exist or is not a file. Pass the path of a "
            ".ttf/.ttc/.otf file, or font_path=None for a default font (install a CJK-capable one with "
            "`apt-get install -y fonts-wqy-microhei`)."
        )
    try:
        atlas = _GlyphAtlas(font_path, font_size)
    except OSError as err:  # unreadable, or not a font FreeType understands
        raise ConfigError(
            f"`font_path` is {font_path!r}, which Pillow/FreeType cannot load as a font ({err}). Pass a "
            "readable .ttf/.ttc/.otf file, or font_path=None for a default font (install a CJK-capable one "
            "with `apt-get install -y fonts-wqy-microhei`)."
        ) from err
    with _ATLASES_LOCK:
        return _ATLASES.setdefault(key, atlas)


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
    """Where every line of a text goes.

    ``line_starts``/``line_ends`` index ``text`` (end exclusive; the newline or the spaces a
    line was wrapped at belong to no line). ``pen`` is the cumulative advance: the pen x of
    character i relative to its line start is ``pen[i] - pen[line_start]``.
    """

    text: str
    glyphs: _PackedGlyphs  # the atlas snapshot glyph_ids index
    glyph_ids: np.ndarray  # (N,) int32
    pen: np.ndarray  # (N + 1,) int64
    line_starts: np.ndarray  # (L,) int64
    line_ends: np.ndarray  # (L,) int64
    lines_per_page: int

    @property
    def num_pages(self) -> int:
        return math.ceil(len(self.line_starts) / self.lines_per_page)

    def page_lines(self, page: int) -> slice:
        return slice(page * self.lines_per_page, (page + 1) * self.lines_per_page)


class TextStats(NamedTuple):
    """:meth:`PageRenderer.text_stats` of one text."""

    pages: int  # pages the whole text needs
    kept_pages: int  # pages drawn under max_pages (the most recent ones)
    dropped_chars: int  # oldest characters max_pages leaves out
    drawn_chars: int  # characters on the kept pages
    missing_chars: int  # of those, drawn as empty boxes: the font has no glyph
    missing_distinct: frozenset[str]  # which characters those are


def check_text(text: object, name: str = "text") -> str:
    """``text`` if it is a ``str``; else a TypeError naming it (bytes: say to decode).

    Raises:
        InputTypeError: ``text`` is ``None``, ``bytes``, a list, a number...
    """
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray)):
        fix = f"decode it first: `{name}.decode('utf-8')`."
    elif isinstance(text, (list, tuple)):
        fix = f"join the pieces first: `''.join({name})`, or render each one separately."
    elif text is None:
        fix = "pass '' for no text."
    else:
        fix = f"convert it first: `str({name})`."
    shown = repr(text)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise InputTypeError(f"`{name}` to render has type {type(text).__name__} ({shown}), not a str; {fix}")


def _check_int(name: str, value: object, minimum: int, hint: str) -> int:
    # bool is an int subclass, but font_size=True is surely a mistake.
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"`{name}` must be an integer >= {minimum}, got {value!r}. {hint}")
    return int(value)


# ----------------------------------------------------------------------------- renderer


class PageRenderer:
    """Lays text out on square white pages and draws it black, left-aligned.

    Picklable and cheap to copy into DataLoader workers: only the settings travel; each
    process loads the font and builds its glyph atlas on first use.

    Args:
        page_size: Side of the square page in pixels (DeepSeek-OCR's base mode reads 1024).
        font_path: Font file; ``None`` uses :func:`default_font_path` (CJK-capable if installed).
        font_size: Font size in pixels; ``None`` scales the recipe's 9 px at 1280 to
            ``page_size``, but never below :data:`MIN_FONT_SIZE` (8): 8 px at 1024.
        margin: White border in pixels; ``None`` scales the recipe's 10 (at least
            :data:`MIN_MARGIN`): 8 px at 1024.
        line_height: Baseline-to-baseline distance in pixels; ``None`` scales the recipe's 10
            but keeps the recipe's 10:9 ratio to the font size: 9 px at 1024.

    Raises:
        ConfigError: naming the field, if a size is not a positive integer, the font cannot
            be loaded, or one line of text does not fit on the page.
    """

    def __init__(
        self,
        page_size: int = 1024,
        font_path: str | None = None,
        font_size: int | None = None,
        margin: int | None = None,
        line_height: int | None = None,
    ) -> None:
        self.page_size = _check_int("page_size", page_size, 1, "Use the encoder's input side, e.g. 1024.")
        scale = self.page_size / GLYPH_PAGE_SIZE
        if font_size is None:
            font_size = max(MIN_FONT_SIZE, round(GLYPH_FONT_SIZE * scale))
        self.font_size = _check_int("font_size", font_size, 1, "Pass a size in pixels, e.g. 8, or None.")
        if margin is None:
            margin = max(MIN_MARGIN, round(GLYPH_MARGIN * scale))
        self.margin = _check_int("margin", margin, 0, "Pass a border in pixels, e.g. 8, or None.")
        if line_height is None:
            line_height = max(
                round(GLYPH_LINE_HEIGHT * scale), math.ceil(self.font_size * GLYPH_LINE_HEIGHT / GLYPH_FONT_SIZE)
            )
        self.line_height = _check_int("line_height", line_height, 1, "Pass a height in pixels, e.g. 9, or None.")
        if font_path is None:
            font_path = default_font_path()
        if not isinstance(font_path, (str, os.PathLike)):
            raise ConfigError(f"`font_path` must be a path string or None, got {font_path!r}.")
        self.font_path = os.fspath(font_path)

        self._atlas: _GlyphAtlas | None = None
        atlas = self.atlas  # load now: a bad font should fail here, not in a DataLoader worker
        self.max_line_width = self.page_size - 2 * self.margin
        text_height = self.page_size - 2 * self.margin
        line_box = atlas.ascent + atlas.descent
        if self.max_line_width < self.font_size or text_height < line_box:
            raise ConfigError(
                f"`margin` {self.margin} and `font_size` {self.font_size} leave no room for a line of text on a "
                f"{self.page_size} px page (text area {max(self.max_line_width, 0)} px, one line needs "
                f"{line_box} px high). Use a smaller margin or font_size, or a larger page_size."
            )
        # The last line's ascender-to-descender box must end inside the bottom margin.
        self.lines_per_page = (text_height - line_box) // self.line_height + 1

    # -- pickling: settings only; the atlas (FreeType handle, lock, caches) is per process.

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_atlas"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)

    @property
    def atlas(self) -> _GlyphAtlas:
        """This process's glyph atlas for the renderer's font and size (loaded on first use)."""
        if self._atlas is None:
            self._atlas = _load_atlas(self.font_path, self.font_size)
        return self._atlas

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(page_size={self.page_size}, font_path={self.font_path!r}, "
            f"font_size={self.font_size}, margin={self.margin}, line_height={self.line_height})"
        )

    # -- layout

    def _layout(self, text: str) -> _Layout:
        """Greedy wrap by pixel width: at the last space that fits, between CJK characters, or
        (for a word longer than a line) at the last character that fits."""
        check_text(text)
        # surrogatepass: a lone surrogate (bad decoding upstream) must not crash a worker;
        # it becomes an invisible character.
        code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        gids, glyphs = self.atlas.glyph_ids(code_points)
        pen = np.zeros(len(text) + 1, dtype=np.int64)  # (N + 1,) pen[i] = advance of text[:i]
        np.cumsum(glyphs.advance[gids], out=pen[1:])
        pen_list = pen.tolist()  # bisect and scalar reads on a list beat numpy calls per line
        width = self.max_line_width
        starts: list[int] = []
        ends: list[int] = []
        n = len(text)
        para_start = 0
        while n and para_start <= n:
            para_end = text.find("\n", para_start)
            if para_end < 0:
                para_end = n
            start = para_start
            if start == para_end:  # an empty line still takes its place on the page
                starts.append(start)
                ends.append(start)
            while start < para_end:
                if pen_list[para_end] - pen_list[start] <= width:  # the common case: the rest fits
                    starts.append(start)
                    ends.append(para_end)
                    break
                # Largest end in (start, para_end) whose line still fits in `width`.
                end = bisect.bisect_right(pen_list, pen_list[start] + width, start, para_end + 1) - 1
                if end <= start:  # one glyph wider than the line: give it a line of its own
                    cut = start + 1
                elif text[end] == " ":
                    cut = end
                elif ord(text[end]) >= _WIDE_FROM or ord(text[end - 1]) >= _WIDE_FROM:
                    cut = end  # a break between CJK characters needs no space
                else:
                    space = text.rfind(" ", start + 1, end)
                    cut = space if space > start else end
                starts.append(start)
                ends.append(cut)
                start = cut
                while start < para_end and text[start] == " ":  # spaces at a wrap are not drawn
                    start += 1
            para_start = para_end + 1
        return _Layout(
            text=text,
            glyphs=glyphs,
            glyph_ids=gids,
            pen=pen,
            line_starts=np.array(starts, dtype=np.int64),
            line_ends=np.array(ends, dtype=np.int64),
            lines_per_page=self.lines_per_page,
        )

    def pages_needed(self, text: str) -> int:
        """How many pages ``text`` fills.

        Args:
            text: The text to lay out.

        Returns:
            The page count :meth:`render` returns with ``max_pages=None`` (0 for ``""``).
        """
        return self._layout(text).num_pages

    def text_stats(self, text: str, max_pages: int | None = None) -> TextStats:
        """What rendering ``text`` would give, without drawing it (for data summaries).

        Args:
            text: The text to lay out.
            max_pages: As in :meth:`render`.

        Returns:
            Pages needed and kept, the characters ``max_pages`` drops, and the characters on the
            kept pages the font has no glyph for.
        """
        layout = self._layout(text)
        pages = self._kept_pages(layout, max_pages, warn=False)
        first_char = int(layout.line_starts[pages.start * layout.lines_per_page]) if len(pages) else len(text)
        gids = layout.glyph_ids[first_char:]
        missing = layout.glyphs.missing[gids]
        distinct = frozenset(self.atlas.chars[g] for g in np.unique(gids[missing]).tolist())
        return TextStats(
            pages=layout.num_pages,
            kept_pages=len(pages),
            dropped_chars=first_char if len(pages) < layout.num_pages else 0,
            drawn_chars=len(text) - first_char,
            missing_chars=int(missing.sum()),
            missing_distinct=distinct,
        )

    def _kept_pages(self, layout: _Layout, max_pages: int | None, warn: bool) -> range:
        """The pages to draw: all, or the last ``max_pages`` (the most recent history)."""
        num_pages = layout.num_pages
        if max_pages is not None:
            max_pages = _check_int("max_pages", max_pages, 1, "Pass None to keep every page.")
        if max_pages is None or num_pages <= max_pages:
            return range(num_pages)
        first = num_pages - max_pages
        if warn:
            dropped_chars = int(layout.line_starts[first * layout.lines_per_page])
            warnings.warn(
                f"The text needs {num_pages} pages but max_pages={max_pages}: kept the last {max_pages} pages and "
                f"dropped the first {first} (the oldest {dropped_chars:,} of {len(layout.text):,} characters). "
                "Pass a larger `max_pages` (or None) to keep them.",
                UserWarning,
                stacklevel=4,  # _kept_pages <- _render_gray <- render* <- the caller
            )
        return range(first, num_pages)

    def _warn_missing_glyphs(self, layout: _Layout, pages: range) -> None:
        """One MissingGlyphWarning for the characters on ``pages`` the font cannot draw."""
        if not len(pages):
            return
        first_char = int(layout.line_starts[pages.start * layout.lines_per_page])
        gids = layout.glyph_ids[first_char:]
        missing = layout.glyphs.missing[gids]
        count = int(missing.sum())
        if not count:
            return
        distinct = np.unique(gids[missing])
        examples = ", ".join(repr(self.atlas.chars[g]) for g in distinct[:5].tolist())
        warnings.warn(
            MissingGlyphWarning(
                f"{count:,} characters ({len(distinct):,} distinct, e.g. {examples}) have no glyph in font "
                f"{self.font_path!r} and were drawn as empty boxes the OCR encoder cannot read. To fix it, "
                f"{CJK_FONT_HINT}."
            ),
            stacklevel=4,
        )

    # -- composition

    def _compose_page(self, layout: _Layout, page: int, canvas: np.ndarray) -> None:
        """Draw one page into ``canvas``: a white (S * S + 1,) uint8 page, flattened, plus one
        spare pixel where glyph pixels that fall off the page are sent.

        Pillow composes overlapping ink (neighbouring glyphs in a line, and line over line)
        by multiplying transmittances ``t = 255 - alpha`` with rounding, ``t <- DIV255(t *
        (255 - a))``. We do the same, but one vectorised scatter cannot apply two updates to
        one pixel, so glyphs are split into layers in which no two glyphs overlap: glyph j
        goes to layer ``(line % row_layers) * col_layers + j % col_layers``, both counts
        computed from this page's glyph boxes. A pixel with at most two contributions is
        then bit-exact; with three or more the rounding order may differ from Pillow's by
        one grey level.
        """
        glyphs = layout.glyphs
        size = self.page_size
        lines = layout.page_lines(page)
        line_starts = layout.line_starts[lines]  # (L,)
        line_lengths = layout.line_ends[lines] - line_starts  # (L,)
        num_chars = int(line_lengths.sum())
        if num_chars == 0:
            return
        # Per character of the page (n,): its index in the text, its line, its glyph.
        first_of_line = np.cumsum(line_lengths) - line_lengths
        char_index = _arange(num_chars) + np.repeat(line_starts - first_of_line, line_lengths)
        line_of = np.repeat(np.arange(len(line_starts)), line_lengths)
        gids = layout.glyph_ids[char_index]
        counts = glyphs.counts[gids]
        drawn = np.flatnonzero(counts)  # spaces and controls have no pixels
        if not drawn.size:
            return
        char_index, line_of, gids, counts = char_index[drawn], line_of[drawn], gids[drawn], counts[drawn]
        pen_x = self.margin + layout.pen[char_index] - layout.pen[line_starts][line_of]
        pen_y = self.margin + line_of * self.line_height
        left, right = pen_x + glyphs.left[gids], pen_x + glyphs.right[gids]
        top, bottom = pen_y + glyphs.top[gids], pen_y + glyphs.bottom[gids]

        # Column layers: glyph j can overlap an earlier glyph i only if some glyph in i..j-1
        # reaches past j's left edge; searchsorted on the running max of right edges finds
        # the earliest such i. Lines are shifted apart (offset) so they don't interact here.
        n = len(gids)
        offset = line_of * (int(right.max() - left.min()) + 1)
        reach = np.maximum.accumulate(right + offset)
        earliest_overlap = np.searchsorted(reach, left + offset, side="right")
        col_layers = max(1, int((_arange(n) - earliest_overlap).max()) + 1)
        # Row layers: lines k apart can't overlap once k * line_height covers the tallest glyph.
        extent = int(glyphs.bottom[gids].max() - glyphs.top[gids].min())
        row_layers = max(1, math.ceil(extent / self.line_height))
        if col_layers * row_layers > 1:
            layer = (line_of % row_layers) * col_layers + _arange(n) % col_layers
            order = np.argsort(layer, kind="stable")
            layer, gids, counts, pen_x, pen_y = layer[order], gids[order], counts[order], pen_x[order], pen_y[order]
        else:
            layer = np.zeros(n, dtype=np.int64)

        # Expand glyphs to their pixels (E,): pixel e is atlas pixel flat[e].
        ends = np.cumsum(counts)
        flat = _arange(int(ends[-1])) + np.repeat(glyphs.starts[gids] - (ends - counts), counts)
        index = np.repeat(pen_y * size + pen_x, counts) + glyphs.offsets(size)[flat]  # (E,) flat pixel
        if left.min() < 0 or right.max() > size or top.min() < 0 or bottom.max() > size:
            # Rare (margin 0, an over-long glyph): clip, sending off-page pixels to the spare.
            ys = np.repeat(pen_y, counts) + glyphs.dy[flat]
            xs = np.repeat(pen_x, counts) + glyphs.dx[flat]
            index[(ys < 0) | (ys >= size) | (xs < 0) | (xs >= size)] = size * size
        transmittance = glyphs.transmittance[flat]  # (E,) uint8

        bounds = np.concatenate(([0], ends))[np.searchsorted(layer, np.arange(int(layer[-1]) + 2))].tolist()
        # The first layer lands on white (t = 255), where DIV255(255 * t') == t': plain copy.
        canvas[index[: bounds[1]]] = transmittance[: bounds[1]]
        for lo, hi in zip(bounds[1:-1], bounds[2:], strict=True):
            pixel = index[lo:hi]
            value = canvas[pixel].astype(np.uint16) * transmittance[lo:hi]  # at most 255 * 255
            value += 128  # Pillow's DIV255: round(v / 255) without a division
            value += value >> 8
            canvas[pixel] = value >> 8

    def _render_gray(self, text: str, max_pages: int | None) -> np.ndarray:
        """The pages as grey levels, (P, S, S) uint8 (a view with one spare pixel per page)."""
        layout = self._layout(text)
        pages = self._kept_pages(layout, max_pages, warn=True)
        self._warn_missing_glyphs(layout, pages)
        size = self.page_size
        canvas = np.full((len(pages), size * size + 1), 255, dtype=np.uint8)
        for slot, page in enumerate(pages):
            self._compose_page(layout, page, canvas[slot])
        return canvas[:, : size * size].reshape(len(pages), size, size)

    def render(self, text: str, max_pages: int | None = None) -> list[Image.Image]:
        """Draw ``text`` on as many pages as it needs.

        Wraps by pixel width (at spaces for Latin text, between characters for CJK),
        respects newlines, expands tabs to :data:`TAB_SPACES` spaces. Deterministic: the
        same text, font and settings give identical bytes. Pixels match
        :func:`render_baseline` (``ImageDraw.text`` per line) exactly except where three or
        more glyphs overlap one pixel, where they may differ by one grey level (Pillow <
        10.2 composed overlapping glyphs by max() rather than alpha-over, so there the
        rare overlap pixels differ more).

        Args:
            text: The text to draw.
            max_pages: Most pages to return. Longer text keeps its *last* pages (the most
                recent history) and warns how many pages and characters were dropped.

        Returns:
            RGB images of ``page_size`` x ``page_size``, white with black text; ``[]`` for "".

        Raises:
            ConfigError: if ``max_pages`` is not None or an integer >= 1.

        Warns:
            UserWarning: when pages were dropped because of ``max_pages``.
            MissingGlyphWarning: when the font lacks some characters of the drawn text.
        """
        gray = self._render_gray(text, max_pages)
        # Image.merge of one "L" page three times: ~0.2 ms per 1024-px page, where filling an
        # RGB array from the grey one in numpy and wrapping it costs 1-4 ms.
        return [Image.merge("RGB", (page, page, page)) for page in map(Image.fromarray, gray)]

    def render_array(self, text: str, max_pages: int | None = None) -> np.ndarray:
        """Like :meth:`render`, as one array (no PIL objects).

        Args:
            text: The text to draw.
            max_pages: As in :meth:`render`.

        Returns:
            uint8 array (P, S, S, 3), S = ``page_size``; P = 0 for empty text.

        Raises:
            ConfigError: if ``max_pages`` is not None or an integer >= 1.
        """
        gray = self._render_gray(text, max_pages)  # (P, S, S)
        rgb = np.empty((*gray.shape, 3), dtype=np.uint8)  # (P, S, S, 3)
        for channel in range(3):  # three strided copies: ~5x faster than one broadcast copy
            rgb[..., channel] = gray
        return rgb

    def to_pixel_values(self, pages: Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
        """Encoder input from pages, normalised like DeepSeek-OCR (mean 0.5, std 0.5).

        Args:
            pages: PIL images of ``page_size`` (any mode; converted to RGB) or a uint8 array
                (P, S, S, 3) from :meth:`render_array`.

        Returns:
            float32 tensor (P, 3, S, S) in [-1, 1]: white is 1, black is -1.

        Raises:
            ConfigError: if a page is not ``page_size`` x ``page_size``.
        """
        size = self.page_size
        if isinstance(pages, np.ndarray):
            array = pages
        elif len(pages) == 0:
            array = np.zeros((0, size, size, 3), dtype=np.uint8)
        else:
            for i, page in enumerate(pages):
                if not isinstance(page, Image.Image):
                    raise InputTypeError(
                        f"`pages[{i}]` has type {type(page).__name__}; pass PIL images or one uint8 array (P, S, S, 3)."
                    )
            array = np.stack([np.asarray(p if p.mode == "RGB" else p.convert("RGB")) for p in pages])
        if array.dtype != np.uint8:
            raise InputTypeError(
                f"`pages` is an array of dtype {array.dtype}; pass uint8 pixels 0..255 (P, S, S, 3), as render_array "
                "returns them (a float array of 0..1 would be scaled wrongly: use (array * 255).round().astype(np.uint8))."
            )
        if array.ndim != 4 or array.shape[1:] != (size, size, 3):
            raise ConfigError(
                f"`pages` must be {size}x{size} RGB pages (array shape (P, {size}, {size}, 3)), got shape "
                f"{tuple(array.shape)}. Render them with this renderer or resize them to page_size={size}."
            )
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)  # (P, 3, S, S) uint8 view
        # (x / 255 - 0.5) / 0.5 == x / 127.5 - 1
        return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


_ARANGE = np.arange(0)


def _arange(n: int) -> np.ndarray:
    """``np.arange(n)`` as a read-only view of a cached array: page composition needs a few
    per page, and allocating 100k-element ranges each time is measurable."""
    global _ARANGE
    if len(_ARANGE) < n:
        _ARANGE = np.arange(max(n, 2 * len(_ARANGE)), dtype=np.int64)
        _ARANGE.flags.writeable = False
    return _ARANGE[:n]


def render_baseline(renderer: PageRenderer, text: str, max_pages: int | None = None) -> list[Image.Image]:
    """The plain renderer: ``ImageDraw.text`` once per line, on ``renderer``'s own layout.

    The reference :meth:`PageRenderer.render` is measured and checked against. Emits no
    warnings (``render`` does).

    Args:
        renderer: Supplies the settings, font and line layout.
        text: The text to draw.
        max_pages: As in :meth:`PageRenderer.render`.

    Returns:
        RGB pages, as :meth:`PageRenderer.render` returns them.

    Raises:
        ConfigError: if ``max_pages`` is not None or an integer >= 1.
    """
    layout = renderer._layout(text)
    atlas = renderer.atlas
    pages = []
    for page in renderer._kept_pages(layout, max_pages, warn=False):
        image = Image.new("RGB", (renderer.page_size, renderer.page_size), "white")
        draw = ImageDraw.Draw(image)
        lines = layout.page_lines(page)
        for row, (start, end) in enumerate(zip(layout.line_starts[lines].tolist(), layout.line_ends[lines].tolist())):
            # Tabs and invisible characters become what the atlas draws for them.
            line = text[start:end].translate(atlas.baseline_substitutes)
            if line:
                draw.text((renderer.margin, renderer.margin + row * renderer.line_height), line, "black", atlas.font)
        pages.append(image)
    return pages


def pixel_values_from_text(renderer: PageRenderer, text: str, max_pages: int | None = None) -> torch.Tensor:
    """Render ``text`` straight into encoder input (skips the PIL images).

    Args:
        renderer: The page renderer.
        text: The text to draw.
        max_pages: As in :meth:`PageRenderer.render`.

    Returns:
        float32 tensor (P, 3, S, S) in [-1, 1], equal to
        ``renderer.to_pixel_values(renderer.render(text, max_pages))``; P = 0 for "".

    Raises:
        ConfigError: if ``max_pages`` is not None or an integer >= 1.
    """
    gray = torch.from_numpy(renderer._render_gray(text, max_pages))  # (P, S, S) uint8
    pixels = gray.to(torch.float32).div_(127.5).sub_(1.0)
    return pixels.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (P, 3, S, S)


__all__ = [
    "DEFAULT_FONT_CANDIDATES",
    "MIN_FONT_SIZE",
    "PageRenderer",
    "TextStats",
    "check_text",
    "default_font_path",
    "pixel_values_from_text",
    "render_baseline",
]
