"""Hypothesis properties of the renderer, the history split, padding, the collator and save/load.

Each property is a law the code must keep for every input, checked on drawn inputs
(strategies in ``tests/strategies.py``); the heavy ones (a model load per example) run
few examples so the whole file stays a few seconds in the default run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ocrmem import MEMModel
from ocrmem.configuration import MEMConfig
from ocrmem.data import MemoryCollator, seed_path_batch
from ocrmem.modeling import IGNORE_INDEX, left_pad
from ocrmem.rendering import PageRenderer
from ..strategies import ModelSpec, memory_examples, model_specs, padded_rows, page_texts, token_rows

PAGE = 96  # px: ~10 lines of ~15 characters, so a few hundred characters fill several pages


@pytest.fixture(scope="module")
def renderer() -> PageRenderer:
    return PageRenderer(page_size=PAGE)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> MEMModel:
    """One tiny MEMModel for the whole module (the properties only read it)."""
    return MEMModel.from_pretrained(tiny_dir)


# ----------------------------------------------------------------------------- renderer


class TestRenderer:
    @given(text=page_texts())
    def test_is_deterministic_across_calls_and_instances(self, renderer, text) -> None:
        first = renderer.render_array(text)
        assert np.array_equal(first, renderer.render_array(text))
        assert np.array_equal(first, PageRenderer(page_size=PAGE).render_array(text))
        assert first.shape == (renderer.pages_needed(text), PAGE, PAGE, 3)

    @given(text=page_texts())
    def test_every_character_is_laid_out_once_in_order(self, renderer, text) -> None:
        # The layout the compositor draws from: lines are consecutive slices of the text; what
        # lies between them is only the spaces a line was wrapped at and the newline ending a
        # paragraph — no character is dropped, repeated or reordered.
        layout = renderer._layout(text)
        starts, ends = layout.line_starts.tolist(), layout.line_ends.tolist()
        if not text:
            assert starts == []
            return
        assert starts[0] == 0
        for start, end in zip(starts, ends):
            assert start <= end and "\n" not in text[start:end]
        for end, next_start in zip(ends, starts[1:]):
            assert re.fullmatch(r" *\n?", text[end:next_start]), (text[end:next_start], end, next_start)
        assert re.fullmatch(r" *", text[ends[-1]:])
        assert text.count("\n") == sum(text[e:s].count("\n") for e, s in zip(ends, starts[1:]))

    @given(text=page_texts())
    def test_every_line_with_ink_is_drawn_on_its_page(self, renderer, text) -> None:
        # Each laid-out line holding a visible character leaves dark pixels in its own band of
        # its own page (line // lines_per_page), and the page count is the layout's.
        layout = renderer._layout(text)
        pages = renderer.render_array(text)[..., 0]  # (P, S, S) grey
        assert len(pages) == layout.num_pages == renderer.pages_needed(text)
        atlas = renderer.atlas
        for line, (start, end) in enumerate(zip(layout.line_starts.tolist(), layout.line_ends.tolist())):
            visible = layout.glyphs.counts[layout.glyph_ids[start:end]] > 0
            if not visible.any():
                continue
            page, row = divmod(line, renderer.lines_per_page)
            top = renderer.margin + row * renderer.line_height
            band = pages[page, top : top + atlas.ascent + atlas.descent]
            assert band.min() < 128, (line, text[start:end])

    @given(text=page_texts(), more=page_texts(max_size=120))
    def test_page_count_is_monotone_in_text_length(self, renderer, text, more) -> None:
        assert renderer.pages_needed(text) <= renderer.pages_needed(text + more)
        for cut in range(0, len(text), max(1, len(text) // 8)):
            assert renderer.pages_needed(text[:cut]) <= renderer.pages_needed(text)


# ----------------------------------------------------------------------------- history split, padding


class TestSplitHistory:
    @given(data=st.data())
    def test_split_is_a_partition_and_only_long_history_is_compressed(self, model, data) -> None:
        marker = model._marker_ids()
        threshold = model.config.context_threshold
        row = data.draw(token_rows(vocab=1024, marker=marker, max_len=3 * threshold))
        history, recent, start = model.split_history(row)
        assert history + recent == row and start == len(history)
        if history:
            assert len(history) > threshold  # short history stays text
        last = max((i for i in range(len(row) - len(marker) + 1) if row[i : i + len(marker)] == marker), default=None)
        if last is not None and last > threshold:
            assert start == last and recent[: len(marker)] == marker  # recent starts at the last marker
        elif last is None and len(row) - threshold > threshold:
            assert len(recent) == threshold  # no marker: the last `threshold` tokens stay text
        elif last is not None or len(row) - threshold <= threshold:
            assert history == []


class TestLeftPad:
    @given(rows=padded_rows())
    def test_rows_are_right_aligned_behind_padding(self, rows) -> None:
        ids, labels = rows
        batch = left_pad(ids, labels, pad_id=99)
        length = max(1, max(len(r) for r in ids))
        for key in ("input_ids", "attention_mask", "labels"):
            assert batch[key].shape == (len(ids), length) and batch[key].dtype == torch.long
        for b, (row, row_labels) in enumerate(zip(ids, labels)):
            mask = batch["attention_mask"][b]
            assert mask.tolist() == [0] * (length - len(row)) + [1] * len(row)
            assert batch["input_ids"][b][mask.bool()].tolist() == row
            assert batch["labels"][b][mask.bool()].tolist() == row_labels
            assert set(batch["input_ids"][b][~mask.bool()].tolist()) <= {99}
            assert set(batch["labels"][b][~mask.bool()].tolist()) <= {IGNORE_INDEX}


# ----------------------------------------------------------------------------- collator


class TestCollator:
    @settings(max_examples=8)  # a 256-px page render per history page
    @given(examples=memory_examples())
    def test_memory_tokens_pages_and_labels_agree(self, model, examples) -> None:
        collator = MemoryCollator.for_model(model)
        batch = collator(examples)
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        mem = collator.memory_token_id
        tokenizer = model.tokenizer
        pages_per_row = [min(collator.renderer.pages_needed(e["history"]), collator.max_pages) for e in examples]
        assert batch["pixel_values"].shape[0] == sum(pages_per_row)
        for b, example in enumerate(examples):
            real = mask[b].bool()
            row_ids, row_labels = ids[b][real].tolist(), labels[b][real].tolist()
            n_mem = pages_per_row[b] * collator.tokens_per_page
            assert row_ids[:n_mem] == [mem] * n_mem and mem not in row_ids[n_mem:]
            # History (memory tokens) and the prompt are never trained on; the answer is, verbatim.
            trained = [i for i, lab in enumerate(row_labels) if lab != IGNORE_INDEX]
            assert trained and trained == list(range(trained[0], len(row_ids))) and trained[0] > n_mem
            assert [row_labels[i] for i in trained] == row_ids[trained[0]:]
            answer = tokenizer.decode(row_ids[trained[0]:], skip_special_tokens=False)
            assert answer == f"{example['response']}<|im_end|>\n"
        assert not labels[~mask.bool()].ne(IGNORE_INDEX).any()


# ----------------------------------------------------------------------------- save -> load


def _build(tiny_dir: Path, spec: ModelSpec) -> MEMModel:
    config = json.loads((tiny_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("model_type", None)
    config.update(
        base_model_name=str(tiny_dir / config["base_model_name"]),  # absolute: the copy lives elsewhere
        ocr_model_name=str(tiny_dir / config["ocr_model_name"]),
        projector_type=spec.projector_type,
        encoder_readout=spec.encoder_readout,
        context_threshold=spec.context_threshold,
        max_pages=spec.max_pages,
    )
    model = MEMModel(MEMConfig(**config), model_dir=tiny_dir)
    generator = torch.Generator().manual_seed(spec.weight_seed)
    with torch.no_grad():
        for param in model.proj.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def _round_trip(tiny_dir: Path, out: Path, spec: ModelSpec) -> None:
    from ocrmem.data import build_sample_batch, synthetic_memory_examples

    original = _build(tiny_dir, spec)
    original.save_pretrained(out)
    loaded = MEMModel.from_pretrained(out).eval()
    assert loaded.config.to_dict() == original.config.to_dict()
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in original.named_parameters() if p.requires_grad
    }
    fast = build_sample_batch(original, batch_size=2, seed=spec.weight_seed % 100)
    seed = seed_path_batch(original.tokenizer, synthetic_memory_examples(2, seed=spec.weight_seed % 100))
    with torch.no_grad():
        for batch in (fast, seed):  # the fast path, and the seed path that splits by context_threshold
            expected, actual = original(**batch), loaded(**batch)
            assert torch.equal(expected.logits, actual.logits)
            assert torch.equal(expected.loss, actual.loss)


class TestSaveLoad:
    # ~3 s per example (two model loads, four forwards): 2 in the default run, 20 in the slow suite.
    @settings(max_examples=2)
    @given(spec=model_specs())
    def test_round_trip_gives_identical_outputs(self, tiny_dir, tmp_path_factory, spec) -> None:
        _round_trip(tiny_dir, tmp_path_factory.mktemp("saved"), spec)

    @pytest.mark.slow
    @settings(max_examples=20)
    @given(spec=model_specs())
    def test_round_trip_gives_identical_outputs_many_specs(self, tiny_dir, tmp_path_factory, spec) -> None:
        _round_trip(tiny_dir, tmp_path_factory.mktemp("saved"), spec)
