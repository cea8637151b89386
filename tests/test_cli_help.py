"""Every CLI answers ``--help`` (and its cheap argument errors) without importing torch.

torch + transformers cost 5-20 s to import on a loaded CPU box; a user typing ``--help`` or a
typo should not wait for them. Checked the way a user runs the command: ``python -X
importtime -m MODULE --help`` in a fresh interpreter, reading which modules it imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = ["diagnostics.grad_flow", "diagnostics.lint", "ocrmem.tiny", "ocrmem.presets", "ocrmem.train"]
HEAVY = ("torch", "transformers", "numpy", "PIL")


def _run(*args: str, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime ARGS``; return the result and the top-level packages imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
    )
    imported = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            imported.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "ocrmem" in imported or "diagnostics" in imported, result.stderr[-2000:]  # the parse saw the run
    return result, imported


@pytest.mark.parametrize("module", CLIS)
def test_help_does_not_import_torch(module: str) -> None:
    result, imported = _run("-m", module, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: python -m" in result.stdout and "exit" in result.stdout  # exit codes are documented
    assert not imported & set(HEAVY), f"{module} --help imported {sorted(imported & set(HEAVY))}"


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["-m", "diagnostics.grad_flow", "/no/such/model_dir"], "does not exist"),
        (["-m", "diagnostics.grad_flow", "--factory", "no_colon"], "FILE.py:FUNC"),
        (["-m", "diagnostics.grad_flow", "--batches", "0"], "--batches must be >= 1"),
        (["-m", "diagnostics.grad_flow", "--data", "tests"], "--data `tests` is a directory; give a JSONL file"),
        (["-m", "ocrmem.presets", "--vision-embedding-size", "-3"], "must be >= 1"),
        (["-m", "ocrmem.tiny", "--seed", "x", "DIR"], "invalid int value"),
    ],
)
def test_argument_errors_exit_2_before_torch_is_imported(argv: list[str], reason: str) -> None:
    result, imported = _run(*argv)
    assert result.returncode == 2
    messages = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert reason in messages[-1] and not any("Traceback" in line for line in messages)
    assert "torch" not in imported


def test_importing_the_packages_does_not_import_torch() -> None:
    result, imported = _run("-c", "import ocrmem, diagnostics, diagnostics.causes, diagnostics.grad_flow")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_the_lazy_public_api_still_works() -> None:
    import diagnostics
    import diagnostics.engine
    import ocrmem
    import ocrmem.modeling
    from diagnostics import diagnose
    from ocrmem import MEMModel

    assert MEMModel is ocrmem.modeling.MEMModel and diagnose is diagnostics.engine.diagnose
    assert {"MEMModel", "MEMOutput", "MEMConfig"} <= set(dir(ocrmem)) and "merge_reports" in dir(diagnostics)
    for package in (ocrmem, diagnostics):
        assert all(hasattr(package, name) for name in package.__all__), package.__name__
        with pytest.raises(AttributeError, match="NoSuchName"):
            package.NoSuchName  # noqa: B018
