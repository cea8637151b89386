"""Tests for ocrmem.rendering: layout, truncation, missing glyphs, the fast path vs ImageDraw."""

from __future__ import annotations

import os
import pickle
import random
import warnings

import numpy as np
import PIL
import pytest
import torch

from ocrmem import rendering
from ocrmem.errors import ConfigError, MissingGlyphWarning
from ocrmem.rendering import PageRenderer, default_font_path, pixel_values_from_text, render_baseline

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
CJK_FONTS = [p for p in rendering.DEFAULT_FONT_CANDIDATES if "wqy" in p or "CJK" in p]
CJK_FONT = next((p for p in CJK_FONTS if os.path.isfile(p)), None)
needs_dejavu = pytest.mark.skipif(
    not os.path.isfile(DEJAVU), reason=f"needs DejaVu Sans at {DEJAVU} (apt-get install -y fonts-dejavu-core)"
)
needs_cjk_font = pytest.mark.skipif(
    CJK_FONT is None,
    reason="needs a CJK font (apt-get install -y fonts-wqy-microhei); looked for " + ", ".join(CJK_FONTS),
)

SMALL_PAGE = 256  # most tests: fast, still ~50 lines of ~50 characters
ENCODER_PAGE = 1024  # DeepSeek-OCR's page, for the agreement checks
# Fast path vs ImageDraw.text: only pixels with 3+ overlapping glyphs may differ, by 1 level.
# Pillow < 10.2 composed overlapping glyphs of one string by max() instead of alpha-over
# (python-pillow/Pillow#7497); there the few overlap pixels may differ by more.
_PILLOW_BLENDS_GLYPHS = tuple(int(part) for part in PIL.__version__.split(".")[:2]) >= (10, 2)
MAX_ABS_DIFF = 1 if _PILLOW_BLENDS_GLYPHS else 128
MAX_MEAN_ABS_DIFF = 0.01 if _PILLOW_BLENDS_GLYPHS else 0.1

CHINESE = "你好世界，今天我们讨论渲染历史记录。"
_WORDS = "the quick brown fox jumps over lazy dog memory encoder page history render token".split()


def latin_text(num_chars: int, seed: int = 0) -> str:
    """Chat-like English: words, punctuation, a newline every few sentences."""
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < num_chars:
        word = rng.choice(_WORDS) + rng.choice(["", "", "", ",", ".", ".\n"])
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:num_chars]


def chinese_text(num_chars: int, seed: int = 0) -> str:
    """Random ideographs with Chinese punctuation and the odd newline."""
    rng = random.Random(seed)
    return "".join(
        rng.choice("，。\n") if rng.random() < 0.06 else chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(num_chars)
    )


def as_array(pages: list) -> np.ndarray:
    return np.stack([np.asarray(page) for page in pages])


@pytest.fixture
def renderer() -> PageRenderer:
    return PageRenderer(page_size=SMALL_PAGE)


@pytest.fixture
def dejavu_renderer() -> PageRenderer:
    if not os.path.isfile(DEJAVU):
        pytest.skip(f"needs DejaVu Sans at {DEJAVU}")
    return PageRenderer(page_size=SMALL_PAGE, font_path=DEJAVU)


class TestDefaults:
    def test_uses_glyph_recipe_when_page_is_1280(self) -> None:
        r = PageRenderer(page_size=1280)
        assert (r.font_size, r.line_height, r.margin) == (9, 10, 10)

    def test_keeps_font_readable_when_page_is_1024(self) -> None:
        r = PageRenderer(page_size=ENCODER_PAGE)
        # 9 px scaled to 1024 would be 7.2 px: floored at MIN_FONT_SIZE, line height follows.
        assert (r.font_size, r.line_height, r.margin) == (rendering.MIN_FONT_SIZE, 9, 8)
        assert r.lines_per_page == 111

    @needs_cjk_font
    def test_prefers_cjk_font_when_one_is_installed(self) -> None:
        assert default_font_path() == CJK_FONT
        assert PageRenderer().font_path == CJK_FONT


