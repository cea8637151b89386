"""The MEMModel adapter (skipped when ocrmem.modeling is not importable)."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ocrmem") is None or importlib.util.find_spec("ocrmem.modeling") is None,
    reason="ocrmem.modeling is not importable",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    try:
        from ocrmem.tiny import write_tiny
    except ImportError as exc:  # the lead is still building it
        pytest.skip(f"ocrmem.tiny not importable: {exc}")
    return write_tiny(tmp_path_factory.mktemp("mem") / "tiny")


class TestMemAdapter:
    def test_load_and_diagnose_tiny(self, tiny_dir) -> None:
        from diagnostics import diagnose
        from diagnostics.mem_adapter import load_model_dir

        model, batches, expect, triage = load_model_dir(tiny_dir, n_batches=2)
        assert expect[0] == "proj" and len(batches) == 2
        assert not [f for f in triage if f.severity == "error"]
        report = diagnose(model, batches[0], expect)
        assert report.status == "ok", report.to_text()
        assert any(p.startswith("loss ←") and "proj (trainable)" in p for p in report.paths)

    def test_cli_on_model_dir(self, tiny_dir, tmp_path, capsys) -> None:
        from diagnostics.grad_flow import main

        code = main([str(tiny_dir), "--batches", "2", "--json", str(tmp_path / "r.json"), "--quiet"])
        assert code == 0, capsys.readouterr()
        data = json.loads((tmp_path / "r.json").read_text())
        assert data["version"] == 2 and len(data["batches"]) == 2
