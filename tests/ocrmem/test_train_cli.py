"""``python -m ocrmem.train``: arguments, exit codes, and what a run leaves in OUTPUT_DIR (in-process)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ocrmem import MEMModel
from ocrmem.checkpointing import LOCK_NAME
from ocrmem.train import EXIT_OK, EXIT_STOPPED, EXIT_USAGE, main
from tests.ocrmem.test_checkpointing import lock_held_by_child, snapshot

TINY_RUN = ["--num-examples", "16", "--batch-size", "2"]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """One 6-step CLI run on the tiny preset, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["--output-dir", str(out), "--max-steps", "6", "--save-steps", "3", "--logging-steps", "2", *TINY_RUN])
    assert code == EXIT_OK
    return out


class TestArguments:
    def test_help_teaches_with_an_example(self, capsys):
        assert main(["--help"]) == EXIT_OK
        text = capsys.readouterr().out
        for expected in ("--output-dir", "--max-steps", "examples:", "torchrun --nproc_per_node 2", "--deepspeed", "exit status"):
            assert expected in text

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            ([], "--output-dir"),
            (["--max-steps", "0"], "--max-steps must be at least 1"),
            (["--empty-history-fraction", "1.5"], "--empty-history-fraction"),
            (["--model-dir", "/no/such/model"], "/no/such/model"),
            (["--deepspeed", "/no/such/ds.json"], "/no/such/ds.json"),
            (["--resume-from-checkpoint", "/no/such/checkpoint-3"], "not a checkpoint dir"),
            (["--report-to", "tensorboard"], "invalid choice"),
            (["--max-steps", "ten"], "invalid int value: 'ten'"),
            (["--learning-rate", "inf"], "--learning-rate must be a finite number > 0, got inf"),
            (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan"),
            (["--seed", "-1"], "--seed must be within [0, 2**32 - 1]"),
            (["--save-steps", "-5"], "--save-steps must be >= 0, got -5"),
            (["--reader-pretrain-steps", "-1"], "--reader-pretrain-steps must be >= 0, got -1"),
            (["--filler-turns", "-2"], "--filler-turns must be >= 0, got -2"),
            (["--resume-partial"], "--resume-partial needs --resume-from-checkpoint"),
            (["--resume-from-checkpoint", str(Path(__file__))], "not a checkpoint dir (a file)"),
            (["--deepspeed", str(Path(__file__).parent)], "a directory, not a file"),
            (["--model-dir", str(Path(__file__))], "no config.json there"),
        ],
    )
    def test_bad_arguments_exit_2_with_a_message(self, tmp_path, capsys, argv, message):
        full = argv if not argv else ["--output-dir", str(tmp_path / "out"), *argv]
        assert main(full) == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1

    @pytest.mark.parametrize("argv_output", ["file", "empty"])
    def test_output_dir_that_is_a_file_or_empty_exits_2(self, tmp_path, capsys, argv_output):
        target = tmp_path / "a-file"
        target.write_text("not a dir")
        assert main(["--output-dir", str(target) if argv_output == "file" else ""]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert ("is a file, not a directory" if argv_output == "file" else "--output-dir is empty") in err
        assert target.read_text() == "not a dir"

    @pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
    def test_wandb_without_wandb_names_the_install(self, tmp_path, capsys):
        assert main(["--output-dir", str(tmp_path), "--report-to", "wandb"]) == EXIT_USAGE
        assert "pip install wandb" in capsys.readouterr().err

    @pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
    def test_unwritable_output_dir_exits_2(self, tmp_path, capsys):
        tmp_path.chmod(0o500)
        try:
            assert main(["--output-dir", str(tmp_path / "out")]) == EXIT_USAGE
        finally:
            tmp_path.chmod(0o700)
        assert str(tmp_path / "out") in capsys.readouterr().err


class TestRun:
    def test_writes_state_curve_and_a_loadable_adapter(self, trained_dir):
        state = json.loads((trained_dir / "trainer_state.json").read_text())
        logged = [h for h in state["log_history"] if "loss" in h]
        assert [h["step"] for h in logged] == [1, 2, 4, 6]  # logging_first_step + every 2 steps
        assert all("proj_grad_norm" in h for h in logged)
        assert (trained_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        config = json.loads((trained_dir / "config.json").read_text())
        assert Path(config["base_model_name"]).is_absolute() and Path(config["ocr_model_name"]).is_absolute()
        model = MEMModel.from_pretrained(trained_dir)  # loads from the output dir as is
        saved = load_file(str(trained_dir / "model.safetensors"))
        assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
        for name, value in model.trainable_state_dict().items():
            assert torch.equal(value, saved[name])

    def test_checkpoints_load_and_match_the_final_adapter(self, trained_dir):
        assert sorted(p.name for p in trained_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    def test_the_auto_written_preset_has_a_pretrained_reader(self, trained_dir):
        from ocrmem.train import READER_PRETRAIN_STEPS

        record = json.loads((trained_dir / "model_init" / "llm" / "reader_pretraining.json").read_text())
        assert record["steps"] == READER_PRETRAIN_STEPS > 0
        assert record["last_loss"] < record["first_loss"] / 10  # it learnt the slot-reading task
        model = MEMModel.from_pretrained(trained_dir / "checkpoint-6")
        final = load_file(str(trained_dir / "model.safetensors"))
        for name, value in model.trainable_state_dict().items():
            assert torch.equal(value, final[name])

    def test_resume_last_continues_from_the_newest_checkpoint(self, trained_dir, capsys):
        code = main(["--output-dir", str(trained_dir), "--max-steps", "8", "--save-steps", "0",
                     "--logging-steps", "2", "--resume-from-checkpoint", "last", *TINY_RUN])
        assert code == EXIT_OK
        state = json.loads((trained_dir / "trainer_state.json").read_text())
        assert state["global_step"] == 8
        err = capsys.readouterr().err
        assert "trained 2 steps (resumed at step 6, now at 8)" in err  # this run's steps
        # the loss change covers this run's first and last step, logged or not: logging every 2
        # steps logs only step 8, HF's mean over steps 7 and 8, i.e. the mean of the two printed
        logged = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
        change = re.search(r"loss (\d+\.\d{4}) \(step 7\) -> (\d+\.\d{4}) \(step 8\)", err)
        assert change, err
        assert (float(change.group(1)) + float(change.group(2))) / 2 == pytest.approx(logged[8], abs=1e-4)

    def test_resume_refuses_a_corrupt_checkpoint_naming_the_intact_one(self, trained_dir, tmp_path, capsys):
        run = tmp_path / "run"
        shutil.copytree(trained_dir, run, ignore=shutil.ignore_patterns("model_init"))
        (run / "checkpoint-6" / "rng_state.pth").write_bytes(b"garbage")
        before = snapshot(run)
        code = main(["--output-dir", str(run), "--model-dir", str(trained_dir / "model_init"), "--max-steps", "9",
                     "--resume-from-checkpoint", "last", *TINY_RUN])
        assert code == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"{run / 'checkpoint-6' / 'rng_state.pth'} is corrupt" in err and f"from {run / 'checkpoint-3'} instead" in err
        assert "Traceback" not in err and "will likely succeed" not in err
        assert snapshot(run) == before

    def test_resume_from_the_output_dir_is_refused_unless_partial(self, trained_dir, tmp_path, capsys, caplog):
        run = tmp_path / "run"
        shutil.copytree(trained_dir, run, ignore=shutil.ignore_patterns("model_init", "checkpoint-3"))
        argv = ["--output-dir", str(run), "--model-dir", str(trained_dir / "model_init"), "--max-steps", "10",
                "--save-steps", "0", "--logging-steps", "1", "--resume-from-checkpoint", str(run), *TINY_RUN]
        assert main(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "final output dir, not a checkpoint" in err and f"Resume from {run / 'checkpoint-6'} instead" in err
        with caplog.at_level(logging.WARNING, logger="ocrmem"):  # the CLI's log handler is pytest's here
            assert main([*argv, "--resume-partial"]) == EXIT_OK
        # this run's steps (the dir's state is at step 6, or 8 after the resume test ran on the shared fixture)
        found = re.search(r"trained (\d+) steps \(resumed at step (\d+), now at 10\)", capsys.readouterr().err)
        assert found and int(found[1]) + int(found[2]) == 10 and int(found[2]) in (6, 8)
        assert any("restarting the optimizer state" in r.getMessage() for r in caplog.records)

    @pytest.mark.parametrize("max_steps", ["6", "4"])
    def test_max_steps_at_or_below_the_checkpoint_exits_0_writing_nothing(self, trained_dir, capsys, max_steps):
        before = snapshot(trained_dir)
        code = main(["--output-dir", str(trained_dir), "--max-steps", max_steps, "--resume-from-checkpoint",
                     str(trained_dir / "checkpoint-6"), *TINY_RUN])
        assert code == EXIT_OK
        assert f"nothing to train: {trained_dir / 'checkpoint-6'} is at step 6 and --max-steps is {max_steps}" in capsys.readouterr().err
        assert snapshot(trained_dir) == before

    def test_output_dir_in_use_by_another_process_exits_2(self, tmp_path, capsys):
        with lock_held_by_child(tmp_path) as pid:
            assert main(["--output-dir", str(tmp_path), "--max-steps", "1", *TINY_RUN]) == EXIT_USAGE
            assert os.listdir(tmp_path) == [LOCK_NAME]  # refused before the tiny preset was written
        err = capsys.readouterr().err
        assert f"is in use by another training (pid {pid} on host" in err and "Traceback" not in err

    def test_diverging_run_exits_1_with_the_finding(self, tmp_path, capsys):
        # Adam moves every weight by ~lr per step: 1e30 overflows the activations at step 2.
        code = main(["--output-dir", str(tmp_path), "--max-steps", "4", "--learning-rate", "1e30",
                     "--save-steps", "0", "--logging-steps", "1", "--reader-pretrain-steps", "0", *TINY_RUN])
        assert code == EXIT_STOPPED
        err = capsys.readouterr().err
        assert "nan_loss" in err and "lower the learning rate" in err
        assert not (tmp_path / "model.safetensors").exists()  # the diverged adapter is not saved
        assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 1


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CHAT_FILES = [str(EXAMPLES / "chats.jsonl"), str(EXAMPLES / "chats_sharegpt.jsonl")]
DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # a Latin font: no CJK glyphs


def chat_run(out: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(out), "--model-dir", str(model_dir), "--save-steps", "0", "--logging-steps", "2",
            "--batch-size", "2", *extra]


class TestChatData:
    def test_trains_on_the_shipped_examples_with_summary_and_memory_gain(self, tmp_path, tiny_dir, capsys):
        out = tmp_path / "run"
        code = main(chat_run(out, tiny_dir, "--train-data", *CHAT_FILES, "--eval-fraction", "0.3",
                             "--max-steps", "4", "--eval-steps", "2"))
        assert code == EXIT_OK
        err = capsys.readouterr().err
        summary = json.loads((out / "data_summary.json").read_text(encoding="utf-8"))
        rows = sum(1 for f in CHAT_FILES for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip())
        assert summary["train"]["rows"] + summary["eval"]["rows"] == rows
        assert summary["eval"]["held_out_from"] == CHAT_FILES
        assert 0 < summary["train"]["compressed_history_share"] < 1  # long and short histories both present
        assert summary["train"]["glyphs"]["missing_chars"] == 0  # the default font covers the Chinese chats
        assert f"{summary['train']['rows']} rows -> {summary['train']['samples']} samples" in err
        evals = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_loss" in h]
        assert [h["step"] for h in evals] == [2, 4]
        for h in evals:
            assert h["eval_memory_gain"] == pytest.approx(h["eval_loss_shuffled_memory"] - h["eval_loss_own_memory"])
            assert h["eval_memory_rows"] >= 2
        assert f"eval_memory_gain {evals[-1]['eval_memory_gain']:+.4f}" in err

    def test_bad_line_exits_2_naming_file_line_and_field(self, tmp_path, tiny_dir, capsys):
        data = tmp_path / "bad.jsonl"
        good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        data.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": None}]}) + "\n")
        assert main(chat_run(tmp_path / "out", tiny_dir, "--train-data", str(data))) == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"{data}:2" in err and "`messages[0].content` is null" in err and "--skip-bad-lines" in err

    def test_missing_glyphs_stop_with_the_count_and_the_fix(self, tmp_path, tiny_dir, capsys):
        if not Path(DEJAVU).is_file():
            pytest.skip("DejaVuSans is not installed")
        argv = chat_run(tmp_path / "out", tiny_dir, "--train-data", CHAT_FILES[0], "--font", DEJAVU, "--max-steps", "2")
        assert main(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        summary = json.loads((tmp_path / "out" / "data_summary.json").read_text(encoding="utf-8"))
        missing = summary["train"]["glyphs"]["missing_chars"] + summary["eval"]["glyphs"]["missing_chars"]
        assert missing > 0 and f"{missing:,} history characters" in err
        assert "fonts-wqy-microhei" in err and "--font" in err and "--allow-missing-glyphs" in err

    def test_allow_missing_glyphs_and_skip_bad_lines_go_on_in_bf16(self, tmp_path, tiny_dir, capsys):
        if not Path(DEJAVU).is_file():
            pytest.skip("DejaVuSans is not installed")
        data = tmp_path / "mixed.jsonl"
        lines = Path(CHAT_FILES[0]).read_text(encoding="utf-8").splitlines()
        data.write_text("\n".join([lines[0], "{oops", *lines[1:4], '{"messages": [{"role": "bot", "content": "x"}]}', *lines[4:]]) + "\n",
                        encoding="utf-8")
        argv = chat_run(tmp_path / "out", tiny_dir, "--train-data", str(data), "--font", DEJAVU, "--allow-missing-glyphs",
                        "--skip-bad-lines", "--bf16", "--max-steps", "2")
        assert main(argv) == EXIT_OK
        err = capsys.readouterr().err
        assert f"skipped 2 bad line(s) of {data} (lines 2, 6)" in err
        args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
        assert args.bf16 is True

    @pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: fp16 is allowed")
    def test_fp16_on_cpu_exits_2_saying_it_needs_a_gpu(self, tmp_path, capsys):
        assert main(["--output-dir", str(tmp_path), "--fp16"]) == EXIT_USAGE
        assert "--fp16 needs a CUDA GPU" in capsys.readouterr().err

    def test_bf16_and_fp16_are_exclusive(self, tmp_path, capsys):
        assert main(["--output-dir", str(tmp_path), "--bf16", "--fp16"]) == EXIT_USAGE
        assert "not allowed with argument" in capsys.readouterr().err
