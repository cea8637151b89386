"""Data: malformed examples and files are clear TypeError/ValueError naming the example and field.

They used to raise ``AttributeError``/``KeyError`` from deep inside the collator, or say "does
not exist" for a directory; an empty batch crashed in ``torch.cat``.
"""

from __future__ import annotations

import json

import pytest

from ocrmem import compat
from ocrmem.data import MemoryCollator, load_jsonl_examples, seed_path_batch, split_chat
from ocrmem.errors import ConfigError, InputError, InputTypeError

TOKENS_PER_PAGE = 16


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return compat.load_tokenizer(str(tiny_dir / "llm"))


@pytest.fixture(scope="module")
def collator(tokenizer):
    return MemoryCollator(tokenizer, page_size=256, tokens_per_page=TOKENS_PER_PAGE)


GOOD = {"history": "I live in Oslo. " * 5, "prompt": "Where do I live?", "response": "Oslo"}


class TestCollator:
    @pytest.mark.parametrize(("field", "value"), [("tokens_per_page", 0), ("max_pages", 0), ("tokens_per_page", "16")])
    def test_bad_sizes_are_refused(self, tokenizer, field, value):
        sizes = {"tokens_per_page": TOKENS_PER_PAGE, field: value}
        with pytest.raises(ConfigError, match=rf"`{field}` is {value!r}"):
            MemoryCollator(tokenizer, page_size=256, **sizes)

    def test_empty_list_is_refused(self, collator):
        with pytest.raises(InputError, match="empty list of examples"):
            collator([])

    def test_not_a_list_is_refused(self, collator):
        with pytest.raises(InputTypeError, match="takes a list of examples, got a dict"):
            collator(GOOD)

    @pytest.mark.parametrize("example", ["text", 3, None, ["history"]])
    def test_example_that_is_no_dict_is_refused(self, collator, example):
        with pytest.raises(InputTypeError, match=rf"example 1 has type {type(example).__name__}"):
            collator([GOOD, example])

    @pytest.mark.parametrize("field", ["history", "prompt", "response"])
    @pytest.mark.parametrize("value", [3, ["a", "b"], b"bytes", None])
    def test_field_of_wrong_type_is_refused_naming_it(self, collator, field, value):
        with pytest.raises(InputTypeError, match=rf"example 0: `{field}` has type {type(value).__name__}.*must be a str"):
            collator([{**GOOD, field: value}])

    def test_missing_field_is_named(self, collator):
        with pytest.raises(InputError, match=r"example 0 is missing \['response'\]"):
            collator([{"history": "", "prompt": "q"}])

    @pytest.mark.parametrize(
        ("messages", "match"),
        [
            ("hello", r"`messages` has type str"),
            ({"role": "user", "content": "q"}, r"`messages` has type dict"),
            (["hi", "there"], r"`messages`\[0\] has type str"),
            ([{"role": "user"}, {"role": "assistant", "content": "a"}], r"`messages`\[0\] has no `content`"),
            ([{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}], r"`messages`\[0\]\['content'\] has type int"),
        ],
    )
    def test_malformed_messages_are_named(self, collator, messages, match):
        with pytest.raises((InputTypeError, InputError), match=match):
            collator([{"messages": messages}])

    @pytest.mark.parametrize("field", ["prompt", "response"])
    def test_literal_memory_token_in_tokenised_text_is_refused(self, collator, field):
        with pytest.raises(InputError, match=rf"`{field}` contains the memory token '<\|image_pad\|>' literally"):
            collator([{**GOOD, field: "see <|image_pad|> here"}])

    def test_literal_memory_token_in_history_is_rendered(self, collator):
        # History becomes pixels: the string is harmless there, and every memory token is a page's.
        batch = collator([{**GOOD, "history": GOOD["history"] + "<|image_pad|>"}])
        pages = batch["pixel_values"].shape[0]
        assert pages >= 1 and int((batch["input_ids"] == collator.memory_token_id).sum()) == pages * TOKENS_PER_PAGE


class TestSplitChat:
    def test_wrong_roles_still_a_config_error(self):
        with pytest.raises(ConfigError, match="must end with a user turn then an assistant turn"):
            split_chat([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}])


class TestJsonl:
    def test_directory_says_it_is_a_directory(self, tmp_path):
        with pytest.raises(IsADirectoryError, match="is a directory; pass the .jsonl file"):
            load_jsonl_examples(tmp_path)

    def test_missing_file_says_it_does_not_exist(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_jsonl_examples(tmp_path / "none.jsonl")

    def test_not_utf8_is_named(self, tmp_path):
        (tmp_path / "d.jsonl").write_bytes(b'{"history": "\xff"}\n')
        with pytest.raises(InputError, match="is not UTF-8"):
            load_jsonl_examples(tmp_path / "d.jsonl")

    def test_bad_line_is_named_with_file_and_line(self, tmp_path):
        lines = [json.dumps(GOOD), json.dumps({"messages": "just text"})]
        (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(InputTypeError, match=r"d.jsonl:2: `messages` has type str"):
            load_jsonl_examples(tmp_path / "d.jsonl")

    def test_field_of_wrong_type_is_named_with_line(self, tmp_path):
        (tmp_path / "d.jsonl").write_text(json.dumps({**GOOD, "history": 7}) + "\n")
        with pytest.raises(InputTypeError, match=r"d.jsonl:1: `history` has type int"):
            load_jsonl_examples(tmp_path / "d.jsonl")

    def test_path_of_wrong_type(self):
        with pytest.raises(InputTypeError, match="pass the path of a .jsonl file"):
            load_jsonl_examples(None)


class TestSeedPathBatch:
    @pytest.mark.parametrize("field", ["history", "prompt"])
    def test_literal_memory_token_anywhere_is_refused(self, tokenizer, field):
        with pytest.raises(InputError, match=rf"`{field}` contains the memory token"):
            seed_path_batch(tokenizer, [{**GOOD, field: GOOD[field] + " <|image_pad|>"}])

    def test_empty_is_refused(self, tokenizer):
        with pytest.raises(InputError, match="no examples"):
            seed_path_batch(tokenizer, [])
