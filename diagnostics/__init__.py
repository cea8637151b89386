"""Gradient-flow and parameter diagnostics for any ``nn.Module`` + batch.

    from diagnostics import diagnose, assert_grad_flow
    report = diagnose(model, batch, expect_trainable=["proj"])
    print(report.to_text())

Command lines: ``python -m diagnostics.grad_flow`` (runtime diagnosis) and
``python -m diagnostics.lint`` (static scan). The package never imports ``ocrmem``
except in :mod:`diagnostics.mem_adapter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Every name is loaded on first use: `python -m diagnostics.lint --help` (and the other
# CLIs' --help) must not pay for importing torch, and runpy warns when a `-m` module
# was imported by its package before execution.
_LAZY: dict[str, str] = {
    "assert_grad_flow": "assertions",
    "CAUSES": "causes",
    "Finding": "causes",
    "diagnose": "engine",
    "extract_loss": "engine",
    "run_forward": "engine",
    "CannotRunError": "errors",
    "DiagnosticsError": "errors",
    "FactoryError": "errors",
    "LossNotFoundError": "errors",
    "FreezeWatch": "freeze",
    "static_freeze_sites": "freeze",
    "LintFinding": "lint",
    "lint_file": "lint",
    "lint_paths": "lint",
    "LoadTriage": "load_triage",
    "TriageFinding": "load_triage",
    "classify_message": "load_triage",
    "ParameterTable": "params",
    "check_expectations": "params",
    "parameter_table": "params",
    "Report": "report",
    "merge_reports": "report",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .assertions import assert_grad_flow
    from .causes import CAUSES, Finding
    from .engine import diagnose, extract_loss, run_forward
    from .errors import CannotRunError, DiagnosticsError, FactoryError, LossNotFoundError
    from .freeze import FreezeWatch, static_freeze_sites
    from .lint import LintFinding, lint_file, lint_paths
    from .load_triage import LoadTriage, TriageFinding, classify_message
    from .params import ParameterTable, check_expectations, parameter_table
    from .report import Report, merge_reports


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CAUSES",
    "CannotRunError",
    "DiagnosticsError",
    "FactoryError",
    "Finding",
    "FreezeWatch",
    "LintFinding",
    "LoadTriage",
    "LossNotFoundError",
    "ParameterTable",
    "Report",
    "TriageFinding",
    "assert_grad_flow",
    "check_expectations",
    "classify_message",
    "diagnose",
    "extract_loss",
    "lint_file",
    "lint_paths",
    "merge_reports",
    "parameter_table",
    "run_forward",
    "static_freeze_sites",
]
