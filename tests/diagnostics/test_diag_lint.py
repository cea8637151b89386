"""Static scan (python -m diagnostics.lint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import zoo
from diagnostics.lint import lint_file, main
from diag_helpers import line_of

ZOO = Path(zoo.__file__)


def _by_line(findings):
    return {(f.line, f.kind): f for f in findings}


class TestLintZoo:
    def test_severities(self) -> None:
        found = _by_line(lint_file(ZOO))
        encoder_only = found[(line_of(zoo.MemLike.embed_history, "with torch.no_grad()"), "grad_disabled")]
        assert encoder_only.severity == "info"
        proj_inside = found[(line_of(zoo.ProjUnderNoGrad.embed_history, "with torch.no_grad()"), "grad_disabled")]
        assert proj_inside.severity == "warning" and "self.proj" in proj_inside.message
        detach = found[(line_of(zoo.DetachedVisionEmbeds.embed_history, ".detach()"), "detached")]
        assert detach.severity == "warning"
        data = found[(line_of(zoo.DataAttribute.embed_history, ".data"), "detached")]
        assert data.severity == "warning"
        switch = found[(line_of(zoo.SetGradEnabledOff.embed_history, "set_grad_enabled(False)"), "grad_disabled")]
        assert switch.severity == "warning"

    def test_detach_not_flowing_to_output_is_info(self, tmp_path) -> None:
        source = tmp_path / "m.py"
        source.write_text(
            "import torch\n"
            "class M(torch.nn.Module):\n"
            "    def forward(self, x):\n"
            "        stat = x.detach().mean()\n"
            "        self.last = stat\n"
            "        return self.helper(x)\n"
            "    def helper(self, x):\n"
            "        with torch.no_grad():\n"
            "            y = self.proj(x)\n"
            "        return y\n"
        )
        findings = lint_file(source)
        assert [(f.line, f.severity, f.kind) for f in findings] == [
            (4, "info", "detached"),
            (8, "warning", "grad_disabled"),
        ]

    def test_library_decorator(self, fake_site) -> None:
        import fake_ocr_encoder

        findings = lint_file(fake_ocr_encoder.__file__)
        assert findings[0].severity == "warning" and "inference_mode" in findings[0].message


class TestLintCli:
    def test_exit_1_and_text_format(self, capsys) -> None:
        assert main([str(ZOO)]) == 1
        out = capsys.readouterr().out
        line = line_of(zoo.ProjUnderNoGrad.embed_history, "with torch.no_grad()")
        assert any(l.endswith(f"zoo.py:{line}: warning: " + l.split(": warning: ", 1)[-1]) for l in out.splitlines())

    def test_json_and_exit_0(self, tmp_path, capsys) -> None:
        clean = tmp_path / "clean.py"
        clean.write_text("import torch\nclass M(torch.nn.Module):\n    def forward(self, x):\n        return x * 2\n")
        assert main([str(clean), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"version": 2, "findings": [], "errors": [], "skipped": []}

    def test_missing_path_exit_2(self, tmp_path) -> None:
        assert main([str(tmp_path / "nope.py")]) == 2

    def test_subprocess(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "diagnostics.lint", str(ZOO)],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=60,
        )
        assert result.returncode == 1 and ": warning: " in result.stdout
        assert "RuntimeWarning" not in result.stderr


def test_subclass_inheriting_forward_from_another_file_is_scanned(tmp_path) -> None:
    # class Mine(ModelFromElsewhere) overrides a method the inherited forward calls.
    source = tmp_path / "mine.py"
    source.write_text(
        "import torch\n"
        "from ocrmem import MEMModel\n\n"
        "class Mine(MEMModel):\n"
        "    def embed_pages(self, pixel_values):\n"
        "        with torch.no_grad():\n"
        "            return self.proj(self.ocr_embed(pixel_values))\n"
    )
    found = [f for f in lint_file(source) if f.kind == "grad_disabled"]
    assert [(f.line, f.severity) for f in found] == [(6, "warning")] and "self.proj" in found[0].message


def test_own_model_code_has_no_warnings() -> None:
    root = Path(__file__).resolve().parents[2]
    warnings = [f for f in lint_file(root / "ocrmem" / "modeling.py") if f.severity != "info"]
    assert warnings == []


BUG = (
    "import torch\n"
    "class M(torch.nn.Module):\n"
    "    def forward(self, x):\n"
    "        with torch.no_grad():\n"
    "            return self.proj(x)\n"
)
BUG_LINE = 4


class TestFilesLintCannotRead:
    """A file lint cannot parse is an error naming file:line, never a clean result."""

    def _bug(self, tmp_path) -> Path:
        path = tmp_path / "bug.py"
        path.write_text(BUG)
        return path

    def test_syntax_error_beside_a_bug(self, tmp_path, capsys) -> None:
        broken = tmp_path / "broken.py"
        broken.write_text("import torch\n\ndef f(:\n    pass\n")
        assert main([str(broken), str(self._bug(tmp_path))]) == 2
        out, err = capsys.readouterr()
        assert f"bug.py:{BUG_LINE}: warning: " in out  # the other file is still scanned and printed
        assert "broken.py:3: invalid syntax" in err and "nothing in this file was checked" in err
        assert len(err.strip().splitlines()) == 1

    def test_nul_bytes(self, tmp_path, capsys) -> None:
        binary = tmp_path / "blob.py"
        binary.write_bytes(b"import torch\nx = 1\n\x00\x01\x02")
        assert main([str(binary)]) == 2
        assert "blob.py:3: binary content" in capsys.readouterr().err

    def test_undecodable_text_names_the_line(self, tmp_path, capsys) -> None:
        latin = tmp_path / "latin.py"
        latin.write_bytes(b"x = 1\ny = 2\nname = '\xe9t\xe9'\n")
        assert main([str(latin)]) == 2
        err = capsys.readouterr().err
        assert "latin.py:3: not valid utf-8 (byte 0xe9)" in err and "coding" in err

    def test_bom_is_scanned(self, tmp_path, capsys) -> None:
        bom = tmp_path / "bom.py"
        bom.write_bytes(b"\xef\xbb\xbf" + BUG.encode())
        assert main([str(bom)]) == 1
        assert f"bom.py:{BUG_LINE}: warning: " in capsys.readouterr().out

    def test_encoding_cookie_is_honoured(self, tmp_path, capsys) -> None:
        latin = tmp_path / "cookie.py"
        latin.write_bytes(b"# -*- coding: latin-1 -*-\n# caf\xe9\n" + BUG.encode())
        assert main([str(latin)]) == 1
        assert f"cookie.py:{BUG_LINE + 2}: warning: " in capsys.readouterr().out

    def test_library_api_raises(self, tmp_path) -> None:
        from diagnostics.lint import UnparsableSourceError, lint_paths

        broken = tmp_path / "broken.py"
        broken.write_text("def f(:\n")
        with pytest.raises(UnparsableSourceError) as info:
            lint_file(broken)
        assert (info.value.line, info.value.reason) == (1, "invalid syntax")
        with pytest.raises(UnparsableSourceError, match="broken.py:1"):
            lint_paths([self._bug(tmp_path), broken])

    def test_json_lists_errors_and_skips(self, tmp_path, capsys) -> None:
        broken = tmp_path / "broken.py"
        broken.write_text("x = (\n")
        notes = tmp_path / "notes.txt"
        notes.write_text("not python")
        assert main([str(broken), str(notes), str(self._bug(tmp_path)), "--json"]) == 2
        report = json.loads(capsys.readouterr().out)
        assert report["version"] == 2
        assert [(f["line"], f["severity"]) for f in report["findings"]] == [(BUG_LINE, "warning")]
        assert [(Path(e["file"]).name, e["line"]) for e in report["errors"]] == [("broken.py", 1)]
        assert [Path(s["file"]).name for s in report["skipped"]] == ["notes.txt"]


class TestPathsLintSkips:
    def test_explicit_non_python_file_is_skipped_with_a_note(self, tmp_path, capsys) -> None:
        readme = tmp_path / "README.md"
        readme.write_text("# hello\n")
        assert main([str(readme), str(tmp_path / "clean.py")]) == 2  # clean.py is missing
        err = capsys.readouterr().err
        assert "note: skipped" in err and "README.md: not a Python file" in err
        assert "clean.py: no such file or directory" in err

    def test_only_non_python_files_is_exit_2(self, tmp_path, capsys) -> None:
        readme = tmp_path / "README.md"
        readme.write_text("# hello\n")
        assert main([str(readme)]) == 2
        assert "no Python file among the paths given" in capsys.readouterr().err

    def test_script_with_python_shebang_is_scanned(self, tmp_path, capsys) -> None:
        script = tmp_path / "train"
        script.write_text("#!/usr/bin/env python3\n" + BUG)
        assert main([str(script)]) == 1
        assert f"train:{BUG_LINE + 1}: warning: " in capsys.readouterr().out

    def test_directory_notes_non_python_files_and_skips_hidden(self, tmp_path, capsys) -> None:
        (tmp_path / "pkg").mkdir()
        (tmp_path / "pkg" / "model.py").write_text(BUG)
        (tmp_path / "pkg" / "weights.bin").write_bytes(b"\x00" * 8)
        (tmp_path / "pkg" / ".venv").mkdir()
        (tmp_path / "pkg" / ".venv" / "broken.py").write_text("def f(:\n")
        assert main([str(tmp_path / "pkg")]) == 1
        out, err = capsys.readouterr()
        assert f"model.py:{BUG_LINE}: warning: " in out
        assert "1 non-Python file(s) not scanned (weights.bin)" in err and "broken" not in err


def test_cli_never_prints_a_traceback_and_help_needs_no_torch(tmp_path) -> None:
    root = Path(__file__).resolve().parents[2]
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    for args in ([str(tmp_path / "missing.py")], [str(broken)], [str(tmp_path)], ["--bogus"]):
        result = subprocess.run(
            [sys.executable, "-m", "diagnostics.lint", *args],
            capture_output=True, text=True, cwd=root, timeout=60,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
    help_run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "diagnostics.lint", "--help"],
        capture_output=True, text=True, cwd=root, timeout=60,
    )
    assert help_run.returncode == 0 and "exit status:" in help_run.stdout
    imported = [line for line in help_run.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not [line for line in imported if "torch" in line]
