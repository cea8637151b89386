"""``python -m ocrmem.train``: arguments, exit codes, and what a run leaves in OUTPUT_DIR (in-process)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ocrmem import MEMModel
from ocrmem.train import EXIT_OK, EXIT_STOPPED, EXIT_USAGE, main

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
        ],
    )
    def test_bad_arguments_exit_2_with_a_message(self, tmp_path, capsys, argv, message):
        full = argv if not argv else ["--output-dir", str(tmp_path / "out"), *argv]
        assert main(full) == EXIT_USAGE
        assert message in capsys.readouterr().err

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
        assert "trained 8 steps" in capsys.readouterr().err

    def test_diverging_run_exits_1_with_the_finding(self, tmp_path, capsys):
        # Adam moves every weight by ~lr per step: 1e30 overflows the activations at step 2.
        code = main(["--output-dir", str(tmp_path), "--max-steps", "4", "--learning-rate", "1e30",
                     "--save-steps", "0", "--logging-steps", "1", *TINY_RUN])
        assert code == EXIT_STOPPED
        err = capsys.readouterr().err
        assert "nan_loss" in err and "lower the learning rate" in err
        assert not (tmp_path / "model.safetensors").exists()  # the diverged adapter is not saved
        assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 1
