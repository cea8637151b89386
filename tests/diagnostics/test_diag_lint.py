"""Static scan (python -m diagnostics.lint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
