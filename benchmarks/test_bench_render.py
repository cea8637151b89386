"""Page rendering speed: the glyph-atlas compositor vs ImageDraw.text per line.

One 1024-px page (DeepSeek-OCR's input) of ~2,500 characters, Latin and Chinese, with the
default (CJK-capable) font. Both sides draw the same layout and return PIL RGB pages.
The atlas is warmed before timing: a DataLoader worker renders thousands of pages with
the same font, so steady state is what training sees.

    python -m pytest benchmarks/test_bench_render.py -p no:cacheprovider --benchmark-only -o addopts=""
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable

import pytest
from PIL import Image

from ocrmem.rendering import PageRenderer, render_baseline

PAGE_SIZE = 1024
NUM_CHARS = 2500
_WORDS = "the quick brown fox jumps over lazy dog memory encoder page history render token user".split()


def latin_text(num_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = [rng.choice(_WORDS) + rng.choice(["", "", "", ",", ".", ".\n"]) for _ in range(num_chars)]
    return " ".join(words)[:num_chars]


def chinese_text(num_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(
        rng.choice("，。\n") if rng.random() < 0.06 else chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(num_chars)
    )


TEXTS = {"latin": latin_text(NUM_CHARS), "chinese": chinese_text(NUM_CHARS)}
RENDERERS: dict[str, Callable[[PageRenderer, str], list[Image.Image]]] = {
    "atlas": lambda renderer, text: renderer.render(text),
    "baseline": render_baseline,
}


@pytest.fixture(scope="module")
def renderer() -> PageRenderer:
    return PageRenderer(page_size=PAGE_SIZE)


@pytest.mark.parametrize("kind", sorted(RENDERERS))
@pytest.mark.parametrize("language", sorted(TEXTS))
def test_render_page(benchmark, renderer: PageRenderer, language: str, kind: str) -> None:
    text = TEXTS[language]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        renderer.render(text)  # warm the glyph atlas; also check the font covers the text
    if any("no glyph" in str(w.message) for w in caught):
        pytest.skip(f"default font {renderer.font_path} lacks {language} glyphs; install fonts-wqy-microhei")
    benchmark.group = f"{language}, {NUM_CHARS} chars, {PAGE_SIZE} px page"
    pages = benchmark(RENDERERS[kind], renderer, text)
    assert len(pages) == 1
