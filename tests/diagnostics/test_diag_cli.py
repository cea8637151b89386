"""python -m diagnostics.grad_flow: exit codes, --factory, --json, --graph."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import zoo
from diagnostics.grad_flow import EXIT_CANNOT_RUN, EXIT_FINDINGS, EXIT_OK, main
from diag_helpers import line_of

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FACTORIES = HERE / "diag_factories.py"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diagnostics.grad_flow", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=180,
    )


class TestMainInProcess:
    def test_exit_0_healthy(self, capsys) -> None:
        assert main([f"--factory={FACTORIES}:healthy", "--quiet"]) == EXIT_OK
        assert "trainable params: 1,600 || all params:" in capsys.readouterr().out

    def test_exit_1_with_json_to_stdout(self, capsys) -> None:
        assert main([f"--factory={FACTORIES}:proj_under_no_grad", "--json", "-", "--quiet"]) == EXIT_FINDINGS
        captured = capsys.readouterr()
        data = json.loads(captured.out)
        assert data["version"] == 2 and data["status"] == "error"
        finding = data["findings"][0]
        assert finding["cause"] == "grad_disabled"
        assert finding["line"] == line_of(zoo.ProjUnderNoGrad.embed_history, "with torch.no_grad()")
        assert "Gradient-flow report" in captured.err  # human text moves to stderr

    def test_freeze_watch_points_at_the_loop(self, capsys, tmp_path) -> None:
        out = tmp_path / "r.json"
        assert main([f"--factory={FACTORIES}:blanket_freeze", "--json", str(out), "--quiet"]) == EXIT_FINDINGS
        data = json.loads(out.read_text())
        finding = next(f for f in data["findings"] if f["cause"] == "not_trainable" and f["params"])
        assert finding["line"] == line_of(zoo.BlanketFreeze.__init__, "requires_grad = False")

    @pytest.mark.parametrize(
        "argv, reason",
        [
            ([f"--factory={FACTORIES}:missing"], "has no function"),
            ([f"--factory={FACTORIES}:not_a_dict"], "must return a dict"),
            (["--factory=nope.py:f"], "does not exist"),
            (["--factory=no_colon"], "FILE.py:FUNC"),
            (["/does/not/exist"], "does not exist"),
            ([f"--factory={FACTORIES}:shape_mismatch"], "could not run"),
        ],
    )
    def test_exit_2_with_one_line_reason(self, argv, reason, capsys) -> None:
        assert main([*argv, "--quiet"]) == EXIT_CANNOT_RUN
        err = capsys.readouterr().err.strip().splitlines()
        assert reason in err[-1]

    def test_a_stock_transformers_dir_is_pointed_at_factory(self, tmp_path, capsys) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=32)
        LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
        capsys.readouterr()  # transformers' own progress bar
        assert main([str(tmp_path / "llama"), "--quiet"]) == EXIT_CANNOT_RUN
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds a 'llama' model, not a MEMModel" in err[0] and "--factory" in err[0]

    def test_a_memmodel_dir_passes_the_model_type_check(self, tiny_dir) -> None:
        from diagnostics.paths import check_model_dir

        check_model_dir(tiny_dir)  # raises CannotRunError otherwise

    @pytest.mark.parametrize(
        "device, reason",
        [
            ("gpu9", "--device `gpu9` is not a device name"),
            ("cuda:7", "--device `cuda:7` is not usable here"),
            ("meta:x", "--device `meta:x` is not a device name"),
        ],
    )
    def test_bad_device_exits_2_with_the_fix(self, device, reason, capsys) -> None:
        assert main([f"--factory={FACTORIES}:healthy", "--device", device, "--quiet"]) == EXIT_CANNOT_RUN
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0] and "cpu" in err[0]

    @pytest.mark.parametrize("option", ["--json", "--graph"])
    def test_unwritable_output_path_exits_2_before_running(self, option, tmp_path, capsys) -> None:
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        cases = [(blocker / "out.json", f"`{blocker}` is a file, not a folder", "give a path in a writable folder"),
                 (blocker / "deeper" / "out.json", f"`{blocker}` is a file, not a folder", "writable folder"),
                 (tmp_path, "is a directory", "give a file path such as")]
        for target, reason, fix in cases:
            # the factory would exit 1 (proj under no_grad): 2 proves the path was checked first
            status = main([f"--factory={FACTORIES}:proj_under_no_grad", option, str(target), "--quiet"])
            assert status == EXIT_CANNOT_RUN
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{option} `{target}`" in err[0] and reason in err[0] and fix in err[0]

    def test_writable_output_paths_are_created(self, tmp_path, capsys) -> None:
        target = tmp_path / "new" / "deeper" / "r.json"
        assert main([f"--factory={FACTORIES}:healthy", "--json", str(target), "--quiet"]) == EXIT_OK
        assert json.loads(target.read_text())["status"] == "ok"

    def test_graph_writes_dot(self, tmp_path, capsys) -> None:
        target = tmp_path / "g.svg"
        assert main([f"--factory={FACTORIES}:proj_under_no_grad", "--graph", str(target), "--quiet"]) == EXIT_FINDINGS
        dot = (tmp_path / "g.dot").read_text()
        assert '"proj"' in dot and "#fb6a4a" in dot  # proj is broken: red
        if shutil.which("dot"):
            assert target.read_text().lstrip().startswith(("<?xml", "<svg"))


class TestJsonOnStdout:
    """``--json -``: stdout is the JSON alone, whatever the model's libraries print."""

    def test_prints_of_the_model_go_to_stderr(self, capsys) -> None:
        assert main([f"--factory={FACTORIES}:chatty", "--json", "-", "--quiet"]) == EXIT_OK
        captured = capsys.readouterr()
        assert json.loads(captured.out)["status"] == "ok"
        assert "chatty library: building the model" in captured.err
        assert "chatty library: forward called" in captured.err

    def test_without_json_stdout_keeps_them(self, capsys) -> None:
        assert main([f"--factory={FACTORIES}:chatty", "--quiet"]) == EXIT_OK
        out = capsys.readouterr().out
        assert "chatty library: forward called" in out and "status: OK" in out

    @pytest.mark.slow
    @pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed installed")
    def test_with_deepspeed_installed_stdout_is_still_valid_json(self) -> None:
        # DeepSpeed logs "Setting accelerator to ..." to stdout when transformers imports it.
        result = _cli("--json", "-", "--quiet")
        assert result.returncode == EXIT_OK, result.stderr
        assert json.loads(result.stdout)["status"] == "ok"
        assert "accelerator" in result.stderr.lower()