class TestValidation:
    @pytest.mark.parametrize(
        ("field", "kwargs"),
        [
            ("page_size", {"page_size": 0}),
            ("page_size", {"page_size": 2.5}),
            ("font_size", {"font_size": 0}),
            ("font_size", {"font_size": True}),
            ("margin", {"margin": -1}),
            ("line_height", {"line_height": 0}),
            ("margin", {"page_size": 32, "margin": 15}),  # no room left for one line
        ],
    )
    def test_raises_config_error_naming_field_when_size_is_bad(self, field: str, kwargs: dict) -> None:
        with pytest.raises(ConfigError, match=f"`{field}`"):
            PageRenderer(**kwargs)

    def test_raises_config_error_with_fix_when_font_path_is_missing(self) -> None:
        with pytest.raises(ConfigError) as info:
            PageRenderer(font_path="/no/such/font.ttf")
        message = str(info.value)
        assert "`font_path`" in message and "/no/such/font.ttf" in message
        assert "apt-get install -y fonts-wqy-microhei" in message
        assert isinstance(info.value, ValueError)

    def test_raises_config_error_when_font_file_is_not_a_font(self, tmp_path) -> None:
        bogus = tmp_path / "bogus.ttf"
        bogus.write_bytes(b"not a font at all")
        with pytest.raises(ConfigError, match="`font_path`.*cannot load"):
            PageRenderer(font_path=str(bogus))

    @pytest.mark.parametrize("max_pages", [0, -1, 1.5])
    def test_raises_config_error_when_max_pages_is_bad(self, renderer: PageRenderer, max_pages: object) -> None:
        with pytest.raises(ConfigError, match="`max_pages`"):
            renderer.render("text", max_pages=max_pages)


class TestRender:
    def test_returns_no_pages_when_text_is_empty(self, renderer: PageRenderer) -> None:
        assert renderer.render("") == []
        assert renderer.pages_needed("") == 0
        assert renderer.render_array("").shape == (0, SMALL_PAGE, SMALL_PAGE, 3)
        assert pixel_values_from_text(renderer, "").shape == (0, 3, SMALL_PAGE, SMALL_PAGE)

    def test_returns_white_rgb_pages_with_black_text_when_text_is_given(self, renderer: PageRenderer) -> None:
        (page,) = renderer.render("Hello, world")
        assert page.mode == "RGB" and page.size == (SMALL_PAGE, SMALL_PAGE)
        pixels = np.asarray(page)
        assert pixels[0, 0].tolist() == [255, 255, 255]
        assert pixels.min() < 64  # real ink, not just antialiasing
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()

    def test_is_byte_identical_when_rendered_twice(self, renderer: PageRenderer) -> None:
        text = latin_text(3000) + CHINESE
        first = [page.tobytes() for page in renderer.render(text)]
        again = [page.tobytes() for page in PageRenderer(page_size=SMALL_PAGE).render(text)]
        assert first == again

    def test_page_count_grows_when_text_grows(self, renderer: PageRenderer) -> None:
        counts = [renderer.pages_needed(latin_text(n)) for n in (10, 2000, 5000, 10000)]
        assert counts == sorted(counts) and counts[0] == 1 and counts[-1] > counts[1]
        assert len(renderer.render(latin_text(5000))) == counts[2]

    def test_starts_new_line_when_text_has_newline(self, renderer: PageRenderer) -> None:
        def inked_rows(text: str) -> int:
            return int((renderer.render_array(text)[0, ..., 0] < 128).any(axis=1).sum())

        assert inked_rows("HHH\nHHH") == 2 * inked_rows("HHH HHH")

    def test_wraps_at_spaces_when_latin_line_is_too_long(self, renderer: PageRenderer) -> None:
        text = latin_text(2000).replace("\n", " ")
        layout = renderer._layout(text)
        assert len(layout.line_starts) > 1
        for start, end in zip(layout.line_starts.tolist(), layout.line_ends.tolist()):
            assert text[start:end].split() == text[start:end].strip().split()  # whole words only
            assert end == len(text) or text[end] == " "
            assert layout.pen[end] - layout.pen[start] <= renderer.max_line_width

    def test_breaks_between_characters_when_chinese_has_no_spaces(self, renderer: PageRenderer) -> None:
        layout = renderer._layout("中" * 500)
        widths = layout.pen[layout.line_ends] - layout.pen[layout.line_starts]
        assert len(widths) > 1 and (widths <= renderer.max_line_width).all()
        assert (layout.line_ends[:-1] == layout.line_starts[1:]).all()  # nothing skipped

    def test_draws_tabs_as_spaces_when_text_has_tabs(self, renderer: PageRenderer) -> None:
        spaces = " " * rendering.TAB_SPACES
        np.testing.assert_array_equal(renderer.render_array("a\tb"), renderer.render_array(f"a{spaces}b"))

    def test_keeps_last_pages_and_warns_when_text_exceeds_max_pages(self, renderer: PageRenderer) -> None:
        text = latin_text(12000)
        all_pages = renderer.render_array(text)
        assert len(all_pages) >= 3
        with pytest.warns(UserWarning, match=rf"needs {len(all_pages)} pages but max_pages=2") as record:
            kept = renderer.render_array(text, max_pages=2)
        np.testing.assert_array_equal(kept, all_pages[-2:])
        message = str(record[0].message)
        assert f"dropped the first {len(all_pages) - 2}" in message
        assert f"of {len(text):,} characters" in message and "`max_pages`" in message

    def test_does_not_warn_when_text_fits_max_pages(self, renderer: PageRenderer) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len(renderer.render(latin_text(500), max_pages=1)) == 1


