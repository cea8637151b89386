"""ocrmem.chat_data: JSONL chats -> per-assistant-turn samples, label masks, seed-path split, data summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ocrmem.chat_data import (
    ChatCollator,
    chat_samples,
    format_summary,
    parse_chat,
    read_chats,
    split_rows,
    summarize,
)
from ocrmem.data import format_turn
from ocrmem.errors import ChatDataError
from ocrmem.modeling import IGNORE_INDEX

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # no CJK glyphs
LONG_EN = "We talked about the weather, the train that was late and the plans for the weekend. " * 4
LONG_ZH = "我们聊了天气、晚点的火车和周末的计划。" * 6


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def msgs(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = msgs(("user", "hi"), ("assistant", "hello"))


class TestParse:
    def test_messages_with_string_and_text_parts(self):
        row = {"messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ], "id": 7}
        assert parse_chat(row, "f:1") == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]

    def test_sharegpt_roles_are_mapped(self):
        row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
        assert [t["role"] for t in parse_chat(row, "f:1")] == ["system", "user", "assistant"]

    @pytest.mark.parametrize(
        ("line", "field"),
        [
            ("{not json", "not valid JSON"),
            ("[1, 2]", "expected a JSON object"),
            (json.dumps({"text": "hi"}), "no `messages` field"),
            (json.dumps({"messages": "hi"}), "`messages` is a str"),
            (json.dumps({"messages": ["hi"]}), "`messages[0]` is a str"),
            (json.dumps({"messages": [{"content": "hi"}]}), "`messages[0].role` is missing"),
            (json.dumps(msgs(("user", "hi"), ("tool", "x"))), "`messages[1].role` is 'tool', an unknown role"),
            (json.dumps({"messages": [{"role": "user"}]}), "`messages[0].content` is missing"),
            (json.dumps(msgs(("user", None), ("assistant", "a"))), "`messages[0].content` is null"),
            (json.dumps(msgs(("user", 42), ("assistant", "a"))), "`messages[0].content` is a int"),
            (json.dumps(msgs(("user", {"text": "hi"}), ("assistant", "a"))), "`messages[0].content` is a dict"),
            (json.dumps(msgs(("user", [{"type": "image_url", "image_url": {"url": "x"}}]), ("assistant", "a"))),
             "`messages[0].content`[0].type is 'image_url'"),
            (json.dumps(msgs(("user", [{"type": "text", "text": None}]), ("assistant", "a"))), "`messages[0].content`[0].text is NoneType"),
            (json.dumps(msgs(("user", ["hi"]), ("assistant", "a"))), "`messages[0].content`[0] is a str"),
            (json.dumps(msgs(("user", "hi"), ("user", "again"))), "no assistant turn"),
            (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}),
             "`conversations[1].from` is 'bot', an unknown role"),
            (json.dumps({"conversations": [{"from": "human"}]}), "`conversations[0].value` is missing"),
            (json.dumps({**GOOD, "conversations": []}), "both `messages` and `conversations`"),
            (json.dumps(msgs(("user", "see <|image_pad|>"), ("assistant", "a"))), "`messages[0].content` contains the special token '<|image_pad|>'"),
            (json.dumps(msgs(("user", "q"), ("assistant", "a<|im_end|>"))), "`messages[1].content` contains the special token '<|im_end|>'"),
        ],
    )
    def test_bad_line_names_file_line_and_field(self, tmp_path, line, field):
        path = write_jsonl(tmp_path / "chats.jsonl", [GOOD, "", line])  # a blank line still counts as a line
        with pytest.raises(ChatDataError) as err:
            read_chats(path)
        message = str(err.value)
        assert f"{path}:3" in message
        assert field in message

    def test_no_python_repr_reaches_the_text(self, tmp_path):
        # A dict content must be refused, not str()-ed into "{'text': 'hi'}" and trained on.
        path = write_jsonl(tmp_path / "c.jsonl", [msgs(("user", {"text": "hi"}), ("assistant", "a"))])
        with pytest.raises(ChatDataError, match="dict"):
            read_chats(path)

    def test_skip_bad_lines_counts_and_names_them(self, tmp_path):
        bad = [json.dumps(msgs(("user", None), ("assistant", "a"))), "{oops", json.dumps({"messages": []})]
        path = write_jsonl(tmp_path / "c.jsonl", [GOOD, bad[0], GOOD, bad[1], bad[2], GOOD])
        chats = read_chats(path, skip_bad_lines=True)
        assert len(chats.chats) == 3 and chats.lines == [1, 3, 6]
        assert [n for n, _ in chats.skipped] == [2, 4, 5]
        message = chats.skipped_message()
        assert "skipped 3 bad line(s)" in message and "lines 2, 4, 5" in message and f"{path}:2" in message

    def test_only_bad_lines_is_an_error_even_when_skipping(self, tmp_path):
        path = write_jsonl(tmp_path / "c.jsonl", ["{oops"])
        with pytest.raises(ChatDataError, match="no chat to train on"):
            read_chats(path, skip_bad_lines=True)

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="nope.jsonl"):
            read_chats(tmp_path / "nope.jsonl")


class TestSamples:
    def test_every_assistant_turn_is_one_sample(self):
        turns = parse_chat(msgs(("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")), "f:1")
        samples = chat_samples([turns])
        assert [s["reply"] for s in samples] == ["a1", "a2"]
        assert [len(s["context"]) for s in samples] == [2, 4]
        assert samples[1]["context"][-1] == {"role": "user", "content": "u2"}

    def test_split_rows_holds_out_whole_chats(self):
        chats = [[{"role": "assistant", "content": str(i)}] for i in range(20)]
        train, held = split_rows(chats, 0.2, seed=3)
        assert len(held) == 4 and len(train) == 16
        assert {c[0]["content"] for c in train}.isdisjoint({c[0]["content"] for c in held})
        assert split_rows(chats, 0.2, seed=3) == (train, held)  # seeded
        assert split_rows(chats, 0.0, seed=3) == (chats, [])


class TestCollator:
    def rows(self, batch, tokenizer):
        out = []
        for b in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][b].bool()
            ids, labels = batch["input_ids"][b][keep], batch["labels"][b][keep]
            out.append((ids, labels, tokenizer.decode(labels[labels != IGNORE_INDEX])))
        return out

    def test_labels_are_the_reply_and_its_end_of_turn_only(self, tiny_model):
        collator = ChatCollator.for_model(tiny_model)
        short = [{"role": "user", "content": "hi"}]
        long = [{"role": "user", "content": LONG_EN}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
        batch = collator([{"context": short, "reply": "Hello there!"}, {"context": long, "reply": "Luna"}])
        (ids0, _, reply0), (ids1, _, reply1) = self.rows(batch, tiny_model.tokenizer)
        assert reply0 == "Hello there!<|im_end|>" and reply1 == "Luna<|im_end|>"
        # short context: no pages, the context stays text; long: pages, then only the marker as text
        mem = tiny_model.memory_token_id
        assert int((ids0 == mem).sum()) == 0
        assert tiny_model.tokenizer.decode(ids0) == format_turn("user", "hi") + "<|im_start|>assistant\nHello there!<|im_end|>"
        n_pages = batch["pixel_values"].shape[0]
        assert n_pages >= 1 and int((ids1 == mem).sum()) == n_pages * tiny_model.tokens_per_page
        assert tiny_model.tokenizer.decode(ids1[ids1 != mem]) == "<|im_start|>assistant\nLuna<|im_end|>"

    def test_split_equals_the_seed_path(self, tiny_model):
        """The fast path lays a sample out exactly as MEMModel.compress_history does for the same chat."""
        tok = tiny_model.tokenizer
        context = [{"role": "system", "content": "s"}, {"role": "user", "content": LONG_ZH}, {"role": "assistant", "content": "好"},
                   {"role": "user", "content": "我的猫叫什么？"}]
        batch = ChatCollator.for_model(tiny_model)([{"context": context, "reply": "团子"}])
        text = "".join(format_turn(t["role"], t["content"]) for t in context) + "<|im_start|>assistant\n团子<|im_end|>"
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        seed = tiny_model.compress_history(ids, labels=ids)
        assert torch.equal(seed["input_ids"], batch["input_ids"])
        assert torch.equal(seed["pixel_values"], batch["pixel_values"])
        reply = batch["labels"] != IGNORE_INDEX
        assert torch.equal(seed["labels"][reply], batch["labels"][reply])

    def test_context_at_threshold_stays_text(self, tiny_model):
        collator = ChatCollator.for_model(tiny_model)
        threshold = tiny_model.config.context_threshold
        grow = ""
        # Find the longest user text whose context is at most the threshold: it must stay text.
        for n in range(1, 200):
            context = [{"role": "user", "content": "a " * n}]
            length = len(collator.tokens.encode(format_turn("user", "a " * n)))
            if length > threshold:
                break
            grow = "a " * n
        short = collator([{"context": [{"role": "user", "content": grow}], "reply": "x"}])
        longer = collator([{"context": context, "reply": "x"}])
        assert short["pixel_values"].shape[0] == 0 and longer["pixel_values"].shape[0] >= 1

    def test_turnwise_tokens_equal_whole_text_tokens(self, tiny_model):
        collator = ChatCollator.for_model(tiny_model)
        turns = [{"role": "system", "content": "Be nice.\n"}, {"role": "user", "content": " spaced  out \n\n你好"},
                 {"role": "assistant", "content": "\nok"}]
        whole = collator.tokens.encode("".join(format_turn(t["role"], t["content"]) for t in turns))
        assert [i for ids in collator.tokens.turn_ids(turns) for i in ids] == whole

    def test_pickles_for_dataloader_workers(self, tiny_model):
        import pickle

        collator = ChatCollator.for_model(tiny_model)
        sample = {"context": [{"role": "user", "content": LONG_EN}], "reply": "x"}
        clone = pickle.loads(pickle.dumps(collator))
        assert torch.equal(clone([sample])["pixel_values"], collator([sample])["pixel_values"])


class TestSummary:
    def summary(self, model, chats, font=None, max_pages=None, max_positions=10_000):
        collator = ChatCollator.for_model(model)
        if font is not None:
            collator = ChatCollator(model.tokenizer, page_size=model.page_size, tokens_per_page=model.tokens_per_page,
                                    font_path=font, context_threshold=model.config.context_threshold)
        return summarize([], chats, collator.tokens, collator.renderer, max_pages=max_pages or model.config.max_pages,
                         tokens_per_page=model.tokens_per_page, max_positions=max_positions), collator

    def chats(self):
        return [
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],  # short: text
            [{"role": "user", "content": LONG_EN * 6}, {"role": "assistant", "content": "a"},  # long: 2+ pages
             {"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        ]

    def test_numbers_match_what_the_collator_builds(self, tiny_model):
        chats = self.chats()
        summary, collator = self.summary(tiny_model, chats)
        samples = chat_samples(chats)
        pages = [collator([s])["pixel_values"].shape[0] for s in samples]
        lengths = [collator([s])["input_ids"].shape[1] for s in samples]
        assert summary["rows"] == 2 and summary["samples"] == 3
        assert summary["samples_with_compressed_history"] == sum(p > 0 for p in pages) == 2
        assert summary["compressed_history_share"] == pytest.approx(2 / 3)
        assert summary["pages_per_sample"] == {"min": min(pages), "median": float(sorted(pages)[1]), "max": max(pages)}
        assert summary["tokens_per_sample"]["max"] == max(lengths) and summary["tokens_per_sample"]["min"] == min(lengths)
        assert summary["chars_dropped_by_max_pages"] == 0 and summary["glyphs"]["missing_chars"] == 0
        text = format_summary("train", summary)
        assert "2 rows -> 3 samples" in text and "66.7%" in text

    def test_max_pages_drops_the_oldest_characters(self, tiny_model):
        chats = self.chats()
        full, _ = self.summary(tiny_model, chats)
        assert full["pages_per_sample"]["max"] >= 2  # the long history needs several pages
        cut, collator = self.summary(tiny_model, chats, max_pages=1)
        assert cut["pages_per_sample"]["max"] == 1 and cut["samples_cut_by_max_pages"] == 2
        expected = 0
        for k in (1, 3):  # the two samples of the long chat
            context_ids = [i for ids in collator.tokens.turn_ids(chats[1][:k]) for i in ids]
            history = collator.tokenizer.decode(collator.tokens.split(context_ids)[0], skip_special_tokens=False)
            expected += collator.renderer.text_stats(history, 1).dropped_chars
        assert expected > 0 and cut["chars_dropped_by_max_pages"] == expected

    def test_samples_longer_than_the_llm_positions_are_counted(self, tiny_model):
        chats = self.chats()
        collator = ChatCollator.for_model(tiny_model)
        lengths = sorted(collator([s])["input_ids"].shape[1] for s in chat_samples(chats))
        summary, _ = self.summary(tiny_model, chats, max_positions=lengths[0])
        assert summary["samples_longer_than_max_positions"] == sum(n > lengths[0] for n in lengths) >= 1
        summary, _ = self.summary(tiny_model, chats, max_positions=lengths[-1])
        assert summary["samples_longer_than_max_positions"] == 0

    def test_missing_glyphs_are_counted_with_a_latin_font(self, tiny_model):
        if not Path(DEJAVU).is_file():
            pytest.skip("DejaVuSans is not installed")
        chats = [[{"role": "user", "content": LONG_ZH}, {"role": "assistant", "content": "好"}]]
        summary, _ = self.summary(tiny_model, chats, font=DEJAVU)
        cjk = [ch for ch in LONG_ZH if ord(ch) >= 0x3000]  # ideographs and CJK punctuation (、。): none in DejaVu
        assert summary["glyphs"]["missing_chars"] == len(cjk)
        assert summary["glyphs"]["missing_distinct"] == len(set(cjk))
        cjk, _ = self.summary(tiny_model, chats)  # the default font covers CJK
        assert cjk["glyphs"]["missing_chars"] == 0
