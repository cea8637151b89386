"""MEMModel.forward refuses bad inputs with the argument, the value and the fix — and accepts good ones.

Each bad input here used to raise a raw torch error ("index out of range in self", a count
mismatch) or, worse, run: 0..255 pixels, a ``-1`` ignore index, a 1-D seed row (every token
became a row), a row longer than the LLM's positions, a config set wrong after construction.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ocrmem import MEMModel
from ocrmem.data import build_sample_batch, format_turn
from ocrmem.errors import ConfigError, InputError, InputTypeError, PixelRangeWarning
from ocrmem.modeling import IGNORE_INDEX


@pytest.fixture(scope="module")
def model(tiny_dir):
    return MEMModel.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def batch(model):
    return build_sample_batch(model, batch_size=2, seed=0)


def _forward(model, batch, **changes):
    inputs = {**batch, **changes}
    with torch.no_grad():
        return model(**inputs)


def _vocab(model) -> int:
    return model.base_llm.get_input_embeddings().num_embeddings


class TestPixelValues:
    def test_uint8_pages_are_refused_with_the_conversion(self, model, batch):
        raw = ((batch["pixel_values"] + 1) * 127.5).round().to(torch.uint8)
        with pytest.raises(InputTypeError, match=r"`pixel_values` has dtype torch.uint8.*/ 127.5 - 1"):
            _forward(model, batch, pixel_values=raw)

    def test_float_pages_in_0_to_255_are_refused(self, model, batch):
        with pytest.raises(InputError, match=r"`pixel_values` range from .* to 255.*0..255"):
            _forward(model, batch, pixel_values=(batch["pixel_values"] + 1) * 127.5)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_pages_are_refused_naming_the_page(self, model, batch, bad):
        pixels = batch["pixel_values"].clone()
        pixels[1, 0, 3, 4] = bad
        with pytest.raises(InputError, match=r"`pixel_values` holds .*(1 NaN|1 inf).*first on page 1"):
            _forward(model, batch, pixel_values=pixels)

    def test_pages_of_another_size_are_refused_naming_page_size(self, model, batch):
        size = model.page_size
        pixels = torch.zeros(batch["pixel_values"].shape[0], 3, size // 2, size // 2)
        with pytest.raises(InputError, match=rf"shape \(2, 3, {size // 2}, {size // 2}\).*page_size={size}"):
            _forward(model, batch, pixel_values=pixels)

    def test_pages_in_0_to_1_warn(self, model, batch):
        with pytest.warns(PixelRangeWarning, match=r"range from 0\.\d+ to 1: no pixel is darker.*`pixel_values \* 2 - 1`"):
            _forward(model, batch, pixel_values=(batch["pixel_values"] + 1) / 2)

    def test_normalised_pages_do_not_warn(self, model, batch):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _forward(model, batch)

    def test_clip_normalised_range_is_accepted(self, model, batch):
        # CLIP's mean/std map pixels to about [-1.79, 2.15]: a normalisation, not raw pixels.
        pixels = batch["pixel_values"].clone()
        pixels[0, 0, 0, 0], pixels[0, 0, 0, 1] = -1.79, 2.15
        assert _forward(model, batch, pixel_values=pixels).memory_used


class TestTokenIds:
    @pytest.mark.parametrize("value", ["vocab", -3, IGNORE_INDEX])
    def test_id_outside_the_vocabulary_is_refused_naming_position(self, model, batch, value):
        ids = batch["input_ids"].clone()
        bad = _vocab(model) if value == "vocab" else value
        ids[1, -2] = bad
        with pytest.raises(InputError, match=rf"token id {bad} at \[1, {ids.shape[1] - 2}\].*0\.\.{_vocab(model) - 1}"):
            _forward(model, batch, input_ids=ids)

    def test_float_ids_are_refused(self, model, batch):
        with pytest.raises(InputTypeError, match=r"`input_ids` has dtype torch.float32.*\.long\(\)"):
            _forward(model, batch, input_ids=batch["input_ids"].float())

    def test_one_dimensional_row_is_refused_with_unsqueeze(self, model):
        text = "word " * 200 + format_turn("user", "q") + "<|im_start|>assistant\nanswer<|im_end|>\n"
        ids = torch.tensor(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        with pytest.raises(InputError, match=r"shape \(\d+,\); it must be 2-D.*unsqueeze\(0\)"):
            _forward(model, {}, input_ids=ids)
        out = _forward(model, {}, input_ids=ids.unsqueeze(0))  # the fix works: one row, compressed
        assert out.logits.shape[0] == 1 and out.memory_used

    def test_list_of_ids_is_refused(self, model, batch):
        with pytest.raises(InputTypeError, match="`input_ids` has type list"):
            _forward(model, batch, input_ids=batch["input_ids"].tolist())

    def test_int32_ids_and_bool_mask_are_accepted(self, model, batch):
        reference = _forward(model, batch).logits
        out = _forward(model, batch, input_ids=batch["input_ids"].int(), attention_mask=batch["attention_mask"].bool())
        torch.testing.assert_close(out.logits, reference, rtol=0, atol=0)


class TestMaskAndLabels:
    def test_mask_of_another_shape_is_refused(self, model, batch):
        with pytest.raises(InputError, match=r"`attention_mask` has shape \(2, \d+\) but `input_ids` has shape"):
            _forward(model, batch, attention_mask=batch["attention_mask"][:, 1:])

    def test_mask_values_other_than_0_1_are_refused(self, model, batch):
        with pytest.raises(InputError, match=r"`attention_mask` holds 2 at \[0, \d+\].*1 for real tokens"):
            _forward(model, batch, attention_mask=batch["attention_mask"] * 2)

    def test_labels_of_another_length_are_refused(self, model, batch):
        with pytest.raises(InputError, match=r"`labels` has shape \(2, \d+\) but `input_ids` has shape"):
            _forward(model, batch, labels=batch["labels"][:, :-1])

    def test_minus_one_as_ignore_index_is_refused_with_the_fix(self, model, batch):
        labels = torch.where(batch["labels"] == IGNORE_INDEX, -1, batch["labels"])
        with pytest.raises(InputError, match=r"`labels` holds -1 .*ignore index is -100.*labels\[labels == -1\] = -100"):
            _forward(model, batch, labels=labels)

    def test_label_beyond_the_vocabulary_is_refused(self, model, batch):
        labels = batch["labels"].clone()
        labels[0, -1] = 10**6
        with pytest.raises(InputError, match=rf"`labels` holds 1000000 at \[0, {labels.shape[1] - 1}\]"):
            _forward(model, batch, labels=labels)

    def test_position_ids_of_another_shape_are_refused(self, model, batch):
        with pytest.raises(InputError, match=r"`position_ids` has shape"):
            _forward(model, batch, position_ids=torch.zeros(3, 5, dtype=torch.long))


class TestMemoryTokens:
    def test_literal_placeholder_in_seed_text_is_refused_naming_it(self, model):
        history = "We met in Paris. <|image_pad|> was in my notes. " * 20
        text = history + format_turn("user", "Where?") + "<|im_start|>assistant\nParis<|im_end|>\n"
        ids = torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"]])
        with pytest.raises(InputError, match=r"20 memory tokens \('<\|image_pad\|>'.*contains '<\|image_pad\|>' literally"):
            _forward(model, {}, input_ids=ids, labels=ids)
        out = _forward(model, {}, input_ids=torch.tensor([model.tokenizer(text.replace("<|image_pad|>", "<image_pad>"))["input_ids"]]))
        assert out.memory_used  # the suggested replacement compresses

    def test_extra_placeholder_on_fast_path_says_it_may_be_literal(self, model, batch):
        ids = batch["input_ids"].clone()
        ids[0, -3] = model.memory_token_id
        with pytest.raises(InputError, match=r"tokens: \d+, features: \d+.*extra 1 may come from text that contains"):
            _forward(model, batch, input_ids=ids)

    def test_pages_without_memory_tokens_are_refused(self, model, batch):
        ids = torch.full_like(batch["input_ids"], 5)
        with pytest.raises(InputError, match=r"tokens: 0, features: \d+.*per page of `pixel_values`"):
            _forward(model, batch, input_ids=ids)


class TestSequenceLength:
    # The check reads `max_position_embeddings` from the LLM's config; lowering it keeps rows short
    # (the tiny LLM's real limit, 8192, would cost seconds of CPU per forward).
    LIMIT = 32

    def test_row_longer_than_max_position_embeddings_is_refused(self, model, monkeypatch):
        assert model.base_llm.config.max_position_embeddings >= self.LIMIT
        monkeypatch.setattr(model.base_llm.config, "max_position_embeddings", self.LIMIT)
        ids = torch.full((1, self.LIMIT + 1), 5)
        no_pages = torch.zeros(0, 3, model.page_size, model.page_size)
        with pytest.raises(InputError, match=rf"spans {self.LIMIT + 1} positions.*max_position_embeddings={self.LIMIT}"):
            _forward(model, {}, input_ids=ids, pixel_values=no_pages)

    def test_long_padded_batch_with_short_rows_is_accepted(self, model, monkeypatch):
        monkeypatch.setattr(model.base_llm.config, "max_position_embeddings", self.LIMIT)
        ids = torch.full((2, self.LIMIT + 8), 5)
        mask = torch.zeros_like(ids)
        mask[:, -self.LIMIT :] = 1  # left padding: 32 real tokens, positions 0..31
        no_pages = torch.zeros(0, 3, model.page_size, model.page_size)
        out = _forward(model, {}, input_ids=ids, attention_mask=mask, pixel_values=no_pages)
        assert out.logits.shape[:2] == (2, self.LIMIT + 8)


class TestConfigAtForwardTime:
    @pytest.mark.parametrize(("field", "value"), [("context_threshold", -5), ("context_threshold", True), ("max_pages", 0)])
    def test_value_set_wrong_after_construction_fails_at_forward(self, model, batch, field, value):
        before = getattr(model.config, field)
        setattr(model.config, field, value)
        try:
            with pytest.raises(ConfigError, match=rf"`{field}` is {value!r}"):
                _forward(model, batch)
        finally:
            setattr(model.config, field, before)
        assert _forward(model, batch).memory_used