class TestMissingGlyphs:
    @needs_dejavu
    def test_warns_with_count_when_dejavu_draws_chinese(self, dejavu_renderer: PageRenderer) -> None:
        text = "abc " + "你好世界" * 3
        with pytest.warns(MissingGlyphWarning) as record:
            dejavu_renderer.render(text)
        assert len([w for w in record if w.category is MissingGlyphWarning]) == 1  # once per call
        message = str(record[0].message)
        assert "12 characters (4 distinct" in message and "'你'" in message
        assert "font_path=" in message and "wqy-microhei" in message and "apt-get install" in message

    @needs_dejavu
    def test_does_not_warn_when_dejavu_draws_latin_and_whitespace(self, dejavu_renderer: PageRenderer) -> None:
        # Tabs, CR, zero-width and ideographic spaces, BEL: invisible, never "missing".
        text = latin_text(800) + "\t\r\n\u200b\u3000\x07\ufeff café naïve"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dejavu_renderer.render(text)

    @needs_cjk_font
    def test_draws_chinese_without_warning_when_font_is_cjk(self) -> None:
        r = PageRenderer(page_size=SMALL_PAGE, font_path=CJK_FONT)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (page,) = r.render_array(CHINESE)
        ink_per_char = (page[..., 0] < 128).sum() / len(CHINESE)
        assert ink_per_char > 5  # strokes, not blank
        # Every character looks different: the font really drew them, no tofu boxes.
        gids, glyphs = r.atlas.glyph_ids(np.array([ord(c) for c in "你好世界"]))
        shapes = {glyphs.transmittance[glyphs.starts[g] : glyphs.starts[g] + glyphs.counts[g]].tobytes() for g in gids}
        assert len(shapes) == 4


class TestBaselineAgreement:
    """The numpy compositor against ImageDraw.text drawing the very same layout."""

    @staticmethod
    def _assert_close_to_baseline(renderer: PageRenderer, text: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingGlyphWarning)
            fast = renderer.render_array(text).astype(np.int16)
        slow = as_array(render_baseline(renderer, text)).astype(np.int16)
        assert fast.shape == slow.shape
        diff = np.abs(fast - slow)
        assert diff.max() <= MAX_ABS_DIFF, f"max abs diff {diff.max()}"
        assert diff.mean() < MAX_MEAN_ABS_DIFF, f"mean abs diff {diff.mean():.4f}"

    def test_matches_baseline_when_text_is_latin(self) -> None:
        self._assert_close_to_baseline(PageRenderer(page_size=ENCODER_PAGE), latin_text(2500))

    @needs_cjk_font
    def test_matches_baseline_when_text_is_chinese(self) -> None:
        self._assert_close_to_baseline(PageRenderer(page_size=ENCODER_PAGE, font_path=CJK_FONT), chinese_text(2500))

    @needs_dejavu
    def test_matches_baseline_when_dejavu_draws_tofu(self) -> None:
        self._assert_close_to_baseline(PageRenderer(page_size=SMALL_PAGE, font_path=DEJAVU), chinese_text(600))

    @needs_dejavu
    def test_matches_baseline_when_glyphs_overlap_across_lines(self) -> None:
        # Line height 3 px: up to four lines overlap; combining marks stack on one pen position.
        r = PageRenderer(page_size=128, font_path=DEJAVU, line_height=3)
        self._assert_close_to_baseline(r, latin_text(600) + " e\u0301\u0308\u0301 ÅÉgjpq")

    @needs_dejavu
    def test_matches_baseline_when_glyphs_are_clipped_by_zero_margin(self) -> None:
        r = PageRenderer(page_size=96, font_path=DEJAVU, margin=0)
        self._assert_close_to_baseline(r, "jjj " + latin_text(400) + "\n" + "W" * 60)

    def test_matches_baseline_when_text_mixes_tabs_and_invisible_characters(self, renderer: PageRenderer) -> None:
        self._assert_close_to_baseline(renderer, "a\tb\r\nc\u200bd\x07e \udc80 " + latin_text(300))


