"""grad_flow on the user's own data: --data FILE.jsonl, --seed-path, many batches.

The data findings (missing_glyphs, history_truncated, no_memory, fewer_batches) are checked
on real files rendered by the real renderer: Chinese history with a Latin-only font (boxes)
against the same rows with the CJK font, and history longer than ``max_pages`` against the
same history with room for it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diagnostics.grad_flow import EXIT_CANNOT_RUN, EXIT_OK, main

LATIN_FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"]
ZH = "我的猫叫小花。我们昨天去了公园，天气很好。" * 120  # 4 pages in the CJK font, 2 in DejaVu (boxes)
ASCII = "We compared notes on the project and fixed a small bug. " * 3

LONG = "My cat is called Mochi. " + "We talked about the weather and the plans for the weekend. " * 8


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _chat(history: str, question: str, answer: str) -> dict:
    turns = [{"role": "user", "content": history}, {"role": "assistant", "content": "ok"}] if history else []
    return {"messages": [*turns, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _by_cause(report: dict) -> dict[str, dict]:
    return {f["cause"]: f for f in report["findings"]}


def test_seed_path_batches_with_and_without_history_are_told_apart(tiny_dir, tmp_path, capsys):
    # Every assistant turn is a sample (as in training): the two long chats give 2 samples each
    # (lines 1, 1, 2, 2), the short ones 1 each (lines 3, 4), so batch 3 holds the two short ones.
    data = _write(tmp_path / "d.jsonl", [_chat(LONG, "Cat?", "Mochi"), _chat(LONG, "Cat?", "Mochi"),
                                         _chat("", "hi", "hello"), _chat("", "hey", "yo")])
    status = main([str(tiny_dir), "--data", str(data), "--seed-path", "--batches", "3", "--json", "-", "--quiet"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert status == EXIT_OK
    zero = [f for f in report["findings"] if f["cause"] == "unused_param"]
    assert zero and zero[0]["severity"] == "warning" and "without history" in zero[0]["message"]
    assert any("proj.0.weight" in p for p in zero[0]["params"])
    assert zero[0]["batches"] == [3]  # 1-based, as the text and progress lines count
    # the share of batches without memory, with the lines of the rows too short to compress
    empty = _by_cause(report)["no_memory"]
    assert empty["severity"] == "warning" and empty["lines"] == [3, 4] and empty["batches_without_memory"] == [3]
    assert empty["file"] == str(data) and empty["line"] == 3
    assert "2 of 6 samples (JSONL lines 3, 4)" in empty["message"] and "1 of 3 batches (batch 3)" in empty["message"]
    assert "context_threshold=64" in empty["message"]
    assert [b["index"] for b in report["batches"]] == [1, 2, 3]
    assert f"WARNING [no_memory] {data}:3" in captured.err and "  batch 3: ok" in captured.err


def test_seed_path_with_history_in_every_batch_is_clean(tiny_dir, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [_chat(LONG, "Cat?", "Mochi")] * 4)
    status = main([str(tiny_dir), "--data", str(data), "--seed-path", "--batches", "2", "--json", "-", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    assert status == EXIT_OK and report["status"] == "ok"
    assert not [f for f in report["findings"] if f["cause"] in ("unused_param", "no_memory")]


def _variant(tiny_dir: Path, target: Path, **config: object) -> Path:
    """A copy of the tiny MEMModel dir with some config.json fields changed (font, max_pages)."""
    shutil.copytree(tiny_dir, target)
    fields = json.loads((target / "config.json").read_text())
    fields.update(config)
    (target / "config.json").write_text(json.dumps(fields))
    return target


def _fast_rows() -> list[dict]:
    return [{"history": ZH, "prompt": "我的猫叫什么？", "response": "小花"},
            {"history": ASCII, "prompt": "What did we fix?", "response": "a bug"}]


def test_renderer_problems_are_findings_with_jsonl_lines(tiny_dir, tmp_path, capsys):
    font = next((f for f in LATIN_FONTS if Path(f).is_file()), None)
    if font is None:
        pytest.skip("no DejaVu Sans (a Latin-only font) on this system")
    model_dir = _variant(tiny_dir, tmp_path / "latin", font_path=font, max_pages=1)
    zh, ascii_row = _fast_rows()
    empty = {"history": "", "prompt": "hi", "response": "hello"}
    path = tmp_path / "d.jsonl"  # line 2 is blank: line numbers are the file's, not the row index
    path.write_text("\n".join([json.dumps(zh), "", json.dumps(ascii_row), json.dumps(empty), json.dumps(empty)]) + "\n",
                    encoding="utf-8")
    status = main([str(model_dir), "--data", str(path), "--batches", "3", "--json", "-", "--quiet"])
    captured = capsys.readouterr()
    report, text = json.loads(captured.out), captured.err
    assert status == EXIT_OK and report["status"] == "ok"  # data problems warn; exit 1 stays for gradient errors
    found = _by_cause(report)
    boxes = found["missing_glyphs"]
    assert boxes["severity"] == "warning" and boxes["lines"] == [1] and boxes["batches"] == [1]
    assert boxes["characters"] > 100 and "empty boxes" in boxes["message"] and font in boxes["message"]
    assert "wqy-microhei" in boxes["message"]  # the renderer's fix: a CJK font
    cut = found["history_truncated"]
    assert cut["lines"] == [1] and cut["pages_needed"] == [2] and "max_pages=1" in cut["message"]
    assert found["no_memory"]["lines"] == [4, 5] and found["no_memory"]["batches_without_memory"] == [2]
    fewer = found["fewer_batches"]
    assert fewer["batches_asked"] == 3 and fewer["batches_built"] == 2 and "holds 4 rows" in fewer["message"]
    assert found["unused_param"]["batches"] == [2]  # the engine's view of the batch without memory
    # the same findings in the human text, and the header says there is something to read
    assert "status: OK (5 warnings below)" in text
    for cause, where in [("missing_glyphs", f"{path}:1"), ("history_truncated", f"{path}:1"),
                         ("no_memory", f"{path}:4"), ("fewer_batches", str(path))]:
        assert f"WARNING [{cause}] {where}" in text
    assert [b["index"] for b in report["batches"]] == [1, 2] and "  batch 2: ok" in text


def test_the_same_rows_with_a_cjk_font_and_room_for_the_pages_are_clean(tiny_dir, tmp_path, capsys):
    path = _write(tmp_path / "d.jsonl", _fast_rows())
    status = main([str(tiny_dir), "--data", str(path), "--batches", "1", "--json", "-", "--quiet"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert status == EXIT_OK and report["findings"] == [] and report["warnings"] == []
    assert "Findings: none" in captured.err and "warning" not in captured.err.lower()


def test_fast_path_data_rows_in_history_prompt_response_form(tiny_dir, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [{"history": LONG, "prompt": "Cat?", "response": "Mochi"}] * 2)
    assert main([str(tiny_dir), "--data", str(data), "--quiet"]) == EXIT_OK


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_bad_data_line_exits_2_naming_the_line(tiny_dir, tmp_path, capsys, content):
    data = tmp_path / "bad.jsonl"
    data.write_text(content + "\n", encoding="utf-8")
    assert main([str(tiny_dir), "--data", str(data), "--quiet"]) == EXIT_CANNOT_RUN
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_missing_data_file_exits_2(tiny_dir, tmp_path, capsys):
    assert main([str(tiny_dir), "--data", str(tmp_path / "none.jsonl"), "--quiet"]) == EXIT_CANNOT_RUN
    assert "none.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"PAR1\x15\x04\x15\xe0\xff\x00binary", "is not UTF-8 text"),  # a Parquet file
        (b"name,history,answer\nLuna,hi,ok\n", "d.data:1: not valid JSON"),  # CSV
        (b'{"text": "hello"}\n{"text": "again"}\n', "d.data:1 is missing ['history', 'prompt', 'response']"),
        (b'{"history": "h", "prompt": "p", "response": "r"}\n{"messages": [{"role": "user", "content": "x"}]}\n',
         "d.data:2: `messages` must end with a user turn"),
        (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n{"history": "h"}\n',
         "d.data:2: no `messages` field"),
        (b'{"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}\n',
         "d.data:1: `conversations[1].from` is 'bot', an unknown role"),
    ],
)
def test_data_in_an_unknown_format_exits_2_naming_file_line_and_format(tiny_dir, tmp_path, capsys, content, reason):
    path = tmp_path / "d.data"
    path.write_bytes(content)
    assert main([str(tiny_dir), "--data", str(path), "--quiet"]) == EXIT_CANNOT_RUN
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0] and '{"messages": [...]}' in err[0]


# ---------------------------------------------------------------- chats, as ocrmem.train reads them


def _turns(*pairs: tuple[str, str], key: str = "messages") -> dict:
    role, text = ("role", "content") if key == "messages" else ("from", "value")
    return {key: [{role: r, text: t} for r, t in pairs]}


def test_chat_files_are_batched_as_training_batches_them(tiny_dir, tmp_path):
    """The diagnosed batches are ChatCollator's batches of the trainer's reader's samples, bit for bit,
    for both chat formats and list-of-parts content (which the old row reader refused)."""
    from diagnostics import mem_adapter
    from ocrmem.chat_data import ChatCollator, chat_samples, read_chats

    parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                          {"role": "user", "content": LONG}, {"role": "assistant", "content": "Noted."},
                          {"role": "user", "content": "Cat?"}, {"role": "assistant", "content": "Mochi"}]}
    share = _turns(("human", LONG), ("gpt", "Noted."), ("human", "Cat?"), ("gpt", "Mochi"), key="conversations")
    for rows in ([parts, parts], [share, share]):
        path = _write(tmp_path / "chats.jsonl", rows)
        loaded = mem_adapter.load_model_dir(tiny_dir, data=path, n_batches=2, batch_size=2)
        samples = chat_samples(read_chats(path).chats)
        assert len(samples) == 4
        collate = ChatCollator.for_model(loaded.model)
        expected = [collate(samples[:2]), collate(samples[2:])]
        assert len(loaded.batches) == 2
        for got, want in zip(loaded.batches, expected):
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), key
        assert expected[0]["pixel_values"].shape[0] > 0  # the long history really became pages
        scan = mem_adapter.LAST_DATA_SCAN
        assert [r.line for r in scan.rows] == [1, 1, 2, 2] and scan.chats


def test_chat_samples_with_short_context_are_named_and_long_ones_are_not(tiny_dir, tmp_path, capsys):
    short = _turns(("user", "hi"), ("assistant", "hello"))
    long = _turns(("user", LONG), ("assistant", "Noted."), ("user", "Cat?"), ("assistant", "Mochi"))
    path = _write(tmp_path / "mixed.jsonl", [long, short, short])
    assert main([str(tiny_dir), "--data", str(path), "--batches", "2", "--json", "-", "--quiet"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    empty = _by_cause(report)["no_memory"]
    assert empty["lines"] == [2, 3] and empty["batches_without_memory"] == [2]
    assert "2 of 4 samples (JSONL lines 2, 3)" in empty["message"]
    assert "context_threshold=64" in empty["message"] and "stays text" in empty["message"]

    path = _write(tmp_path / "long.jsonl", [long, long])
    assert main([str(tiny_dir), "--data", str(path), "--batches", "2", "--json", "-", "--quiet"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "ok" and "no_memory" not in _by_cause(report)


def test_a_bad_chat_line_exits_2_with_the_trainers_own_message(tiny_dir, tmp_path, capsys):
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": "x"}]},
                          {"role": "assistant", "content": "ok"}]}
    path = _write(tmp_path / "bad.jsonl", [_turns(("user", "a"), ("assistant", "b")), image])
    assert main([str(tiny_dir), "--data", str(path), "--quiet"]) == EXIT_CANNOT_RUN
    err = capsys.readouterr().err
    assert f"{path}:2" in err and "`messages[0].content`[1].type is 'image_url'" in err


def test_seed_path_on_chats_needs_user_then_assistant(tiny_dir, tmp_path, capsys):
    path = _write(tmp_path / "d.jsonl", [_turns(("user", LONG), ("assistant", "a"), ("assistant", "b"))])
    assert main([str(tiny_dir), "--data", str(path), "--seed-path", "--quiet"]) == EXIT_CANNOT_RUN
    assert "line 1: an assistant turn follows assistant" in capsys.readouterr().err
    path = _write(tmp_path / "ok.jsonl", [_turns(("user", LONG), ("assistant", "a"), ("user", "q"), ("assistant", "b"))])
    assert main([str(tiny_dir), "--data", str(path), "--seed-path", "--quiet"]) == EXIT_OK
