"""grad_flow on the user's own data: --data FILE.jsonl, --seed-path, many batches."""

from __future__ import annotations

import json

import pytest

from diagnostics.grad_flow import EXIT_CANNOT_RUN, EXIT_OK, main

LONG = "My cat is called Mochi. " + "We talked about the weather and the plans for the weekend. " * 8


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _chat(history: str, question: str, answer: str) -> dict:
    turns = [{"role": "user", "content": history}, {"role": "assistant", "content": "ok"}] if history else []
    return {"messages": [*turns, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_seed_path_batches_with_and_without_history_are_told_apart(tiny_dir, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [_chat(LONG, "Cat?", "Mochi"), _chat(LONG, "Cat?", "Mochi"),
                                         _chat("", "hi", "hello"), _chat("", "hey", "yo")])
    status = main([str(tiny_dir), "--data", str(data), "--seed-path", "--batches", "2", "--json", "-", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    assert status == EXIT_OK
    zero = [f for f in report["findings"] if f["cause"] == "unused_param"]
    assert zero and zero[0]["severity"] == "warning" and "without history" in zero[0]["message"]
    assert any("proj.0.weight" in p for p in zero[0]["params"])


def test_seed_path_with_history_in_every_batch_is_clean(tiny_dir, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [_chat(LONG, "Cat?", "Mochi")] * 4)
    status = main([str(tiny_dir), "--data", str(data), "--seed-path", "--batches", "2", "--json", "-", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    assert status == EXIT_OK and report["status"] == "ok"
    assert not [f for f in report["findings"] if f["cause"] == "unused_param"]


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