class TestPickling:
    def test_renders_identically_when_pickled_into_a_fresh_process(
        self, renderer: PageRenderer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        text = latin_text(1500) + CHINESE
        expected = renderer.render_array(text)
        clone = pickle.loads(pickle.dumps(renderer))
        assert clone._atlas is None  # only settings travel
        monkeypatch.setattr(rendering, "_ATLASES", {})  # as in a spawned DataLoader worker
        np.testing.assert_array_equal(clone.render_array(text), expected)
        assert clone.atlas is not renderer.atlas


class TestPixelValues:
    def test_normalises_to_minus_one_one_when_pages_are_converted(self, renderer: PageRenderer) -> None:
        text = latin_text(5000)
        pages = renderer.render(text)
        pixel_values = renderer.to_pixel_values(pages)
        assert pixel_values.shape == (len(pages), 3, SMALL_PAGE, SMALL_PAGE)
        assert pixel_values.dtype == torch.float32 and pixel_values.is_contiguous()
        assert pixel_values.max().item() == 1.0 and pixel_values.min().item() >= -1.0
        expected = torch.from_numpy(as_array(pages)).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        torch.testing.assert_close(pixel_values, expected, rtol=0, atol=1e-6)

    def test_agrees_when_built_from_array_list_or_text(self, renderer: PageRenderer) -> None:
        text = latin_text(3000)
        from_list = renderer.to_pixel_values(renderer.render(text))
        torch.testing.assert_close(renderer.to_pixel_values(renderer.render_array(text)), from_list, rtol=0, atol=0)
        torch.testing.assert_close(pixel_values_from_text(renderer, text), from_list, rtol=0, atol=0)

    def test_raises_config_error_when_page_size_differs(self, renderer: PageRenderer) -> None:
        other = PageRenderer(page_size=128).render("x")
        with pytest.raises(ConfigError, match="`pages`"):
            renderer.to_pixel_values(other)


class TestTextTypes:
    """Non-str text used to fail with AttributeError ('bytes' object has no attribute 'encode'...)."""

    @pytest.mark.parametrize(
        ("text", "fix"),
        [(b"abc", r"decode it first"), (["a", "b"], r"join the pieces"), (None, r"pass '' for no text"), (12, r"str\(text\)")],
    )
    @pytest.mark.parametrize("call", ["render", "render_array", "pages_needed", "pixel_values_from_text"])
    def test_non_str_text_is_a_type_error_with_the_fix(self, renderer, text, fix, call):
        from ocrmem.errors import InputTypeError

        fn = (lambda t: pixel_values_from_text(renderer, t)) if call == "pixel_values_from_text" else getattr(renderer, call)
        with pytest.raises(InputTypeError, match=rf"`text` to render has type {type(text).__name__}.*{fix}"):
            fn(text)

    def test_float_page_array_is_refused(self, renderer):
        from ocrmem.errors import InputTypeError

        pages = renderer.render_array("hello").astype(np.float32) / 255.0
        with pytest.raises(InputTypeError, match=r"dtype float32; pass uint8"):
            renderer.to_pixel_values(pages)

    def test_non_image_page_is_refused(self, renderer):
        from ocrmem.errors import InputTypeError

        with pytest.raises(InputTypeError, match=r"`pages\[1\]` has type str"):
            renderer.to_pixel_values([renderer.render("a")[0], "page"])