class TestSubprocess:
    def test_factory_exit_codes_and_help(self, tmp_path) -> None:
        ok = _cli(f"--factory={FACTORIES}:healthy", "--json", str(tmp_path / "ok.json"))
        assert ok.returncode == EXIT_OK, ok.stderr
        assert json.loads((tmp_path / "ok.json").read_text())["status"] == "ok"
        assert "[grad_flow" in ok.stderr  # progress lines
        bad = _cli(f"--factory={FACTORIES}:proj_under_no_grad", "--quiet")
        assert bad.returncode == EXIT_FINDINGS and "[grad_disabled]" in bad.stdout
        from diagnostics.grad_flow import build_parser

        help_text = build_parser().format_help()
        assert "exit status" in help_text and "reentrant_checkpoint" in help_text and "--factory" in help_text

    def test_crashes_are_not_findings(self, tmp_path) -> None:
        """A bad --device and an unwritable --json: exit 2, one line, no traceback."""
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        for args in (["--device", "tpu:0"], ["--json", str(blocker / "r.json")]):
            result = _cli(f"--factory={FACTORIES}:healthy", "--quiet", *args)
            assert result.returncode == EXIT_CANNOT_RUN, result.stderr
            assert "Traceback" not in result.stderr
            assert len([line for line in result.stderr.splitlines() if line.startswith("grad_flow:")]) == 1

    def test_missing_dot_message(self, tmp_path) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        os.symlink(sys.executable, bin_dir / "python")
        env = {**os.environ, "PATH": str(bin_dir)}
        result = _cli(f"--factory={FACTORIES}:healthy", "--graph", str(tmp_path / "g.svg"), "--quiet", env=env)
        assert result.returncode == EXIT_OK, result.stderr
        assert (tmp_path / "g.dot").exists() and not (tmp_path / "g.svg").exists()
        assert "apt-get install graphviz" in result.stderr
