"""``python -m ocrmem.tiny DIR``: exit 0 with the directory written, 2 with one line otherwise."""

from __future__ import annotations

import json

import pytest

from ocrmem.tiny import EXIT_OK, EXIT_USAGE, main


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--seed", "x", "DIR"], "argument --seed: invalid int value: 'x'"),
        (["--readout", "pixels", "DIR"], "invalid choice: 'pixels'"),
        (["--reader-pretrain-steps", "-1", "DIR"], "--reader-pretrain-steps must be >= 0, got -1"),
        ([], "the following arguments are required: dir"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, reason, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert reason in err[-1]


def test_dir_under_a_file_exits_2_naming_the_file(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main([str(blocker / "tiny")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"`{blocker}` is a file" in err[0] and "give a new or existing directory" in err[0]
    assert blocker.read_text() == "x"  # untouched


@pytest.mark.slow  # writes a whole tiny preset (5-20 s here); the session fixture `tiny_dir` covers write_tiny
def test_writes_a_loadable_dir(tmp_path, capsys):
    target = tmp_path / "nested" / "tiny"
    assert main([str(target), "--seed", "3"]) == EXIT_OK
    captured = capsys.readouterr()
    assert f"writing the tiny MEMModel to {target}/" in captured.err  # the early progress line
    assert f"wrote tiny MEMModel to {target}/" in captured.out
    assert json.loads((target / "config.json").read_text())["model_type"] == "ocrmem"
    assert (target / "llm").is_dir() and (target / "ocr").is_dir()


def test_writing_the_preset_logs_nothing_its_first_load_says_once(tmp_path, caplog):
    """write_tiny builds a MEMModel to save it; the loader's INFO lines belong to the load after."""
    import logging

    from ocrmem import MEMModel
    from ocrmem.tiny import write_tiny

    logger = logging.getLogger("ocrmem.encoder")
    before = logger.level
    with caplog.at_level(logging.INFO, logger="ocrmem.encoder"):
        write_tiny(tmp_path / "tiny")
        assert [r for r in caplog.records if r.name == "ocrmem.encoder"] == []
        assert logger.level == logging.INFO  # restored to what it was around the call
        MEMModel.from_pretrained(tmp_path / "tiny")
        loads = [r.getMessage() for r in caplog.records if r.name == "ocrmem.encoder"]
    assert sum("Not loading 6 key(s)" in m for m in loads) == 1 and any("read-out" in m for m in loads)
    assert logger.level == before
