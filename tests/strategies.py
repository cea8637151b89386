"""Hypothesis strategies: the grad-flow law's scenarios, and the inputs of the renderer / data properties."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

# The trainable sets the law is checked on (names resolved against the tiny preset in the test).
TRAINABLE_SETS = ("proj", "proj+encoder_last_block", "proj+encoder_lora", "proj+llm_norm")


@dataclass(frozen=True)
class Draw:
    """One drawn scenario."""

    trainable: str  # one of TRAINABLE_SETS
    pages: tuple[int, ...]  # fast path: pages per row (0-3); seed path: 0 = short history, >0 = long
    recent: tuple[int, ...]  # recent-text tokens per row
    checkpointing: bool  # non-reentrant activation checkpointing of the LLM
    seed_path: bool  # model(input_ids, attention_mask, labels) only


@st.composite
def scenarios(draw: st.DrawFn) -> Draw:
    batch = draw(st.integers(1, 3))
    return Draw(
        trainable=draw(st.sampled_from(TRAINABLE_SETS)),
        pages=tuple(draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch))),
        recent=tuple(draw(st.lists(st.integers(2, 24), min_size=batch, max_size=batch))),
        checkpointing=draw(st.booleans()),
        seed_path=draw(st.booleans()),
    )


# ----------------------------------------------------------------------------- renderer and data

#: what page text is made of: Latin words, digits, punctuation, tabs, newlines (paragraphs and
#: empty lines), runs of spaces (wrap points), CJK (breaks between characters) — every character
#: has a glyph in the CJK-capable default font, so no MissingGlyphWarning muddies the properties.
PAGE_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,;:!?()'-/" + "   \t\n" + "的一是在不了有和人这中大记忆压缩"


def page_texts(max_size: int = 400) -> st.SearchStrategy[str]:
    """Text to render: short to a few small pages, with long words (wider than a line) now and then."""
    word = st.one_of(
        st.text(alphabet=PAGE_ALPHABET, min_size=0, max_size=12),
        st.text(alphabet="mw", min_size=14, max_size=40),  # longer than a 96-px line: broken by character
    )
    return st.lists(word, max_size=40).map("".join).filter(lambda t: len(t) <= max_size)


def token_rows(vocab: int, marker: list[int], max_len: int = 200) -> st.SearchStrategy[list[int]]:
    """Token ids of one chat row (padding removed), with the assistant marker spliced in 0-3 times."""

    @st.composite
    def rows(draw: st.DrawFn) -> list[int]:
        ids = draw(st.lists(st.integers(0, vocab - 1), max_size=max_len))
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.integers(0, len(ids)))
            ids[at:at] = marker
        return ids

    return rows()


@st.composite
def padded_rows(draw: st.DrawFn) -> tuple[list[list[int]], list[list[int]]]:
    """Rows of ids and their labels (same lengths, -100 or an id), some empty, for ``left_pad``."""
    lengths = draw(st.lists(st.integers(0, 12), min_size=1, max_size=5))
    ids = [draw(st.lists(st.integers(0, 50), min_size=n, max_size=n)) for n in lengths]
    labels = [[draw(st.sampled_from([-100, token])) for token in row] for row in ids]
    return ids, labels


#: chat snippets for collator examples: words, CJK, and the chat-template markers themselves.
_CHAT_WORDS = ["the", "cat", "Paris", "blue", "我", "记住", "名字", "42.", "\n", "<|im_start|>user\n", "<|im_end|>\n"]


def chat_text(max_words: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(_CHAT_WORDS), max_size=max_words).map(" ".join)


@st.composite
def memory_examples(draw: st.DrawFn) -> list[dict[str, str]]:
    """1-3 collator examples: history from none to several pages, a prompt, a non-empty response."""
    return [
        {
            "history": draw(chat_text(600)),
            "prompt": draw(chat_text(6)),
            "response": draw(chat_text(6).filter(bool)),
        }
        for _ in range(draw(st.integers(1, 3)))
    ]


@dataclass(frozen=True)
class ModelSpec:
    """A small MEMModel variant to save and load: config fields plus a seed for its proj weights."""

    projector_type: str
    encoder_readout: str
    context_threshold: int
    max_pages: int
    weight_seed: int


def model_specs() -> st.SearchStrategy[ModelSpec]:
    from ocrmem.configuration import ENCODER_READOUTS, PROJECTOR_TYPES

    return st.builds(
        ModelSpec,
        projector_type=st.sampled_from(PROJECTOR_TYPES),
        encoder_readout=st.sampled_from(ENCODER_READOUTS),
        context_threshold=st.integers(8, 128),
        max_pages=st.integers(1, 4),
        weight_seed=st.integers(0, 2**31 - 1),
    )


__all__ = [
    "Draw",
    "ModelSpec",
    "PAGE_ALPHABET",
    "TRAINABLE_SETS",
    "chat_text",
    "memory_examples",
    "model_specs",
    "padded_rows",
    "page_texts",
    "scenarios",
    "token_rows",
]
